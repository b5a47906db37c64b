"""Kernels that update the KV cache in place, written in TVMScript (TE cannot mutate inputs),
Gemma's per-head q/k norm (:func:`qk_norm`), and the CUDA-graph build's attention, input
copies and Medusa draft (:func:`tree_attention`, :func:`stage_tree`, :func:`stage_draft`,
:func:`topk_rows`, :func:`draft_tokens`), all scheduled as written.

They are called with ``R.call_tir_inplace``; both are already scheduled and marked so that
no schedule rule touches them (``hetcomp.rule`` = ``script.<kind>``): one loop nest, whose outer two loops are a parallel loop and a
serial one for CPUs, and blocks and threads for GPUs (``gpu=True``). :func:`for_gpu` turns the CPU
kernel in a module into the GPU one (the arguments are recorded on the function).
"""

from __future__ import annotations

import json
import math

from tvm.script import tirx as T

from .._tvm import compiler
from .ops import OP_KIND

ARGS_ATTR = "hetcomp.script_args"


def _loop_kinds(gpu: bool):
    """The outer and inner loop kinds of an in-place script kernel: CPU threads over the
    outer loop with a serial inner one, or a GPU block per outer iteration with a thread per
    inner one (called while the script is parsed)."""
    if not gpu:
        return T.parallel, T.serial
    return (lambda e: T.thread_binding(e, thread="blockIdx.x"),
            lambda e: T.thread_binding(e, thread="threadIdx.x"))


def rope_kv(num_heads: int, num_kv_heads: int, head_dim: int, layers: int, context: int,
            gpu: bool = False, kv_dtype: str = "float32"):
    """Apply RoPE (rotate-half) to the fused ``qkv[w, (H + 2G) * D]`` rows.

    ``cs[w, D]`` holds each row's cosines and sines (:func:`hetcomp.kernels.ops.rope_table`,
    computed once per call for all layers). Writes the roped K of tree node i to
    ``k_cache[layer, :, :, n + i]`` and its V to ``v_cache[layer, :, n + i, :]`` in place, and
    returns the roped queries ``q[H, w, D]`` and the tree's keys and values once more, in one
    row-major layout, ``k_tree[G, w, D]`` and ``v_tree[G, w, D]``: the sparse tree-attention
    kernel reads only these (its dot products over head_dim load keys as vectors, which the
    position-major K cache cannot give), so a unit that runs it needs no cache.

    ``kv_dtype``: the caches' element type. The cache gets each value rounded to it, and
    ``k_tree``/``v_tree`` (float32) get the same rounded values, so the sparse part sees the
    tree exactly as the fused kernel and later steps read it back from the cache.

    The CUDA-graph build has no ``rope_kv``: its :func:`tree_attention` does this work.
    """
    hq, g, d, nl, c = num_heads, num_kv_heads, head_dim, layers, context
    kvd = kv_dtype
    half = d // 2
    qkv_size = (hq + 2 * g) * d

    # Heads in parallel (GPU: a block each, a thread per rotated pair), tree rows inside: a
    # thread owns its heads' cache lines (rows in parallel made two threads write the
    # neighbouring positions of one K cache line).
    heads, pairs = _loop_kinds(gpu)

    @T.prim_func(private=True)
    def rope_kv_func(var_qkv: T.handle, var_cs: T.handle, var_k: T.handle, var_v: T.handle,
                     layer: T.int64, n: T.int64, var_q: T.handle, var_kt: T.handle,
                     var_vt: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True,
                     "hetcomp.rule": "script.rope"})
        w = T.int64()
        qkv = T.match_buffer(var_qkv, (w, qkv_size), "float32")
        cs = T.match_buffer(var_cs, (w, d), "float32")
        k_cache = T.match_buffer(var_k, (nl, g, d, c), kvd)
        v_cache = T.match_buffer(var_v, (nl, g, c, d), kvd)
        q = T.match_buffer(var_q, (hq, w, d), "float32")
        k_tree = T.match_buffer(var_kt, (g, w, d), "float32")
        v_tree = T.match_buffer(var_vt, (g, w, d), "float32")
        for h in heads(hq + g):
            for j in pairs(half):
                for i in range(w):
                    x0 = qkv[i, h * d + j]
                    x1 = qkv[i, h * d + j + half]
                    if h < hq:
                        q[h, i, j] = x0 * cs[i, j] - x1 * cs[i, j + half]
                        q[h, i, j + half] = x1 * cs[i, j] + x0 * cs[i, j + half]
                    else:
                        k0 = T.Cast(kvd, x0 * cs[i, j] - x1 * cs[i, j + half])
                        k1 = T.Cast(kvd, x1 * cs[i, j] + x0 * cs[i, j + half])
                        k_cache[layer, h - hq, j, n + i] = k0
                        k_cache[layer, h - hq, j + half, n + i] = k1
                        k_tree[h - hq, i, j] = T.Cast("float32", k0)
                        k_tree[h - hq, i, j + half] = T.Cast("float32", k1)
                    if h < g:  # the V rows are copied by the first g heads' iterations
                        v0 = T.Cast(kvd, qkv[i, (hq + g + h) * d + j])
                        v1 = T.Cast(kvd, qkv[i, (hq + g + h) * d + j + half])
                        v_cache[layer, h, n + i, j] = v0
                        v_cache[layer, h, n + i, j + half] = v1
                        v_tree[h, i, j] = T.Cast("float32", v0)
                        v_tree[h, i, j + half] = T.Cast("float32", v1)

    recorded = {"args": [num_heads, num_kv_heads, head_dim, layers, context], "kv_dtype": kv_dtype}
    return rope_kv_func.with_attr(OP_KIND, "rope").with_attr(ARGS_ATTR, json.dumps(recorded))


def qk_norm(num_heads: int, num_kv_heads: int, head_dim: int, eps: float, gpu: bool = False):
    """Gemma's q/k norm: RMSNorm over head_dim of every query head (weights ``q_gamma[D]``)
    and key head (``k_gamma[D]``) of the fused ``qkv[w, (H + 2G) * D]`` rows, before
    ``rope_kv``; the value heads are copied. Output: the same layout.

    CPU: a parallel task per head, each row's sum of squares once in a local scalar. GPU: a
    block per (head, row) and a thread per element, each thread summing its row itself (D
    loads of the same addresses, broadcast to the warp: a thread-local sum needs no
    shared-memory reduction)."""
    hq, g, d = num_heads, num_kv_heads, head_dim
    qkv_size = (hq + 2 * g) * d
    outer, inner = _loop_kinds(gpu)
    inv_d = 1.0 / d

    @T.prim_func(private=True)
    def qk_norm_func(var_qkv: T.handle, var_qg: T.handle, var_kg: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True,
                     "hetcomp.rule": "script.qk_norm"})
        w = T.int64()
        qkv = T.match_buffer(var_qkv, (w, qkv_size), "float32")
        q_gamma = T.match_buffer(var_qg, (d,), "float32")
        k_gamma = T.match_buffer(var_kg, (d,), "float32")
        out = T.match_buffer(var_out, (w, qkv_size), "float32")
        if gpu:
            for b in outer((hq + 2 * g) * w):
                for t in inner(d):
                    h = b // w
                    i = b % w
                    ss = T.decl_buffer((1,), "float32", scope="local")
                    ss[0] = T.float32(0)
                    for u in range(d):
                        ss[0] = ss[0] + qkv[i, h * d + u] * qkv[i, h * d + u]
                    if h < hq + g:
                        out[i, h * d + t] = qkv[i, h * d + t] * T.rsqrt(
                            ss[0] * T.float32(inv_d) + T.float32(eps)) * T.if_then_else(
                                h < hq, q_gamma[t], k_gamma[t])
                    else:
                        out[i, h * d + t] = qkv[i, h * d + t]
        else:
            for h in outer(hq + 2 * g):
                for i in range(w):
                    if h < hq + g:
                        ss = T.decl_buffer((1,), "float32", scope="local")
                        ss[0] = T.float32(0)
                        for u in range(d):
                            ss[0] = ss[0] + qkv[i, h * d + u] * qkv[i, h * d + u]
                        for t in range(d):
                            out[i, h * d + t] = qkv[i, h * d + t] * T.rsqrt(
                                ss[0] * T.float32(inv_d) + T.float32(eps)) * T.if_then_else(
                                    h < hq, q_gamma[t], k_gamma[t])
                    else:
                        for t in range(d):
                            out[i, h * d + t] = qkv[i, h * d + t]

    return qk_norm_func.with_attr(OP_KIND, "qk_norm").with_attr(ARGS_ATTR, json.dumps(
        {"args": [num_heads, num_kv_heads, head_dim, eps]}))


def kv_commit(num_kv_heads: int, head_dim: int, layers: int, context: int, gpu: bool = False,
              kv_dtype: str = "float32"):
    """Compact the accepted tree nodes: slot ``n + idx[j]`` moves to ``n + j``, in order.

    Safe in place because ``idx`` is increasing with ``idx[j] >= j`` (a root-to-leaf path in
    a topologically ordered tree), so a slot is read before any later move overwrites it.
    ``kv_dtype``: the caches' element type (copied as is).
    """
    g, d, nl, c = num_kv_heads, head_dim, layers, context
    kvd = kv_dtype

    pairs, elements = _loop_kinds(gpu)  # over (layer, head) pairs, then elements

    @T.prim_func(private=True)
    def kv_commit_func(var_k: T.handle, var_v: T.handle, var_idx: T.handle, n: T.int64):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True,
                     "hetcomp.rule": "script.kv_commit"})
        a = T.int64()
        k_cache = T.match_buffer(var_k, (nl, g, d, c), kvd)
        v_cache = T.match_buffer(var_v, (nl, g, c, d), kvd)
        idx = T.match_buffer(var_idx, (a,), "int32")
        for lg in pairs(nl * g):
            for e in elements(d):
                for j in range(a):  # in order, per (layer, head, element): safe in place
                    k_cache[lg // g, lg % g, e, n + j] = k_cache[
                        lg // g, lg % g, e, n + T.Cast("int64", idx[j])]
                    v_cache[lg // g, lg % g, n + j, e] = v_cache[
                        lg // g, lg % g, n + T.Cast("int64", idx[j]), e]

    return kv_commit_func.with_attr(OP_KIND, "kv_commit").with_attr(ARGS_ATTR, json.dumps(
        {"args": [num_kv_heads, head_dim, layers, context], "kv_dtype": kv_dtype}))


def stage_tree(gpu: bool = False):
    """Copy a call's ``positions[w]`` and ``mask[w, w]`` into buffers of the function's own
    (a block per row, a thread per column on the GPU). A CUDA graph replays fixed addresses:
    the kernels it captures read these copies, never the call's arguments."""
    rows, cols = _loop_kinds(gpu)

    @T.prim_func(private=True)
    def stage_tree_func(var_pos: T.handle, var_mask: T.handle, var_pos_out: T.handle,
                        var_mask_out: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True,
                     "hetcomp.rule": "script.stage_tree"})
        w = T.int64()
        positions = T.match_buffer(var_pos, (w,), "int32")
        mask = T.match_buffer(var_mask, (w, w), "int32")
        pos_out = T.match_buffer(var_pos_out, (w,), "int32")
        mask_out = T.match_buffer(var_mask_out, (w, w), "int32")
        for i in rows(w):
            for j in cols(w):
                mask_out[i, j] = mask[i, j]
                if j == 0:
                    pos_out[i] = positions[i]

    return stage_tree_func.with_attr(OP_KIND, "stage_tree").with_attr(
        ARGS_ATTR, json.dumps({"args": []}))


def stage_draft(hidden: int, gpu: bool = False):
    """The Medusa draft's inputs: row ``sel[0, 0]`` of ``hidden[w, E]`` (float32: the verify
    call's rows, or prefill's one) and the root token ``sel[1, 0]`` (``sel[2, W]``: int32,
    :func:`draft_tokens`'), copied into buffers of the function's own. The row is chosen on
    the device, so the hidden states never travel to the host and back; and the draft's
    CUDA graph reads these copies instead of the call's tensors (:func:`stage_tree`). One
    block, 256 threads striding over the row."""
    blocks, threads = _loop_kinds(gpu)
    nt = min(256, hidden)
    steps = (hidden + nt - 1) // nt

    @T.prim_func(private=True)
    def stage_draft_func(var_h: T.handle, var_sel: T.handle, var_h_out: T.handle,
                         var_root_out: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True,
                     "hetcomp.rule": "script.stage_draft"})
        w, s = T.int64(), T.int64()
        h = T.match_buffer(var_h, (w, hidden), "float32")
        sel = T.match_buffer(var_sel, (2, s), "int32")
        h_out = T.match_buffer(var_h_out, (1, hidden), "float32")
        root_out = T.match_buffer(var_root_out, (1,), "int32")
        for b in blocks(T.int64(1)):
            for t in threads(T.int64(nt)):
                row = T.max(T.min(T.Cast("int64", sel[0, 0]), w - 1), T.int64(0))
                for j in range(T.int64(steps)):
                    if j * nt + t < hidden:
                        h_out[b, j * nt + t] = h[row, j * nt + t]
                if t == 0:
                    root_out[b] = sel[1, 0]

    return stage_draft_func.with_attr(OP_KIND, "stage_draft").with_attr(
        ARGS_ATTR, json.dumps({"args": [hidden]}))


def draft_tokens(heads: int, topk: int, gpu: bool = False):
    """The tree's tokens from the draft's candidates. ``sel[2, W]`` (int32): ``sel[0, 0]`` is
    :func:`stage_draft`'s row (the rest of row 0 is unused), ``sel[1]`` the tree's nodes,
    root first; ``tokens[i]`` is node ``x = sel[1, i]``, a token id where ``x >= 0`` (the
    root, lookup tokens) and candidate ``c = -1 - x`` otherwise, ``top[c // topk, c % topk]``
    (head, rank; clamped into ``top[heads, topk]``). The tokens stay on the device for the
    verify call that follows: no host round trip between draft and verify. One block, a
    thread per node (striding past 64)."""
    blocks, threads = _loop_kinds(gpu)
    nt, last = 64, heads * topk - 1

    @T.prim_func(private=True)
    def draft_tokens_func(var_top: T.handle, var_sel: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True,
                     "hetcomp.rule": "script.draft_tokens"})
        w = T.int64()
        top = T.match_buffer(var_top, (heads, topk), "int32")
        sel = T.match_buffer(var_sel, (2, w), "int32")
        out = T.match_buffer(var_out, (w,), "int32")
        for b in blocks(T.int64(1)):
            for t in threads(T.int64(nt)):
                for j in range((w + (nt - 1)) // nt):
                    i = j * nt + t
                    if i < w:
                        x = sel[1, i]
                        c = T.max(T.min(T.int64(-1) - T.Cast("int64", x), T.int64(last)),
                                  T.int64(0))
                        out[i] = T.if_then_else(x >= 0, x, top[c // topk, c % topk])

    return draft_tokens_func.with_attr(OP_KIND, "draft_tokens").with_attr(
        ARGS_ATTR, json.dumps({"args": [heads, topk]}))


def _fold(combine, red, t, stride, fan, fan_in: int):
    """``red[t]`` combined with ``red[t + u * stride]`` for ``u < fan`` (at most ``fan_in``),
    as one expression: a thread reads its slots and writes its own in one statement, which
    TVM's ThreadSync needs no barrier inside (a read, then a write, of a shared buffer under
    a condition is where it cannot place one). ``fan`` folds to a constant once the levels'
    loop is unrolled; the slots past it are never read (``if_then_else`` evaluates one
    branch)."""
    tir = compiler().tir
    acc = tir.BufferLoad(red, [t])
    for u in range(1, fan_in):
        k = tir.IntImm("int64", u)
        acc = tir.if_then_else(k < fan, combine(acc, tir.BufferLoad(red, [t + k * stride])),
                               acc)
    return acc


@T.macro
def _no_sync():
    T.evaluate(0)


@T.macro
def _block_sync():
    T.tvm_storage_sync("shared")


#: Threads a ``tree_attention`` block aims for: groups of ``T`` threads, each on its own chunk.
TREE_ATTENTION_THREADS = 256
#: Values a ``tree_attention`` thread combines per level of a group's reductions: 8 makes a
#: 64-thread group's max and sum two levels (two barriers) each, where pairs took six.
TREE_REDUCE_FAN_IN = 8


def tree_attention(num_heads: int, num_kv_heads: int, head_dim: int, layers: int, context: int,
                   gpu: bool = False, kv_dtype: str = "float32", window: int = 0,
                   groups: int | None = None, fan_in: int = TREE_REDUCE_FAN_IN,
                   qk_norm_eps: float | None = None):
    """Tree attention with the cache length read on the device, for CUDA graphs, with RoPE and
    the tree's cache write inside: the fused masked attention of
    :func:`hetcomp.kernels.ops.attention` (``part="full"``) after :func:`rope_kv`, in one
    kernel, with every shape static but the rows, so one captured graph serves every cache
    length.

    Inputs: the fused ``qkv[w, (H + 2G) * D]`` rows (the qkv linear's, not yet rotated),
    their cos/sin table ``cs[w, D]`` (:func:`hetcomp.kernels.ops.rope_table`), the caches
    (written in place: ``R.call_tir_inplace``), ``mask[w, w]``, ``positions[w]``, ``layer``;
    output ``o[w, H, D]``. The committed keys are ``[0, n)`` with ``n = positions[0]`` (the
    root's position: the first row sits at the cache's end), the tree's ``[n, n + w)``; row i
    sees tree node j where ``mask[i, j] != 0``. ``window = S > 0``: row i sees only keys less
    than S positions back (a committed key's position is its slot, a tree key's its
    ``positions``).

    The tree's keys and values come from ``qkv`` itself: a thread scoring tree node j rotates
    node j's key (rounded to the cache's type, as the cache will hold it), so no block reads
    a cache slot at or past ``n``. Block (h, i) of the first query head of each KV head
    writes node i's rotated K and its V into the cache at ``n + i``: the slots later steps
    read, written by one block each, and read by none in this kernel. That is
    :func:`rope_kv`'s work without its launch (a kernel a layer fewer in a CUDA graph).

    ``qk_norm_eps``: Gemma's per-head q/k RMSNorm (:func:`qk_norm`, in its arithmetic) before
    the rotation, with ``q_gamma[D]`` and ``k_gamma[D]`` the arguments after ``cs``: a thread
    that rotates a query or key row sums its squares first (the block's query once per
    thread, a tree key by the thread scoring it), so that kernel's launch goes too.

    One thread block per (head, row), flash decoding within the block: ``groups`` groups of
    ``T`` threads (T the power of two >= max(D, 32); default groups: as many as make
    :data:`TREE_ATTENTION_THREADS` threads), each group on every ``groups``-th chunk of T
    keys with its own online softmax, so that at W = 1 (one block per head) a block still
    has ``groups`` chunks of loads in flight. In a group a thread scores one key (the K cache
    is position-major, so the loads are coalesced; the head dimension's loop is unrolled, its
    loads independent), a shared-memory tree reduction gives the chunk's max and sum (each
    level a thread combines ``fan_in`` values, a barrier a level: 2 levels for a group of 64
    with the default 8, 6 with pairs), and
    thread ``d < D`` accumulates output element d over the chunk's values (a V row is
    contiguous; keys the row cannot see are skipped). The groups' running max, sum and output
    live in shared memory and are merged exactly at the end (the log-sum-exp rule of
    ``ops.attention_merge``); phases are separated by block barriers. Chunks past ``n + w``
    are skipped, so the work follows the cache length while the launch does not depend on
    it. ``gpu=False``: the same phases with the block loop parallel and the thread loops
    serial on the CPU (tests run it against numpy).
    """
    hq, g, d, nl, c = num_heads, num_kv_heads, head_dim, layers, context
    kvd, rep = kv_dtype, num_heads // num_kv_heads
    nt = max(32, 1 << (d - 1).bit_length())
    ng = groups or max(1, TREE_ATTENTION_THREADS // nt)
    # Tree-reduction levels over nt values: at level l the slots 1 << (l * lf) apart, at
    # most fan_in of them (nt and fan_in are powers of two).
    lf = fan_in.bit_length() - 1
    levels = -(-(nt.bit_length() - 1) // lf)

    def level_stride(level):  # constants once the level loop is unrolled
        return T.shift_left(T.int64(1), level * lf)

    def level_fan(level):
        return T.min(T.int64(fan_in), T.shift_right(T.int64(nt), level * lf))
    limit = window or c + 1  # key distance bound: every key is nearer than c + 1
    scale = 1.0 / math.sqrt(d)
    blocks, threads = _loop_kinds(gpu)
    shared = "shared" if gpu else "global"
    sync = _block_sync if gpu else _no_sync
    nt64, ng64 = T.int64(nt), T.int64(ng)
    span = T.int64(nt * ng)  # a round's keys and the block's threads: group t // nt, lane t % nt
    half, qkv_size = d // 2, (hq + 2 * g) * d

    qk = qk_norm_eps is not None

    def roped(qkv, cs, row, head, e, rstd=None, gamma=None):
        """Element ``e`` of head ``head`` of ``qkv[row]`` rotated (rotate-half), in
        :func:`rope_kv`'s arithmetic, the head normed first where ``gamma`` is given (times
        ``rstd``, :func:`qk_norm`'s arithmetic); ``e < half`` folds once the head
        dimension's loop is unrolled."""
        j = e % half
        x0, x1 = qkv[row, head * d + j], qkv[row, head * d + j + half]
        if gamma is not None:
            x0, x1 = x0 * rstd * gamma[j], x1 * rstd * gamma[j + half]
        return T.if_then_else(e < half, x0 * cs[row, j] - x1 * cs[row, j + half],
                              x1 * cs[row, j] + x0 * cs[row, j + half])

    @T.macro
    def head_rstd(out, qkv, row, head):
        """``out[0] = rsqrt(mean(head ** 2) + eps)`` of head ``head`` of ``qkv[row]``."""
        out[0] = T.float32(0)
        for u in range(d):
            out[0] = out[0] + qkv[row, head * d + u] * qkv[row, head * d + u]
        out[0] = T.rsqrt(out[0] * T.float32(1.0 / d) + T.float32(qk_norm_eps or 0.0))

    def as_cached(x):  # a value as the cache holds it, back in float32
        return T.Cast("float32", T.Cast(kvd, x))

    # Thread t's own shared slots are indexed by t itself: TVM's ThreadSync takes an access
    # as the thread's own only when its index names threadIdx.x (not a let-bound
    # expression of it), and would otherwise ask for a barrier inside a condition.
    @T.macro
    def tree_reduce(red, combine):
        for level in T.unroll(T.int64(levels)):
            for t in threads(span):
                if t % nt % (level_stride(level) * level_fan(level)) == 0:
                    red[t] = _fold(combine, red, t, level_stride(level), level_fan(level),
                                   fan_in)
            sync()

    @T.macro
    def body(var_qkv, var_cs, q_gamma, k_gamma, var_k, var_v, var_mask, var_pos, layer, var_out):
        # Both kernels' body: the gammas are the norm's buffers (None without it, and read
        # only in its Python-level branches), everything else the kernel's own arguments.
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True,
                     "hetcomp.rule": "script.tree_attention"})
        w = T.int64()
        qkv = T.match_buffer(var_qkv, (w, qkv_size), "float32")
        cs = T.match_buffer(var_cs, (w, d), "float32")
        k_cache = T.match_buffer(var_k, (nl, g, d, c), kvd)
        v_cache = T.match_buffer(var_v, (nl, g, c, d), kvd)
        mask = T.match_buffer(var_mask, (w, w), "int32")
        positions = T.match_buffer(var_pos, (w,), "int32")
        out = T.match_buffer(var_out, (w, hq, d), "float32")
        for b in blocks(hq * w):
            qs = T.alloc_buffer((d,), "float32", scope=shared)  # the row's query, scaled
            acc = T.alloc_buffer((nt * ng,), "float32", scope=shared)  # groups' outputs
            sc = T.alloc_buffer((nt * ng,), "float32", scope=shared)  # their chunks' scores
            red = T.alloc_buffer((nt * ng,), "float32", scope=shared)
            stat = T.alloc_buffer((3 * ng,), "float32", scope=shared)  # max, sum; new max
            n = T.Cast("int64", positions[0])
            total = n + w
            h = b // w
            i = b % w
            kv = h // rep
            pi = T.Cast("int64", positions[i])
            for t in threads(span):
                if t < d:
                    if qk:  # (a Python-level branch: the other kernel has no norm)
                        rs = T.alloc_buffer((1,), "float32", scope="local")  # a row's rstd
                        head_rstd(rs, qkv, i, h)
                        qs[t] = roped(qkv, cs, i, h, t, rs[0], q_gamma) * T.float32(scale)
                    else:
                        qs[t] = roped(qkv, cs, i, h, t) * T.float32(scale)
                    if h % rep == 0:  # node i's K and V into the cache, once per KV head
                        if qk:
                            head_rstd(rs, qkv, i, hq + kv)
                            k_cache[layer, kv, t, n + i] = T.Cast(
                                kvd, roped(qkv, cs, i, hq + kv, t, rs[0], k_gamma))
                        else:
                            k_cache[layer, kv, t, n + i] = T.Cast(
                                kvd, roped(qkv, cs, i, hq + kv, t))
                        v_cache[layer, kv, n + i, t] = T.Cast(kvd, qkv[i, (hq + g + kv) * d + t])
                acc[t] = T.float32(0)
                if t % nt == 0:
                    stat[t // nt * 3] = T.float32("-inf")
                    stat[t // nt * 3 + 1] = T.float32(0)
            sync()
            for r in range((total + (span - 1)) // span):
                # Step 1. A key per thread (group t // nt on chunk r * groups + t // nt): its
                # score, or -inf where the row cannot see it.
                for t in threads(span):
                    dot = T.alloc_buffer((1,), "float32", scope="local")
                    j = r * span + t
                    node = T.max(T.min(j - n, w - 1), T.int64(0))
                    seen = T.if_then_else(
                        j < n, pi - j < limit,
                        j < total and mask[i, node] != 0
                        and pi - T.Cast("int64", positions[node]) < limit)
                    dot[0] = T.float32("-inf")
                    if seen:
                        dot[0] = T.float32(0)
                        if j < n:
                            for e in T.unroll(T.int64(d)):
                                dot[0] = dot[0] + qs[e] * T.Cast(
                                    "float32", k_cache[layer, kv, e, j])
                        else:  # a tree key: node's K, rotated here a pair at a time
                            if qk:
                                rk = T.alloc_buffer((1,), "float32", scope="local")
                                head_rstd(rk, qkv, node, hq + kv)
                                for e in T.unroll(T.int64(half)):
                                    dot[0] = dot[0] + qs[e] * as_cached(roped(
                                        qkv, cs, node, hq + kv, e, rk[0], k_gamma)) + qs[
                                        e + half] * as_cached(roped(qkv, cs, node, hq + kv,
                                                                    e + half, rk[0], k_gamma))
                            else:
                                for e in T.unroll(T.int64(half)):
                                    dot[0] = dot[0] + qs[e] * as_cached(
                                        roped(qkv, cs, node, hq + kv, e)) + qs[e + half] * (
                                        as_cached(roped(qkv, cs, node, hq + kv, e + half)))
                    sc[t] = dot[0]
                    red[t] = dot[0]
                sync()
                # Step 2. Each chunk's max; its group's new running max.
                tree_reduce(red, T.max)
                for t in threads(span):
                    if t % nt == 0:
                        stat[t // nt * 3 + 2] = T.max(stat[t // nt * 3], red[t])
                sync()
                # Step 3. Weights against the new max, and their sum.
                for t in threads(span):
                    p = T.if_then_else(sc[t] == T.float32("-inf"), T.float32(0),
                                       T.exp(sc[t] - stat[t // nt * 3 + 2]))
                    sc[t] = p
                    red[t] = p
                sync()
                tree_reduce(red, lambda x, y: x + y)
                # Step 4. Rescale the group's output by exp(old max - new max), add its
                # chunk's values (those the row sees); then the running sum and max.
                for t in threads(span):
                    alpha = T.if_then_else(
                        stat[t // nt * 3] == T.float32("-inf"), T.float32(0),
                        T.exp(stat[t // nt * 3] - stat[t // nt * 3 + 2]))
                    if t % nt < d:
                        a = T.alloc_buffer((1,), "float32", scope="local")
                        a[0] = acc[t] * alpha
                        first = t - t % nt  # the group's first slot, its chunk's first key
                        for u in T.unroll(nt64):
                            wt = sc[first + u]  # (a shared read may not sit in a condition)
                            key = r * span + first + u
                            if key < total and wt != T.float32(0):
                                a[0] = a[0] + wt * T.if_then_else(
                                    key < n, T.Cast("float32", v_cache[layer, kv, key, t % nt]),
                                    as_cached(qkv[T.max(key - n, T.int64(0)),
                                                  (hq + g + kv) * d + t % nt]))
                        acc[t] = a[0]
                sync()
                for t in threads(span):
                    if t % nt == 0:
                        stat[t // nt * 3 + 1] = stat[t // nt * 3 + 1] * T.if_then_else(
                            stat[t // nt * 3] == T.float32("-inf"), T.float32(0),
                            T.exp(stat[t // nt * 3] - stat[t // nt * 3 + 2])) + red[t]
                sync()
                for t in threads(span):  # apart: the statement above reads the old max
                    if t % nt == 0:
                        stat[t // nt * 3] = stat[t // nt * 3 + 2]
                sync()
            # The groups' states merged: weights exp(m_g - max_g m_g); a group that saw no
            # key (m_g = -inf) weighs 0, and every row sees at least its own node.
            for t in threads(span):
                if t < d:
                    top = T.alloc_buffer((1,), "float32", scope="local")
                    num = T.alloc_buffer((1,), "float32", scope="local")
                    den = T.alloc_buffer((1,), "float32", scope="local")
                    top[0] = stat[0]
                    for gj in range(ng64):
                        top[0] = T.max(top[0], stat[gj * 3])
                    num[0] = T.float32(0)
                    den[0] = T.float32(0)
                    for gj in range(ng64):
                        f = T.if_then_else(stat[gj * 3] == T.float32("-inf"), T.float32(0),
                                           T.exp(stat[gj * 3] - top[0]))
                        num[0] = num[0] + f * acc[gj * nt + t]
                        den[0] = den[0] + f * stat[gj * 3 + 1]
                    out[i, h, t] = num[0] / den[0]

    @T.prim_func(private=True)
    def tree_attention_func(var_qkv: T.handle, var_cs: T.handle, var_k: T.handle,
                            var_v: T.handle, var_mask: T.handle, var_pos: T.handle,
                            layer: T.int64, var_out: T.handle):
        body(var_qkv, var_cs, None, None, var_k, var_v, var_mask, var_pos, layer, var_out)

    @T.prim_func(private=True)
    def tree_attention_qk_norm(var_qkv: T.handle, var_cs: T.handle, var_qg: T.handle,
                               var_kg: T.handle, var_k: T.handle, var_v: T.handle,
                               var_mask: T.handle, var_pos: T.handle, layer: T.int64,
                               var_out: T.handle):
        q_gamma = T.match_buffer(var_qg, (d,), "float32")
        k_gamma = T.match_buffer(var_kg, (d,), "float32")
        body(var_qkv, var_cs, q_gamma, k_gamma, var_k, var_v, var_mask, var_pos, layer, var_out)

    recorded = {"args": [num_heads, num_kv_heads, head_dim, layers, context],
                "kv_dtype": kv_dtype, "groups": ng, "fan_in": fan_in}
    if window:
        recorded["window"] = window
    if qk:
        recorded["qk_norm_eps"] = qk_norm_eps
    func = tree_attention_qk_norm if qk else tree_attention_func
    return func.with_attr(OP_KIND, "tree_attention").with_attr(
        ARGS_ATTR, json.dumps(recorded))


#: Candidates a ``topk_rows`` thread loads before it ranks them (independent loads in flight).
TOPK_LOADS = 8


def topk_rows(n: int, k: int, rows: int, gpu: bool = False, mapped: bool = False):
    """The ``k`` largest of each of ``rows`` logit rows ``[rows, n]`` (float32), as column
    indices ``[rows, k]`` (int32) in descending order of value, ties to the lower index:
    the Medusa draft's candidates. ``mapped``: a third argument ``vocab[n]`` (int32) maps
    the indices to token ids (a draft vocabulary's ``take``, fused).

    One block per row, ``nt`` threads (256; 64 for k > 16, so that the lists fit shared
    memory). Thread t scans columns ``t, t + nt, ...`` (coalesced), :data:`TOPK_LOADS` loads
    at a time, and keeps its own top-k sorted in registers: a column that beats the k-th
    enters at the end and bubbles up (rare once the list is full). The ``nt`` sorted lists
    then go to shared memory and are merged pairwise, log2(nt) levels, a barrier each: at
    level l thread t < nt >> (l + 1) merges lists 2t and 2t + 1 into list t of the other
    buffer (levels alternate between a buffer of nt lists and one of nt / 2, so no thread
    reads in a level what another writes there). A full sort of the row (TVM's GPU
    ``topk``) is several launches and O(n log n) work for ten values.
    """
    nt = 256 if k <= 16 else 64
    if k > 64 or k > n:
        raise ValueError(f"topk_rows: k = {k} must be at most 64 and the row's {n} columns")
    levels = nt.bit_length() - 1  # even: the merge loop runs levels in pairs
    loads = TOPK_LOADS
    batches = (n + nt * loads - 1) // (nt * loads)
    blocks, threads = _loop_kinds(gpu)
    shared = "shared" if gpu else "global"
    sync = _block_sync if gpu else _no_sync
    nt64, last = T.int64(nt), k - 1
    from tvm import tirx

    def better(av, ai, bv, bi):
        """(value, index) a ranks before b: larger value, or equal and lower index."""
        return tirx.Or(av > bv, tirx.And(av == bv, ai < bi))

    @T.macro
    def merge(src_v, src_i, dst_v, dst_i, level):
        for t in threads(nt64):
            if t < T.shift_right(nt64, level + 1):
                pa = T.alloc_buffer((1,), "int64", scope="local")
                pb = T.alloc_buffer((1,), "int64", scope="local")
                mv = T.alloc_buffer((k,), "float32", scope="local")
                mi = T.alloc_buffer((k,), "int32", scope="local")
                pa[0] = T.int64(0)
                pb[0] = T.int64(0)
                for s in T.unroll(k):
                    av = src_v[2 * t * k + pa[0]]
                    ai = src_i[2 * t * k + pa[0]]
                    bv = src_v[(2 * t + 1) * k + pb[0]]
                    bi = src_i[(2 * t + 1) * k + pb[0]]
                    if better(av, ai, bv, bi):
                        mv[s] = av
                        mi[s] = ai
                        pa[0] = pa[0] + 1
                    else:
                        mv[s] = bv
                        mi[s] = bi
                        pb[0] = pb[0] + 1
                for s in T.unroll(k):
                    dst_v[t * k + s] = mv[s]
                    dst_i[t * k + s] = mi[s]
        sync()

    @T.macro
    def body(logits, vocab, out):
        for b in blocks(T.int64(rows)):
            lists_v = T.alloc_buffer((nt * k,), "float32", scope=shared)
            lists_i = T.alloc_buffer((nt * k,), "int32", scope=shared)
            half_v = T.alloc_buffer((nt // 2 * k,), "float32", scope=shared)
            half_i = T.alloc_buffer((nt // 2 * k,), "int32", scope=shared)
            for t in threads(nt64):
                lv = T.alloc_buffer((k,), "float32", scope="local")
                li = T.alloc_buffer((k,), "int32", scope="local")
                xs = T.alloc_buffer((loads,), "float32", scope="local")
                sv = T.alloc_buffer((1,), "float32", scope="local")
                si = T.alloc_buffer((1,), "int32", scope="local")
                for s in T.unroll(k):
                    lv[s] = T.float32("-inf")
                    li[s] = T.Cast("int32", n + t)  # past every column: ranks after them
                for bt in range(T.int64(batches)):
                    for u in T.unroll(T.int64(loads)):
                        j = (bt * loads + u) * nt + t
                        xs[u] = T.if_then_else(j < n, logits[b, j], T.float32("-inf"))
                    for u in T.unroll(T.int64(loads)):
                        j = (bt * loads + u) * nt + t
                        if j < n and better(xs[u], T.Cast("int32", j), lv[last], li[last]):
                            lv[last] = xs[u]
                            li[last] = T.Cast("int32", j)
                            for s in T.unroll(last):
                                if better(lv[last - s], li[last - s],
                                          lv[last - 1 - s], li[last - 1 - s]):
                                    sv[0] = lv[last - s]
                                    si[0] = li[last - s]
                                    lv[last - s] = lv[last - 1 - s]
                                    li[last - s] = li[last - 1 - s]
                                    lv[last - 1 - s] = sv[0]
                                    li[last - 1 - s] = si[0]
                for s in T.unroll(k):
                    lists_v[t * k + s] = lv[s]
                    lists_i[t * k + s] = li[s]
            sync()
            for lp in range(T.int64(levels // 2)):
                merge(lists_v, lists_i, half_v, half_i, 2 * lp)
                merge(half_v, half_i, lists_v, lists_i, 2 * lp + 1)
            for t in threads(nt64):
                if t < k:
                    if mapped:
                        out[b, t] = vocab[lists_i[t]]
                    else:
                        out[b, t] = lists_i[t]

    if mapped:
        @T.prim_func(private=True)
        def topk_func(var_logits: T.handle, var_vocab: T.handle, var_out: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True,
                         "hetcomp.rule": "script.topk"})
            logits = T.match_buffer(var_logits, (rows, n), "float32")
            vocab = T.match_buffer(var_vocab, (n,), "int32")
            out = T.match_buffer(var_out, (rows, k), "int32")
            body(logits, vocab, out)
    else:
        @T.prim_func(private=True)
        def topk_func(var_logits: T.handle, var_out: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True,
                         "hetcomp.rule": "script.topk"})
            logits = T.match_buffer(var_logits, (rows, n), "float32")
            out = T.match_buffer(var_out, (rows, k), "int32")
            body(logits, None, out)

    return topk_func.with_attr(OP_KIND, "topk").with_attr("hetcomp.n", n).with_attr(
        ARGS_ATTR, json.dumps({"args": [n, k, rows], "mapped": mapped}))


def for_gpu(func, gpu: bool = True):
    """The GPU version of a script kernel (any of this module's), or None for others;
    ``gpu=False``: a fresh CPU copy (new definitions, for a second unit)."""
    attrs = func.attrs
    if attrs is None or ARGS_ATTR not in attrs:
        return None
    recorded = json.loads(str(attrs[ARGS_ATTR]))
    build = {"rope": rope_kv, "kv_commit": kv_commit, "qk_norm": qk_norm,
             "tree_attention": tree_attention, "stage_tree": stage_tree,
             "stage_draft": stage_draft, "topk": topk_rows,
             "draft_tokens": draft_tokens}[str(attrs[OP_KIND])]
    kw = {key: recorded[key] for key in ("kv_dtype", "window", "groups", "mapped", "fan_in",
                                         "qk_norm_eps") if key in recorded}
    out = build(*recorded["args"], gpu=gpu, **kw)
    for key in ("global_symbol", "target", "hetcomp.cost"):  # AnnotateCost's too
        if key in attrs:
            out = out.with_attr(key, attrs[key])
    return out
