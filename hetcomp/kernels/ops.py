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


def packed_shape(n: int, k: int) -> tuple[int, int, int]:
    """Shape ``[N // B, K, B]`` of a packed linear weight with ``n`` outputs, ``k`` inputs."""
    b = pack_block(n)
    return (n // b, k, b)


def pack_linear_weight(w: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """``[N, K]`` (HF layout, y = x @ w.T) -> ``[N // B, K, B]``."""
    n, k = w.shape
    b = pack_block(n)
    return np.ascontiguousarray(w.reshape(n // b, b, k).transpose(0, 2, 1)).astype(dtype)


def unpack_linear_weight(wp: np.ndarray) -> np.ndarray:
    nb, k, b = wp.shape
    return np.ascontiguousarray(wp.transpose(0, 2, 1).reshape(nb * b, k))


def fast_exp(x):
    """``exp(x)`` for float32 as plain arithmetic, so that LLVM vectorises it.

    ``tir.exp`` lowers to ``llvm.exp``, which x86 and ARM expand into one scalar libm call per
    lane: the softmax and SiLU kernels spent most of their time there. This is Cephes' expf
    (as in TVM's ``topi.fast_exp``) with a two-constant ln 2 (Cody-Waite), so the range
    reduction stays exact to a few ulp: ``x = n ln2 + f``, ``|f| <= ln2 / 2``, ``exp(f)`` by a
    degree-7 polynomial and ``2^n`` built in the exponent bits. Relative error < 2e-7 on
    ``[-87, 88]``; ``-inf`` (and anything below -88.37) gives 0; above 88 it saturates at
    ``exp(88)`` (the callers' arguments are <= 0 or feed ``1 / (1 + exp)``).
    """
    tir = compiler().tir

    def f32(v):
        return tir.const(v, "float32")

    x = tir.max(tir.min(x, f32(88.0)), f32(-88.3762626647949))
    n = tir.floor(x * f32(1.44269504088896341) + f32(0.5))
    f = x - n * f32(0.693359375) - n * f32(-2.12194440e-4)
    p = f32(1.9875691500e-4)
    for coef in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
                 5.0000001201e-1):
        p = p * f + f32(coef)
    y = p * f * f + f + f32(1.0)
    two_n = tir.reinterpret("float32", tir.shift_left(
        tir.Cast("int32", n) + tir.const(127, "int32"), tir.const(23, "int32")))
    return y * two_n


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
    wp = te.placeholder(packed_shape(n, k), wdtype, name="wp")
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
        lambda i, j: gu[i, j] / (tir.const(1.0, "float32") + fast_exp(-gu[i, j])) * gu[i, j + inter],
        name="silu_mul",
    )
    return _finish(te.create_prim_func([gu, y], index_dtype_override="int64"), "elementwise")


def rope_table(head_dim: int, theta: float, rows: int | None = None):
    """``cs[w, D]``: ``cos`` of each row's rotation angles in the first ``D / 2`` columns,
    ``sin`` in the last ``D / 2``; angle ``j`` of a token at ``pos`` is
    ``pos / theta^(2j / D)``.

    Computed once per call of the decoder and shared by every layer's ``rope_kv``, which
    computed them itself: a ``pow``, ``cos`` and ``sin`` libm call per angle, row and layer.
    """
    c = compiler()
    te, tir = c.te, c.tir
    half = head_dim // 2
    w = _rows(rows)
    pos = te.placeholder((w,), "int32", name="positions")

    def angle(i, j):
        inv_freq = tir.const(1.0, "float32") / tir.pow(
            tir.const(theta, "float32"),
            (j * 2).astype("float32") / tir.const(float(head_dim), "float32"))
        return pos[i].astype("float32") * inv_freq

    cs = te.compute((w, head_dim), lambda i, j: tir.if_then_else(
        j < half, tir.cos(angle(i, j)), tir.sin(angle(i, j - half))), name="rope_table")
    return _finish(te.create_prim_func([pos, cs], index_dtype_override="int64"), "elementwise")


def take_last(hidden: int, rows: int | None = None):
    c = compiler()
    te = c.te
    w = _rows(rows)
    x = te.placeholder((w, hidden), "float32", name="x")
    y = te.compute((1, hidden), lambda i, e: x[w - 1, e], name="last")
    return _finish(te.create_prim_func([x, y], index_dtype_override="int64"), "elementwise")


def argmax(vocab: int, rows: int | None = None):
    """Greedy ids per row: the first index of the row maximum (numpy's tie rule).

    Two plain reductions, the row maximum and the smallest index holding it, rather than one
    (index, value) reduction: min and max vectorise on a CPU and reduce across threads on a
    GPU, where the tuple reducer's select chain ran as scalar code (0.2 ms per row here).
    """
    c = compiler()
    te, tir = c.te, c.tir
    w = _rows(rows)
    logits = te.placeholder((w, vocab), "float32", name="logits")
    r = te.reduce_axis((0, vocab), name="v")
    m = te.compute((w,), lambda i: te.max(logits[i, r], axis=r), name="row_max")
    # The index search runs in float32 (exact below 2^24): AVX2 has no 64-bit integer min.
    assert vocab < 1 << 24, "argmax indexes in float32"
    r2 = te.reduce_axis((0, vocab), name="v2")
    first = te.compute((w,), lambda i: te.min(
        tir.Select(logits[i, r2] == m[i], r2.var.astype("float32"), tir.const(vocab, "float32")),
        axis=r2), name="first")
    idx = te.compute((w,), lambda i: first[i].astype("int32"), name="argmax")
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


def key_tile(context: int) -> int:
    """Keys per vector tile of the attention kernel: the largest of 16, 8, 4, 2, 1 dividing the
    cache length, so that the key range rounded up to whole tiles stays inside the cache."""
    return next(t for t in (16, 8, 4, 2, 1) if context % t == 0)


def attention(num_heads: int, num_kv_heads: int, head_dim: int, layers: int, context: int,
              rows: int | None = None):
    """Tree attention of ``q[H, w, D]`` over the committed cache ``[0, n)`` plus the tree.

    The tree's own K/V sit in the cache at ``[n, n + w)`` (written by ``rope_kv``); node i
    attends to tree node j where ``mask[i, j] != 0`` (its ancestors and itself). Output
    ``[w, H, D]``.

    The keys run over ``[0, n + w)`` rounded up to whole tiles of :func:`key_tile` keys, so
    the vector loops need no tail. Keys past ``n + w`` get the additive bias ``-inf`` (weight
    exactly 0); they read cache slots that are zero at allocation and hold stale, finite K/V
    later, so ``0 * v`` stays 0. The bias (0 or ``-inf`` per row and key) is built once per
    row, not per head, and replaces the mask gather in the vector loops.
    """
    c = compiler()
    te, tir = c.te, c.tir
    hq, g, d = num_heads, num_kv_heads, head_dim
    rep = hq // g
    tile = key_tile(context)
    w, n, layer, q, kt, vc, mask = _attention_inputs(hq, g, d, layers, context, rows)
    total = n + w
    keys = (total + (tile - 1)) // tile * tile
    scale = tir.const(1.0 / math.sqrt(d), "float32")
    zero, neg_inf = tir.const(0.0, "float32"), tir.const(-float("inf"), "float32")
    bias = te.compute((w, keys), lambda i, j: tir.if_then_else(
        j < n, zero, tir.if_then_else(
            j < total, tir.Select(mask[i, tir.min(j - n, w - 1)] != 0, zero, neg_inf), neg_inf)),
        name="bias")
    rd = te.reduce_axis((0, d), name="d")
    s = te.compute(
        (hq, w, keys),
        lambda h, i, j: te.sum(q[h, i, rd] * scale * kt[layer, h // rep, rd, j], axis=rd),
        name="scores",
    )
    rj = te.reduce_axis((0, keys), name="j")
    m = te.compute((hq, w), lambda h, i: te.max(s[h, i, rj] + bias[i, rj], axis=rj),
                   name="row_max")
    e = te.compute((hq, w, keys), lambda h, i, j: fast_exp(s[h, i, j] + bias[i, j] - m[h, i]),
                   name="exp")
    rj2 = te.reduce_axis((0, keys), name="j2")
    z = te.compute((hq, w), lambda h, i: te.sum(e[h, i, rj2], axis=rj2), name="row_sum")
    rj3 = te.reduce_axis((0, keys), name="j3")
    o = te.compute(
        (w, hq, d),
        lambda i, h, dd: te.sum(e[h, i, rj3] * vc[layer, h // rep, rj3, dd], axis=rj3),
        name="pv",
    )
    out = te.compute((w, hq, d), lambda i, h, dd: o[i, h, dd] / z[h, i], name="attn_out")
    func = te.create_prim_func([q, kt, vc, mask, layer, n, out], index_dtype_override="int64")
    return _finish(func, "attention", attn_cfg=[hq, g, d, layers, context], key_tile=tile)


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
            tir.const(1.0, "float32") + fast_exp(-(z[i, e] + b[e]))),
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
        valid(i, j), fast_exp(s[h, i, j] - m[h, i]), tir.const(0.0, "float32")), name=f"{name}_exp")
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
                          tir.const(0.0, "float32"), fast_exp(lse[h, i] - m[h, i]))

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
