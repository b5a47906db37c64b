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
from ..quant_format import pack_block

OP_KIND = "hetcomp.op_kind"


def packed_shape(n: int, k: int) -> tuple[int, int, int]:
    """Shape ``[N // B, K, B]`` of a packed linear weight with ``n`` outputs, ``k`` inputs."""
    b = pack_block(n)
    return (n // b, k, b)


def pack_linear_weight(w: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """``[N, K]`` (HF layout, y = x @ w.T) -> ``[N // B, K, B]``."""
    n, k = w.shape
    b = pack_block(n)
    out = np.empty((n // b, k, b), dtype)
    np.copyto(out, w.reshape(n // b, b, k).transpose(0, 2, 1))  # one pass, cast included
    return out


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


def linear(n: int, k: int, wdtype: str, residual: bool = False, rows: int | None = None,
           norm_eps: float | None = None, activation: str | None = None, bias: bool = False,
           split_x: bool = False):
    """``y[w, n] = x[w, k] @ W.T (+ r[w, n])`` with W packed ``[n // B, k, B]``.

    The fused forms (:class:`~hetcomp.passes.fuse_linear_chains.FuseLinearChains`) take the
    elementwise kernels around a linear into it, one launch instead of two or three:

    - ``norm_eps``: x is RMS-normed first, with ``gamma[k]`` the argument after x. The kernel
      reduces ``(x * gamma) @ W.T`` and the row's sum of squares (block ``sumsq``) and scales
      afterwards: ``y = rsqrt(sumsq / k + eps) * ((x * gamma) @ W.T)``, so no normed copy of x
      is ever written. The same arithmetic as :func:`rms_norm` then :func:`linear` up to
      rounding (the scale moves past the sum).
    - ``activation`` (a key of :data:`ACTIVATIONS`): the ``n`` weight columns are
      ``[gate | up]`` and the kernel writes ``act(gate) * up``, ``[w, n / 2]``. ``matmul`` is
      ``[w, 2, n / 2]`` (half 0 the gate), so one thread can hold both halves of a column.
    - ``bias``: ``+ b[n]`` (Qwen2's q/k/v bias, :func:`bias_add`), the argument after W.

    A fused kernel writes its result in the block ``epilogue`` and takes no residual.

    ``split_x`` (float16 weights, a static width: what tensor cores multiply) writes x (times
    gamma) as two float16 terms first, ``hi = f16(v)`` and ``lo = f16(v - hi)`` of
    ``v = x / m`` with ``m`` the row's largest magnitude (block ``x_max``: any row fits
    float16's range), rows ``[hi; lo]`` of the block ``x_split``; reduces ``hi @ W.T +
    lo @ W.T`` in float32 (block ``matmul_raw``) and scales it back by ``m`` (``matmul``):
    the same arguments and result, x kept to ~22 bits of its row's scale (float16 x alone
    keeps 11, which moves logits by ~2e-4 of their scale).
    """
    c = compiler()
    te, b = c.te, pack_block(n)
    w = _rows(rows)
    fused = fused_form(residual, norm_eps, activation, bias)
    x = te.placeholder((w, k), "float32", name="x")
    wp = te.placeholder(packed_shape(n, k), wdtype, name="wp")
    r = te.reduce_axis((0, k), name="k")
    gamma = te.placeholder((k,), "float32", name="gamma") if norm_eps is not None else None
    args = [x] if gamma is None else [x, gamma]
    args.append(wp)
    b_in = te.placeholder((n,), "float32", name="bias") if bias else None
    args += [b_in] if bias else []

    def dot(i, col):  # x's row (times gamma) against column col of W
        xin = x[i, r] if gamma is None else x[i, r] * gamma[r]
        return te.sum(xin * wp[col // b, r, col % b].astype("float32"), axis=r)

    if split_x:
        dot, row_scale = _split_dot(x, gamma, wp, w, k, b)
    if activation is None:
        shape, body = (w, n), lambda i, j: dot(i, j)
    else:
        half = n // 2
        shape, body = (w, 2, half), lambda i, h, j: dot(i, h * half + j)
    if split_x:  # the sums over the rows' scaled terms (``matmul_raw``), scaled back
        raw = te.compute(shape, body, name="matmul_raw")

        def body(i, *rest):
            return raw[(i, *rest)] * row_scale[i]

    y = te.compute(shape, body, name="matmul")
    if not fused:
        if residual:
            res = te.placeholder((w, n), "float32", name="residual")
            y = te.compute((w, n), lambda i, j: y[i, j] + res[i, j], name="add_residual")
            args.append(res)
        return _finish(te.create_prim_func([*args, y], index_dtype_override="int64"), "linear",
                       n=n, k=k, block=b, residual=int(residual))
    out = fused_epilogue(y, x, k, norm_eps, activation, b_in)
    return _finish(te.create_prim_func([*args, out], index_dtype_override="int64"), "linear",
                   n=n, k=k, block=b, residual=0, **fused_attrs(norm_eps, activation, bias))


def _split_dot(x, gamma, wp, w, k: int, b: int):
    """:func:`linear`'s ``dot`` for ``split_x`` and the rows' scales (:func:`split_rows`),
    a reduction over (term, k)."""
    te = compiler().te
    if wp.dtype != "float16":
        raise ValueError("split_x needs float16 weights and a static width")
    xs, x_max = split_rows(x, gamma, w, k)
    rows = int(w)
    term, r = te.reduce_axis((0, 2), name="s"), te.reduce_axis((0, k), name="k")

    def dot(i, col):
        return te.sum(xs[term * rows + i, r].astype("float32")
                      * wp[col // b, r, col % b].astype("float32"), axis=[term, r])

    return dot, x_max


def split_rows(x, gamma, w, k: int):
    """The blocks ``x_max`` (each row's largest magnitude) and ``x_split`` (``[2w, k]``
    float16, the hi rows then the lo rows of x (times gamma) over it) of a tensor-core
    linear: ``(x_split, x_max)``. The width ``w`` must be static."""
    c = compiler()
    te, tir = c.te, c.tir
    if not isinstance(w, c.tir.IntImm):  # a symbolic width: a value, not a type, is wrong
        raise ValueError("split_x needs a static width")  # noqa: TRY004
    rows = int(w)

    def value(i, kk):
        return x[i, kk] if gamma is None else x[i, kk] * gamma[kk]

    rm = te.reduce_axis((0, k), name="km")
    # A zero row keeps a scale of 1e-30: its terms are then 0, as its products.
    x_max = te.compute((rows,), lambda i: te.max(
        tir.max(tir.abs(value(i, rm)), tir.const(1e-30, "float32")), axis=rm), name="x_max")

    def split(row, kk):
        i = row % rows
        return hi_lo(value(i, kk) / x_max[i], row < rows)

    return te.compute((2 * rows, k), split, name="x_split"), x_max


def hi_lo(v, hi):
    """``f16(v)`` where ``hi``, else ``f16(v - f16(v))``: a float32 value as the sum of two
    float16 terms (~22 bits of it)."""
    tir = compiler().tir
    h = v.astype("float16")
    return tir.Select(hi, h, (v - h.astype("float32")).astype("float16"))


def fused_epilogue(mm, x, k: int, norm_eps: float | None, activation: str | None, b_in):
    """The ``epilogue`` block of a fused linear (:func:`linear`, and the block-quantized
    :func:`hetcomp.kernels.quant.linear_quant`): ``mm`` the ``matmul`` block (``[w, n]``, or
    ``[w, 2, n / 2]`` gated), x the input (a norm's ``sumsq`` block reads it), ``b_in`` the
    bias placeholder or None."""
    c = compiler()
    te, tir = c.te, c.tir
    w = x.shape[0]
    if norm_eps is not None:
        r2 = te.reduce_axis((0, k), name="k2")
        ss = te.compute((w,), lambda i: te.sum(x[i, r2] * x[i, r2], axis=r2), name="sumsq")

    def scale(i):  # rstd inline in the epilogue, as in RMSNormRule (no shared copy, no race)
        if norm_eps is None:
            return tir.const(1.0, "float32")
        return tir.rsqrt(ss[i] / float(k) + tir.const(norm_eps, "float32"))

    if activation is None:
        return te.compute(tuple(mm.shape), lambda i, j: mm[i, j] * scale(i) + b_in[j]
                          if b_in is not None else mm[i, j] * scale(i), name="epilogue")
    act = ACTIVATION_FNS[activation]

    def gated(i, j):  # the activation reads its argument many times: bind it once
        gate, s = tir.Var("gate", "float32"), tir.Var("s", "float32")
        return tir.Let(s, scale(i), tir.Let(gate, mm[i, 0, j] * s,
                                            act(gate) * (mm[i, 1, j] * s)))

    return te.compute((w, mm.shape[2]), gated, name="epilogue")


def fused_form(residual: bool, norm_eps: float | None, activation: str | None,
               bias: bool) -> bool:
    """Whether a linear's arguments ask for a fused form (a ValueError for the
    combinations none has: a residual with any, a bias with an activation)."""
    fused = norm_eps is not None or activation is not None or bias
    if fused and residual or bias and activation is not None:
        raise ValueError("a fused linear takes no residual, a gated one no bias")
    return fused


def fused_attrs(norm_eps: float | None, activation: str | None, bias: bool) -> dict:
    """A fused linear's ``hetcomp.*`` attributes (what :func:`is_fused_linear` reads)."""
    attrs = {"norm_eps": float(norm_eps)} if norm_eps is not None else {}
    if activation is not None:
        attrs["activation"] = activation
    if bias:
        attrs["bias"] = 1
    return attrs


def is_fused_linear(func) -> bool:
    """Whether a ``linear`` kernel is one of :func:`linear`'s fused forms."""
    attrs = func.attrs
    return (attrs is not None and str(attrs.get(OP_KIND, "")) == "linear"
            and any(f"hetcomp.{a}" in attrs for a in ("norm_eps", "activation", "bias")))


def embed(vocab: int, hidden: int, wdtype: str, rows: int | None = None, scale: float = 1.0):
    """Rows of the packed (tied) embedding table for ``tokens[w]``, times ``scale`` (Gemma:
    ``sqrt(hidden)``, applied in float32 as transformers does for a float32 table)."""
    c = compiler()
    te, b = c.te, pack_block(vocab)
    w = _rows(rows)
    tokens = te.placeholder((w,), "int32", name="tokens")
    table = te.placeholder((vocab // b, hidden, b), wdtype, name="table")
    out = te.compute(
        (w, hidden),
        lambda i, e: scaled(table[tokens[i] // b, e, tokens[i] % b].astype("float32"), scale),
        name="embed",
    )
    return _finish(te.create_prim_func([tokens, table, out], index_dtype_override="int64"), "embed")


def scaled(x, scale: float):
    """``x * scale`` in float32, or ``x`` itself for a scale of 1."""
    return x if scale == 1.0 else x * compiler().tir.const(scale, "float32")


def rms_norm(hidden: int, eps: float, rows: int | None = None, residual: bool = False):
    """``x / rms(x) * gamma`` per row; ``residual``: ``+ r`` (Gemma's post-norms, whose output
    joins the residual stream), in the same ``norm`` block."""
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
    if residual:
        r = te.placeholder((w, hidden), "float32", name="residual")
        y = te.compute((w, hidden), lambda i, e: r[i, e] + x[i, e] * scale[i] * g[e], name="norm")
        return _finish(te.create_prim_func([x, g, r, y], index_dtype_override="int64"),
                       "rms_norm", residual=1, norm_eps=float(eps))
    y = te.compute((w, hidden), lambda i, e: x[i, e] * scale[i] * g[e], name="norm")
    return _finish(te.create_prim_func([x, g, y], index_dtype_override="int64"), "rms_norm",
                   norm_eps=float(eps))


def _silu(x):
    return x / (compiler().tir.const(1.0, "float32") + fast_exp(-x))


def _gelu_tanh(x):
    """``0.5 x (1 + tanh(u)) = x * sigmoid(2u)``, ``u = sqrt(2 / pi) (x + 0.044715 x^3)``: one
    :func:`fast_exp` and no cancellation near 0 (``1 - 2 / (1 + exp(2u))`` would have)."""
    tir = compiler().tir
    k0, k1 = tir.const(-2.0 * math.sqrt(2.0 / math.pi), "float32"), tir.const(0.044715, "float32")
    return x / (tir.const(1.0, "float32") + fast_exp(k0 * (x + k1 * x * x * x)))


#: The gate's activation of each ``LlamaConfig.activation`` (shared by the activation
#: kernels and the fused linears).
ACTIVATION_FNS = {"silu": _silu, "gelu_tanh": _gelu_tanh}


def _gated(activation: str, inter: int, rows: int | None):
    """``act(gate) * up`` where the gate_up linear wrote ``[gate | up]`` columns."""
    c = compiler()
    te = c.te
    w = _rows(rows)
    gu = te.placeholder((w, 2 * inter), "float32", name="gate_up")
    act = ACTIVATION_FNS[activation]
    name = {"silu": "silu_mul", "gelu_tanh": "gelu_mul"}[activation]
    y = te.compute((w, inter), lambda i, j: act(gu[i, j]) * gu[i, j + inter], name=name)
    return _finish(te.create_prim_func([gu, y], index_dtype_override="int64"), "elementwise",
                   activation=activation)


def silu_mul(inter: int, rows: int | None = None):
    """``silu(gate) * up`` where the gate_up linear wrote ``[gate | up]`` columns."""
    return _gated("silu", inter, rows)


def gelu_mul(inter: int, rows: int | None = None):
    """``gelu_tanh(gate) * up`` (GeGLU, Gemma) where the gate_up linear wrote ``[gate | up]``
    (:func:`_gelu_tanh`)."""
    return _gated("gelu_tanh", inter, rows)


#: The activation kernel of each ``LlamaConfig.activation``.
ACTIVATIONS = {"silu": silu_mul, "gelu_tanh": gelu_mul}


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


def take_row(hidden: int, rows: int | None = None):
    """Row ``m - 1`` of ``x[w, E]`` as ``[1, E]``: the last prompt row of a padded prefill
    chunk (``m`` valid rows, a scalar argument)."""
    c = compiler()
    te = c.te
    w = _rows(rows)
    x = te.placeholder((w, hidden), "float32", name="x")
    m = _sym("m")
    y = te.compute((1, hidden), lambda i, e: x[m - 1, e], name="row")
    return _finish(te.create_prim_func([x, m, y], index_dtype_override="int64"), "elementwise")


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


def _attention_inputs(hq: int, g: int, d: int, layers: int, context: int, rows: int | None,
                      kv_dtype: str = "float32"):
    """Symbols and placeholders shared by the attention kernels (cache layouts: module doc)."""
    te = compiler().te
    w, n, layer = _rows(rows), _sym("n"), _sym("layer")
    q = te.placeholder((hq, w, d), "float32", name="q")
    kt = te.placeholder((layers, g, d, context), kv_dtype, name="k_cache")
    vc = te.placeholder((layers, g, context, d), kv_dtype, name="v_cache")
    mask = te.placeholder((w, w), "int32", name="mask")
    return w, n, layer, q, kt, vc, mask


def key_tile(context: int) -> int:
    """Keys per vector tile of the attention kernel: the largest of 16, 8, 4, 2, 1 dividing the
    cache length, so that the key range rounded up to whole tiles stays inside the cache."""
    return next(t for t in (16, 8, 4, 2, 1) if context % t == 0)


def attention(num_heads: int, num_kv_heads: int, head_dim: int, layers: int, context: int,
              rows: int | None = None, part: str = "full", kv_dtype: str = "float32",
              window: int = 0, exact: bool = False):
    """Attention of the tree queries ``q[H, w, D]`` over the KV cache.

    ``part="full"``: over the committed cache ``[0, n)`` plus the tree, whose own K/V sit in
    the cache at ``[n, n + w)`` (written by ``rope_kv``); node i attends to tree node j where
    ``mask[i, j] != 0`` (its ancestors and itself). Output ``o[w, H, D]``. Prefill's causal
    chunks and the narrow verify steps run this fused kernel.

    ``part="dense"``: over the committed cache ``[0, n)`` only, the dense part of a verify
    step; no mask. Output: a partial ``[w, H, D + 1]``, the output normalised within the part
    (0 for an empty cache) with its log-sum-exp in the last column (``-inf`` for an empty
    cache), which :func:`attention_merge` combines with the sparse part's
    (:func:`hetcomp.kernels.sparse_attention.sparse_tree_attention`).

    ``window = S > 0`` (a sliding-window layer, Gemma 3): the kernel takes the rows'
    ``positions[w]`` after the mask (``part="dense"``: after the caches), and row i sees key
    j only where ``positions[i] - pos(j) < S``; a committed key's position is its slot, a
    tree key's ``positions[j - n]``. So a row past ``S`` keys drops the oldest ones exactly.

    ``kv_dtype``: the caches' element type (``float16`` halves the bytes the dense part
    streams); each K and V element is widened to float32 as it is read, and everything is
    computed and accumulated in float32.

    ``exact`` (``part="full"``): a tree row's output is what sequential decoding computes for
    its token, independently of where its ancestors sit among the tree's slots. The scores,
    the maximum and ``P.V`` (keys in slot order: a tree lists ancestors before descendants,
    and masked keys add exact zeros) already are; the softmax's sum adds each key in the
    vector lane of its slot, so it sums in float64, whose rounding to float32 no reordering
    of at most a context of terms changes (in practice: an ulp of float64 per term).

    The keys run over the range rounded up to whole tiles of :func:`key_tile` keys, so the
    vector loops need no tail. Keys past the range get the additive bias ``-inf`` (weight
    exactly 0); they read cache slots that are zero at allocation and hold stale, finite K/V
    later, so ``0 * v`` stays 0. The bias (0 or ``-inf`` per row and key) is built once per
    row, not per head, and replaces the mask gather in the vector loops.
    """
    c = compiler()
    te, tir = c.te, c.tir
    hq, g, d = num_heads, num_kv_heads, head_dim
    rep = hq // g
    tile = key_tile(context)
    w, n, layer, q, kt, vc, mask = _attention_inputs(hq, g, d, layers, context, rows, kv_dtype)
    dense = part == "dense"

    def widen(x):  # a cache element, to float32 where it is read
        return x if kv_dtype == "float32" else x.astype("float32")

    # An empty reduction would skip its init: the dense part covers at least one (masked) tile.
    total = tir.max(n, 1) if dense else n + w
    keys = (total + (tile - 1)) // tile * tile
    scale = tir.const(1.0 / math.sqrt(d), "float32")
    zero, neg_inf = tir.const(0.0, "float32"), tir.const(-float("inf"), "float32")
    pos = te.placeholder((w,), "int32", name="positions") if window else None

    def near(i, key_pos):  # key_pos (int64) inside row i's window
        if not window:
            return tir.const(True, "bool")
        return pos[i].astype("int64") - key_pos < tir.const(window, "int64")

    if dense:
        bias = te.compute((w, keys), lambda i, j: tir.Select(
            tir.all(j < n, near(i, j)), zero, neg_inf), name="bias")
    else:
        def tree_key(i, j):
            t = tir.min(j - n, w - 1)
            return tir.all(mask[i, t] != 0, near(i, pos[t].astype("int64") if window else j))

        bias = te.compute((w, keys), lambda i, j: tir.if_then_else(
            j < n, tir.Select(near(i, j), zero, neg_inf), tir.if_then_else(
                j < total, tir.Select(tree_key(i, j), zero, neg_inf),
                neg_inf)), name="bias")
    extra = [pos] if window else []
    win = {"window": window} if window else {}
    rd = te.reduce_axis((0, d), name="d")
    s = te.compute(
        (hq, w, keys),
        lambda h, i, j: te.sum(q[h, i, rd] * scale * widen(kt[layer, h // rep, rd, j]),
                               axis=rd),
        name="scores",
    )
    rj = te.reduce_axis((0, keys), name="j")
    m = te.compute((hq, w), lambda h, i: te.max(s[h, i, rj] + bias[i, rj], axis=rj),
                   name="row_max")

    def shift(h, i):  # an empty dense part has max -inf: shift by 0 so exp gives 0, not NaN
        return tir.Select(m[h, i] == neg_inf, zero, m[h, i]) if dense else m[h, i]

    e = te.compute((hq, w, keys), lambda h, i, j: fast_exp(s[h, i, j] + bias[i, j] - shift(h, i)),
                   name="exp")
    rj2 = te.reduce_axis((0, keys), name="j2")
    acc = "float64" if exact and not dense else "float32"
    z = te.compute((hq, w), lambda h, i: te.sum(e[h, i, rj2].astype(acc), axis=rj2),
                   name="row_sum")
    rj3 = te.reduce_axis((0, keys), name="j3")
    o = te.compute(
        (w, hq, d),
        lambda i, h, dd: te.sum(e[h, i, rj3] * widen(vc[layer, h // rep, rj3, dd]), axis=rj3),
        name="pv",
    )
    if not dense:
        out = te.compute((w, hq, d), lambda i, h, dd: o[i, h, dd] / z[h, i].astype("float32"),
                         name="attn_out")
        func = te.create_prim_func([q, kt, vc, mask, *extra, layer, n, out],
                                   index_dtype_override="int64")
        return _finish(func, "attention", attn_cfg=[hq, g, d, layers, context], key_tile=tile,
                       **win)
    # One output holds both results (a partial, :func:`attention_merge`): the schedule computes
    # everything inside one (head, row tile) task, and TVM's compute_at cannot place stages
    # shared by two output blocks there.
    part_out = te.compute((w, hq, d + 1), lambda i, h, dd: tir.Select(
        dd < d, tir.Select(z[h, i] > zero, o[i, h, tir.min(dd, d - 1)] / z[h, i], zero),
        tir.Select(z[h, i] > zero, m[h, i] + tir.log(z[h, i]), neg_inf)), name="attn_out")
    func = te.create_prim_func([q, kt, vc, *extra, layer, n, part_out],
                               index_dtype_override="int64")
    return _finish(func, "attention", attn_cfg=[hq, g, d, layers, context], key_tile=tile,
                   part="dense", **win)


def medusa_act(hidden: int, heads: int):
    """``y[k] = h + SiLU(z[k] + b[k])``: the residual SiLU block of every Medusa head, from
    ``h[1, E]``, the stacked linear's ``z[1, K * E]`` (head k's columns ``k * E ..``) and
    ``b[K, E]``, into the heads' rows ``y[K, E]``."""
    c = compiler()
    te, tir = c.te, c.tir
    h = te.placeholder((1, hidden), "float32", name="h")
    z = te.placeholder((1, heads * hidden), "float32", name="z")
    b = te.placeholder((heads, hidden), "float32", name="bias")

    def act(k, e):
        x = z[0, k * hidden + e] + b[k, e]
        return h[0, e] + x / (tir.const(1.0, "float32") + fast_exp(-x))

    y = te.compute((heads, hidden), act, name="medusa_act")
    return _finish(te.create_prim_func([h, z, b, y], index_dtype_override="int64"),
                   "elementwise")


def attention_merge(num_heads: int, head_dim: int, rows: int | None = None):
    """Exact online-softmax merge of two attention parts over disjoint key sets.

    A part is ``[w, H, D + 1]``: its softmax-normalised output in ``[..., :D]`` and its
    log-sum-exp in ``[..., D]`` (``-inf``: an empty part). ``o = (a1 * o1 + a2 * o2) /
    (a1 + a2)`` with ``a_p = exp(lse_p - max(lse1, lse2))`` (0 for an empty part): merging
    the dense part (cache keys) with the sparse part (tree keys) gives attention over both,
    ``o[w, H, D]``.
    """
    c = compiler()
    te, tir = c.te, c.tir
    hq, d = num_heads, head_dim
    w = _rows(rows)
    p1 = te.placeholder((w, hq, d + 1), "float32", name="part1")
    p2 = te.placeholder((w, hq, d + 1), "float32", name="part2")
    m = te.compute((w, hq), lambda i, h: tir.max(p1[i, h, d], p2[i, h, d]), name="m")

    def weight(p, name):
        return te.compute((w, hq), lambda i, h: tir.Select(
            p[i, h, d] == tir.const(-float("inf"), "float32"), tir.const(0.0, "float32"),
            fast_exp(p[i, h, d] - m[i, h])), name=name)

    a1, a2 = weight(p1, "weight1"), weight(p2, "weight2")
    out = te.compute((w, hq, d), lambda i, h, dd: (a1[i, h] * p1[i, h, dd] + a2[i, h] * p2[i, h, dd])
                     / (a1[i, h] + a2[i, h]), name="merge")
    return _finish(te.create_prim_func([p1, p2, out], index_dtype_override="int64"),
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


def bias_add(n: int, rows: int | None = None):
    """``x[w, n] + b[n]``: the q/k/v bias (Qwen2), added after the qkv linear so that the
    linear stays one kernel the partition pass splits by columns and the bias stays whole on
    the host."""
    c = compiler()
    te = c.te
    w = _rows(rows)
    x = te.placeholder((w, n), "float32", name="x")
    b = te.placeholder((n,), "float32", name="bias")
    y = te.compute((w, n), lambda i, j: x[i, j] + b[j], name="bias_add")
    return _finish(te.create_prim_func([x, b, y], index_dtype_override="int64"), "elementwise",
                   bias=1)
