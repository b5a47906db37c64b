"""The float linear kernels scheduled by ``arm.Linear``, cross-compiled for aarch64 and run
under qemu: numerics against numpy and the register use that is the rule's reason to
exist."""

import re

import numpy as np
import pytest

from hetcomp import _tvm
from hetcomp.codegen.cross import AARCH64_NEON, CrossToolchain, QemuKernel, apply_rules
from hetcomp.codegen.targets import make_target
from hetcomp.kernels import ops
from hetcomp.schedules.apply import RULE_ATTR, ApplyRules
from hetcomp.schedules.arm import LinearRule as ArmLinearRule
from hetcomp.schedules.cpu import LinearRule
from hetcomp.schedules.llvm import llvm_rules

TOOLCHAIN = CrossToolchain.find()
needs_qemu = pytest.mark.skipif(
    TOOLCHAIN is None, reason="aarch64-linux-gnu-gcc or qemu-aarch64(-static) not installed "
    "(Debian: gcc-aarch64-linux-gnu qemu-user-static)")
N, K = 96, 128  # three 32-column panels
c = _tvm.compiler()


def _kernel(tmp_path, dtype, rows, residual=False, rule=None):
    func = apply_rules(ops.linear(N, K, dtype, residual, rows=rows),
                       [rule or ArmLinearRule()], AARCH64_NEON)
    assert func is not None, "the NEON rule must apply to aarch64 +neon"
    return QemuKernel(func, "linear", num_outputs=1, workdir=str(tmp_path),
                      toolchain=TOOLCHAIN)


@needs_qemu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("w", [1, 4, 8, 16, None])
def test_neon_linear_matches_numpy(tmp_path, dtype, w):
    """Whole panels (W = 1), 16-column sub-panels (4-row tiles: W = 4 and prefill's symbolic
    width, run with 5 rows) and 8-column ones (8-row tiles); with the residual add at W = 8."""
    rows = w or 5
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, K)).astype("float32")
    wt = rng.standard_normal((N, K)).astype(dtype)
    r = rng.standard_normal((rows, N)).astype("float32")
    ref = x.astype(np.float64) @ wt.astype(np.float64).T
    wp = ops.pack_linear_weight(wt.astype("float32"), dtype)
    (y,) = _kernel(tmp_path, dtype, w)(x, wp)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)
    if w == 8:
        (y,) = _kernel(tmp_path / "res", dtype, w, residual=True)(x, wp, r)
        np.testing.assert_allclose(y, ref + r, rtol=1e-5, atol=1e-4)


def _stack_reloads(asm: str) -> int:
    """``q`` registers loaded back from the stack: register spills in the vector code."""
    return len(re.findall(r"\b(?:ldr|ldp)\s+q\d+,.*\[sp", asm))


@needs_qemu
@pytest.mark.parametrize("w", [8, 16])
def test_neon_tiles_fit_the_register_file(tmp_path, w):
    """The reason for the rule: the generic 8-row whole-panel tile (64 registers of
    accumulators) reloads about one ``q`` register per FMA from the stack (62 / 63 measured),
    8-column sub-panels none. Both emit 4-lane vector FMAs."""
    arm = _kernel(tmp_path / "arm", "float32", w)
    generic = _kernel(tmp_path / "generic", "float32", w, rule=LinearRule())
    assert _stack_reloads(arm.asm) == 0
    assert _stack_reloads(generic.asm) >= 32
    fmla = re.findall(r"\bfmla\s+v\d+\.4s, v\d+\.4s, v\d+\.(?:4s|s\[\d\])", arm.asm)
    assert len(fmla) >= 8 * 2  # 8 rows x 2 registers of an 8-column sub-panel


def test_rule_choice_by_target():
    """aarch64 +neon builds get arm.Linear; x86 builds with AVX2 get x86.Linear."""
    func = ops.linear(N, K, "float32", rows=8).with_attr("global_symbol", "main")
    for target, rule in ((make_target("aarch64"), "arm.Linear"),
                         (make_target("x86-64-v3"), "x86.Linear")):
        with target:
            mod = ApplyRules(*llvm_rules())(c.IRModule({"main": func}))
        assert str(mod["main"].attrs[RULE_ATTR]) == rule
    assert ArmLinearRule().apply(func, make_target("x86-64-v3"), False) is None
