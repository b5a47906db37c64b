"""Tutorial 4: the tensorized sparse tree-attention kernel for ARM (NEON), run under qemu.

The kernel is the sparse part of every compiled verify step (each tree row against its
ancestors); it reads the model's layouts: the tree's keys and values row-major,
``k_tree[G, W, D]`` and ``v_tree[G, W, D]`` as ``rope_kv`` returns them (never the KV cache), and
writes the partial ``[W, H, D + 1]`` (output, then log-sum-exp) that the merge with the dense
part reads.

Run: ``.venv/bin/python tutorials/04_arm_kernel.py``. Needs Debian's gcc-aarch64-linux-gnu and
qemu-user-static (``make setup`` installs them); without them it only prints the x86 result.
"""

import os
import tempfile

import numpy as np

from hetcomp.codegen.cross import AARCH64_NEON, CrossToolchain, QemuKernel, apply_rules
from hetcomp.hardware import target_dict
from hetcomp.kernels import sparse_attention as sa
from hetcomp.schedules.arm import arm_rules
from hetcomp.schedules.x86 import x86_rules

H, G, D = 9, 3, 64  # SmolLM2-135M's query heads, KV heads and head_dim

# 1. A Medusa-like tree: node i attends to its ancestors and itself (CSR rows).
parents = [-1, 0, 0, 0, 1, 1, 2, 4, 4, 7, 3, 10]
row_ptr, col_idx = sa.csr_from_parents(parents)
w = len(parents)
rng = np.random.default_rng(0)
q = rng.standard_normal((H, w, D)).astype("float32")
k = rng.standard_normal((G, w, D)).astype("float32")
v = rng.standard_normal((G, w, D)).astype("float32")

# 2. numpy reference: masked softmax attention and its log-sum-exp per row.
mask = sa.mask_from_csr(row_ptr, col_idx).astype(bool)
s = np.einsum("hid,hjd->hij", q, np.repeat(k, H // G, 0)) / np.sqrt(D)
s = np.where(mask[None], s, -np.inf)
lse_ref = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
o_ref = np.einsum("hij,hjd->hid", np.exp(s - lse_ref[..., None]), np.repeat(v, H // G, 0))

# 3. The schedule rule tensorizes q.k and P.V with intrinsics the project registers: NEON
#    fmla.4s for aarch64, AVX for x86. On this machine, the x86 build:
from hetcomp import _tvm  # noqa: E402

c = _tvm.compiler()
x86 = apply_rules(sa.sparse_tree_attention(H, G, D), x86_rules(),
                  target_dict("host"))
lib = c.compile(c.IRModule({"main": x86}), target=c.Target(target_dict("host")))
part = _tvm.tensor(np.zeros((w, H, D + 1), "float32"))
lib["main"](*[_tvm.tensor(a) for a in (q, k, v, row_ptr, col_idx)], part)
o = part.numpy()[..., :D].transpose(1, 0, 2)
print("x86 kernel, max error:", float(np.abs(o - o_ref).max()),
      "lse:", float(np.abs(part.numpy()[..., D].T - lse_ref).max()))

# 4. The aarch64 build, linked into a small C harness and run under qemu.
toolchain = CrossToolchain.find()
if toolchain is None:
    print("aarch64 toolchain or qemu not installed: skipping the ARM run")
else:
    arm = apply_rules(sa.sparse_tree_attention(H, G, D), arm_rules(),
                      AARCH64_NEON)
    with tempfile.TemporaryDirectory() as work:  # the object, the harness, the inputs
        kernel = QemuKernel(arm, "sparse_tree_attention", num_outputs=1,
                            check=sa.check_inputs, workdir=work, toolchain=toolchain)
        (part_arm,) = kernel(q, k, v, row_ptr, col_idx)
    o_arm = part_arm[..., :D].transpose(1, 0, 2)
    print("aarch64 kernel under qemu, max error:", float(np.abs(o_arm - o_ref).max()))
    asm = kernel.asm
    print("NEON fmla instructions in the kernel:", asm.count("fmla"))
    assert np.abs(o_arm - o_ref).max() < 1e-5
print(os.path.basename(__file__), "done")
