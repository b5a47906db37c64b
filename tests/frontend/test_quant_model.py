"""A q4_1 artifact compiled from a q4_1 GGUF computes the model of the file's own blocks: its
logits are numpy's forward on the dequantized weights (with the int8-dot kernels: on the
linears' inputs rounded to int8 blocks), speculation is lossless, and the weights rebuild
byte for byte from the file."""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType

from hetcomp.artifact_format import read_manifest
from hetcomp.codegen.targets import make_target
from hetcomp.driver.compile import CompileOptions, compile_model
from hetcomp.errors import HetcompError
from hetcomp.frontend.config import LlamaConfig
from hetcomp.frontend.weights import random_weights
from hetcomp.quant_format import QuantMatrix
from hetcomp.runtime import load_artifact
from hetcomp.runtime.generate import generate
from hetcomp.runtime.weights import attach_weights
from hetcomp.schedules.int8_dot import INT8_DOT_RULE, has_int8_dot
from hetcomp.speculative.medusa import MedusaHeads
from hetcomp.testing import (
    TINY,
    assert_one_line_error,
    byte_tokenizer_spec,
    depths,
    full_mask,
    run_cli,
    tree_mask,
)
from hetcomp.testing import numpy_llama as ref
from hetcomp.testing.gguf_writer import write_gguf

WIDTHS = (1, 4, 16)
Q8_0 = GGMLQuantizationType.Q8_0


@pytest.fixture(scope="module")
def q41(tmp_path_factory):
    """(artifact, reference float32 weights, gguf path, heads path): a Q4_1 file (every
    matrix, the embedding too) compiled with --dtype q4_1 and random Medusa heads."""
    tmp = tmp_path_factory.mktemp("q41")
    path = tmp / "tiny.q4_1.gguf"
    # (a weight scale where greedy tokens vary: at the default they mostly repeat the input)
    stored = write_gguf(path, TINY, random_weights(TINY, seed=7, scale=0.3),
                        byte_tokenizer_spec(TINY.vocab_size), qtype="Q4_1")
    # The embedding / LM head is q8_0 in a quantized artifact: this file's q4_1 table
    # converted, here by gguf's own Q8_0 (the reference), which ours must equal.
    embed = stored["embed"]
    stored["embed"] = gguf.quants.dequantize(gguf.quants.quantize(embed, Q8_0), Q8_0)
    np.testing.assert_array_equal(QuantMatrix.quantize(embed, "q8_0").dequantize(),
                                  stored["embed"])
    rng = np.random.default_rng(3)
    e = TINY.hidden_size
    heads = MedusaHeads(rng.standard_normal((3, e, e)).astype("float32") * 0.05,
                        np.zeros((3, e), "float32"),
                        np.tile(np.linspace(0.5, 0.01, 10), (3, 1)), {})
    heads.save(str(tmp / "heads.npz"))
    out = tmp / "art"
    # A float32 cache and float activations: the logits are checked at 1e-4, the quantized
    # weights' numerics alone (the default float16 cache is tests/runtime/test_kv_dtype.py's,
    # the int8 activations test_int8_dot_model's).
    compile_model(CompileOptions(model=str(path), dtype="q4_1", heads=str(tmp / "heads.npz"),
                                 widths=WIDTHS, max_context=TINY.max_context,
                                 kv_dtype="float32", int8_dot=False), str(out), quiet=True)
    return load_artifact(str(out)), stored, str(path), str(tmp / "heads.npz")


@pytest.fixture(scope="module", params=["default", "fused"])
def q41_any(request, q41):
    """:func:`q41`, and the same file compiled as a GPU build's module is (CUDA-graph build,
    its norms and activations inside the quantized qkv and gate_up kernels:
    FuseLinearChains' quantized forms), run on the CPU."""
    if request.param == "default":
        return q41
    _, stored, path, heads = q41
    out = request.getfixturevalue("tmp_path_factory").mktemp("q41_fused") / "art"
    compile_model(CompileOptions(model=path, dtype="q4_1", heads=heads, widths=WIDTHS,
                                 max_context=TINY.max_context, device_len=True,
                                 fuse_linears=True, kv_dtype="float32", int8_dot=False),
                  str(out), quiet=True)
    art = load_artifact(str(out))
    called = {k["name"] for k in art.manifest["kernels"] if k["function"] == "verify_w16"}
    assert {"linear_norm_n128_k64_w16", "linear_norm_silu_n192_k64_w16"} <= called, called
    return art, stored, path, heads


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_manifest_and_params(q41):
    art, _, _, _ = q41
    m = read_manifest(art.path)
    assert m["dtype"] == "q4_1"
    dtypes = {p["name"]: (p["dtype"], p["shape"]) for p in m["params"]}
    assert dtypes["layers.0.wqkv"] == ("uint8", [TINY.qkv_size // 32, e_blocks(), 20, 32])
    assert dtypes["embed"] == ("uint8", [TINY.vocab_size // 32, e_blocks(), 34, 32])
    assert dtypes["medusa.w"][0] == "float16"  # the draft's heads stay float


def e_blocks():
    return TINY.hidden_size // 32


def test_logits_match_numpy_on_dequantized_weights(q41_any):
    art, w, _, _ = q41_any
    prompt = [5, 17, 99, 3, 42, 7, 8, 300, 11]
    sess = art.new_session()
    nxt, hidden = sess.prefill(prompt)
    logits, ref_hidden = ref.forward(TINY, w, prompt)
    assert nxt == int(np.argmax(logits[-1]))
    assert rel_err(hidden.numpy()[0], ref_hidden[-1]) < 1e-4
    parents = [-1, 0, 0, 0, 1, 1, 2, 4, 4, 7, 3, 10, 0, 12, 13, 5]  # verify_w16
    toks = (np.arange(16) * 13 + 40) % TINY.vocab_size
    ids, hidden, logits = sess.verify(toks, depths(parents) + len(prompt), tree_mask(parents))
    ref_logits, _ = ref.forward(TINY, w, np.concatenate([prompt, toks]),
                                positions=np.concatenate([np.arange(len(prompt)),
                                                          depths(parents) + len(prompt)]),
                                mask=full_mask(len(prompt), tree_mask(parents)))
    assert rel_err(logits.numpy(), ref_logits[len(prompt):]) < 1e-4
    np.testing.assert_array_equal(ids, ref_logits[len(prompt):].argmax(-1))


def test_greedy_equals_numpy_and_speculation_is_lossless(q41_any):
    art, w, _, _ = q41_any
    for prompt in ([5, 17, 99], [200, 3, 4, 5, 6]):
        seq = generate(art, prompt, max_new_tokens=24, stop_at_eos=False).ids
        assert len(set(seq)) > 3 and seq == ref.greedy(TINY, w, prompt, 24)
        for width in (4, 16):
            assert generate(art, prompt, max_new_tokens=24, stop_at_eos=False,
                            width=width).ids == seq, (prompt, width)


def test_weights_rebuild_byte_for_byte(q41):
    """attach-weights' rebuild from the GGUF (and heads) hashes to the compiled params.bin."""
    art, _, path, heads = q41
    attach_weights(art.path, path, heads, quiet=True)  # raises if any byte differs


def test_bad_dtype_and_row_length(tmp_path):
    with pytest.raises(HetcompError, match="unsupported dtype"):
        CompileOptions(dtype="q5_0")
    with pytest.raises(HetcompError, match="multiple of 32"):
        QuantMatrix.quantize(np.zeros((32, 40), "float32"), "q8_0")


def test_cli_q4_1_prints_what_it_kept_and_bad_input_is_one_line(tmp_path, cli):
    """The CLI on a Q4_1 file: one line saying what was kept and converted, inspect shows the
    dtype; an unknown --dtype and a model whose rows are not whole blocks get one line,
    exit 2, nothing written. (compile runs in-process: ``cli``; inspect, runtime-only, in a
    real process.)"""
    path = tmp_path / "tiny.gguf"
    write_gguf(path, TINY, random_weights(TINY), byte_tokenizer_spec(TINY.vocab_size),
               qtype="Q4_1")
    rc, _, err = cli("compile", "--model", path, "--dtype", "q4_1", "--no-heads",
                     "--max-context", 64, "-o", tmp_path / "a")
    assert rc == 0, err
    # 7 matrices a layer in the file's q4_1; its Q4_1 embedding becomes the q8_0 table.
    assert "kept 14 q4_1 bit for bit; converted 1 q4_1->q8_0" in err
    rc, out, _ = run_cli("inspect", tmp_path / "a")
    assert rc == 0 and '"dtype": "q4_1"' in out
    rc, _, err = cli("compile", "--model", path, "--dtype", "q5_0", "-o", tmp_path / "b")
    assert_one_line_error(rc, err, "unsupported dtype")
    odd = LlamaConfig(hidden_size=48, intermediate_size=64, num_layers=1, num_heads=3,
                      num_kv_heads=3, vocab_size=260, max_context=32)
    write_gguf(tmp_path / "odd.gguf", odd, random_weights(odd), byte_tokenizer_spec(260))
    rc, _, err = cli("compile", "--model", tmp_path / "odd.gguf", "--dtype", "q8_0",
                     "-o", tmp_path / "c")
    assert_one_line_error(rc, err, "whole 32-weight blocks")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


@pytest.fixture(scope="module")
def q41_int8(q41, tmp_path_factory):
    """:func:`q41`'s file compiled as `hetcomp compile` does by default: on a CPU with VNNI,
    every quantized linear on int8 activations (``x86.Int8DotLinear``)."""
    _, stored, path, heads = q41
    if not has_int8_dot(make_target("host")):
        pytest.skip("this CPU lacks AVX-512 VNNI/VBMI")
    out = tmp_path_factory.mktemp("q41_int8") / "art"
    compile_model(CompileOptions(model=path, dtype="q4_1", heads=heads, widths=WIDTHS,
                                 max_context=TINY.max_context, kv_dtype="float32"),
                  str(out), quiet=True)
    return load_artifact(str(out)), stored


def test_int8_dot_model(q41_int8):
    """Every quantized linear of every step runs on int8 activations; the logits follow
    numpy's forward with each linear's input rounded to int8 blocks (not the float one), and
    speculation is still token-identical to sequential greedy decoding."""
    art, w = q41_int8
    linears = [k for k in art.manifest["kernels"]
               if k["name"].startswith("linear") and k["function"] in ("verify_w1", "verify_w16")]
    assert len(linears) == 2 * 5 and {k["rule"] for k in linears} == {INT8_DOT_RULE}
    prompt = [5, 17, 99, 3, 42, 7, 8, 300, 11]
    sess = art.new_session()
    sess.prefill(prompt)
    parents = [-1, 0, 0, 0, 1, 1, 2, 4, 4, 7, 3, 10, 0, 12, 13, 5]
    toks = (np.arange(16) * 13 + 40) % TINY.vocab_size
    _, _, logits = sess.verify(toks, depths(parents) + len(prompt), tree_mask(parents))
    kw = {"positions": np.concatenate([np.arange(len(prompt)), depths(parents) + len(prompt)]),
          "mask": full_mask(len(prompt), tree_mask(parents))}
    seq = np.concatenate([prompt, toks])
    int8_ref = ref.forward(TINY, w, seq, int8_inputs=True, **kw)[0][len(prompt):]
    float_ref = ref.forward(TINY, w, seq, **kw)[0][len(prompt):]
    err = rel_err(logits.numpy(), int8_ref)
    assert err < 1e-4 and rel_err(logits.numpy(), float_ref) > 1e-2
    for prompt in ([5, 17, 99], [200, 3, 4, 5, 6]):
        seq = generate(art, prompt, max_new_tokens=24, stop_at_eos=False).ids
        assert len(set(seq)) > 3
        for width in (4, 16):
            assert generate(art, prompt, max_new_tokens=24, stop_at_eos=False,
                            width=width).ids == seq, (prompt, width)


def test_int8_dot_trees_compute_what_sequential_decoding_computes(q41_int8):
    """Int8 activations turn the split attention's float differences (~1e-3 in logits) into
    different roundings (up to a logit on SmolLM2 and Gemma 3 q4_1, where speculation then
    left greedy decoding's output): such a build runs the fused masked attention at every
    width, its softmax summed in float64, and each tree node's logits are those of
    sequential decoding along its path, bit for bit, at static widths (a branching tree,
    whose nodes' ancestors sit at other slots than their depths) and the symbolic one."""
    art, _ = q41_int8
    assert art.manifest["exact_attention"] is True
    attention = {(k["function"], k["name"]) for k in art.manifest["kernels"]
                 if "attention" in k["name"]}
    assert {f for f, _ in attention} >= {"verify", "verify_w4", "verify_w16"}
    assert all(name.startswith("attention") and "dense" not in name and "merge" not in name
               for _, name in attention), attention
    prompt = [5, 17, 99, 3, 42, 7, 8, 300, 11]
    trees = {16: [-1, 0, 0, 0, 1, 1, 2, 4, 4, 7, 3, 10, 0, 12, 13, 5],  # verify_w16
             4: [-1, 0, 0, 1], 6: [-1, 0, 1, 2, 3, 4]}  # verify_w4; verify (symbolic)
    for width, parents in trees.items():
        toks = [int(t) for t in (np.arange(width) * 29 + 7) % TINY.vocab_size]
        sess = art.new_session()
        sess.prefill(prompt)
        _, _, logits = sess.verify(toks, depths(parents) + sess.length, tree_mask(parents))
        got = logits.numpy()
        for node in range(width):
            path = [node]
            while parents[path[-1]] >= 0:
                path.append(parents[path[-1]])
            sess = art.new_session()
            sess.prefill(prompt)
            for j in reversed(path):
                _, _, seq = sess.verify([toks[j]], [sess.length], np.ones((1, 1), "int32"))
                sess.commit([0])
            np.testing.assert_array_equal(got[node], seq.numpy()[0], err_msg=(width, node))


def test_cli_no_int8_dot_reaches_the_options(tmp_path, monkeypatch):
    """`--no-int8-dot` turns the int8-dot kernels off (CompileOptions.int8_dot)."""
    from hetcomp import cli
    from hetcomp.driver import compile as driver

    seen = []
    monkeypatch.setattr(driver, "compile_model", lambda opts, *a, **k: seen.append(opts))
    for flag, want in (([], True), (["--no-int8-dot"], False)):
        assert cli.main(["compile", "--dtype", "q4_0", "--no-heads", "-o", str(tmp_path / "x"),
                         *flag]) == 0
        assert seen[-1].int8_dot is want
