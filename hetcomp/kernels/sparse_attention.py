"""The sparse part of tree attention: tree queries against tree keys under the ancestor mask.

Every compiled ``verify`` step splits tree attention in two (:mod:`hetcomp.frontend.llama`):
a dense part (tree queries against the committed cache, :func:`hetcomp.kernels.ops.attention`
with ``part="dense"``) and this sparse part (tree queries against the tree's own keys, where
node i sees only its ancestors and itself: ``depth(i) + 1`` non-zeros per row). Each part
returns its softmax-normalised output and the log-sum-exp of its scores, and
:func:`hetcomp.kernels.ops.attention_merge` combines them exactly (online softmax).

The tree is given as CSR ancestor lists: ``row_ptr[W + 1]`` and ``col_idx[nnz]``, where row i
lists the ancestors of node i and i itself (:func:`csr_from_parents`; the runtime builds them
per tree shape, :meth:`hetcomp.speculative.tree.Tree.csr`).

Kernels (each a ``tirx.PrimFunc`` tagged with ``hetcomp.op_kind``; ``w`` and ``nnz`` are
symbolic, so one compiled kernel serves every tree):

- :func:`sparse_tree_attention` (``"sparse_tree_attention"``): row-wise CSR, single pass
  (online softmax, no score scratch). Its blocks nest by sparse level: ``row`` (tree node,
  KV head; the H / G query heads sharing that KV head go together, so each K/V row is loaded
  once for all of them) > ``key`` (one non-zero; the key row is the block's iteration
  variable, read from ``col_idx``) > the head_dim blocks ``qk`` (dot product), ``rescale``
  (``o *= alpha``) and ``pv`` (``o += p * v``). The head_dim blocks thus have affine bindings
  and can be tensorized (:mod:`hetcomp.schedules.arm`, :mod:`hetcomp.schedules.x86`).
- :func:`naive_sparse_tree_attention` (``"sparse_tree_attention_naive"``) and
  :func:`dense_tree_attention` (``"tree_attention_dense"``, every W x W score under an
  additive mask): benchmark baselines with the same signature; no model calls them.

Layouts are the model's, so nothing is copied: ``q[H, W, D]`` as ``rope_kv`` returns it, and
the tree's keys and values ``k_tree[G, W, D]``, ``v_tree[G, W, D]`` (one layout for both;
``rope_kv`` writes each roped key and each value row there as well as into the caches; the
position-major K cache ``k_cache[L, G, D, C]`` is key-contiguous, which the dense part
vectorises over but a per-key dot product over head_dim could not load as a vector). The
kernel reads nothing of the caches: a unit that runs it needs only tree-sized inputs, so a
partitioned plan copies q/k/v of the W nodes to it, never the cache.
Grouped-query: query head h uses KV head ``h // (H // G)``. Output: the partial
``[W, H, D + 1]`` the merge reads from both parts, the normalised output (the layout the output
projection reads) with ``lse = log(sum(exp(scale * q.k)))`` over the row's non-zeros in the
last column, ``scale = 1 / sqrt(D)``.
"""

from __future__ import annotations

import math

import numpy as np
from tvm.script import tirx as T

from .._tvm import compiler
from ..errors import HetcompError
from .ops import OP_KIND, fast_exp

SPARSE_KIND = "sparse_tree_attention"
NAIVE_KIND = "sparse_tree_attention_naive"
DENSE_KIND = "tree_attention_dense"


# ----------------------------------------------------------------------------- tree as CSR


def csr_from_parents(parents) -> tuple[np.ndarray, np.ndarray]:
    """CSR ancestor lists of a tree given each node's parent.

    Parameters
    ----------
    parents : sequence of int
        ``parents[i]`` is the parent of node i, ``-1`` for a root. Parents come before their
        children (topological order), as in every token tree the speculative decoder builds.

    Returns
    -------
    row_ptr : np.ndarray, int32 ``[W + 1]``
    col_idx : np.ndarray, int32 ``[nnz]``
        Row i lists node i's ancestors and i itself, in increasing order.
    """
    parents = [int(p) for p in parents]
    rows: list[list[int]] = []
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise HetcompError(f"parent of node {i} is {p}: parents must precede children")
        rows.append((rows[p] if p >= 0 else []) + [i])
    row_ptr = np.zeros(len(parents) + 1, "int32")
    row_ptr[1:] = np.cumsum([len(r) for r in rows])
    col_idx = np.array([j for r in rows for j in r], "int32")
    return row_ptr, col_idx


def mask_from_csr(row_ptr: np.ndarray, col_idx: np.ndarray) -> np.ndarray:
    """The dense ``int32 [W, W]`` mask (1 where node i attends to node j) of a CSR tree."""
    w = len(row_ptr) - 1
    mask = np.zeros((w, w), "int32")
    for i in range(w):
        mask[i, col_idx[row_ptr[i]:row_ptr[i + 1]]] = 1
    return mask


def validate_csr(row_ptr: np.ndarray, col_idx: np.ndarray, w: int) -> None:
    """Raise :class:`HetcompError` unless ``(row_ptr, col_idx)`` is a valid ``w``-row tree CSR.

    The kernels index keys through ``col_idx`` without bounds checks, so this runs before
    every call from Python: ``row_ptr`` must be int32 ``[w + 1]``, start at 0, end at
    ``len(col_idx)`` and increase strictly (every row holds at least the node itself);
    ``col_idx`` must be int32 with entries in ``[0, w)``.
    """
    row_ptr, col_idx = np.asarray(row_ptr), np.asarray(col_idx)
    if row_ptr.dtype != np.int32 or col_idx.dtype != np.int32:
        raise HetcompError(f"row_ptr/col_idx must be int32, got {row_ptr.dtype}/{col_idx.dtype}")
    if row_ptr.shape != (w + 1,) or col_idx.ndim != 1:
        raise HetcompError(f"row_ptr must have shape ({w + 1},) for {w} tree nodes and col_idx "
                           f"must be 1-D, got {row_ptr.shape} and {col_idx.shape}")
    if row_ptr[0] != 0 or row_ptr[-1] != len(col_idx):
        raise HetcompError(f"row_ptr must run from 0 to nnz={len(col_idx)}, "
                           f"got {row_ptr[0]}..{row_ptr[-1]}")
    if np.any(np.diff(row_ptr) <= 0):
        raise HetcompError("row_ptr must increase strictly: every row includes its own node")
    if len(col_idx) and (col_idx.min() < 0 or col_idx.max() >= w):
        raise HetcompError(f"col_idx entries must lie in [0, {w})")


def check_inputs(q, k, v, row_ptr, col_idx) -> None:
    """Validate the shapes, dtypes and layout of a sparse tree-attention call.

    Raises :class:`HetcompError` with the first violation: ``q[H, W, D]``, ``k[G, W, D]``
    with ``H % G == 0``, ``v`` shaped as ``k``, all float32 and C-contiguous, and a valid CSR
    tree (:func:`validate_csr`).
    """
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.ndim != 3 or a.dtype != np.float32 or not a.flags.c_contiguous:
            raise HetcompError(f"{name} must be a C-contiguous float32 array of 3 dims, "
                               f"got {a.dtype} {a.shape}")
    h, w, d = q.shape
    if k.shape[1:] != (w, d) or h % k.shape[0]:
        raise HetcompError(f"k must be [G, {w}, {d}] with G dividing {h}, got {k.shape}")
    if v.shape != k.shape:
        raise HetcompError(f"v must be shaped as k, {k.shape}, got {v.shape}")
    validate_csr(row_ptr, col_idx, w)


# ----------------------------------------------------------------------------- kernels


def _f32(value: float):
    return compiler().tir.const(value, "float32")


def log_positive(x):
    """``log(x)`` for a normal ``x > 0`` as an inline fp32 expression (Cephes ``logf``, ~1 ulp).

    Used once per row for the log-sum-exp (whose argument is >= 1); inline for the same
    reason as the exp (:func:`~hetcomp.kernels.ops.fast_exp`): a libm call clobbers every vector
    register.
    """
    tir = compiler().tir
    bits = tir.reinterpret("int32", x)
    # x = 2^e * f with f in [0.5, 1), then f folded into [sqrt(1/2), sqrt(2)) - 1.
    e = tir.Cast("float32", ((bits >> 23) & 0xFF) - 126)
    f = tir.reinterpret("float32", (bits & 0x807FFFFF) | 0x3F000000)
    small = f < _f32(0.707106781186547524)
    e = tir.Select(small, e - _f32(1.0), e)
    f = tir.Select(small, f + f, f) - _f32(1.0)
    z = f * f
    y = _f32(7.0376836292e-2)
    for coef in (-1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
                 -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1):
        y = y * f + _f32(coef)
    y = y * f * z + e * _f32(-2.12194440e-4) - z * _f32(0.5)
    return f + y + e * _f32(0.693359375)


def _row_helpers():
    """Fresh ``T.inline`` helpers shared by the sparse and the dense kernel.

    Created per kernel because an inline object suffixes the names of the blocks it emits
    from its second use on (``qk_1``); the schedule rules look blocks up by name.
    """

    @T.inline
    def _score(q, k, vg, vi, vc, r, rep, d, scale, s):
        """``s[r] = scale * q[head, vi] . k[vg, vc]`` for query head ``vg * rep + r``
        (``k``: the tree's keys ``[G, w, D]``)."""
        s[r] = T.float32(0)
        for e in range(d):
            with T.sblock("qk"):
                vr, ve = T.axis.remap("SR", [r, e])
                s[vr] = s[vr] + q[vg * rep + vr, vi, ve] * k[vg, vc, ve]
        s[r] = s[r] * scale

    @T.inline
    def _online_update(v, vg, vc, r, d, acc, s, m, den, p, alpha):
        """Fold tree key ``vc`` with score ``s[r]`` into head r's running (max, denominator,
        acc); its value row is ``v_tree[vg, vc]``."""
        # Branch-free, one exp per key: with e = exp(-|s - m|), either the maximum stands
        # (alpha = 1, p = e) or s is the new maximum (alpha = e rescales the running sums,
        # p = 1). A branch here would be mispredicted on every other key.
        p[r] = fast_exp(T.min(s[r] - m[r], m[r] - s[r]))
        alpha[r] = T.Select(s[r] > m[r], p[r], T.float32(1))
        p[r] = T.Select(s[r] > m[r], T.float32(1), p[r])
        m[r] = T.max(m[r], s[r])
        den[r] = den[r] * alpha[r] + p[r]
        for e in range(d):
            with T.sblock("rescale"):
                vr, ve = T.axis.remap("SS", [r, e])
                acc[vr, ve] = acc[vr, ve] * alpha[vr]
        for e in range(d):
            with T.sblock("pv"):
                vr, ve = T.axis.remap("SS", [r, e])
                acc[vr, ve] = acc[vr, ve] + p[vr] * v[vg, vc, ve]

    @T.inline
    def _row_init(rep, d, acc, m, den):
        for r in range(rep):
            m[r] = T.min_value("float32")
            den[r] = T.float32(0)
            for e in range(d):
                with T.sblock("acc_init"):
                    vr, ve = T.axis.remap("SS", [r, e])
                    acc[vr, ve] = T.float32(0)

    @T.inline
    def _row_finish(o, vg, vi, rep, d, acc, m, den):
        for r in range(rep):
            o[vi, vg * rep + r, d] = m[r] + log_positive(den[r])  # the partial's lse column
            den[r] = T.float32(1) / den[r]
            for e in range(d):
                with T.sblock("out"):
                    vr, ve = T.axis.remap("SS", [r, e])
                    o[vi, vg * rep + vr, ve] = acc[vr, ve] * den[vr]

    return _score, _online_update, _row_init, _row_finish


def _sparse_func(num_heads: int, num_kv_heads: int, head_dim: int):
    hq, g, d = num_heads, num_kv_heads, head_dim
    rep = hq // g
    scale = T.float32(1.0 / math.sqrt(d))
    _score, _online_update, _row_init, _row_finish = _row_helpers()

    @T.prim_func(s_tir=True)
    def sparse_tree_attention(var_q: T.handle, var_k: T.handle, var_v: T.handle,
                              var_row_ptr: T.handle, var_col_idx: T.handle, var_o: T.handle):
        T.func_attr({"tirx.noalias": True})
        w = T.int64()
        nnz = T.int64()
        q = T.match_buffer(var_q, (hq, w, d), "float32")
        k = T.match_buffer(var_k, (g, w, d), "float32")
        v = T.match_buffer(var_v, (g, w, d), "float32")
        row_ptr = T.match_buffer(var_row_ptr, (w + 1,), "int32")
        col_idx = T.match_buffer(var_col_idx, (nnz,), "int32")
        o = T.match_buffer(var_o, (w, hq, d + 1), "float32")
        # One row per (tree node, KV head): its rep query heads share every K/V row load.
        for i, kv in T.grid(w, g):
            with T.sblock("row"):
                vi, vg = T.axis.remap("SS", [i, kv])
                # The online-softmax state (registers after scheduling; a GPU rule makes
                # it thread-local).
                acc = T.sblock_alloc_buffer((rep, d), "float32")
                s = T.sblock_alloc_buffer((rep,), "float32")
                m = T.sblock_alloc_buffer((rep,), "float32")
                den = T.sblock_alloc_buffer((rep,), "float32")
                p = T.sblock_alloc_buffer((rep,), "float32")
                alpha = T.sblock_alloc_buffer((rep,), "float32")
                _row_init(rep, d, acc, m, den)
                for j in range(T.Cast("int64", row_ptr[vi + 1] - row_ptr[vi])):
                    with T.sblock("key"):
                        # The key row is this block's iteration variable, so the head_dim
                        # blocks inside see plain affine indices (tensorizable).
                        vc = T.axis.opaque(
                            w, T.Cast("int64", col_idx[T.Cast("int64", row_ptr[vi]) + j]))
                        for r in range(rep):
                            _score(q, k, vg, vi, vc, r, rep, d, scale, s)
                            _online_update(v, vg, vc, r, d, acc, s, m, den, p, alpha)
                _row_finish(o, vg, vi, rep, d, acc, m, den)

    return sparse_tree_attention


def _dense_func(num_heads: int, num_kv_heads: int, head_dim: int):
    hq, g, d = num_heads, num_kv_heads, head_dim
    rep = hq // g
    scale = T.float32(1.0 / math.sqrt(d))
    _score, _online_update, _row_init, _row_finish = _row_helpers()

    @T.prim_func(s_tir=True)
    def tree_attention_dense(var_q: T.handle, var_k: T.handle, var_v: T.handle,
                             var_mask: T.handle, var_o: T.handle):
        T.func_attr({"tirx.noalias": True})
        w = T.int64()
        q = T.match_buffer(var_q, (hq, w, d), "float32")
        k = T.match_buffer(var_k, (g, w, d), "float32")
        v = T.match_buffer(var_v, (g, w, d), "float32")
        mask = T.match_buffer(var_mask, (w, w), "int32")
        o = T.match_buffer(var_o, (w, hq, d + 1), "float32")
        for i, kv in T.grid(w, g):
            with T.sblock("row"):
                vi, vg = T.axis.remap("SS", [i, kv])
                # The online-softmax state (registers after scheduling; a GPU rule makes
                # it thread-local).
                acc = T.sblock_alloc_buffer((rep, d), "float32")
                s = T.sblock_alloc_buffer((rep,), "float32")
                m = T.sblock_alloc_buffer((rep,), "float32")
                den = T.sblock_alloc_buffer((rep,), "float32")
                p = T.sblock_alloc_buffer((rep,), "float32")
                alpha = T.sblock_alloc_buffer((rep,), "float32")
                _row_init(rep, d, acc, m, den)
                for j in range(w):
                    with T.sblock("key"):
                        vc = T.axis.opaque(w, j)
                        for r in range(rep):
                            # An additive mask, as dense attention applies it: every score,
                            # exp and P.V update is computed; a masked key weighs exp(-88).
                            # (With exact zeroing LLVM proves a masked update a no-op and
                            # skips it: a sparse kernel in disguise, not the dense baseline.)
                            _score(q, k, vg, vi, vc, r, rep, d, scale, s)
                            s[r] = s[r] + T.Select(mask[vi, vc] != 0, T.float32(0),
                                                   T.float32(-1e30))
                            _online_update(v, vg, vc, r, d, acc, s, m, den, p, alpha)
                _row_finish(o, vg, vi, rep, d, acc, m, den)

    return tree_attention_dense


def _check_heads(num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    if num_heads % num_kv_heads or head_dim <= 0:
        raise HetcompError(f"{num_heads} query heads cannot share {num_kv_heads} KV heads")


def sparse_tree_attention(num_heads: int, num_kv_heads: int, head_dim: int):
    """The sparse tree-attention kernel, in the model's layouts (unscheduled; module doc).

    Parameters
    ----------
    num_heads, num_kv_heads, head_dim : int
        H, G and D; ``num_heads`` must be a multiple of ``num_kv_heads``.

    Returns
    -------
    tirx.PrimFunc
        ``(q[H, w, D], k_tree[G, w, D], v_tree[G, w, D], row_ptr[w + 1], col_idx[nnz],
        part[w, H, D + 1])`` (the output with its log-sum-exp in the last column), tagged
        ``hetcomp.op_kind = "sparse_tree_attention"`` with ``hetcomp.head_dim``. Inputs must pass :func:`check_inputs`: the kernel trusts
        ``col_idx``.
    """
    _check_heads(num_heads, num_kv_heads, head_dim)
    func = _sparse_func(num_heads, num_kv_heads, head_dim)
    return func.with_attr(OP_KIND, SPARSE_KIND).with_attr("hetcomp.head_dim", head_dim)


def naive_sparse_tree_attention(num_heads: int, num_kv_heads: int, head_dim: int):
    """The sparse kernel as plain loops, only its row loop parallel (the benchmark baseline).

    Same signature and results as :func:`sparse_tree_attention`, without tensor intrinsics
    or unrolling (scalar code, apart from what LLVM's own vectorisers find); marked
    scheduled so that no rule touches it.
    """
    _check_heads(num_heads, num_kv_heads, head_dim)
    c = compiler()
    sch = c.Schedule(_sparse_func(num_heads, num_kv_heads, head_dim))
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("row"))))  # as the tuned schedule
    return (sch.mod["main"].with_attr(OP_KIND, NAIVE_KIND)
            .with_attr(c.IS_SCHEDULED, True))


def dense_tree_attention(num_heads: int, num_kv_heads: int, head_dim: int):
    """Dense masked baseline: all W x W scores, masked by ``mask[W, W]`` (int32, 1 = attend).

    The same row/key/head_dim block nest as :func:`sparse_tree_attention`, with the key loop
    running over every tree node and the mask added to the scores (0 or -1e30): every score,
    exp and P.V update is computed, a masked key enters with weight ``exp(-88)``. No model
    calls it; it is what the sparse kernel is measured against.

    Returns
    -------
    tirx.PrimFunc
        ``(q, k_tree, v_tree, mask[w, w], part)`` with the output of
        :func:`sparse_tree_attention`; tagged ``hetcomp.op_kind = "tree_attention_dense"``.
    """
    _check_heads(num_heads, num_kv_heads, head_dim)
    func = _dense_func(num_heads, num_kv_heads, head_dim)
    return func.with_attr(OP_KIND, DENSE_KIND).with_attr("hetcomp.head_dim", head_dim)
