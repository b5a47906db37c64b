"""Test and tutorial helpers: tiny models, an independent numpy LLaMA (:mod:`.numpy_llama`), a
GGUF writer as llama.cpp's converter writes (:mod:`.gguf_writer`). Not used by the compiler."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from tokenizers.pre_tokenizers import ByteLevel

from ..driver.compile import CompileOptions, compile_model
from ..frontend.config import LlamaConfig
from ..frontend.weights import random_weights
from ..runtime.generate import generate

TINY = LlamaConfig(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                   num_kv_heads=2, vocab_size=320, max_context=128, rope_theta=10000.0)
# Qwen2's shape in miniature: q/k/v biases, an untied LM head, a large RoPE base.
TINY_QWEN2 = LlamaConfig(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=2, vocab_size=320, max_context=128, rope_theta=1e6,
                         norm_eps=1e-6, tie_embeddings=False, qkv_bias=True)
# Gemma 3's shape in miniature: scaled embedding, q/k norms, post-norms, GeGLU, one KV head
# with a wide head_dim, and sliding-window layers (window 8; as llama.cpp derives for a gemma3
# GGUF, every 6th layer global and a local RoPE base of 10000), so that a context of a few
# dozen tokens runs past the window.
TINY_GEMMA3 = LlamaConfig(hidden_size=64, intermediate_size=96, num_layers=6, num_heads=4,
                          num_kv_heads=1, vocab_size=320, max_context=128, rope_theta=1e6,
                          norm_eps=1e-6, head_dim=32, embed_scale=8.0, qk_norm=True,
                          post_norms=True, activation="gelu_tanh", sliding_window=8,
                          sliding_pattern=6, rope_local_theta=10000.0)

# A ChatML template (SmolLM2's shape, without its default system turn) for tiny models.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer_spec(vocab_size: int, chat_template: str | None = None) -> dict:
    """A byte-level BPE vocabulary with no merges, padded to ``vocab_size`` (tiny models)."""
    alphabet = sorted(ByteLevel.alphabet())
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + alphabet
    tokens += [f"<extra_{i}>" for i in range(vocab_size - len(tokens))]
    types = [3, 3, 3] + [1] * (vocab_size - 3)
    return {"model": "gpt2", "pre": "default", "tokens": tokens, "merges": [],
            "token_type": types, "eos_token_id": 2, "bos_token_id": 1,
            "add_bos_token": False, "chat_template": chat_template}


def tree_mask(parents):
    """Ancestor-or-self mask of a tree given each node's parent (-1 for the root)."""
    w = len(parents)
    m = np.zeros((w, w), "int32")
    for i in range(w):
        j = i
        while j >= 0:
            m[i, j] = 1
            j = parents[j]
    return m


def full_mask(prompt_len: int, tree) -> np.ndarray:
    """``[T + W, T + W]`` attention mask of a prompt of ``prompt_len`` tokens (causal) followed
    by a tree (``tree``: its ancestor-or-self mask) that sees the whole prompt: what the numpy
    model is given to check a verify step after a prefill."""
    t, w = prompt_len, len(tree)
    m = np.zeros((t + w, t + w), bool)
    m[:t, :t] = np.tril(np.ones((t, t), bool))
    m[t:, :t] = True
    m[t:, t:] = np.asarray(tree).astype(bool)
    return m


def depths(parents):
    d = []
    for p in parents:
        d.append(0 if p < 0 else d[p] + 1)
    return np.array(d)


def fused_linear_reference(x, w, gamma=None, eps=None, activation=None, bias=None):
    """numpy (float64) of a fused linear (``ops.linear``/``quant.linear_quant``'s fused
    forms): RMSNorm of x (with ``gamma``, ``eps``), ``x @ w.T`` (``w[n, k]``), then
    ``act(gate) * up`` of the ``[gate | up]`` columns or ``+ bias``."""
    h = x.astype(np.float64)
    if gamma is not None:
        h = h / np.sqrt((h * h).mean(axis=1, keepdims=True) + eps) * gamma
    y = h @ w.astype(np.float64).T
    if activation is None:
        return y + bias if bias is not None else y
    gate, up = np.split(y, 2, axis=1)
    if activation == "silu":
        return gate / (1 + np.exp(-gate)) * up
    u = np.sqrt(2 / np.pi) * (gate + 0.044715 * gate ** 3)
    return 0.5 * gate * (1 + np.tanh(u)) * up


def compile_tiny(tmp_path_factory, cfg=TINY, dtype="float32", seed=0, name="tiny", scale=0.08,
                 **options):
    """Compile a random model of ``cfg`` into a fresh folder of pytest's ``tmp_path_factory``
    (``scale``: the weights' standard deviation; at the default a tiny model's greedy choice
    mostly repeats its input token; ``options``: more :class:`CompileOptions` fields); returns
    (artifact path, float32 weights)."""
    w = random_weights(cfg, seed=seed, scale=scale)
    out = tmp_path_factory.mktemp(name) / "art"
    compile_model(CompileOptions(model="tiny.gguf", dtype=dtype, max_context=cfg.max_context,
                                 **options),
                  str(out), quiet=True, weights=(cfg, w, byte_tokenizer_spec(cfg.vocab_size),
                                                  __file__))
    return str(out), w


def compile_tiny_cuda(out: str, dtype: str = "float16", **options) -> dict:
    """``compile --target cuda`` of :data:`TINY` with random weights (seed 3) into ``out``
    (``options``: more :class:`CompileOptions` fields); returns its manifest."""
    from ..artifact_format import read_manifest

    compile_model(CompileOptions(model="tiny.gguf", dtype=dtype, target="cuda", max_context=64,
                                 **options), out, quiet=True,
                  weights=(TINY, random_weights(TINY, seed=3),
                           byte_tokenizer_spec(TINY.vocab_size), __file__))
    return read_manifest(out)


def compile_with_random_heads(tmp, model: str, cfg: LlamaConfig, widths, heads: int = 2,
                              **options):
    """Compile the model file ``model`` into ``tmp/art`` with ``heads`` untrained Medusa heads
    (seed 0, falling rank probabilities) and verify functions for ``widths`` (``options``:
    more :class:`CompileOptions` fields); returns the artifact folder."""
    from ..speculative.medusa import MedusaHeads

    e = cfg.hidden_size
    rng = np.random.default_rng(0)
    MedusaHeads(w=(rng.standard_normal((heads, e, e)) * 0.05).astype("float32"),
                b=np.zeros((heads, e), "float32"),
                rank_probs=np.tile(np.linspace(0.5, 0.05, 10), (heads, 1)), info={}
                ).save(str(tmp / "heads.npz"))
    compile_model(CompileOptions(model=model, heads=str(tmp / "heads.npz"), widths=widths,
                                 max_context=cfg.max_context, **options), str(tmp / "art"),
                  quiet=True)
    return str(tmp / "art")


def packaged_heads_artifact(out: str, name: str, width: int, max_context: int):
    """The registered model ``name`` compiled into ``out`` in float16 with its packaged
    Medusa heads (the registry's default, checked to be its entry's file) and the one
    speculative ``width``; returns the loaded artifact."""
    from ..data import packaged_file
    from ..frontend import models
    from ..runtime import load_artifact

    heads = models.default_heads(name)
    assert heads == packaged_file(models.MODELS[name].heads)
    compile_model(CompileOptions(model=name, dtype="float16", max_context=max_context,
                                 heads=heads, widths=(width,)), out, quiet=True)
    return load_artifact(out)


def compile_fused(tmp, model: str, cfg: LlamaConfig, widths, kernels: set[str]):
    """:func:`compile_with_random_heads` as a GPU build's module is (the CUDA-graph build,
    its norms and activations inside the linears: FuseLinearChains), to run on the CPU;
    checks that the widest verify calls ``kernels`` (the fused ones, and what stays apart)
    and returns the loaded artifact."""
    from ..runtime import load_artifact

    art = load_artifact(compile_with_random_heads(tmp, model, cfg, widths, device_len=True,
                                                  fuse_linears=True))
    fn = f"verify_w{max(widths)}"
    called = {k["name"] for k in art.manifest["kernels"] if k["function"] == fn}
    assert kernels <= called, sorted(called)
    return art


def run_cli(*args, **kwargs):
    """``hetcomp ARGS`` in a fresh process: (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "hetcomp", *map(str, args)], capture_output=True,
                       text=True, timeout=600, check=False, **kwargs)
    return p.returncode, p.stdout, p.stderr


def edit_manifest(art_dir: str, edit) -> None:
    """Apply ``edit(manifest)`` to an artifact's manifest and seal it again (its digest
    recomputed), as a build that wrote those values would have."""
    import json
    import os

    from ..artifact_format import manifest_digest

    path = os.path.join(art_dir, "manifest.json")
    with open(path) as fh:
        manifest = json.load(fh)
    edit(manifest)
    manifest["digest"] = manifest_digest(manifest)
    with open(path, "w") as fh:
        json.dump(manifest, fh, indent=1)


def lacking_cpu_feature() -> str | None:
    """An instruction-set extension (LLVM's name) this CPU lacks, that the loaders check;
    None where it has them all or its flags are unknown."""
    import platform

    from ..hardware import CPU_FEATURE_FLAGS, machine_cpu_flags

    flags = machine_cpu_flags()
    known = CPU_FEATURE_FLAGS.get(platform.machine(), {})
    return next((f for f, flag in known.items() if flags is not None and flag not in flags),
                None)


def host_linear_rule() -> str:
    """The rule that schedules the float linears of a ``--target host`` build here:
    ``x86.Linear`` on an x86 CPU with AVX-512 or AVX2+FMA, else ``cpu.Linear``."""
    from ..codegen.targets import make_target
    from ..schedules.x86 import LinearRule

    return "x86.Linear" if LinearRule().tile(make_target("host"), 1) else "cpu.Linear"


def host_quant_linear_rule() -> str:
    """The rule of the quantized linears of a ``--target host`` build here: the int8-dot
    kernel's where the CPU has one (``x86.Int8DotLinear``, ``arm.Int8DotLinear``), else
    :func:`host_float_quant_linear_rule`'s."""
    from ..codegen.targets import make_target
    from ..schedules.int8_dot import int8_dot_isa

    isa = int8_dot_isa(make_target("host"))
    return isa.rule if isa is not None else host_float_quant_linear_rule()


def host_float_quant_linear_rule() -> str:
    """The rule of a ``--target host`` build's quantized linears on float FMAs (no int8 dot
    product, or ``--no-int8-dot``): ``x86.QuantLinear`` on x86 with AVX2, ``arm.QuantLinear``
    on NEON, else ``cpu.QuantLinear``."""
    from ..codegen.targets import make_target
    from ..schedules import arm, x86

    target = make_target("host")
    for rule in (x86.QuantLinearRule(), arm.QuantLinearRule()):
        if rule.applies(target):
            return f"{type(rule).__module__.rsplit('.', 1)[1]}.QuantLinear"
    return "cpu.QuantLinear"


def assert_one_line_error(rc, err, needle=""):
    """Bad input's contract: exit code 2 and one line on stderr (containing ``needle``)."""
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and needle in lines[0], err


# A 4-node tree (root, two children, a grandchild) verified after a prompt.
_TREE_MASK = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]])
_TREE_DEPTHS = np.array([0, 1, 1, 2])


def assert_matches_reference(art, reference, prompt: list[int], new_tokens: int = 12):
    """``art`` (a partitioned build, say) computes what ``reference`` does: prefill hidden
    states (rtol 1e-5), logits of a 4-node tree verify (relative error < 1e-5) and identical
    greedy generation. Returns ``art``'s session after the verify."""
    a, b = art.new_session(), reference.new_session()
    _, ha = a.prefill(prompt)
    _, hb = b.prefill(prompt)
    np.testing.assert_allclose(ha.numpy(), hb.numpy(), rtol=1e-5, atol=1e-6)
    pos = _TREE_DEPTHS + len(prompt)
    _, _, la = a.verify([7, 8, 9, 10], pos, _TREE_MASK)
    _, _, lb = b.verify([7, 8, 9, 10], pos, _TREE_MASK)
    ref = lb.numpy()
    assert np.abs(la.numpy() - ref).max() / np.abs(ref).max() < 1e-5
    assert (generate(art, prompt, new_tokens, False).ids
            == generate(reference, prompt, new_tokens, False).ids)
    return a
