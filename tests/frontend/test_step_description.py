"""The step model the planner costs lists exactly the kernels the compiled verify calls."""

from collections import Counter

import pytest
import tvm

from hetcomp.cost.roofline import ModelShape, model_step
from hetcomp.frontend import llama
from hetcomp.kernels.ops import OP_KIND
from hetcomp.passes import FuseLinearChains
from hetcomp.testing import TINY, TINY_GEMMA3, TINY_QWEN2


def _called_kernels(mod, fn: str) -> Counter:
    """Kernel name stems (``_w{W}`` dropped) called by ``fn``, with their call counts."""
    calls = Counter()

    def visit(e):
        if isinstance(e, tvm.relax.Call) and e.args and isinstance(e.args[0], tvm.ir.GlobalVar):
            func = mod[e.args[0]]
            if isinstance(func, tvm.tirx.PrimFunc) and OP_KIND in func.attrs:
                calls[e.args[0].name_hint.split("_w")[0]] += 1

    tvm.relax.analysis.post_order_visit(mod[fn].body, visit)
    return calls


def _step_kernels(shape: ModelShape, w: int, device_len: bool = False,
                  fused: bool = False) -> Counter:
    """The same stems from :func:`model_step` (linear kinds by their shapes; ``fused``: the
    qkv and gate_up kernels' names after FuseLinearChains)."""
    stems = {"rope": "rope_kv", "attention_sparse": "sparse_tree_attention"}
    tags = {"qkv": "_norm_bias" if shape.qkv_bias else "_norm",
            "gate_up": f"_norm_{shape.activation}"} if fused else {}
    out = Counter()
    for op in model_step(shape, w, 64, device_len=device_len, fused_linears=fused):
        if op.features.op == "linear":
            n, k, residual = shape.linear_dims(op.split)
            stem = f"linear{tags.get(op.split, '')}{'_res' if residual else ''}_n{n}_k{k}"
        else:
            stem = stems.get(op.name, op.name)
        out[stem] += op.count
    return out


@pytest.mark.parametrize("w", [1, 2, 4, 16])
@pytest.mark.parametrize("cfg", [TINY, TINY_QWEN2, TINY_GEMMA3], ids=["llama", "qwen2", "gemma3"])
def test_model_step_is_what_verify_runs(w, cfg):
    if cfg.sliding_window and w > cfg.sliding_window:
        pytest.skip("tree wider than the window (build_module refuses it)")
    mod = llama.build_module(cfg, static_widths=(w,))
    assert _step_kernels(ModelShape.from_config(cfg), w) == _called_kernels(mod, f"verify_w{w}")


@pytest.mark.parametrize("w", [1, 4])
@pytest.mark.parametrize("cfg", [TINY, TINY_GEMMA3], ids=["llama", "gemma3"])
def test_model_step_is_what_the_cuda_graph_build_runs(w, cfg):
    """The build for CUDA graphs (``device_len``): the input copy, one attention kernel at
    every width, RoPE inside it (no ``rope_kv``)."""
    mod = llama.build_module(cfg, static_widths=(w,), device_len=True)
    called = _called_kernels(mod, f"verify_w{w}")
    assert called["tree_attention"] == cfg.num_layers and called["stage_tree"] == 1
    assert "rope_kv" not in called
    assert _step_kernels(ModelShape.from_config(cfg), w, device_len=True) == called


@pytest.mark.parametrize("w", [1, 4])
@pytest.mark.parametrize("cfg", [TINY, TINY_QWEN2, TINY_GEMMA3], ids=["llama", "qwen2", "gemma3"])
def test_model_step_is_what_the_fused_gpu_build_runs(w, cfg):
    """A whole-model GPU build's step: the CUDA-graph build after FuseLinearChains (the
    layers' norms and activation inside the qkv and gate_up kernels)."""
    mod = FuseLinearChains()(llama.build_module(cfg, static_widths=(w,), device_len=True))
    called = _called_kernels(mod, f"verify_w{w}")
    assert called["rms_norm"] == 1
    assert _step_kernels(ModelShape.from_config(cfg), w, device_len=True, fused=True) == called
