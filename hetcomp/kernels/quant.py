"""The linear and embedding kernels of GGUF block-quantized weights (q4_0, q4_1, q8_0),
which dequantize in registers; formats and layout: :mod:`hetcomp.quant_format`."""

from __future__ import annotations

from .._tvm import compiler
from ..quant_format import (  # noqa: F401  re-exported: the kernels' layout
    BLOCK_BYTES,
    QK,
    QUANT_DTYPES,
    QuantMatrix,
    is_quant,
    pack_quant_weight,
    quant_packed_shape,
    unpack_quant_weight,
)
from .ops import _finish, _rows, pack_block

_QUANTS_AT = {"q4_0": 2, "q4_1": 4, "q8_0": 2}


def _dequant(wp, qtype: str, b: int):
    """``(scale(j, kb), weight(j, kk, scale))`` TE expressions of a packed weight ``wp``."""
    tir = compiler().tir

    def half(p, kb, c, lane):  # a little-endian float16 at block bytes c, c + 1
        lo = wp[p, kb, c, lane].astype("uint16")
        hi = wp[p, kb, c + 1, lane].astype("uint16")
        return tir.reinterpret("float16", lo | (hi << tir.const(8, "uint16"))).astype("float32")

    at = _QUANTS_AT[qtype]

    def weight(j, kk, d, m):
        p, lane, kb, t = j // b, j % b, kk // QK, kk % QK
        if qtype == "q8_0":
            q = tir.reinterpret("int8", wp[p, kb, at + t, lane]).astype("float32")
            return q * d
        byte = wp[p, kb, at + t % 16, lane].astype("int32")
        # A select, not a shift by 4 (t // 16): the shift stays a 32-bit constant once the
        # schedule unrolls the block (an index-typed shift widens the vector to int64).
        q = tir.Select(t < 16, byte & tir.const(15, "int32"),
                       byte >> tir.const(4, "int32")).astype("float32")
        if qtype == "q4_0":
            return (q - tir.const(8.0, "float32")) * d
        return q * d + m

    return half, weight


def linear_quant(n: int, k: int, qtype: str, residual: bool = False, rows: int | None = None):
    """``y[w, n] = x[w, k] @ W.T (+ r[w, n])`` with W in ``qtype`` blocks, packed
    ``[n // B, k // 32, bytes, B]`` (module doc); fp32 accumulation.

    The block scales (and q4_1 mins) are their own stages ``scale[n, k // 32]`` so that a
    schedule computes them once per block and column, not once per weight and row.
    """
    c = compiler()
    te, b = c.te, pack_block(n)
    assert k % QK == 0, (n, k)
    w = _rows(rows)
    x = te.placeholder((w, k), "float32", name="x")
    wp = te.placeholder(quant_packed_shape(n, k, qtype), "uint8", name="wp")
    half, weight = _dequant(wp, qtype, b)
    scale = te.compute((n, k // QK), lambda j, kb: half(j // b, kb, 0, j % b), name="scale")
    mins = None
    if qtype == "q4_1":
        mins = te.compute((n, k // QK), lambda j, kb: half(j // b, kb, 2, j % b), name="min")
    r = te.reduce_axis((0, k), name="k")
    y = te.compute(
        (w, n),
        lambda i, j: te.sum(x[i, r] * weight(j, r, scale[j, r // QK],
                                             None if mins is None else mins[j, r // QK]),
                            axis=r),
        name="matmul",
    )
    args = [x, wp]
    if residual:
        res = te.placeholder((w, n), "float32", name="residual")
        y = te.compute((w, n), lambda i, j: y[i, j] + res[i, j], name="add_residual")
        args.append(res)
    func = te.create_prim_func([*args, y], index_dtype_override="int64")
    return _finish(func, "linear", n=n, k=k, block=b, residual=int(residual), qtype=qtype)


def embed_quant(vocab: int, hidden: int, qtype: str, rows: int | None = None):
    """Rows of the (tied) embedding table in ``qtype`` blocks for ``tokens[w]``."""
    c = compiler()
    te, b = c.te, pack_block(vocab)
    w = _rows(rows)
    tokens = te.placeholder((w,), "int32", name="tokens")
    table = te.placeholder(quant_packed_shape(vocab, hidden, qtype), "uint8", name="table")
    half, weight = _dequant(table, qtype, b)

    def row(i, e):
        j = tokens[i].astype("int64")
        kb = e // QK
        mn = half(j // b, kb, 2, j % b) if qtype == "q4_1" else None
        return weight(j, e, half(j // b, kb, 0, j % b), mn)

    out = te.compute((w, hidden), row, name="embed")
    func = te.create_prim_func([tokens, table, out], index_dtype_override="int64")
    return _finish(func, "embed", qtype=qtype)
