"""The qwen2 architecture (q/k/v biases, no Q/K permutation, untied LM head) from a tiny GGUF
written as llama.cpp's converter writes it, against the independent numpy reference: loading,
every compiled function, greedy decoding with and without speculation, and a partitioned
build."""

import dataclasses

import numpy as np
import pytest

from hetcomp.driver.compile import CompileOptions, compile_model
from hetcomp.frontend import load_model
from hetcomp.frontend.weights import random_weights
from hetcomp.hardware import target_dict
from hetcomp.plan import HeteroPlan
from hetcomp.runtime import generate, load_artifact
from hetcomp.testing import (TINY_QWEN2, assert_matches_reference, byte_tokenizer_spec, depths,
                             compile_fused, compile_with_random_heads, full_mask,
                             tree_mask)
from hetcomp.testing import numpy_llama as ref
from hetcomp.testing.gguf_writer import write_gguf

CFG = TINY_QWEN2
WIDTHS = (1, 4)


def _rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def qwen2_gguf(tmp_path_factory):
    """A tiny qwen2 GGUF (Q5_0 matrices, as Qwen2.5 files hold) and the weights it stores."""
    path = tmp_path_factory.mktemp("qwen2") / "m.gguf"
    w = random_weights(CFG, seed=7)
    stored = write_gguf(path, CFG, w, byte_tokenizer_spec(CFG.vocab_size), arch="qwen2",
                        qtype="Q5_0")
    return path, w, stored


@pytest.fixture(scope="module")
def qwen2_artifact(tmp_path_factory, qwen2_gguf):
    """Compiled from the GGUF, with (untrained) Medusa heads and a W = 4 verify."""
    path, _, _ = qwen2_gguf
    tmp = tmp_path_factory.mktemp("qwen2-art")
    return load_artifact(compile_with_random_heads(tmp, str(path), CFG, WIDTHS))


def test_loader_reads_biases_untied_head_and_unpermuted_rows(qwen2_gguf):
    path, w, stored = qwen2_gguf
    cfg, loaded, spec, _ = load_model(str(path), max_context=CFG.max_context)
    assert cfg == dataclasses.replace(CFG, norm_eps=float(np.float32(CFG.norm_eps)))
    assert set(loaded) == set(stored)
    for name, arr in stored.items():
        np.testing.assert_array_equal(loaded[name], arr, err_msg=name)
    # Biases are stored as float32; llama.cpp's Qwen2 converter keeps HF's Q/K rows, so the
    # loaded rows are the written ones up to Q5_0's rounding (a permutation would move them).
    np.testing.assert_array_equal(loaded["layers.1.bk"], w["layers.1.bk"])
    for name in ("layers.0.wq", "layers.1.wk", "lm_head"):
        assert _rel_err(loaded[name], w[name]) < 0.1, name


@pytest.fixture(scope="module")
def qwen2_fused(tmp_path_factory, qwen2_gguf):
    """As a GPU build's module is: the norms, q/k/v biases and SwiGLU inside the linears
    (FuseLinearChains), run on the CPU."""
    return compile_fused(tmp_path_factory.mktemp("qwen2-fused"), str(qwen2_gguf[0]), CFG,
                         WIDTHS, {"linear_norm_bias_n128_k64_w4",
                                  "linear_norm_silu_n192_k64_w4"})


@pytest.mark.parametrize("artifact", ["qwen2_artifact", "qwen2_fused"])
def test_prefill_and_tree_verify_match_numpy(request, artifact, qwen2_gguf):
    _, _, stored = qwen2_gguf
    art = request.getfixturevalue(artifact)
    prompt = [5, 17, 99, 3, 42]
    sess = art.new_session()
    nxt, hidden = sess.prefill(prompt)
    ref_logits, ref_hidden = ref.forward(CFG, stored, prompt)
    assert nxt == int(np.argmax(ref_logits[-1]))
    assert _rel_err(hidden.numpy()[0], ref_hidden[-1]) < 1e-4
    parents = [-1, 0, 0, 1]
    toks, mask = np.array([10, 11, 12, 13]), tree_mask(parents)
    pos = depths(parents) + len(prompt)
    _, _, logits = sess.verify(toks, pos, mask)
    t = len(prompt)
    ref_tree, _ = ref.forward(CFG, stored, np.concatenate([prompt, toks]),
                              positions=np.concatenate([np.arange(t), pos]),
                              mask=full_mask(t, mask))
    assert _rel_err(logits.numpy(), ref_tree[t:]) < 1e-4
    # The biases matter: without them the reference is far off.
    unbiased = {k: v for k, v in stored.items() if ".b" not in k}
    assert _rel_err(ref.forward(CFG, unbiased, prompt)[0], ref_logits) > 0.05


def test_greedy_with_and_without_speculation_matches_numpy(qwen2_artifact, qwen2_gguf):
    _, _, stored = qwen2_gguf
    art = qwen2_artifact
    accepted = []
    for prompt in ([12, 200, 31, 4], [7]):
        expected = ref.greedy(CFG, stored, prompt, 16)
        assert generate(art, prompt, 16, stop_at_eos=False).ids == expected
        for lookup in (0, 3):  # Medusa trees alone, and with lookup chains that do get accepted
            res = generate(art, prompt, 16, stop_at_eos=False, width=4, lookup=lookup)
            assert res.ids == expected, (prompt, lookup)
            accepted.append(res.accepted_per_step)
    assert max(accepted) > 1.5  # trees are accepted beyond the root: commit is exercised
    # The random model falls into loops ("13 13 282 13 282 ..."), where an n-gram recurs with
    # different continuations: lookup trees that branch are verified losslessly too.
    art.step_shapes.clear()
    res = generate(art, [7], 40, stop_at_eos=False, width=4, lookup=3)
    assert res.ids == ref.greedy(CFG, stored, [7], 40)
    looked = [key[1] for key in art.step_shapes]
    assert any(len(set(p)) < len(p) for p in looked), looked  # a node with two lookup children


def test_partitioned_build_matches_unpartitioned(tmp_path, qwen2_gguf):
    """The column-split qkv linear keeps its bias (added on the host after the concat)."""
    path, _, _ = qwen2_gguf
    host = target_dict("host")
    loaded = load_model(str(path), max_context=CFG.max_context)
    compile_model(CompileOptions(model="qwen2-tiny"), str(tmp_path / "ref"), quiet=True,
                  weights=loaded)
    plan = HeteroPlan(units=("cpu", "cpu:1"), targets=(host, host),
                      ratios=(("default", 0.5), ("qkv", 0.37)), dense_attention=1,
                      sparse_attention=0)
    compile_model(CompileOptions(model="qwen2-tiny", plan=plan), str(tmp_path / "a"),
                  quiet=True, weights=loaded)
    art = load_artifact(str(tmp_path / "a"))
    assert len(art.devices) == 2
    assert_matches_reference(art, load_artifact(str(tmp_path / "ref")), [5, 17, 99, 3])


def test_partitioned_lm_head_with_heads_speculates(tmp_path, qwen2_gguf):
    """An untied LM head split across units stays whole for the draft (which is not
    partitioned): the artifact loads and speculates as the numpy model decodes. (Its recipe
    was dropped with the split, and the artifact could not load.)"""
    path, _, stored = qwen2_gguf
    host = target_dict("host")
    plan = HeteroPlan(units=("cpu", "cpu:1"), targets=(host, host),
                      ratios=(("default", 0.5), ("lm_head", 0.5)))
    art = load_artifact(compile_with_random_heads(tmp_path, str(path), CFG, WIDTHS, plan=plan))
    assert {"lm_head__u0", "lm_head__u1"} <= set(art.manifest["param_recipes"])
    assert "lm_head" in art.manifest["functions"]["medusa"]
    prompt = [12, 200, 31, 4]
    res = generate(art, prompt, 16, stop_at_eos=False, width=4)
    assert res.ids == ref.greedy(CFG, stored, prompt, 16) and res.accepted_per_step > 1


def test_cuda_artifact_compiles_without_a_gpu(tmp_path, qwen2_gguf):
    """--target cuda: the bias kernel gets a GPU schedule like every other elementwise one."""
    path, _, _ = qwen2_gguf
    compile_model(CompileOptions(model=str(path), target="cuda", max_context=CFG.max_context),
                  str(tmp_path / "g"), quiet=True)
    lib = (tmp_path / "g" / "lib.so").read_bytes()
    assert b"bias_add" in lib and lib.count(b"__global__") > 10
