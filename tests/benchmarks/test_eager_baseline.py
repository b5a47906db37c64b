"""benchmarks/cuda_host/eager.py, the PyTorch eager baseline of the GPU runs (issue #19),
computes the model it claims to: its steps against the numpy LLaMA on the same weights."""

import importlib.util
import os

import numpy as np
import pytest

from hetcomp.frontend.config import LlamaConfig
from hetcomp.testing import numpy_llama as ref

torch = pytest.importorskip("torch")
_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "cuda_host",
                     "eager.py")
_spec = importlib.util.spec_from_file_location("eager", _PATH)
eager = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eager)

CFG = {"hidden": 48, "ffn": 80, "layers": 2, "heads": 6, "kv_heads": 2, "head_dim": 8,
       "vocab": 97, "rope_theta": 10000.0, "eps": 1e-5}


def _numpy_weights(w: dict) -> dict:
    """eager's fused weights in the loader's names (what numpy_llama reads)."""
    e, d = CFG["hidden"], CFG["head_dim"]
    out = {"embed": w["embed"].numpy(), "norm": w["norm"].numpy()}
    for i in range(CFG["layers"]):
        p = f"layers.{i}."
        wq, wk, wv = np.split(w[f"{i}.wqkv"].numpy(),
                              np.cumsum([CFG["heads"] * d, CFG["kv_heads"] * d]))
        gate, up = np.split(w[f"{i}.w_gate_up"].numpy(), 2)
        out.update({p + "attn_norm": w[f"{i}.attn_norm"].numpy(), p + "wq": wq, p + "wk": wk,
                    p + "wv": wv, p + "wo": w[f"{i}.wo"].numpy(),
                    p + "ffn_norm": w[f"{i}.ffn_norm"].numpy(), p + "w_gate": gate,
                    p + "w_up": up, p + "w_down": w[f"{i}.w_down"].numpy()})
        assert wq.shape == (CFG["heads"] * d, e)
    return out


def test_eager_steps_match_the_numpy_llama():
    w = eager.random_weights(CFG, "cpu", torch.float32, seed=3)
    for k in ("norm", "0.attn_norm"):  # non-trivial norms
        w[k] = w[k] + torch.linspace(-0.3, 0.3, CFG["hidden"])
    cfg = LlamaConfig(hidden_size=CFG["hidden"], intermediate_size=CFG["ffn"],
                      num_layers=CFG["layers"], num_heads=CFG["heads"],
                      num_kv_heads=CFG["kv_heads"], vocab_size=CFG["vocab"],
                      rope_theta=CFG["rope_theta"], norm_eps=CFG["eps"], head_dim=CFG["head_dim"])
    tokens = [5, 17, 3, 60, 2, 41, 9]
    expected, _ = ref.forward(cfg, _numpy_weights(w), tokens)
    shape = (CFG["layers"], CFG["kv_heads"], 16, CFG["head_dim"])
    kc, vc = torch.zeros(shape), torch.zeros(shape)
    with torch.inference_mode():
        first = eager.step(w, CFG, torch.tensor(tokens[:4]), kc, vc, 0)  # a 4-row chunk
        rest = eager.step(w, CFG, torch.tensor(tokens[4:]), kc, vc, 4)  # 3 rows on the cache
    got = torch.cat([first, rest]).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_eager_bench_reports_steps_and_decode(monkeypatch):
    """Its steps and decode are timed with the cyclic collector paused, as hetcomp's are."""
    import gc

    real_step, collector = eager.step, []

    def step(*args):
        collector.append(gc.isenabled())
        return real_step(*args)

    monkeypatch.setattr(eager, "step", step)
    res = eager.bench(CFG, "cpu", "float32", widths=(1, 4), cache_len=8, new_tokens=4,
                      repeat=2)
    assert len(collector) == 2 * 3 + 4 and not any(collector) and gc.isenabled()
    assert set(res["step_ms"]) == {"1", "4"} and all(v > 0 for v in res["step_ms"].values())
    assert res["tokens_per_s"] > 0
