"""Sparse tree attention on this machine (x86): CSR helpers, kernel numerics in the model's
layouts, the LSE merge, rules."""

import re

import numpy as np
import pytest

from hetcomp import _tvm
from hetcomp.codegen.cross import AARCH64_NEON, apply_rules
from hetcomp.errors import HetcompError
from hetcomp.hardware import target_dict
from hetcomp.kernels import ops
from hetcomp.kernels import sparse_attention as sa
from hetcomp.schedules import arm, x86
from hetcomp.schedules.arm import NEON_F32
from hetcomp.schedules.llvm import llvm_rules
from hetcomp.schedules.x86 import AVX2_F32, AVX512_F32, x86_rules
from hetcomp.testing import tree_mask
from hetcomp.testing.tree_attention import (
    D,
    G,
    H,
    random_qkv,
    random_tree,
    reference_attention,
    split_part,
)

HOST = target_dict("host")


def merge_parts(o_a, lse_a, o_b, lse_b):
    """Online-softmax merge of two partial attention results over disjoint key sets."""
    m = np.maximum(lse_a, lse_b)
    wa, wb = np.exp(lse_a - m), np.exp(lse_b - m)
    z = wa + wb
    return (wa[..., None] * o_a + wb[..., None] * o_b) / z[..., None], m + np.log(z)


# ----------------------------------------------------------------------------- kernels


def host_kernel(func):
    c = _tvm.compiler()
    lib = c.compile(c.IRModule({"main": func}), target=c.Target(HOST))
    fn = lib["main"]

    def call(*inputs, out_shapes):
        outs = [_tvm.tensor(np.zeros(s, "float32")) for s in out_shapes]
        fn(*[_tvm.tensor(x) if isinstance(x, np.ndarray) else x for x in inputs], *outs)
        return [o.numpy() for o in outs]

    return call


def host_has_x86_rule() -> bool:
    return x86.SparseTreeAttentionRule().intrinsics(_tvm.compiler().Target(HOST)) is not None


needs_x86_rule = pytest.mark.skipif(not host_has_x86_rule(),
                                    reason="host CPU has neither AVX-512 nor AVX2+FMA")


def x86_scheduled(func):
    """``func`` as the x86 rules schedule it; the unscheduled kernel stands in (same numerics)
    only on a host without AVX2 + FMA, never for a rule that stopped applying."""
    scheduled = apply_rules(func, x86_rules(), HOST)
    if host_has_x86_rule():
        assert scheduled is not None, f"x86 rules left {func.attrs['global_symbol']} unscheduled"
    return scheduled or func


@pytest.fixture(scope="module")
def kernels():
    return {"sparse": host_kernel(x86_scheduled(sa.sparse_tree_attention(H, G, D))),
            "dense": host_kernel(x86_scheduled(sa.dense_tree_attention(H, G, D))),
            "naive": host_kernel(sa.naive_sparse_tree_attention(H, G, D))}


def run(kernels, name, q, k, v, row_ptr, col_idx):
    """Run a kernel on the tree's ``k, v[G, W, D]`` (the model's layout); (o[H, W, D], lse)."""
    shapes = [(q.shape[1], q.shape[0], q.shape[2] + 1)]
    if name == "dense":
        tree = (sa.mask_from_csr(row_ptr, col_idx),)
    else:
        sa.check_inputs(q, k, v, row_ptr, col_idx)
        tree = (row_ptr, col_idx)
    (part,) = kernels[name](q, k, v, *tree, out_shapes=shapes)
    return split_part(part)


# ----------------------------------------------------------------------------- tests


def test_csr_from_parents():
    #      0
    #    1   2
    #    3     4 - 5
    parents = [-1, 0, 0, 1, 2, 4]
    row_ptr, col_idx = sa.csr_from_parents(parents)
    assert row_ptr.tolist() == [0, 1, 3, 5, 8, 11, 15]
    assert col_idx.tolist() == [0, 0, 1, 0, 2, 0, 1, 3, 0, 2, 4, 0, 2, 4, 5]
    assert row_ptr.dtype == col_idx.dtype == np.int32
    np.testing.assert_array_equal(sa.mask_from_csr(row_ptr, col_idx), tree_mask(parents))
    with pytest.raises(HetcompError, match="precede"):
        sa.csr_from_parents([-1, 2, 0])


@pytest.mark.parametrize("mutate, match", [
    (lambda rp, ci: (rp.astype("int64"), ci), "int32"),
    (lambda rp, ci: (rp[:-1], ci), "shape"),
    (lambda rp, ci: (rp + 1, ci), "from 0"),
    (lambda rp, ci: (np.concatenate([rp[:2], rp[1:2], rp[3:]]).astype("int32"), ci),
     "increase"),
    (lambda rp, ci: (rp, np.where(ci == 3, 99, ci).astype("int32")), r"\[0, 6\)"),
])
def test_validate_csr_rejects(mutate, match):
    row_ptr, col_idx = mutate(*sa.csr_from_parents([-1, 0, 0, 1, 2, 4]))
    with pytest.raises(HetcompError, match=match):
        sa.validate_csr(row_ptr, col_idx, 6)


def test_check_inputs_rejects_bad_layout():
    rng = np.random.default_rng(1)
    q, k, v = random_qkv(8, rng)
    row_ptr, col_idx = sa.csr_from_parents(random_tree(8, rng))
    sa.check_inputs(q, k, v, row_ptr, col_idx)
    with pytest.raises(HetcompError, match="C-contiguous"):
        sa.check_inputs(q, np.swapaxes(k, 1, 2), v, row_ptr, col_idx)
    with pytest.raises(HetcompError, match="G dividing"):
        sa.check_inputs(q, k[:, :7].copy(), v, row_ptr, col_idx)
    with pytest.raises(HetcompError, match="shaped as k"):  # a V cache in place of v_tree
        sa.check_inputs(q, k, np.zeros((G, 96, D), "float32"), row_ptr, col_idx)


@pytest.mark.parametrize("w", [4, 16, 64])
@pytest.mark.parametrize("name", ["sparse", "dense", "naive"])
def test_kernel_matches_numpy(kernels, name, w):
    rng = np.random.default_rng(w)
    parents = random_tree(w, rng)
    q, k, v = random_qkv(w, rng)
    row_ptr, col_idx = sa.csr_from_parents(parents)
    o, lse = run(kernels, name, q, k, v, row_ptr, col_idx)
    o_ref, lse_ref = reference_attention(q, k, v, tree_mask(parents))
    np.testing.assert_allclose(o, o_ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(lse, lse_ref, atol=1e-5, rtol=0)


def test_deep_chain_and_large_scores(kernels):
    # A chain (every row holds all its predecessors) with scores of very different sizes:
    # the online softmax must rescale correctly whichever key holds the maximum.
    w = 24
    rng = np.random.default_rng(7)
    q, k, v = random_qkv(w, rng)
    k *= np.linspace(0.1, 6.0, w, dtype="float32")[None, :, None]
    parents = [-1, *range(w - 1)]
    o, lse = run(kernels, "sparse", q, k, v, *sa.csr_from_parents(parents))
    o_ref, lse_ref = reference_attention(q, k, v, tree_mask(parents))
    np.testing.assert_allclose(o, o_ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(lse, lse_ref, atol=1e-5, rtol=1e-6)


def test_merge_with_dense_part_equals_full_attention(kernels):
    """Dense part (tree queries x cache) + sparse part (tree x tree), merged = full attention."""
    rng = np.random.default_rng(3)
    w, cache = 16, 37
    parents = random_tree(w, rng)
    q, k, v = random_qkv(w, rng)
    kc = rng.standard_normal((G, cache, D), dtype="float32")
    vc = rng.standard_normal((G, cache, D), dtype="float32")
    o_dense, lse_dense = reference_attention(q, kc, vc, np.ones((w, cache), "int32"))
    o_sparse, lse_sparse = run(kernels, "sparse", q, k, v, *sa.csr_from_parents(parents))
    full_mask = np.concatenate([np.ones((w, cache), "int32"), tree_mask(parents)], axis=1)
    o_full, lse_full = reference_attention(q, np.concatenate([kc, k], 1),
                                           np.concatenate([vc, v], 1), full_mask)
    o, lse = merge_parts(o_dense, lse_dense, o_sparse, lse_sparse)
    np.testing.assert_allclose(o, o_full, atol=1e-5, rtol=0)
    np.testing.assert_allclose(lse, lse_full, atol=1e-5, rtol=0)
    # The model's merge kernel (scheduled) on [W, H, D + 1] partials.
    merge = host_kernel(apply_rules(ops.attention_merge(H, D), llvm_rules(), HOST))

    def part(o_, lse_):
        return np.concatenate([o_.transpose(1, 0, 2), lse_.T[..., None]], -1).astype("float32")

    (o2,) = merge(part(o_dense, lse_dense), part(o_sparse, lse_sparse),
                  out_shapes=[(w, H, D)])
    np.testing.assert_allclose(o2.transpose(1, 0, 2), o_full, atol=1e-5, rtol=0)


def test_rules_apply_only_to_their_kinds_and_targets():
    c = _tvm.compiler()
    sparse = sa.sparse_tree_attention(H, G, D)
    x86_rule, neon = x86.SparseTreeAttentionRule(), arm.SparseTreeAttentionRule()
    host, arm_t = c.Target(HOST), c.Target(AARCH64_NEON)
    with host:
        assert x86_rule.apply(ops.attention_merge(H, D), host, False) is None
        assert neon.apply(sparse, host, False) is None
        assert x86_rule.apply(sa.sparse_tree_attention(H, G, 48), host,
                         False) is None  # no intrinsic for head_dim 48
        assert x86_rule.apply(sparse, c.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu"}),
                         False) is None  # no AVX2/FMA named: generic x86-64
    with arm_t:
        assert x86_rule.apply(sparse, arm_t, False) is None
    scheduled = apply_rules(sparse, [neon], AARCH64_NEON)
    assert bool(scheduled.attrs[c.IS_SCHEDULED])
    assert scheduled.attrs[sa.OP_KIND] == sa.SPARSE_KIND


def test_intrinsics_registered_once():
    ti = _tvm.compiler().TensorIntrin
    for intrins in (NEON_F32, AVX512_F32, AVX2_F32):
        assert intrins.register() is intrins
        for name in (*intrins.dot.values(), intrins.axpy, intrins.scale):
            assert ti.get(name) is not None
        intrins.register()  # already registered: a no-op, not an error


@needs_x86_rule
def test_x86_kernel_uses_vector_fmas():
    func = apply_rules(sa.sparse_tree_attention(H, G, D), x86_rules(), HOST)
    c = _tvm.compiler()
    lib = c.compile(c.IRModule({"main": func}), target=c.Target(HOST))
    asm = lib.mod.inspect_source("s")
    assert re.search(r"vfmadd\d+ps\s+.*%[yz]mm", asm)
    assert "expf" not in asm and "logf" not in asm  # inline exp/log: no libm calls
