"""The compute definitions (TE and TVMScript) of every kernel the LLaMA model calls.

Each builder returns a ``tirx.PrimFunc`` carrying the attribute ``hetcomp.op_kind``; the
schedule rules in :mod:`hetcomp.schedules` dispatch on it, the partition passes recognise
linear layers by it, and the profiler names op classes after it. Shapes with ``w`` (tree or
prompt rows) and ``n`` (committed cache length) are symbolic, so one compiled kernel serves
every width and position.

Layouts (chosen for the CPU schedules; see ``pack_linear_weight``):
- linear weights are packed ``[N // B, K, B]``: a block of B output columns is contiguous per
  input row, so a GEMV streams the weight once with B-wide vector FMAs;
- the K cache is transposed, ``k_cache[L, G, D, C]`` (positions contiguous, so scores vectorise
  over keys) and the V cache is ``v_cache[L, G, C, D]`` (so P.V vectorises over head_dim).
"""

from __future__ import annotations

import math

import numpy as np

from .._tvm import compiler

OP_KIND = "hetcomp.op_kind"


def pack_block(n: int) -> int:
    """The column block B of a packed linear weight with ``n`` output columns."""
    for b in (32, 16, 8, 4, 2):
        if n % b == 0:
            return b
    return 1


def pack_linear_weight(w: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """``[N, K]`` (HF layout, y = x @ w.T) -> ``[N // B, K, B]``."""
    n, k = w.shape
    b = pack_block(n)
    return np.ascontiguousarray(w.reshape(n // b, b, k).transpose(0, 2, 1)).astype(dtype)


def unpack_linear_weight(wp: np.ndarray) -> np.ndarray:
    nb, k, b = wp.shape
    return np.ascontiguousarray(wp.transpose(0, 2, 1).reshape(nb * b, k))


def _finish(func, kind: str, **attrs):
    func = func.with_attr(OP_KIND, kind)
    for k, v in attrs.items():
        func = func.with_attr(f"hetcomp.{k}", v)
    return func


def _sym(name: str):
    return compiler().tir.Var(name, "int64")


def _rows(rows: int | None):
    """The row extent: symbolic ``w`` (one kernel for every width) or a static width.

    Static widths let the schedules tile rows exactly (no predicates), which keeps the
    accumulators of a linear layer's row tile in vector registers.
    """
    return _sym("w") if rows is None else compiler().tir.IntImm("int64", rows)


def linear(n: int, k: int, wdtype: str, residual: bool = False, rows: int | None = None):
    """``y[w, n] = x[w, k] @ W.T (+ r[w, n])`` with W packed ``[n // B, k, B]``."""
    c = compiler()
    te, b = c.te, pack_block(n)
    w = _rows(rows)
    x = te.placeholder((w, k), "float32", name="x")
    wp = te.placeholder((n // b, k, b), wdtype, name="wp")
    r = te.reduce_axis((0, k), name="k")
    y = te.compute(
        (w, n),
        lambda i, j: te.sum(x[i, r] * wp[j // b, r, j % b].astype("float32"), axis=r),
        name="matmul",
    )
    args = [x, wp]
    if residual:
        res = te.placeholder((w, n), "float32", name="residual")
        y = te.compute((w, n), lambda i, j: y[i, j] + res[i, j], name="add_residual")
        args.append(res)
    return _finish(c.te.create_prim_func([*args, y], index_dtype_override="int64"), "linear", n=n, k=k, block=b,
                   residual=int(residual))


def embed(vocab: int, hidden: int, wdtype: str, rows: int | None = None):
    """Rows of the packed (tied) embedding table for ``tokens[w]``."""
    c = compiler()
    te, b = c.te, pack_block(vocab)
    w = _rows(rows)
    tokens = te.placeholder((w,), "int32", name="tokens")
    table = te.placeholder((vocab // b, hidden, b), wdtype, name="table")
    out = te.compute(
        (w, hidden),
        lambda i, e: table[tokens[i] // b, e, tokens[i] % b].astype("float32"),
        name="embed",
    )
    return _finish(te.create_prim_func([tokens, table, out], index_dtype_override="int64"), "embed")


def rms_norm(hidden: int, eps: float, rows: int | None = None):
    c = compiler()
    te, tir = c.te, c.tir
    w = _rows(rows)
    x = te.placeholder((w, hidden), "float32", name="x")
    g = te.placeholder((hidden,), "float32", name="gamma")
    r = te.reduce_axis((0, hidden), name="k")
    ss = te.compute((w,), lambda i: te.sum(x[i, r] * x[i, r], axis=r), name="sumsq")
    scale = te.compute(
        (w,), lambda i: tir.rsqrt(ss[i] / float(hidden) + tir.const(eps, "float32")), name="rstd"
    )
    y = te.compute((w, hidden), lambda i, e: x[i, e] * scale[i] * g[e], name="norm")
    return _finish(te.create_prim_func([x, g, y], index_dtype_override="int64"), "rms_norm")


def silu_mul(inter: int, rows: int | None = None):
    """``silu(gate) * up`` where the gate_up linear wrote ``[gate | up]`` columns."""
    c = compiler()
    te, tir = c.te, c.tir
    w = _rows(rows)
    gu = te.placeholder((w, 2 * inter), "float32", name="gate_up")
    y = te.compute(
        (w, inter),
        lambda i, j: gu[i, j] / (tir.const(1.0, "float32") + tir.exp(-gu[i, j])) * gu[i, j + inter],
        name="silu_mul",
    )
    return _finish(te.create_prim_func([gu, y], index_dtype_override="int64"), "elementwise")


def take_last(hidden: int, rows: int | None = None):
    c = compiler()
    te = c.te
    w = _rows(rows)
    x = te.placeholder((w, hidden), "float32", name="x")
    y = te.compute((1, hidden), lambda i, e: x[w - 1, e], name="last")
    return _finish(te.create_prim_func([x, y], index_dtype_override="int64"), "elementwise")


def argmax(vocab: int, rows: int | None = None):
    """Greedy ids per row: the first index of the row maximum (numpy's tie rule)."""
    c = compiler()
    te, tir = c.te, c.tir
    w = _rows(rows)
    logits = te.placeholder((w, vocab), "float32", name="logits")
    r = te.reduce_axis((0, vocab), name="v")

    def fcombine(x, y):
        # (index, value): keep the larger value, the smaller index on ties.
        take_y = tir.any(y[1] > x[1], tir.all(y[1] == x[1], y[0] < x[0]))
        return tir.Select(take_y, y[0], x[0]), tir.Select(take_y, y[1], x[1])

    def fidentity(t0, t1):
        return tir.const(-1, t0), tir.min_value(t1)

    amax = te.comm_reducer(fcombine, fidentity, name="argmax")
    idx, _ = te.compute(
        (w,), lambda i: amax((r.var.astype("int32"), logits[i, r]), axis=r), name="argmax"
    )
    return _finish(te.create_prim_func([logits, idx], index_dtype_override="int64"), "argmax")


def _attention_inputs(hq: int, g: int, d: int, layers: int, context: int, rows: int | None):
    """Symbols and placeholders shared by the attention kernels (cache layouts: module doc)."""
    te = compiler().te
    w, n, layer = _rows(rows), _sym("n"), _sym("layer")
    q = te.placeholder((hq, w, d), "float32", name="q")
    kt = te.placeholder((layers, g, d, context), "float32", name="k_cache")
    vc = te.placeholder((layers, g, context, d), "float32", name="v_cache")
    mask = te.placeholder((w, w), "int32", name="mask")
    return w, n, layer, q, kt, vc, mask


def attention(num_heads: int, num_kv_heads: int, head_dim: int, layers: int, context: int,
              rows: int | None = None):
    """Tree attention of ``q[H, w, D]`` over the committed cache ``[0, n)`` plus the tree.

    The tree's own K/V sit in the cache at ``[n, n + w)`` (written by ``rope_kv``); node i
    attends to tree node j where ``mask[i, j] != 0`` (its ancestors and itself). Output
    ``[w, H, D]``.
    """
    c = compiler()
    te, tir = c.te, c.tir
    hq, g, d = num_heads, num_kv_heads, head_dim
    rep = hq // g
    w, n, layer, q, kt, vc, mask = _attention_inputs(hq, g, d, layers, context, rows)
    total = n + w
    scale = tir.const(1.0 / math.sqrt(d), "float32")
    rd = te.reduce_axis((0, d), name="d")
    s = te.compute(
        (hq, w, total),
        lambda h, i, j: te.sum(q[h, i, rd] * scale * kt[layer, h // rep, rd, j], axis=rd),
        name="scores",
    )

    def valid(i, j):
        return tir.if_then_else(j < n, tir.const(True), mask[i, tir.max(j - n, 0)] != 0)

    neg = tir.min_value("float32")
    rj = te.reduce_axis((0, total), name="j")
    m = te.compute(
        (hq, w), lambda h, i: te.max(tir.Select(valid(i, rj), s[h, i, rj], neg), axis=rj),
        name="row_max",
    )
    e = te.compute(
        (hq, w, total),
        lambda h, i, j: tir.Select(valid(i, j), tir.exp(s[h, i, j] - m[h, i]),
                                   tir.const(0.0, "float32")),
        name="exp",
    )
    rj2 = te.reduce_axis((0, total), name="j2")
    z = te.compute((hq, w), lambda h, i: te.sum(e[h, i, rj2], axis=rj2), name="row_sum")
    rj3 = te.reduce_axis((0, total), name="j3")
    o = te.compute(
        (w, hq, d),
        lambda i, h, dd: te.sum(e[h, i, rj3] * vc[layer, h // rep, rj3, dd], axis=rj3),
        name="pv",
    )
    out = te.compute((w, hq, d), lambda i, h, dd: o[i, h, dd] / z[h, i], name="attn_out")
    func = te.create_prim_func([q, kt, vc, mask, layer, n, out], index_dtype_override="int64")
    return _finish(func, "attention", attn_cfg=[hq, g, d, layers, context])


def medusa_act(hidden: int, rows: int | None = None):
    """``h + SiLU(z + b)``: the residual SiLU block of a Medusa head."""
    c = compiler()
    te, tir = c.te, c.tir
    w = _rows(rows)
    h = te.placeholder((w, hidden), "float32", name="h")
    z = te.placeholder((w, hidden), "float32", name="z")
    b = te.placeholder((hidden,), "float32", name="bias")
    y = te.compute(
        (w, hidden),
        lambda i, e: h[i, e] + (z[i, e] + b[e]) / (
            tir.const(1.0, "float32") + tir.exp(-(z[i, e] + b[e]))),
        name="medusa_act")
    return _finish(te.create_prim_func([h, z, b, y], index_dtype_override="int64"),
                   "elementwise")


def _lse_parts(te, tir, s, valid, total, hq, w, name):
    """Row max, exp, sum and log-sum-exp of masked scores (empty rows give lse = -inf)."""
    neg = tir.min_value("float32")
    r1 = te.reduce_axis((0, total), name=f"{name}_j1")
    m = te.compute((hq, w), lambda h, i: te.max(tir.Select(valid(i, r1), s[h, i, r1], neg),
                                                 axis=r1), name=f"{name}_max")
    e = te.compute((hq, w, total), lambda h, i, j: tir.Select(
        valid(i, j), tir.exp(s[h, i, j] - m[h, i]), tir.const(0.0, "float32")), name=f"{name}_exp")
    r2 = te.reduce_axis((0, total), name=f"{name}_j2")
    z = te.compute((hq, w), lambda h, i: te.sum(e[h, i, r2], axis=r2), name=f"{name}_sum")
    lse = te.compute((hq, w), lambda h, i: tir.Select(
        z[h, i] > tir.const(0.0, "float32"), m[h, i] + tir.log(z[h, i]),
        tir.const(-float("inf"), "float32")), name=f"{name}_lse")
    return e, z, lse


def attention_part(num_heads: int, num_kv_heads: int, head_dim: int, layers: int,
                   context: int, part: str, rows: int | None = None):
    """One affinity part of tree attention, returning ``(o[w, H, D], lse[H, w])``.

    ``part="dense"``: tree queries against the committed cache ``[0, n)`` (long, regular).
    ``part="tree"``: tree queries against the tree's own K/V ``[n, n + w)`` under ``mask``
    (each row has depth + 1 non-zeros). ``o`` is normalised within the part; ``lse`` is the
    part's log-sum-exp, so :func:`attention_merge` recombines the parts exactly.
    """
    c = compiler()
    te, tir = c.te, c.tir
    hq, g, d = num_heads, num_kv_heads, head_dim
    rep = hq // g
    w, n, layer, q, kt, vc, mask = _attention_inputs(hq, g, d, layers, context, rows)
    dense = part == "dense"
    # Reductions never run empty (an empty TIR reduction skips its init): the dense part over
    # an empty cache (n = 0) reduces over one masked-out key instead.
    total, off = (tir.max(n, 1), 0) if dense else (w, n)
    scale = tir.const(1.0 / math.sqrt(d), "float32")
    rd = te.reduce_axis((0, d), name="d")
    s = te.compute(
        (hq, w, total),
        lambda h, i, j: te.sum(q[h, i, rd] * scale * kt[layer, h // rep, rd, off + j], axis=rd),
        name="scores")

    def valid(i, j):
        return j < n if dense else mask[i, j] != 0

    e, z, lse = _lse_parts(te, tir, s, valid, total, hq, w, "p")
    rj = te.reduce_axis((0, total), name="j3")
    o = te.compute((w, hq, d), lambda i, h, dd: te.sum(
        e[h, i, rj] * vc[layer, h // rep, off + rj, dd], axis=rj), name="pv")
    out = te.compute((w, hq, d), lambda i, h, dd: tir.Select(
        z[h, i] > tir.const(0.0, "float32"), o[i, h, dd] / z[h, i], tir.const(0.0, "float32")),
        name="attn_out")
    args = [q, kt, vc] + ([] if dense else [mask]) + [layer, n, out, lse]
    func = te.create_prim_func(args, index_dtype_override="int64")
    return _finish(func, "attention_part", part=part)


def attention_merge(num_heads: int, head_dim: int, rows: int | None = None):
    """Exact online-softmax merge of two attention parts: weights ``exp(lse_p - max)``."""
    c = compiler()
    te, tir = c.te, c.tir
    hq, d = num_heads, head_dim
    w = _rows(rows)
    o1 = te.placeholder((w, hq, d), "float32", name="o1")
    l1 = te.placeholder((hq, w), "float32", name="lse1")
    o2 = te.placeholder((w, hq, d), "float32", name="o2")
    l2 = te.placeholder((hq, w), "float32", name="lse2")
    m = te.compute((hq, w), lambda h, i: tir.max(l1[h, i], l2[h, i]), name="m")

    def weight(lse, h, i):
        return tir.Select(lse[h, i] == tir.const(-float("inf"), "float32"),
                          tir.const(0.0, "float32"), tir.exp(lse[h, i] - m[h, i]))

    out = te.compute((w, hq, d), lambda i, h, dd: (
        weight(l1, h, i) * o1[i, h, dd] + weight(l2, h, i) * o2[i, h, dd])
        / (weight(l1, h, i) + weight(l2, h, i)), name="merge")
    return _finish(te.create_prim_func([o1, l1, o2, l2, out], index_dtype_override="int64"),
                   "attention_merge")


def add(n: int, rows: int | None = None):
    """``a[w, n] + b[w, n]`` (the residual of a column-split linear layer)."""
    c = compiler()
    te = c.te
    w = _rows(rows)
    a = te.placeholder((w, n), "float32", name="a")
    b = te.placeholder((w, n), "float32", name="b")
    y = te.compute((w, n), lambda i, j: a[i, j] + b[i, j], name="add")
    return _finish(te.create_prim_func([a, b, y], index_dtype_override="int64"), "elementwise")
