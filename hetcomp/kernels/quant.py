"""The linear and embedding kernels of GGUF block-quantized weights (q4_0, q4_1, q8_0),
which dequantize in registers; formats and layout: :mod:`hetcomp.quant_format`."""

from __future__ import annotations

from .._tvm import compiler
from ..quant_format import (  # noqa: F401  re-exported: the kernels' layout
    BLOCK_BYTES,
    HEADER_BYTES,
    QK,
    QUANT_DTYPES,
    QuantMatrix,
    is_quant,
    pack_quant_weight,
    quant_packed_shape,
    unpack_quant_weight,
)
from .ops import (
    _finish,
    _rows,
    fused_attrs,
    fused_epilogue,
    fused_form,
    hi_lo,
    pack_block,
    scaled,
    split_rows,
)


def _dequant(wp, qtype: str, b: int):
    """``(half, quant, weight)`` TE expressions of a packed weight ``wp``: ``half(p, kb, c,
    lane)`` the float16 at block bytes ``c, c + 1``; ``quant(j, kb, t)`` weight ``t`` of a
    block as its raw integer (nibble or int8) in float32; ``weight(j, kk, d, m)`` the
    dequantized weight."""
    tir = compiler().tir

    def half(p, kb, c, lane):  # little-endian
        lo = wp[p, kb, c, lane].astype("uint16")
        hi = wp[p, kb, c + 1, lane].astype("uint16")
        return tir.reinterpret("float16", lo | (hi << tir.const(8, "uint16"))).astype("float32")

    at = HEADER_BYTES[qtype]

    def quant(j, kb, t):
        p, lane = j // b, j % b
        if qtype == "q8_0":
            return tir.reinterpret("int8", wp[p, kb, at + t, lane]).astype("float32")
        byte = wp[p, kb, at + t % 16, lane].astype("int32")
        # A select, not a shift by 4 (t // 16): the shift stays a 32-bit constant once the
        # schedule unrolls the block (an index-typed shift widens the vector to int64).
        return tir.Select(t < 16, byte & tir.const(15, "int32"),
                          byte >> tir.const(4, "int32")).astype("float32")

    def weight(j, kk, d, m):
        q = quant(j, kk // QK, kk % QK)
        if qtype == "q8_0":
            return q * d
        if qtype == "q4_0":
            return (q - tir.const(8.0, "float32")) * d
        return q * d + m

    return half, quant, weight


#: Widths up to which the linear kernel factors the block scale out of the block's sum
#: (``y = sum_kb d inner + c xsum``, ``inner = sum_t x q``): one vector op fewer per weight,
#: with a second ``rows x B`` register tile. SmolLM2 shapes, 1 thread, min of 9-15 runs,
#: direct / factored: 3072x576 W=1 52.7 / 44.2 us (q4_1), 53.1 / 35.1 (q8_0); W=4 76.3 / 71.5,
#: 72.5 / 68.3; the 49152x576 q8_0 LM head W=1 1004 / 843, W=2 1893 / 1765, W=4 2696 / 3020.
FACTORED_MAX_ROWS = 2


def linear_quant(n: int, k: int, qtype: str, residual: bool = False, rows: int | None = None,
                 norm_eps: float | None = None, activation: str | None = None,
                 bias: bool = False, split_x: bool = False):
    """``y[w, n] = x[w, k] @ W.T (+ r[w, n])`` with W in ``qtype`` blocks, packed
    ``[n // B, k // 32, bytes, B]`` (module doc); fp32 accumulation.

    Static widths up to :data:`FACTORED_MAX_ROWS` sum each block on the raw quants and scale
    once per block: ``y = sum_kb (d inner + c xsum)`` with ``inner[w, n, kb] = sum_t x q``,
    ``xsum[w, kb] = sum_t x`` and ``c`` the min (q4_1), ``-8 d`` (q4_0) or nothing (q8_0).
    Wider ones dequantize each weight (``x (d q + m)``) once per row tile. The block scales
    (and q4_1 mins) are their own stages ``scale[n, k // 32]`` so that a schedule decodes them
    once per block and column, not once per weight and row.

    ``norm_eps``, ``activation``, ``bias``: the fused forms of
    :func:`hetcomp.kernels.ops.linear` (the same arguments, blocks ``sumsq`` and
    ``epilogue``), x times gamma wherever x is read. A gated kernel's per-column stages are
    ``[2, n / 2, ...]`` like its ``matmul``: half 0 the gate columns, half 1 the up columns,
    so a schedule can decode a half's scale inside the loop over halves.

    ``split_x`` (a static width: what tensor cores multiply): :func:`hetcomp.kernels.ops.
    linear`'s ``split_x`` form on dequantized weights. x goes in as float16 hi and lo terms
    over its rows' largest magnitudes (blocks ``x_max``, ``x_split``), each weight ``d q +
    m`` (float32, as the other forms compute it) as float16 hi and lo terms (block
    ``w_split``, ``[2, k, cols]``); ``matmul_raw`` sums the four products in float32 and
    ``matmul`` scales them back: both operands kept to ~22 bits, where float16 weights
    would round each dequantized weight by up to 2^-12 of itself.
    """
    c = compiler()
    te, tir, b = c.te, c.tir, pack_block(n)
    assert k % QK == 0, (n, k)
    fused = fused_form(residual, norm_eps, activation, bias)
    w = _rows(rows)
    nkb = k // QK
    x = te.placeholder((w, k), "float32", name="x")
    gamma = te.placeholder((k,), "float32", name="gamma") if norm_eps is not None else None
    wp = te.placeholder(quant_packed_shape(n, k, qtype), "uint8", name="wp")
    b_in = te.placeholder((n,), "float32", name="bias") if bias else None
    half, quant, weight = _dequant(wp, qtype, b)

    def xin(i, kk):  # x's element (times gamma)
        return x[i, kk] if gamma is None else x[i, kk] * gamma[kk]

    # Per-column stages and the matmul over columns ``cols``: [n], or [2, n / 2] gated.
    cols = (n,) if activation is None else (2, n // 2)

    def col(c_idx):  # the weight column of a stage's column index
        return c_idx[0] if len(c_idx) == 1 else c_idx[0] * (n // 2) + c_idx[1]

    scale = te.compute((*cols, nkb), lambda *a: half(col(a[:-1]) // b, a[-1], 0,
                                                     col(a[:-1]) % b), name="scale")
    mins = None
    if qtype == "q4_1":
        mins = te.compute((*cols, nkb), lambda *a: half(col(a[:-1]) // b, a[-1], 2,
                                                        col(a[:-1]) % b), name="min")
    if split_x:
        y = _split_matmul(x, gamma, w, k, cols, lambda kk, c_idx: weight(
            col(c_idx), kk, scale[(*c_idx, kk // QK)],
            None if mins is None else mins[(*c_idx, kk // QK)]))
    elif rows is not None and rows <= FACTORED_MAX_ROWS:
        rt = te.reduce_axis((0, QK), name="t")
        inner = te.compute((w, *cols, nkb), lambda i, *a: te.sum(
            xin(i, a[-1] * QK + rt) * quant(col(a[:-1]), a[-1], rt), axis=rt), name="inner")
        rkb = te.reduce_axis((0, nkb), name="kb")
        if qtype == "q8_0":
            def block(i, c_idx, kb):
                return scale[(*c_idx, kb)] * inner[(i, *c_idx, kb)]
        else:
            rt2 = te.reduce_axis((0, QK), name="t2")
            xs = te.compute((w, nkb), lambda i, kb: te.sum(xin(i, kb * QK + rt2), axis=rt2),
                            name="xsum")

            def block(i, c_idx, kb):
                off = (mins[(*c_idx, kb)] if qtype == "q4_1"
                       else scale[(*c_idx, kb)] * tir.const(-8.0, "float32"))
                return scale[(*c_idx, kb)] * inner[(i, *c_idx, kb)] + off * xs[i, kb]
        y = te.compute((w, *cols), lambda i, *c_idx: te.sum(block(i, c_idx, rkb), axis=rkb),
                       name="matmul")
    else:
        r = te.reduce_axis((0, k), name="k")
        y = te.compute((w, *cols), lambda i, *c_idx: te.sum(xin(i, r) * weight(
            col(c_idx), r, scale[(*c_idx, r // QK)],
            None if mins is None else mins[(*c_idx, r // QK)]), axis=r), name="matmul")
    args = [x] if gamma is None else [x, gamma]
    args += [wp] + ([b_in] if bias else [])
    if fused:
        out = fused_epilogue(y, x, k, norm_eps, activation, b_in)
        func = te.create_prim_func([*args, out], index_dtype_override="int64")
        return _finish(func, "linear", n=n, k=k, block=b, residual=0, qtype=qtype,
                       **fused_attrs(norm_eps, activation, bias))
    if residual:
        res = te.placeholder((w, n), "float32", name="residual")
        y = te.compute((w, n), lambda i, j: y[i, j] + res[i, j], name="add_residual")
        args.append(res)
    func = te.create_prim_func([*args, y], index_dtype_override="int64")
    return _finish(func, "linear", n=n, k=k, block=b, residual=int(residual), qtype=qtype)


def _split_matmul(x, gamma, w, k: int, cols: tuple, weight):
    """:func:`linear_quant`'s ``split_x`` blocks ``x_max``, ``x_split``, ``w_split``,
    ``matmul_raw`` and ``matmul`` (``[w, *cols]``); ``weight(kk, c_idx)`` the dequantized
    weight of row ``kk``, column index ``c_idx``."""
    te = compiler().te
    xs, x_max = split_rows(x, gamma, w, k)
    rows = int(w)
    ws = te.compute((2, k, *cols), lambda u, kk, *c_idx: hi_lo(weight(kk, c_idx), u == 0),
                    name="w_split")
    s, u, r = (te.reduce_axis((0, 2), name="s"), te.reduce_axis((0, 2), name="u"),
               te.reduce_axis((0, k), name="k"))
    raw = te.compute((rows, *cols), lambda i, *c_idx: te.sum(
        xs[s * rows + i, r].astype("float32") * ws[(u, r, *c_idx)].astype("float32"),
        axis=[s, u, r]), name="matmul_raw")
    return te.compute((rows, *cols), lambda i, *c_idx: raw[(i, *c_idx)] * x_max[i],
                      name="matmul")


def embed_quant(vocab: int, hidden: int, qtype: str, rows: int | None = None,
                scale: float = 1.0):
    """Rows of the (tied) embedding table in ``qtype`` blocks for ``tokens[w]``, times
    ``scale`` (:func:`hetcomp.kernels.ops.embed`)."""
    c = compiler()
    te, b = c.te, pack_block(vocab)
    w = _rows(rows)
    tokens = te.placeholder((w,), "int32", name="tokens")
    table = te.placeholder(quant_packed_shape(vocab, hidden, qtype), "uint8", name="table")
    half, _, weight = _dequant(table, qtype, b)

    def row(i, e):
        j = tokens[i].astype("int64")
        kb = e // QK
        mn = half(j // b, kb, 2, j % b) if qtype == "q4_1" else None
        return scaled(weight(j, e, half(j // b, kb, 0, j % b), mn), scale)

    out = te.compute((w, hidden), row, name="embed")
    func = te.create_prim_func([tokens, table, out], index_dtype_override="int64")
    return _finish(func, "embed", qtype=qtype)
