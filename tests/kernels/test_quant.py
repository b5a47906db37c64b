"""Block-quantized weights: the device layout holds the file's blocks exactly, and the
dequantizing linear and embedding kernels match numpy (gguf's dequantize, then matmul)."""

import re

import numpy as np
import pytest

from hetcomp import _tvm
from hetcomp.codegen.targets import make_target
from hetcomp.errors import HetcompError
from hetcomp.frontend.gguf_loader import open_gguf, read_weights
from hetcomp.frontend.weights import random_weights
from hetcomp.hardware import target_dict
from hetcomp.kernels import ops, quant
from hetcomp.schedules.apply import RULE_ATTR, ApplyRules
from hetcomp.schedules.cpu import ElementwiseRule, LinearRule, QuantLinearRule
from hetcomp.schedules.llvm import llvm_rules
from hetcomp.schedules.x86 import QuantLinearRule as X86QuantLinearRule
from hetcomp.testing import (
    TINY,
    byte_tokenizer_spec,
    fused_linear_reference,
    host_float_quant_linear_rule,
)
from hetcomp.testing.gguf_writer import write_gguf

c = _tvm.compiler()
TARGET = make_target("host")
FORMATS = ("q4_0", "q4_1", "q8_0")


def _layout_dequantize(wp: np.ndarray, qtype: str) -> np.ndarray:
    """The device layout decoded from its definition (module doc of hetcomp.kernels.quant),
    independently of the packing code: ``[N, K]`` float32."""
    p, nkb, nbytes, b = wp.shape
    blk = wp.transpose(0, 3, 1, 2).reshape(p * b, nkb, nbytes)  # byte c of column j's block
    d = blk[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)[..., None]
    if qtype == "q8_0":
        return (blk[..., 2:].view(np.int8).astype(np.float32) * d).reshape(p * b, -1)
    qs = blk[..., (4 if qtype == "q4_1" else 2):]
    q = np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.float32)
    if qtype == "q4_0":
        return ((q - 8) * d).reshape(p * b, -1)
    m = blk[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)[..., None]
    return (q * d + m).reshape(p * b, -1)


@pytest.mark.parametrize("qtype", FORMATS)
def test_layout_keeps_the_files_blocks(tmp_path, qtype):
    """A GGUF written by gguf's own quantizer: the loader keeps every matrix's bytes as the
    file stores them (Q/K rows un-permuted whole), and the device layout decodes to exactly
    gguf.quants.dequantize of those bytes."""
    path = tmp_path / "m.gguf"
    stored = write_gguf(path, TINY, random_weights(TINY), byte_tokenizer_spec(TINY.vocab_size),
                        qtype=qtype.upper())
    reader = open_gguf(str(path))
    w = read_weights(reader, TINY, keep_quant=True)
    file_v = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    assert isinstance(w["layers.0.wv"], quant.QuantMatrix)
    assert w["layers.0.wv"].blocks.tobytes() == np.asarray(file_v.data).tobytes()
    for name in ("embed", "layers.0.wq", "layers.1.wk", "layers.1.w_down"):
        m = w[name]
        assert m.qtype == qtype
        wp = quant.pack_quant_weight(m)
        assert wp.shape == quant.quant_packed_shape(*m.shape, qtype)
        np.testing.assert_array_equal(_layout_dequantize(wp, qtype), stored[name])
        np.testing.assert_array_equal(m.dequantize(), stored[name])
        back = quant.unpack_quant_weight(wp, qtype)
        assert back.blocks.tobytes() == m.blocks.tobytes()


def _build(func, rule):
    sch = rule.apply(func, TARGET, False)
    assert sch is not None
    return c.compile(c.IRModule({"main": sch.mod["main"]}), target=TARGET)["main"]


#: The generic rule, and x86's (its one-tile kernels prefetch) where this CPU runs its code.
QUANT_RULES = [pytest.param(QuantLinearRule(), id="cpu"), pytest.param(
    X86QuantLinearRule(), id="x86", marks=pytest.mark.skipif(
        not X86QuantLinearRule().applies(TARGET), reason="not an x86 CPU with AVX2"))]


@pytest.mark.parametrize("rule", QUANT_RULES)
@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("rows", [1, 2, 4, 16, None])
@pytest.mark.parametrize("n", [96, 33])
def test_linear_matches_numpy(qtype, rows, n, rule):
    """x @ dequantize(W).T (+ residual) for static widths 1, 2 (the factored kernel), 4, 16
    and the symbolic one (here 5 rows: a partial row tile); an odd N packs one-column
    panels (an odd vocabulary's LM head: its schedule vectorized lanes it did not have).
    x86's one-tile kernels prefetch 2 KB ahead, past the last block of this 7.5 KB weight
    (clamped)."""
    k, w = 128, rows or 5
    rng = np.random.default_rng(1)
    m = quant.QuantMatrix.quantize(rng.standard_normal((n, k)).astype("float32"), qtype)
    x = rng.standard_normal((w, k)).astype("float32")
    r = rng.standard_normal((w, n)).astype("float32")
    ref = x.astype(np.float64) @ m.dequantize().astype(np.float64).T
    for residual in (False, True):
        f = _build(quant.linear_quant(n, k, qtype, residual, rows=rows), rule)
        y = _tvm.tensor(np.zeros((w, n), "float32"))
        args = [_tvm.tensor(x), _tvm.tensor(quant.pack_quant_weight(m))]
        f(*args, *([_tvm.tensor(r)] if residual else []), y)
        np.testing.assert_allclose(y.numpy(), ref + r if residual else ref, rtol=1e-5,
                                   atol=1e-4)


@pytest.mark.parametrize("qtype", FORMATS)
def test_embed_matches_numpy(qtype):
    vocab, e = 96, 64
    rng = np.random.default_rng(2)
    m = quant.QuantMatrix.quantize(rng.standard_normal((vocab, e)).astype("float32"), qtype)
    tokens = np.array([0, 95, 33, 33, 7], "int32")
    f = _build(quant.embed_quant(vocab, e, qtype, rows=5), ElementwiseRule())
    y = _tvm.tensor(np.zeros((5, e), "float32"))
    f(_tvm.tensor(tokens), _tvm.tensor(quant.pack_quant_weight(m)), y)
    np.testing.assert_array_equal(y.numpy(), m.dequantize()[tokens])


def test_rules_pick_the_quantized_linear():
    """The float rule refuses a quantized kernel and the other way round; ApplyRules records
    the quantized rule, with the attributes the partition pass and profiler read."""
    q = quant.linear_quant(64, 64, "q4_1", rows=2)
    assert LinearRule().apply(q, TARGET, False) is None
    assert QuantLinearRule().apply(ops.linear(64, 64, "float32"), TARGET, False) is None
    assert {k: int(q.attrs[f"hetcomp.{k}"]) for k in ("n", "k", "block", "residual")} == {
        "n": 64, "k": 64, "block": 32, "residual": 0}
    assert str(q.attrs["hetcomp.op_kind"]) == "linear"
    with TARGET:
        mod = ApplyRules(*llvm_rules())(c.IRModule({"main": q.with_attr("global_symbol",
                                                                          "main")}))
    assert str(mod["main"].attrs[RULE_ATTR]) == host_float_quant_linear_rule()


def test_one_tile_x86_quant_linears_prefetch_their_blocks():
    """x86's rule: a kernel whose rows fit one tile with whole panels prefetches, each k
    block, every cache line of the block 2 KB ahead (q4_1: 20 x 32 = 640 bytes, ten lines;
    clamped to the weights' last byte); wider kernels, symbolic rows and the generic rule do
    not."""
    target = c.Target(target_dict("x86-64-v3"))

    def prefetched(rule, rows):
        text = rule.apply(quant.linear_quant(96, 128, "q4_1", rows=rows), target,
                          False).mod["main"].script()
        return re.findall(r'call_llvm_intrin\("void", "llvm\.prefetch[^"]*", '
                          r"T\.address_of\(wp\[([^\]]*)\]", text)

    got = [re.findall(r"T\.min\(\(\w+ \* T\.int64\((\d+)\) \+ \w+\) \* T\.int64\((\d+)\) "
                      r"\+ T\.int64\((\d+)\), T\.int64\((\d+)\)\)", g)
           for g in prefetched(X86QuantLinearRule(), 4)]
    # (k blocks, block bytes, bytes ahead, last byte), each of wp's 4 indices the same byte
    assert got == [[("4", "640", str(2048 + line), "7679")] * 4 for line in range(0, 640, 64)]
    assert len(prefetched(X86QuantLinearRule(), 8)) == 10
    for rows in (16, None):
        assert prefetched(X86QuantLinearRule(), rows) == []
    assert prefetched(QuantLinearRule(), 4) == []


def test_row_length_not_a_block_multiple_is_refused():
    with pytest.raises(HetcompError, match="multiple of 32"):
        quant.QuantMatrix.quantize(np.zeros((4, 48), "float32"), "q4_1")


FUSED_FORMS = [{"norm_eps": 1e-5}, {"activation": "silu"},
               {"norm_eps": 1e-6, "activation": "gelu_tanh"}, {"bias": True},
               {"norm_eps": 1e-5, "bias": True}]


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("form", FUSED_FORMS, ids=lambda f: "_".join(f))
def test_fused_forms_match_numpy(qtype, rows, form):
    """The fused forms of the quantized linear (FuseLinearChains' norm, gated activation and
    bias), unscheduled on the CPU: the factored kernel (1, 2 rows) and the dequantizing one
    (4), against numpy on gguf's dequantized weights."""
    n, k = 96, 128
    rng = np.random.default_rng(rows)
    m = quant.QuantMatrix.quantize(rng.standard_normal((n, k)).astype("float32"), qtype)
    x = rng.standard_normal((rows, k)).astype("float32")
    gamma = rng.standard_normal(k).astype("float32")
    bias = rng.standard_normal(n).astype("float32")
    func = quant.linear_quant(n, k, qtype, rows=rows, **form)
    assert ops.is_fused_linear(func) and QuantLinearRule().apply(func, TARGET, False) is None
    f = c.compile(c.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET)
    args = [x] + ([gamma] if "norm_eps" in form else []) + [quant.pack_quant_weight(m)]
    args += [bias] if form.get("bias") else []
    out = _tvm.tensor(np.zeros((rows, n // 2 if "activation" in form else n), "float32"))
    f["main"](*map(_tvm.tensor, args), out)
    ref = fused_linear_reference(x, m.dequantize(), gamma if "norm_eps" in form else None,
                          form.get("norm_eps"), form.get("activation"),
                          bias if form.get("bias") else None)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("builder", [lambda **kw: ops.linear(64, 64, "float16", **kw),
                                     lambda **kw: quant.linear_quant(64, 64, "q8_0", **kw)],
                         ids=["float", "quantized"])
def test_fused_forms_refuse_what_none_has(builder):
    """Both linears refuse a residual with a fused form and a bias with an activation."""
    for kw in ({"residual": True, "norm_eps": 1e-5}, {"bias": True, "activation": "silu"}):
        with pytest.raises(ValueError, match="no residual, a gated one no bias"):
            builder(rows=2, **kw)
