"""``script_ops.tree_attention``, the attention of CUDA-graph builds (the cache length read on
the device as ``positions[0]``, RoPE and the tree's cache write inside): its CPU form (the same
phases, the thread loops serial) against float64 numpy and ``rope_kv``, and its GPU form
through TVM's CUDA codegen and nvcc."""

import json
import math
import shutil
import subprocess

import numpy as np
import pytest

from hetcomp import _tvm
from hetcomp.codegen.build import cuda_source
from hetcomp.kernels import script_ops
from hetcomp.testing import depths, tree_mask
from hetcomp.testing.gpu import kernel_library

H, G, D, LAYERS, CONTEXT = 4, 2, 16, 2, 64
HALF = D // 2


def rope(x, cs):
    """Rotate-half RoPE of rows ``x[w, D]`` by their table ``cs[w, D]`` (cos | sin)."""
    c, s = cs[:, :HALF], cs[:, HALF:]
    return np.concatenate([x[:, :HALF] * c - x[:, HALF:] * s, x[:, HALF:] * c + x[:, :HALF] * s],
                          axis=1)


def written_caches(qkv, cs, kc, vc, n, layer):
    """The caches after the kernel: each tree node's rotated K and its V, rounded to the
    caches' type, at slot ``n + i`` of ``layer``."""
    kc, vc, w = kc.copy(), vc.copy(), len(qkv)
    for g in range(G):
        kc[layer, g, :, n:n + w] = rope(qkv[:, (H + g) * D:(H + g + 1) * D], cs).T
        vc[layer, g, n:n + w] = qkv[:, (H + G + g) * D:(H + G + g + 1) * D]
    return kc, vc


def reference(qkv, cs, kc, vc, mask, pos, layer, window=0):
    """Row i of head h: softmax over the committed keys [0, n) and its tree ancestors, all
    read from the caches as the kernel leaves them."""
    w, n, rep = len(qkv), int(pos[0]), H // G
    kc, vc = written_caches(qkv, cs, kc, vc, n, layer)
    out = np.zeros((w, H, D))
    for h in range(H):
        q = rope(qkv[:, h * D:(h + 1) * D], cs)
        for i in range(w):
            keys = [j for j in range(n) if not window or pos[i] - j < window]
            keys += [n + t for t in range(w)
                     if mask[i, t] and (not window or pos[i] - pos[t] < window)]
            s = q[i].astype(np.float64) @ kc[layer, h // rep][:, keys].astype(np.float64)
            p = np.exp(s / math.sqrt(D) - (s / math.sqrt(D)).max())
            out[i, h] = (p / p.sum()) @ vc[layer, h // rep][keys].astype(np.float64)
    return out


def inputs(rng, n, parents, kv_dtype):
    """qkv rows, their RoPE table (the real one: angles of each node's position), caches,
    mask and positions."""
    w = len(parents)
    mask, pos = tree_mask(parents).astype("int32"), (n + depths(parents)).astype("int32")
    angles = pos[:, None] / 10000.0 ** (np.arange(HALF) * 2 / D)
    cs = np.concatenate([np.cos(angles), np.sin(angles)], axis=1).astype("float32")
    qkv = rng.standard_normal((w, (H + 2 * G) * D)).astype("float32")
    kc = rng.standard_normal((LAYERS, G, D, CONTEXT)).astype(kv_dtype)
    vc = rng.standard_normal((LAYERS, G, CONTEXT, D)).astype(kv_dtype)
    return qkv, cs, kc, vc, mask, pos


def run(lib, qkv, cs, kc, vc, mask, pos, layer):
    """The kernel's output and the caches it leaves."""
    caches = _tvm.tensor(kc), _tvm.tensor(vc)
    out = _tvm.tensor(np.zeros((len(qkv), H, D), "float32"))
    lib["main"](_tvm.tensor(qkv), _tvm.tensor(cs), *caches, _tvm.tensor(mask), _tvm.tensor(pos),
                layer, out)
    return out.numpy(), caches[0].numpy(), caches[1].numpy()


@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("groups", [None, 1, 3])
def test_cpu_form_matches_numpy(kv_dtype, window, groups):
    """Empty cache (one key: the row itself), a tree over a short cache, several 32-key
    chunks, and a cache filled to its last slot; with a window, keys 5 or more positions
    back drop out, whole chunks of them too. One group takes the chunks one by one; three
    take them three at a time (some rounds leave a group without keys: its state must
    weigh nothing in the merge); the default, eight, takes the whole cache in one round.
    The caches come back with the tree's K and V written, the rest untouched."""
    func = script_ops.tree_attention(H, G, D, LAYERS, CONTEXT, kv_dtype=kv_dtype,
                                     window=window, groups=groups)
    lib = kernel_library(func, "host")
    rng = np.random.default_rng(window)
    for n, parents in ((0, [-1]), (3, [-1, 0, 0, 1]), (40, [-1, 0, 1, 1, 0, 4, 2, 6]),
                       (33, [-1] + list(range(30)))):
        args = inputs(rng, n, parents, kv_dtype)
        out, kc, vc = run(lib, *args, 1)
        np.testing.assert_allclose(out, reference(*args, 1, window), rtol=1e-5, atol=1e-5,
                                   err_msg=f"n={n} w={len(parents)}")
        want_k, want_v = written_caches(*args[:4], n, 1)
        np.testing.assert_allclose(kc.astype("float32"), want_k.astype("float32"),
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(vc, want_v)


def test_tree_keys_are_rope_kvs_own():
    """The cache the kernel writes equals ``rope_kv``'s, bit for bit (float16: the same
    rounding), so a later step reads the keys the CPU build's RoPE would have written."""
    n, parents = 21, [-1, 0, 1, 0, 3]
    qkv, cs, kc, vc, mask, pos = inputs(np.random.default_rng(5), n, parents, "float16")
    _, k_ours, v_ours = run(kernel_library(script_ops.tree_attention(
        H, G, D, LAYERS, CONTEXT, kv_dtype="float16"), "host"), qkv, cs, kc, vc, mask, pos, 0)
    caches = _tvm.tensor(kc), _tvm.tensor(vc)
    w = len(parents)
    kernel_library(script_ops.rope_kv(H, G, D, LAYERS, CONTEXT, kv_dtype="float16"), "host")[
        "main"](_tvm.tensor(qkv), _tvm.tensor(cs), *caches, 0, n,
                *(_tvm.tensor(np.zeros(s, "float32")) for s in ((H, w, D), (G, w, D), (G, w, D))))
    np.testing.assert_array_equal(k_ours, caches[0].numpy())
    np.testing.assert_array_equal(v_ours, caches[1].numpy())


@pytest.mark.parametrize("groups,threads", [(None, 256), (1, 32)])
def test_gpu_form_is_one_block_per_row_with_barriers(groups, threads):
    """A block per (head, row): groups of T = 32 threads (the power of two >= head_dim, at
    least a warp), 256 threads by default; the running states in shared memory, a barrier
    after every phase and no other (TVM's ThreadSync adds none: each thread's own slots are
    indexed by threadIdx.x), the round loop bounded by the length read on the device, the
    head dimension's loads unrolled."""
    func = script_ops.for_gpu(script_ops.tree_attention(H, G, D, LAYERS, CONTEXT,
                                                        groups=groups))
    assert json.loads(str(func.attrs[script_ops.ARGS_ATTR]))["groups"] == threads // 32
    src = cuda_source(kernel_library(func, "cuda"))
    assert f"__launch_bounds__({threads})" in src
    assert src.count("__shared__") == 5
    # init; per round: scores, max's two tree levels (8 slots, then 4 or 8), new max,
    # weights, sum's two levels, values, sum, max: 10 a round (18 with pairs for D = 64)
    assert src.count("__syncthreads()") == 11
    assert f"((total_ptr[0] + (int64_t){threads - 1}) >> (int64_t)" in src
    # A key's head dimension unrolled (and the tree row's write), a value per chunk slot (and
    # the write); the tree's keys and values read from qkv.
    assert src.count("k_cache_ptr[") == D + 1 and src.count("v_cache_ptr[") == 32 + 1
    assert "qkv_ptr[" in src


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit)")
@pytest.mark.parametrize("head_dim,kv_dtype,qk_eps", [(64, "float16", None),
                                                     (256, "float32", None),
                                                     (256, "float32", 1e-6)])
def test_gpu_form_compiles_with_nvcc(tmp_path, head_dim, kv_dtype, qk_eps):
    """SmolLM2's shape and Gemma 3's head_dim 256 (256 threads), with its q/k norm inside
    too, for sm_90. (Gemma's float16-cache form with the norm spills 8 bytes on sm_90: ptxas
    keeps it at 32 registers.)"""
    func = script_ops.for_gpu(script_ops.tree_attention(9, 3, head_dim, 30, 2048,
                                                        kv_dtype=kv_dtype, window=512,
                                                        qk_norm_eps=qk_eps))
    src = cuda_source(kernel_library(func, "cuda"))
    (tmp_path / "k.cu").write_text(src)
    out = subprocess.run(["nvcc", "--cubin", "-arch=sm_90", "--resource-usage", "-o",
                          str(tmp_path / "k.cubin"), str(tmp_path / "k.cu")],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "used 1 barriers" in out.stderr
    assert "0 bytes stack frame, 0 bytes spill stores" in out.stderr  # 64 or 256 loads unrolled


@pytest.mark.parametrize("fan_in", [2, 4, 8])
def test_any_fan_in_gives_the_same_attention(fan_in):
    """The group reductions combine ``fan_in`` slots a level (pairs: log2 T levels; 8: two
    for T = 64): 32-thread groups over a cache of several chunks, against numpy."""
    func = script_ops.tree_attention(H, G, D, LAYERS, CONTEXT, kv_dtype="float32",
                                     fan_in=fan_in)
    assert json.loads(str(func.attrs[script_ops.ARGS_ATTR]))["fan_in"] == fan_in
    lib = kernel_library(func, "host")
    rng = np.random.default_rng(fan_in)
    args = inputs(rng, 45, [-1, 0, 1, 1, 0], "float32")
    np.testing.assert_allclose(run(lib, *args, 0)[0], reference(*args, 0), rtol=1e-5, atol=1e-5)


def qk_normed(qkv, q_gamma, k_gamma, eps):
    """Gemma's per-head RMSNorm of the query and key heads (``script_ops.qk_norm``), float64."""
    out = qkv.astype(np.float64).copy()
    for head in range(H + G):
        x = out[:, head * D:(head + 1) * D]
        x[:] = x / np.sqrt((x * x).mean(axis=1, keepdims=True) + eps) * (
            q_gamma if head < H else k_gamma)
    return out


@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
def test_qk_norm_inside_matches_numpy(kv_dtype):
    """Gemma's q/k norm in the kernel (``qk_norm_eps``): the output and the keys it writes
    are those of the normed rows, rotated; a window too, as Gemma's local layers have."""
    eps = 1e-6
    func = script_ops.tree_attention(H, G, D, LAYERS, CONTEXT, kv_dtype=kv_dtype, window=5,
                                     qk_norm_eps=eps)
    assert json.loads(str(func.attrs[script_ops.ARGS_ATTR]))["qk_norm_eps"] == eps
    lib = kernel_library(func, "host")
    rng = np.random.default_rng(9)
    qg, kg = rng.standard_normal(D).astype("float32"), rng.standard_normal(D).astype("float32")
    for n, parents in ((0, [-1]), (40, [-1, 0, 1, 1, 0, 4, 2, 6])):
        qkv, cs, kc, vc, mask, pos = inputs(rng, n, parents, kv_dtype)
        caches = _tvm.tensor(kc), _tvm.tensor(vc)
        out = _tvm.tensor(np.zeros((len(qkv), H, D), "float32"))
        lib["main"](*map(_tvm.tensor, (qkv, cs, qg, kg)), *caches, _tvm.tensor(mask),
                    _tvm.tensor(pos), 1, out)
        normed = qk_normed(qkv, qg, kg, eps)
        np.testing.assert_allclose(out.numpy(), reference(normed, cs, kc, vc, mask, pos, 1, 5),
                                   rtol=1e-4, atol=1e-5)
        want_k, want_v = written_caches(normed, cs, kc, vc, n, 1)
        np.testing.assert_allclose(caches[0].numpy().astype("float32"),
                                   want_k.astype("float32"), rtol=2e-3, atol=1e-3)
        np.testing.assert_array_equal(caches[1].numpy(), want_v)
