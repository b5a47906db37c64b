"""A float16 KV cache: attention (fused kernel and dense part) reads it, widens to float32 and
accumulates in float32; rope_kv rounds what it writes and hands the sparse part the same
rounded values; commit moves float16 slots. Numerics against numpy, scheduled by the rules
the model uses."""

import numpy as np
import pytest

from hetcomp import _tvm
from hetcomp.codegen.cross import apply_rules
from hetcomp.codegen.targets import make_target
from hetcomp.kernels import ops, script_ops
from hetcomp.schedules.cpu import AttentionRule
from hetcomp.schedules.gpu import gpu_rules
from hetcomp.testing.tree_attention import split_part

c = _tvm.compiler()
TARGET = make_target("host")
CUDA = {"kind": "cuda", "arch": "sm_90"}
HQ, G, D, LAYERS, CONTEXT, LAYER = 6, 2, 32, 2, 64, 1


def _build(func):
    return c.compile(c.IRModule({"main": func}), target=TARGET)["main"]


def _scheduled(func):
    sch = AttentionRule().apply(func, TARGET, False)
    assert sch is not None, "the CPU attention rule must schedule the float16-cache kernel"
    return sch.mod["main"]


def _reference(q, kc, vc, n, mask):
    """Attention over cache keys [0, n) (+ the tree at [n, n + w) under ``mask``) in float64
    from the cache's own (float16) values; (o[H, w, D], lse[H, w])."""
    w = q.shape[1]
    keys = n + (0 if mask is None else w)
    k = np.repeat(kc[LAYER].astype(np.float64), HQ // G, axis=0)[:, :, :keys]
    v = np.repeat(vc[LAYER].astype(np.float64), HQ // G, axis=0)[:, :keys]
    s = np.einsum("hid,hdj->hij", q.astype(np.float64), k) / np.sqrt(D)
    if mask is not None:
        valid = np.concatenate([np.ones((w, n), bool), mask != 0], axis=1)
        s = np.where(valid[None], s, -np.inf)
    m = s.max(-1, keepdims=True)
    e = np.exp(s - m)
    z = e.sum(-1, keepdims=True)
    return np.einsum("hij,hjd->hid", e / z, v), (m + np.log(z))[..., 0]


def _inputs(w, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((HQ, w, D)).astype("float32")
    kc = (rng.standard_normal((LAYERS, G, D, CONTEXT)) * 2).astype("float16")
    vc = rng.standard_normal((LAYERS, G, CONTEXT, D)).astype("float16")
    return q, kc, vc


@pytest.mark.parametrize("w,n", [(4, 37), (8, 56)])
def test_fused_attention_reads_float16_cache(w, n):
    q, kc, vc = _inputs(w, w)
    mask = np.tril(np.ones((w, w), "int32"))
    fn = _build(_scheduled(ops.attention(HQ, G, D, LAYERS, CONTEXT, rows=w,
                                         kv_dtype="float16")))
    out = _tvm.tensor(np.zeros((w, HQ, D), "float32"))
    fn(*[_tvm.tensor(a) for a in (q, kc, vc, mask)], LAYER, n, out)
    o_ref, _ = _reference(q, kc, vc, n, mask)
    # float32 accumulation of float16 inputs: float32 rounding only.
    np.testing.assert_allclose(out.numpy(), o_ref.transpose(1, 0, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("w,n", [(4, 37), (16, 60)])
def test_dense_part_reads_float16_cache(w, n):
    q, kc, vc = _inputs(w, 100 + w)
    fn = _build(_scheduled(ops.attention(HQ, G, D, LAYERS, CONTEXT, rows=w, part="dense",
                                         kv_dtype="float16")))
    part = _tvm.tensor(np.zeros((w, HQ, D + 1), "float32"))
    fn(*[_tvm.tensor(a) for a in (q, kc, vc)], LAYER, n, part)
    o, lse = split_part(part.numpy())
    o_ref, lse_ref = _reference(q, kc, vc, n, None)
    np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("part", ["full", "dense"])
def test_gpu_rule_schedules_float16_cache_attention(part):
    func = ops.attention(HQ, G, D, LAYERS, CONTEXT, rows=8, part=part, kv_dtype="float16")
    scheduled = apply_rules(func, gpu_rules(), CUDA)
    assert scheduled is not None
    src = c.compile(c.IRModule({"main": scheduled}), target=c.Target(CUDA)).mod \
        .imports[0].inspect_source()
    assert "half" in src and "__global__" in src


def test_rope_kv_rounds_once_for_cache_and_tree():
    """The cache holds float16(K), and k_tree/v_tree the same values widened: the sparse part
    sees the tree exactly as the fused kernel and later steps read it from the cache."""
    rows, n = 3, 7
    fn = _build(script_ops.rope_kv(HQ, G, D, LAYERS, CONTEXT, kv_dtype="float16")
                .with_attr("global_symbol", "main"))
    rng = np.random.default_rng(5)
    qkv = rng.standard_normal((rows, (HQ + 2 * G) * D)).astype("float32")
    cs = rng.standard_normal((rows, D)).astype("float32")
    kc = _tvm.tensor(np.zeros((LAYERS, G, D, CONTEXT), "float16"))
    vc = _tvm.tensor(np.zeros((LAYERS, G, CONTEXT, D), "float16"))
    q, kt, vt = (_tvm.tensor(np.zeros(s, "float32")) for s in
                 ((HQ, rows, D), (G, rows, D), (G, rows, D)))
    fn(_tvm.tensor(qkv), _tvm.tensor(cs), kc, vc, LAYER, n, q, kt, vt)
    v = qkv.reshape(rows, HQ + 2 * G, D)[:, HQ + G:].transpose(1, 0, 2)
    np.testing.assert_array_equal(vc.numpy()[LAYER, :, n:n + rows], v.astype("float16"))
    np.testing.assert_array_equal(vt.numpy(), v.astype("float16").astype("float32"))
    k16 = kc.numpy()[LAYER, :, :, n:n + rows].transpose(0, 2, 1)
    np.testing.assert_array_equal(kt.numpy(), k16.astype("float32"))
    assert np.abs(k16).max() > 0 and not kc.numpy()[0].any()  # only this layer's slots


def test_kv_commit_moves_float16_slots():
    fn = _build(script_ops.kv_commit(G, D, LAYERS, CONTEXT, kv_dtype="float16")
                .with_attr("global_symbol", "main"))
    rng = np.random.default_rng(6)
    kc0 = rng.standard_normal((LAYERS, G, D, CONTEXT)).astype("float16")
    vc0 = rng.standard_normal((LAYERS, G, CONTEXT, D)).astype("float16")
    kc, vc = _tvm.tensor(kc0), _tvm.tensor(vc0)
    n, idx = 10, np.array([0, 2, 3], "int32")
    fn(kc, vc, _tvm.tensor(idx), n)
    np.testing.assert_array_equal(kc.numpy()[..., n:n + 3], kc0[..., n + idx])
    np.testing.assert_array_equal(vc.numpy()[:, :, n:n + 3], vc0[:, :, n + idx])


def test_gpu_script_kernels_write_float16_cache():
    """The GPU versions of rope_kv and kv_commit (for_gpu keeps the recorded kv_dtype)."""
    for func in (script_ops.rope_kv(HQ, G, D, LAYERS, CONTEXT, kv_dtype="float16"),
                 script_ops.kv_commit(G, D, LAYERS, CONTEXT, kv_dtype="float16")):
        text = script_ops.for_gpu(func).script()
        assert '"float16"' in text and "blockIdx.x" in text
