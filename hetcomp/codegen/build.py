"""Schedule and compile a Relax module for one target, or for several units (vdevices)."""

from __future__ import annotations

import json

from .._tvm import compiler
from ..schedules import cpu_rules
from ..schedules.apply import ApplyRules
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


def build(mod, target, scheduled: list | None = None):
    """Schedule and compile ``mod``; returns a ``tvm.runtime.Executable``. ``scheduled``
    (a list) receives the scheduled module (for :func:`kernel_table`)."""
    c = compiler()
    mod = _keep(schedule_module(mod, target), scheduled)
    return c.compile(mod, target=target)


def _keep(mod, scheduled: list | None):
    if scheduled is not None:
        scheduled.append(mod)
    return mod


def build_gpu(mod, target, scheduled: list | None = None):
    """Compile ``mod`` entirely for a GPU ``target``: every kernel gets our GPU rules, then
    dlight's; the VM's control flow runs on the target's host."""
    c = compiler()
    mod = _keep(schedule_module(c.relax.transform.LegalizeOps()(mod), target), scheduled)
    return c.compile(mod, target=target)


def build_hetero(mod, host_target, plan, scheduled: list | None = None):
    """Compile a module partitioned by :class:`~hetcomp.plan.HeteroPlan`.

    Host kernels get the CPU rules; kernels carrying a GPU ``target`` attribute get dlight's
    GPU rules inside that target. All-LLVM plans (two CPU vdevices) compile for the host
    target; mixed plans compile without a target, each kernel using its own.
    """
    c = compiler()
    mod = c.relax.transform.LegalizeOps()(mod)
    mod = schedule_module(mod, host_target)
    if {t["kind"] for t in plan.targets} == {"llvm"}:
        return c.compile(_keep(mod, scheduled), target=host_target)
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
        on_gpu = schedule_module(c.IRModule(mine), c.Target(dict(tgt)))
        for gv, f in on_gpu.functions_items():
            mod[gv.name_hint] = f
    # Kernels keep their own targets; the given one serves Relax-level dispatch (the Medusa
    # draft's top-k runs on the host).
    return c.compile(_keep(mod, scheduled), target=host_target)


def compile_relax(mod, target: str = "host"):
    """Legalize, fuse and compile an imported Relax module (``from_torch``) for a named
    target; returns a ``tvm.runtime.Executable``."""
    c = compiler()
    mod = c.relax.get_pipeline("zero")(mod)
    return c.compile(mod, target=make_target(target))


def kernel_table(mod, units: list[dict]) -> list[dict]:
    """Every kernel each Relax function of the scheduled ``mod`` calls: ``{"function", "name",
    "unit", "rule", "predicted_us", "calls"}``, in call order, one row per (function, kernel).

    ``units``: the artifact's units (``[{"name", "device", ...}]``, vdevice order). A call's unit
    is the vdevice of its result, else its kernel's target kind, else the first unit.
    ``rule``: the schedule rule that scheduled it (``hetcomp.rule``; None for a kernel no rule
    scheduled). ``predicted_us``: AnnotateCost's prediction for one call on that unit (None
    where no cost was annotated).
    """
    c = compiler()
    vdevs = list(mod.global_infos["vdevice"]) if "vdevice" in mod.global_infos else []
    rows = []
    for gv, func in mod.functions_items():
        if not isinstance(func, c.relax.Function):
            continue
        seen: dict[str, dict] = {}
        for call in _call_sites(func):
            name = call.args[0].name_hint
            kernel = mod[name] if name in [g.name_hint for g in mod.get_global_vars()] else None
            attrs = kernel.attrs if kernel is not None and kernel.attrs is not None else {}
            unit = _call_unit(c, call, attrs, vdevs, units)
            key = f"{name}@{unit}"
            if key in seen:
                seen[key]["calls"] += 1
                continue
            cost = json.loads(str(attrs["hetcomp.cost"])) if "hetcomp.cost" in attrs else {}
            seen[key] = {"function": gv.name_hint, "name": name, "unit": unit,
                         "rule": str(attrs["hetcomp.rule"]) if "hetcomp.rule" in attrs else None,
                         "predicted_us": (round(1e6 * cost[unit], 3) if unit in cost else None),
                         "calls": 1}
        rows += seen.values()
    return rows


def _call_sites(func) -> list:
    c = compiler()
    ops = (c.call_tir_op, c.Op.get("relax.call_tir_inplace"))
    sites = []

    def visit(e):
        if isinstance(e, c.relax.Call) and any(e.op.same_as(o) for o in ops):
            sites.append(e)

    c.relax.analysis.post_order_visit(func.body, visit)
    return sites


def _call_unit(c, call, attrs, vdevs, units) -> str:
    ty = getattr(call, "ty", None) or getattr(call, "struct_info", None)
    fields = getattr(ty, "fields", None) or [ty]
    for f in fields:
        vd = getattr(f, "vdevice", None)
        if vd is not None:
            for i, v in enumerate(vdevs):
                if c.same_vdevice(v, vd) and i < len(units):
                    return units[i]["name"]
    if "target" in attrs:
        kind = str(attrs["target"].kind.name)
        for u in units:
            if u.get("device") == kind or (kind == "llvm" and u.get("device") == "cpu"):
                return u["name"]
    return units[0]["name"]
