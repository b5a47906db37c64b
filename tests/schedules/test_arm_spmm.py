"""The NEON-tensorized sparse tree-attention kernel, cross-compiled for aarch64, run under qemu."""

import re

import numpy as np
import pytest

from hetcomp.codegen.cross import AARCH64_NEON, CrossToolchain, QemuKernel, apply_rules
from hetcomp.errors import HetcompError
from hetcomp.kernels import sparse_attention as sa
from hetcomp.schedules.arm import arm_rules
from hetcomp.testing import full_mask, tree_mask
from hetcomp.testing.tree_attention import (
    D,
    G,
    H,
    random_qkv,
    random_tree,
    reference_attention,
    split_part,
)

TOOLCHAIN = CrossToolchain.find()
pytestmark = pytest.mark.skipif(
    TOOLCHAIN is None, reason="aarch64-linux-gnu-gcc or qemu-aarch64(-static) not installed "
    "(Debian: gcc-aarch64-linux-gnu qemu-user-static)")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    func = apply_rules(sa.sparse_tree_attention(H, G, D), arm_rules(),
                       AARCH64_NEON)
    assert func is not None, "the NEON rule must apply to aarch64 +neon"
    return QemuKernel(func, "sparse_tree_attention", num_outputs=1, check=sa.check_inputs,
                      workdir=str(tmp_path_factory.mktemp("arm")), toolchain=TOOLCHAIN)


def tree_inputs(w, seed):
    rng = np.random.default_rng(seed)
    parents = random_tree(w, rng)
    q, k, v = random_qkv(w, rng)
    return parents, (q, k, v), sa.csr_from_parents(parents)


@pytest.mark.parametrize("w", [4, 16, 64])
def test_arm_kernel_matches_numpy(kernel, w):
    parents, (q, k, v), (row_ptr, col_idx) = tree_inputs(w, 100 + w)
    o, lse = split_part(kernel(q, k, v, row_ptr, col_idx)[0])
    o_ref, lse_ref = reference_attention(q, k, v, tree_mask(parents))
    np.testing.assert_allclose(o, o_ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(lse, lse_ref, atol=1e-5, rtol=0)


def test_assembly_uses_neon_vector_fmas(kernel):
    # The dot, P.V and rescale intrinsics: 4-lane fmla / fmul on v registers, with the dot's
    # accumulators reduced by a pairwise add rather than through memory.
    fmla = re.findall(r"\bfmla\s+v\d+\.4s, v\d+\.4s, v\d+\.(?:4s|s\[\d\])", kernel.asm)
    assert len(fmla) >= 3 * (D // 4)  # at least one head's dot product, fully unrolled
    assert re.search(r"\bfaddp\s+v\d+\.4s|\bfaddp\s+s\d+, v\d+\.2s", kernel.asm)
    assert "bl\texpf" not in kernel.asm and "bl\tlogf" not in kernel.asm


def test_wrapper_rejects_bad_shapes_and_trees(kernel):
    _, (q, k, v), (row_ptr, col_idx) = tree_inputs(16, 5)
    with pytest.raises(HetcompError, match=r"k must have shape \(3, 16, 64\)"):
        kernel(q, np.zeros((G, 17, D), "float32"), v, row_ptr, col_idx)
    with pytest.raises(HetcompError, match="C-contiguous"):  # a wrongly packed [G, D, W] K
        kernel(q, np.swapaxes(np.ascontiguousarray(np.swapaxes(k, 1, 2)), 1, 2), v, row_ptr,
               col_idx)
    with pytest.raises(HetcompError, match="float32"):
        kernel(q.astype("float64"), k, v, row_ptr, col_idx)
    bad_cols = col_idx.copy()
    bad_cols[-1] = 16  # a key outside the tree: would be an out-of-bounds read
    with pytest.raises(HetcompError, match=r"\[0, 16\)"):
        kernel(q, k, v, row_ptr, bad_cols)
    empty_row = row_ptr.copy()
    empty_row[3] = empty_row[2]  # node 2 without even itself: a malformed tree
    with pytest.raises(HetcompError, match="increase strictly"):
        kernel(q, k, v, empty_row, col_idx)
    with pytest.raises(HetcompError, match=r"v must have shape \(3, 16, 64\)"):  # a V cache
        kernel(q, k, np.zeros((G, 96, D), "float32"), row_ptr, col_idx)


def test_kernel_itself_rejects_mismatched_arguments(kernel):
    # Bypassing the Python checks, the kernel's own argument checks still refuse the call.
    _, (q, k, v), (row_ptr, col_idx) = tree_inputs(16, 6)
    outs = [np.empty((16, H, D + 1), "float32")]
    k_bad = np.zeros((G, 17, D), "float32")
    with pytest.raises(HetcompError, match=r"Mismatched k\.shape\[1\]"):
        kernel.run_unchecked([q, k_bad, v, row_ptr, col_idx, *outs], 5)
    with pytest.raises(HetcompError, match=r"Mismatched col_idx\.dtype"):
        kernel.run_unchecked([q, k, v, row_ptr, col_idx.astype("int64"), *outs], 5)


# ----------------------------------------------------------------------------- the model


def test_tiny_model_under_qemu_matches_numpy(tmp_path):
    """A tiny model scheduled for aarch64 (NEON sparse kernel in verify_w4), every kernel run
    under qemu: prefill, a verify of a tree, commit of a branch, a verify after it."""
    from hetcomp.codegen.build import schedule_module
    from hetcomp.codegen.cross import QemuModule
    from hetcomp.codegen.targets import make_target
    from hetcomp.frontend.config import kv_cache_shapes
    from hetcomp.frontend.llama import build_module
    from hetcomp.frontend.weights import pack_weights, param_specs, random_weights
    from hetcomp.speculative.tree import csr_from_mask
    from hetcomp.testing import TINY, depths
    from hetcomp.testing import numpy_llama as ref

    cfg = TINY
    w = random_weights(cfg, seed=4)
    packed = pack_weights(cfg, w, "float32")
    params = [packed[name] for name, _, _ in param_specs(cfg, "float32")]
    mod = schedule_module(build_module(cfg, static_widths=(4,)), make_target("aarch64"))
    run = QemuModule(mod, workdir=str(tmp_path), toolchain=TOOLCHAIN)
    ks, vs = kv_cache_shapes(cfg)
    kc, vc = np.zeros(ks, "float32"), np.zeros(vs, "float32")
    prompt = [5, 17, 99, 3, 42]
    t = len(prompt)
    _, hidden, ids, kc, vc = run("prefill", np.array(prompt, "int32"), np.arange(t, dtype="int32"),
                                 np.tril(np.ones((t, t), "int32")), kc, vc, t - t, *params)
    ref_logits, ref_hidden = ref.forward(cfg, w, prompt)
    np.testing.assert_allclose(hidden[0], ref_hidden[-1], atol=2e-5, rtol=1e-4)
    assert int(ids[0]) == int(ref_logits[-1].argmax())

    parents = [-1, 0, 0, 1]
    mask = tree_mask(parents)
    toks = np.array([10, 11, 12, 13], "int32")
    pos = (depths(parents) + t).astype("int32")
    logits, hidden, ids, kc, vc = run("verify_w4", toks, pos, mask, *csr_from_mask(mask), kc, vc,
                                      t, *params)
    ref_logits, _ = ref.forward(cfg, w, np.concatenate([prompt, toks]),
                                positions=np.concatenate([np.arange(t), pos]),
                                mask=full_mask(t, mask))
    np.testing.assert_allclose(logits, ref_logits[t:], atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(ids, ref_logits[t:].argmax(-1))

    kc, vc = run("commit", kc, vc, np.array([0, 1, 3], "int32"), t)  # the branch 0 -> 1 -> 3
    seq = prompt + [10, 11, 13]
    chain = tree_mask([-1, 0, 1, 2])
    toks2 = np.array([20, 21, 22, 23], "int32")
    logits, *_ = run("verify_w4", toks2, np.arange(len(seq), len(seq) + 4, dtype="int32"), chain,
                     *csr_from_mask(chain), kc, vc, len(seq), *params)
    ref_logits, _ = ref.forward(cfg, w, seq + toks2.tolist())
    np.testing.assert_allclose(logits, ref_logits[len(seq):], atol=1e-4, rtol=1e-4)
