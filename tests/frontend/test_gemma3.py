"""The gemma3 architecture (scaled embedding, q/k norms, post-norms, GeGLU, sliding-window
layers with their own RoPE base) from a tiny GGUF written as llama.cpp's converter writes it,
against the independent numpy reference: loading, prefill (the 64-row chunk and the symbolic
one) and tree verify (fused and split attention) past a window of 8, greedy decoding with
and without speculation."""

import dataclasses

import numpy as np
import pytest

from hetcomp.artifact_format import read_manifest
from hetcomp.driver.compile import CompileOptions, compile_model
from hetcomp.frontend import load_model
from hetcomp.frontend.weights import random_weights
from hetcomp.hardware import target_dict
from hetcomp.plan import HeteroPlan
from hetcomp.runtime import generate, load_artifact
from hetcomp.testing import (TINY_GEMMA3, assert_matches_reference, byte_tokenizer_spec, depths,
                             compile_fused, compile_with_random_heads, full_mask,
                             tree_mask)
from hetcomp.testing import numpy_llama as ref
from hetcomp.testing.gguf_writer import write_gguf

CFG = TINY_GEMMA3
WIDTHS = (1, 4)
PROMPT = [int(t) for t in np.random.default_rng(3).integers(3, 300, 70)]  # 9 windows long


def _rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def gemma3_gguf(tmp_path_factory):
    """A tiny gemma3 GGUF (Q8_0 matrices) and the weights it stores."""
    path = tmp_path_factory.mktemp("gemma3") / "m.gguf"
    w = random_weights(CFG, seed=5)
    # Rows as small as Gemma's (times sqrt(E) = 8 they enter at ~0.02): random_weights' x10
    # rows dominate the post-normed residual stream and greedy repeats the last token.
    w["embed"] = w["embed"] / 40
    stored = write_gguf(path, CFG, w, byte_tokenizer_spec(CFG.vocab_size), arch="gemma3",
                        qtype="Q8_0")
    return path, stored


@pytest.fixture(scope="module")
def gemma3_artifact(tmp_path_factory, gemma3_gguf):
    """Compiled from the GGUF, with (untrained) Medusa heads and a W = 4 verify."""
    path, _ = gemma3_gguf
    tmp = tmp_path_factory.mktemp("gemma3-art")
    return load_artifact(compile_with_random_heads(tmp, str(path), CFG, WIDTHS))


def test_loader_derives_gemma3_config_as_llama_cpp(gemma3_gguf):
    path, stored = gemma3_gguf
    cfg, loaded, _, _ = load_model(str(path), max_context=CFG.max_context)
    assert cfg == dataclasses.replace(CFG, norm_eps=float(np.float32(CFG.norm_eps)))
    assert [cfg.layer_window(i) for i in range(6)] == [8, 8, 8, 8, 8, 0]
    assert [cfg.layer_rope_theta(i) for i in (0, 5)] == [1e4, 1e6]
    assert set(loaded) == set(stored)
    for name, arr in stored.items():
        np.testing.assert_array_equal(loaded[name], arr, err_msg=name)


def test_tree_widths_stay_inside_the_sliding_window(tmp_path, gemma3_gguf):
    """A tree node's ancestors must lie inside the window (the sparse part applies none):
    widths above it are left out, and an explicit --width above it is refused before the
    build (it failed after it, as an assertion)."""
    from hetcomp.errors import HetcompError

    path, _ = gemma3_gguf
    with pytest.raises(HetcompError, match="--width 16: wider than the model's sliding window "
                                           "of 8 tokens"):
        compile_with_random_heads(tmp_path, str(path), CFG, (4, 16), default_width=16)
    art = compile_with_random_heads(tmp_path, str(path), CFG, (4, 16))
    manifest = read_manifest(art)
    assert manifest["widths"] == [4] and sorted(manifest["speculative"]["trees"]) == [
        "1", "2", "3", "4"]
    assert "verify_w16" not in manifest["functions"]


@pytest.fixture(scope="module")
def gemma3_device_len(tmp_path_factory, gemma3_gguf):
    """The same model and heads compiled as for CUDA graphs (the windowed ``tree_attention``
    kernels, the cache length read on the device, the draft's copied inputs), run on the
    CPU."""
    path, _ = gemma3_gguf
    tmp = tmp_path_factory.mktemp("gemma3-dev")
    return load_artifact(compile_with_random_heads(tmp, str(path), CFG, WIDTHS,
                                                   device_len=True))


@pytest.fixture(scope="module")
def gemma3_fused(tmp_path_factory, gemma3_gguf):
    """The CUDA-graph build with its norms and GeGLU inside the linears, as a GPU build's
    (FuseLinearChains; the post-norms, which add the residual, stay their own kernels, and
    the q/k norms run inside tree_attention, with RoPE), run on the CPU."""
    art = compile_fused(tmp_path_factory.mktemp("gemma3-fused"), str(gemma3_gguf[0]), CFG,
                        WIDTHS, {"linear_norm_gelu_tanh_n192_k64_w4", "rms_norm_res_w4",
                                 "tree_attention", "tree_attention_win8"})
    assert not any(k["name"] in ("qk_norm", "rope_kv") for k in art.manifest["kernels"])
    return art


@pytest.mark.parametrize("artifact", ["gemma3_artifact", "gemma3_device_len", "gemma3_fused"])
def test_prefill_and_tree_verify_past_the_window_match_numpy(request, artifact, gemma3_gguf):
    _, stored = gemma3_gguf
    sess = request.getfixturevalue(artifact).new_session()
    nxt, hidden = sess.prefill(PROMPT)  # a 64-row chunk, then a 6-row one
    ref_logits, ref_hidden = ref.forward(CFG, stored, PROMPT)
    assert nxt == int(np.argmax(ref_logits[-1]))
    assert _rel_err(hidden.numpy()[0], ref_hidden[-1]) < 1e-4
    t = len(PROMPT)
    for parents in ([-1], [-1, 0, 0, 1]):  # W = 1: the fused kernel; W = 4: dense + sparse
        w = len(parents)
        toks, mask = np.arange(10, 10 + w), tree_mask(parents)
        pos = depths(parents) + t
        _, _, logits = sess.verify(toks, pos, mask)
        ref_tree, _ = ref.forward(CFG, stored, np.concatenate([PROMPT, toks]),
                                  positions=np.concatenate([np.arange(t), pos]),
                                  mask=full_mask(t, mask))
        assert _rel_err(logits.numpy(), ref_tree[t:]) < 1e-4, parents
    # The window matters: without it the reference is far off.
    unwindowed = ref.forward(dataclasses.replace(CFG, sliding_window=0), stored, PROMPT)[0]
    assert _rel_err(unwindowed[-1], ref_logits[-1]) > 0.05


@pytest.mark.parametrize("artifact", ["gemma3_artifact", "gemma3_device_len", "gemma3_fused"])
def test_greedy_with_and_without_speculation_matches_numpy(request, artifact, gemma3_gguf):
    _, stored = gemma3_gguf
    art = request.getfixturevalue(artifact)
    prompt = PROMPT[:20]
    expected = ref.greedy(CFG, stored, prompt, 16)
    assert len(set(expected)) > 3  # not one token repeated
    assert generate(art, prompt, 16, stop_at_eos=False).ids == expected
    res = generate(art, prompt, 16, stop_at_eos=False, width=4, lookup=3)
    assert res.ids == expected


def test_cuda_graph_build_drafts_the_same_candidates(gemma3_artifact, gemma3_device_len):
    """The draft reading copies of its inputs (``stage_draft``) proposes what the plain
    build's draft does."""
    _, hidden = gemma3_artifact.new_session().prefill(PROMPT[:20])
    for root in (5, 77):
        np.testing.assert_array_equal(gemma3_device_len.medusa_candidates(hidden, root, 10),
                                      gemma3_artifact.medusa_candidates(hidden, root, 10))


def test_partitioned_build_matches_unpartitioned(tmp_path, gemma3_gguf):
    """Column-split o/down linears (no residual of their own here) and the windowed attention
    kernels (their positions moved with them) on a second unit compute the same."""
    path, _ = gemma3_gguf
    host = target_dict("host")
    loaded = load_model(str(path), max_context=CFG.max_context)
    compile_model(CompileOptions(model="gemma3-tiny"), str(tmp_path / "ref"), quiet=True,
                  weights=loaded)
    plan = HeteroPlan(units=("cpu", "cpu:1"), targets=(host, host),
                      ratios=(("default", 0.5), ("down", 0.25)), dense_attention=1,
                      sparse_attention=0)
    compile_model(CompileOptions(model="gemma3-tiny", plan=plan), str(tmp_path / "a"),
                  quiet=True, weights=loaded)
    art = load_artifact(str(tmp_path / "a"))
    assert len(art.devices) == 2
    assert_matches_reference(art, load_artifact(str(tmp_path / "ref")), PROMPT[:12])


def test_cuda_artifact_compiles_without_a_gpu(tmp_path, gemma3_gguf):
    """--target cuda: the windowed attention is the device-length kernel's windowed version,
    with the q/k norm inside (no qk_norm kernel), the residual norm gets a GPU schedule like
    its plain version."""
    path, _ = gemma3_gguf
    compile_model(CompileOptions(model=str(path), target="cuda", max_context=CFG.max_context),
                  str(tmp_path / "g"), quiet=True)
    lib = (tmp_path / "g" / "lib.so").read_bytes()
    for name in (b"tree_attention_win8", b"rms_norm_res", b"gelu_mul"):
        assert name in lib, name
    kernels = {k["name"] for k in read_manifest(str(tmp_path / "g"))["kernels"]}
    assert "qk_norm" not in kernels and "tree_attention_win8" in kernels
    assert lib.count(b"__global__") > 10


def test_the_draft_conditions_on_the_root_row_as_stored(tmp_path, gemma3_gguf):
    """Calibration trains and ranks root-conditioned heads on the embedding table's rows as
    stored (``calibrate``: ``embed[roots]``); Gemma scales them by sqrt(E) where they enter
    the layers, and the compiled draft took that scaled gather for the root too, so its root
    term was sqrt(E) times what the heads learnt (8 here, 25 for Gemma 3 270M): it proposed
    other candidates than calibration measured (Gemma 3 270M float16, 8 held-out prompts,
    64 tokens, W = 4: 2.250 tokens a step decoded, 2.333 replayed from calibration's ranks).
    The draft's logits are the heads' on the stored row, far from those on the scaled row."""
    from hetcomp import _tvm
    from hetcomp.speculative.medusa import MedusaHeads

    path, stored = gemma3_gguf
    e, rng = CFG.hidden_size, np.random.default_rng(1)
    heads = MedusaHeads(w=(rng.standard_normal((2, e, e)) * 0.05).astype("float32"),
                        b=np.zeros((2, e), "float32"),
                        rank_probs=np.tile(np.linspace(0.5, 0.05, 10), (2, 1)), info={},
                        u=(rng.standard_normal((2, e, e)) * 2.0).astype("float32"))
    heads.save(str(tmp_path / "h.npz"))
    heads = MedusaHeads.load(str(tmp_path / "h.npz"))  # (as stored: float16 weights)
    art = load_artifact(compile_model(CompileOptions(
        model=str(path), heads=str(tmp_path / "h.npz"), widths=(1, 4),
        max_context=CFG.max_context), str(tmp_path / "art"), quiet=True))
    _, hidden = art.new_session().prefill(PROMPT[:20])
    h = hidden.numpy().astype(np.float64)
    embed = stored["embed"].astype(np.float64)
    for root in (5, 77):
        logits = art._medusa(hidden, _tvm.tensor(np.array([[0], [root]], "int32")),
                             *art.medusa_params)[0].numpy()
        want = heads.hidden(h, embed[[root]]) @ embed.T
        scaled = heads.hidden(h, CFG.embed_scale * embed[[root]]) @ embed.T
        err = np.abs(logits - want[:, 0]).max()
        assert err < 1e-3 * np.abs(want).max(), root
        assert np.abs(logits - scaled[:, 0]).max() > 100 * err, root
