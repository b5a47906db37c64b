"""The CUDA artifact's own kernels, run on the CPU with every GPU thread serial
(``hetcomp.testing.gpu.emulated_artifact``), through the runtime: the schedules, the fixed
caches, the draft and tree verification of ``compile --target cuda``, checked step by step
against the CPU artifact of the same model (no GPU needed)."""

import numpy as np
import pytest

from hetcomp import _tvm
from hetcomp.codegen.build import schedule_module
from hetcomp.driver.compile import CompileOptions, compile_model
from hetcomp.frontend.llama import build_module
from hetcomp.frontend.weights import random_weights
from hetcomp.hardware import target_dict
from hetcomp.kernels import ops
from hetcomp.passes.pipeline import scheduling_pipeline
from hetcomp.runtime import generate, load_artifact
from hetcomp.runtime.generate import auto_lookup
from hetcomp.speculative.medusa import MedusaHeads
from hetcomp.testing import TINY, TINY_GEMMA3, TINY_QWEN2, byte_tokenizer_spec, depths, tree_mask
from hetcomp.testing.gpu import (
    capture_scheduled,
    cpu_form,
    emulated_artifact,
    emulated_module,
    kernel_library,
)

WIDTHS = [1, 4]


def _pair(tmp, cfg, dtype, widths=WIDTHS):
    """(emulated CUDA artifact, CPU artifact) of one random model with two random heads."""
    e = cfg.hidden_size
    rng = np.random.default_rng(0)
    MedusaHeads(w=(rng.standard_normal((2, e, e)) * 0.05).astype("float32"),
                b=np.zeros((2, e), "float32"),
                rank_probs=np.tile(np.linspace(0.5, 0.05, 10), (2, 1)), info={}
                ).save(str(tmp / "heads.npz"))
    # Weights of a larger scale than the default: greedy then varies from token to token.
    weights = (cfg, random_weights(cfg, seed=3, scale=0.3), byte_tokenizer_spec(cfg.vocab_size),
               __file__)
    built, scheduled = {}, {}
    for target in ("cuda", "host"):
        # The CPU artifact with float activations: the GPU's quantized kernels do not round
        # them to int8 (x86.Int8DotLinear would, on this host).
        opts = CompileOptions(model="tiny", dtype=dtype, target=target, widths=widths,
                              heads=str(tmp / "heads.npz"), max_context=cfg.max_context,
                              int8_dot=False)
        with capture_scheduled(scheduled.setdefault(target, [])):
            built[target] = compile_model(opts, str(tmp / target), quiet=True, weights=weights)
    cuda = emulated_artifact(built["cuda"], scheduled["cuda"][0], str(tmp / "emulated"))
    return load_artifact(cuda), load_artifact(built["host"])


@pytest.fixture(scope="module", params=["float16", "q4_1"])
def pair(request, tmp_path_factory):
    return _pair(tmp_path_factory.mktemp(request.param), TINY, request.param)


def test_emulated_artifact_runs_the_cuda_build(pair):
    emulated, cpu = pair
    assert emulated.manifest["fixed_cache"] and emulated.manifest["cuda_graph"]
    assert {k["rule"].split(".")[0] for k in emulated.manifest["kernels"]} >= {"gpu", "script"}
    assert emulated.static_widths == cpu.static_widths == WIDTHS


def _steps(art, prompt, trees):
    """Prefill ``prompt``, then verify each ``(tokens, parents, accepted)`` and commit its
    accepted path; the logits of every call."""
    sess = art.new_session()
    sess.prefill(prompt)
    out = []
    for tokens, parents, accepted in trees:
        _, _, logits = sess.verify(np.array(tokens), depths(parents) + sess.length,
                                   tree_mask(parents))
        out.append(logits.numpy())
        sess.commit(accepted)
    return out


def _assert_close(got, want):
    """Logits equal up to float sums in another order: 3e-4 of their scale (float16 here:
    5e-7 to 5e-5 of it; a 5% error in tree_attention's softmax scale gives 1e-2 to 3e-2)."""
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-4 * np.abs(want).max())


def test_each_verify_and_commit_matches_the_cpu_artifact(pair):
    """Chains and branching trees, committed on and off the identity path: the cache the
    GPU kernels wrote (tree_attention's own cache write, kv_commit) is what later steps
    read, and every step's logits equal the CPU artifact's."""
    emulated, cpu = pair
    trees = [([7, 9, 11, 13], [-1, 0, 1, 2], [0, 1]),  # a chain, its first two kept
             ([21, 30, 31, 40], [-1, 0, 0, 1], [0, 2]),  # the second branch: a real commit
             ([5], [-1], [0]),
             ([50, 51, 52, 53], [-1, 0, 0, 2], [0, 2, 3])]
    got, want = _steps(emulated, [1, 2, 3, 4, 5], trees), _steps(cpu, [1, 2, 3, 4, 5], trees)
    for g, w in zip(got, want, strict=True):
        _assert_close(g, w)
        np.testing.assert_array_equal(g.argmax(axis=1), w.argmax(axis=1))


def test_greedy_and_speculative_output_equal_the_cpu_artifact(pair):
    emulated, cpu = pair
    prompt = [5, 17, 99, 3, 42]
    want = generate(cpu, prompt, max_new_tokens=24, stop_at_eos=False).ids
    assert len(set(want)) > 3  # a varied sequence, not one token repeated
    for width in WIDTHS:
        for lookup in sorted({0, auto_lookup(width)}):  # Medusa alone; with the default lookup
            assert generate(emulated, prompt, max_new_tokens=24, stop_at_eos=False,
                            width=width, lookup=lookup).ids == want, (width, lookup)


@pytest.mark.parametrize("cfg", [TINY_QWEN2, TINY_GEMMA3], ids=["qwen2", "gemma3"])
def test_other_families_match_the_cpu_artifact(tmp_path, cfg):
    """Qwen2's q/k/v bias (fused into the qkv kernel) and Gemma 3's q/k norm inside
    tree_attention, windows and post-norms, on the GPU kernels."""
    emulated, cpu = _pair(tmp_path, cfg, "float16")
    prompt = [5, 17, 99, 3, 42, 8, 9]
    trees = [([7, 9, 11, 13], [-1, 0, 1, 2], [0, 1]), ([21, 30, 31, 40], [-1, 0, 0, 1], [0, 2])]
    for g, w in zip(_steps(emulated, prompt, trees), _steps(cpu, prompt, trees), strict=True):
        _assert_close(g, w)
    want = generate(cpu, prompt, max_new_tokens=16, stop_at_eos=False).ids
    assert generate(emulated, prompt, max_new_tokens=16, stop_at_eos=False, width=4).ids == want


def test_quantized_wide_steps_on_tensor_cores_match_the_cpu_artifact(tmp_path):
    """A q4_1 build's 16-row verify step and 64-row prompt chunk run their linears on
    gpu.QuantTensorCoreLinear (each warp decodes its W tiles into shared memory as float16
    hi and lo terms); emulated, a 70-token prompt (a chunk of 64, then 6 rows) and two
    16-node trees give the CPU artifact's logits, and W = 16 decodes the CPU's greedy
    output."""
    emulated, cpu = _pair(tmp_path, TINY, "q4_1", widths=[16])
    rules = {k["name"]: k["rule"] for k in emulated.manifest["kernels"]}
    wide = {name for name, rule in rules.items() if rule == "gpu.QuantTensorCoreLinear"}
    assert {name.rsplit("_", 1)[1] for name in wide} == {"w16", "w64"}
    # qkv, o, gate_up and down at both; the q8_0 LM head for the tree's 16 rows (a prompt
    # chunk's runs for its last row only)
    assert len(wide) == 2 * 4 + 1 and "linear_q8_0_n320_k64_w16" in wide
    rng = np.random.default_rng(1)
    prompt = [int(t) for t in rng.integers(1, 300, 70)]
    parents = [-1, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7]  # a binary tree
    trees = [([int(t) for t in rng.integers(1, 300, 16)], parents, [0, 1, 3]),
             ([int(t) for t in rng.integers(1, 300, 16)], parents, [0, 2])]
    for g, w in zip(_steps(emulated, prompt, trees), _steps(cpu, prompt, trees), strict=True):
        _assert_close(g, w)
    want = generate(cpu, prompt, max_new_tokens=12, stop_at_eos=False).ids
    assert generate(emulated, prompt, max_new_tokens=12, stop_at_eos=False,
                    width=16).ids == want


def test_a_module_without_gpu_kernels_is_refused():
    """Emulating a CPU build would check the CPU kernels against themselves."""
    target = _tvm.compiler().Target(target_dict("host"))
    with target:
        scheduled = scheduling_pipeline(target)(build_module(TINY, "float32", 2))
    with pytest.raises(ValueError, match="not a GPU-scheduled module"):
        emulated_module(scheduled)


def test_cpu_form_serialises_loops_of_symbolic_extent():
    """A GPU kernel whose thread extents are expressions (the dense attention part: the
    cache length rounded to key tiles, ``T.max(n, 1)`` inside) runs serially too, and as
    the kernel it schedules computes."""
    kernel = ops.attention(4, 2, 16, 2, 128, part="dense")
    cuda = _tvm.compiler().Target(target_dict("cuda"))
    with cuda:
        scheduled = schedule_module(_tvm.compiler().IRModule({"main": kernel}), cuda)["main"]
    serial = cpu_form(scheduled)
    assert "T.thread_binding(" in scheduled.script()
    assert "T.thread_binding(" not in serial.script()
    rng = np.random.default_rng(0)
    w, n = 3, 37
    args = [rng.standard_normal((4, w, 16)).astype("float32"),
            rng.standard_normal((2, 2, 16, 128)).astype("float32"),
            rng.standard_normal((2, 2, 128, 16)).astype("float32")]
    outs = []
    for func in (kernel, serial):
        out = _tvm.tensor(np.zeros((w, 4, 17), "float32"))
        kernel_library(func)["main"](*map(_tvm.tensor, args), 1, n, out)
        outs.append(out.numpy())
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)
