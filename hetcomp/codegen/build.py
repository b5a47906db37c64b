"""Schedule and compile a Relax module for one target, or for several units (vdevices)."""

from __future__ import annotations

from .._tvm import compiler
from ..schedules import cpu_rules
from ..schedules.apply import RULE_ATTR, ApplyRules
from ..schedules.arm import arm_rules
from ..schedules.gpu import gpu_rules, use_gpu_script_kernels
from ..schedules.x86 import x86_rules
from .targets import make_target


def llvm_rules():
    """The rule list of every LLVM CPU target: the ISA rules first (each applies only to a
    target with its vector extension: x86 AVX-512 or AVX2+FMA, aarch64 NEON), then the
    generic CPU rules. (Not in ``hetcomp.schedules``' package init: importing the ISA rules
    registers their tensor intrinsics, and MetaSchedule's builder workers import that
    package under a 30 s timeout.)"""
    return [*x86_rules(), *arm_rules(), *cpu_rules()]


def schedule_module(mod, target):
    """Schedule every unscheduled kernel for ``target`` (run before ``tvm.compile``): the CPU
    rules for LLVM targets; for GPU targets the in-place script kernels are swapped for their
    GPU versions, then our GPU rules and dlight's apply."""
    c = compiler()
    if target.kind.name == "llvm":
        rules = llvm_rules()
    else:
        mod, rules = use_gpu_script_kernels(mod), gpu_rules()
    with target:
        return ApplyRules(*rules)(mod)


def kernel_table(mod) -> list[tuple[str, str, str | None]]:
    """``(function, kernel, rule)`` for every kernel each Relax function of a scheduled
    module calls (``call_tir`` and in-place calls, in binding order): what a compiled
    function runs and which rule (``hetcomp.rule``, None if none did) scheduled it."""
    c = compiler()
    rows = []
    for gv, func in mod.functions_items():
        if not isinstance(func, c.relax.Function):
            continue

        def visit(expr, fname=gv.name_hint):
            if isinstance(expr, c.relax.Call) and isinstance(expr.args[0] if expr.args else None,
                                                             c.tvm.ir.GlobalVar):
                callee = mod[expr.args[0]]
                if isinstance(callee, c.tir.PrimFunc):
                    rule = callee.attrs.get(RULE_ATTR) if callee.attrs is not None else None
                    rows.append((fname, expr.args[0].name_hint,
                                 None if rule is None else str(rule)))

        c.relax.analysis.post_order_visit(func, visit)
    return rows


def build(mod, target):
    """Schedule and compile ``mod``; returns a ``tvm.runtime.Executable``."""
    c = compiler()
    mod = schedule_module(mod, target)
    return c.compile(mod, target=target)


def build_gpu(mod, target):
    """Compile ``mod`` entirely for a GPU ``target``: every kernel gets our GPU rules, then
    dlight's; the VM's control flow runs on the target's host."""
    c = compiler()
    mod = schedule_module(c.relax.transform.LegalizeOps()(mod), target)
    return c.compile(mod, target=target)


def build_hetero(mod, host_target, plan):
    """Compile a module partitioned by :class:`~hetcomp.plan.HeteroPlan`.

    Host kernels get the CPU rules; kernels carrying a GPU ``target`` attribute get dlight's
    GPU rules inside that target. All-LLVM plans (two CPU vdevices) compile for the host
    target; mixed plans compile without a target, each kernel using its own.
    """
    c = compiler()
    mod = c.relax.transform.LegalizeOps()(mod)
    mod = schedule_module(mod, host_target)
    if {t["kind"] for t in plan.targets} == {"llvm"}:
        return c.compile(mod, target=host_target)
    # Every kernel without a target (ours and legalized Relax ops) is a host kernel; pin it so
    # that the GPU rules, which fall back to the current target, leave it alone.
    for gv, func in mod.functions_items():
        if isinstance(func, c.tir.PrimFunc) and (func.attrs is None or "target" not in func.attrs):
            mod[gv] = func.with_attr("target", host_target)
    # The GPU rules see only the kernels placed on that GPU (dlight's rules do not all check
    # a kernel's own target, and would schedule host kernels as GPU ones).
    for tgt in plan.targets:
        if tgt["kind"] == "llvm":
            continue
        mine = {gv: f for gv, f in mod.functions_items() if isinstance(f, c.tir.PrimFunc)
                and str(f.attrs["target"].kind.name) == tgt["kind"]}
        scheduled = schedule_module(c.IRModule(mine), c.Target(dict(tgt)))
        for gv, f in scheduled.functions_items():
            mod[gv.name_hint] = f
    # Kernels keep their own targets; the given one serves Relax-level dispatch (the Medusa
    # draft's top-k runs on the host).
    return c.compile(mod, target=host_target)


def compile_relax(mod, target: str = "host"):
    """Legalize, fuse and compile an imported Relax module (``from_torch``) for a named
    target; returns a ``tvm.runtime.Executable``."""
    c = compiler()
    mod = c.relax.get_pipeline("zero")(mod)
    return c.compile(mod, target=make_target(target))
