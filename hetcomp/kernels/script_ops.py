"""Kernels that update the KV cache in place, written in TVMScript (TE cannot mutate inputs),
and Gemma's per-head q/k norm (:func:`qk_norm`, scheduled as written like them).

They are called with ``R.call_tir_inplace``; both are already scheduled and marked so that
no schedule rule touches them (``hetcomp.rule`` = ``script.<kind>``): one loop nest, whose outer two loops are a parallel loop and a
serial one for CPUs, and blocks and threads for GPUs (``gpu=True``). :func:`for_gpu` turns the CPU
kernel in a module into the GPU one (the arguments are recorded on the function).
"""

from __future__ import annotations

import json

from tvm.script import tirx as T

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

    return rope_kv_func.with_attr(OP_KIND, "rope").with_attr(ARGS_ATTR, json.dumps(
        {"args": [num_heads, num_kv_heads, head_dim, layers, context], "kv_dtype": kv_dtype}))


def qk_norm(num_heads: int, num_kv_heads: int, head_dim: int, eps: float, gpu: bool = False):
    """Gemma's q/k norm: RMSNorm over head_dim of every query head (weights ``q_gamma[D]``)
    and key head (``k_gamma[D]``) of the fused ``qkv[w, (H + 2G) * D]`` rows, before
    ``rope_kv``; the value heads are copied. Output: the same layout.

    CPU: a parallel task per head, each row's sum of squares once in a local scalar. GPU: a
    block per head and a thread per element, each thread summing its row itself (D loads: a
    thread-local sum needs no shared-memory reduction)."""
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
        for h in outer(hq + 2 * g):
            if gpu:
                for t in inner(d):
                    for i in range(w):
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


def for_gpu(func, gpu: bool = True):
    """The GPU version of a script kernel (``rope_kv``/``kv_commit``), or None for others;
    ``gpu=False``: a fresh CPU copy (new definitions, for a second unit)."""
    attrs = func.attrs
    if attrs is None or ARGS_ATTR not in attrs:
        return None
    recorded = json.loads(str(attrs[ARGS_ATTR]))
    build = {"rope": rope_kv, "kv_commit": kv_commit, "qk_norm": qk_norm}[str(attrs[OP_KIND])]
    kw = {"kv_dtype": recorded["kv_dtype"]} if "kv_dtype" in recorded else {}
    out = build(*recorded["args"], gpu=gpu, **kw)
    for key in ("global_symbol", "target"):
        if key in attrs:
            out = out.with_attr(key, attrs[key])
    return out
