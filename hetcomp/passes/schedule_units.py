"""ScheduleUnits: schedule every kernel by rule for the unit (target) it runs on.

A kernel carrying a ``target`` attribute (placed on another unit by PartitionHetero) is
scheduled for that target; the others for the module's target. LLVM targets get their
quantized linears swapped for the int8-dot kernel where the CPU has VNNI or NEON dotprod
(:mod:`hetcomp.schedules.int8_dot`), then the ISA rules then the CPU rules; GPU targets get their in-place script kernels swapped for the GPU versions, then our
GPU rules and dlight's. Each group is scheduled inside its own target with only its own
kernels in view: dlight's rules do not all check a kernel's target, and would schedule a
host kernel as a GPU one.
"""

from __future__ import annotations

from .._tvm import compiler
from ..schedules.apply import RULE_ATTR, ApplyRules
from ..schedules.gpu import gpu_rules, use_gpu_script_kernels
from ..schedules.int8_dot import use_int8_dot_kernels
from ..schedules.llvm import llvm_rules

_c = compiler()


def _own_target(func):
    return func.attrs.get("target") if func.attrs is not None else None


@_c.module_pass(opt_level=0, name="ScheduleUnits")
class ScheduleUnits:
    """Schedule each unscheduled PrimFunc with the rules of its target.

    ``target`` is the module's target (what kernels without a ``target`` attribute compile
    for). Run after LegalizeOps (the legalized Relax ops are kernels too) and before the VM
    lowering. The input module is not modified.
    """

    def __init__(self, target, tensor_cores: bool = True, int8_dot: bool = True):
        self.target = _c.Target(target) if isinstance(target, dict | str) else target
        self.tensor_cores, self.int8_dot = tensor_cores, int8_dot

    def transform_module(self, mod, _ctx):
        groups: dict[str, tuple] = {}
        for gv, func in mod.functions_items():
            if isinstance(func, _c.tir.PrimFunc):
                tgt = _own_target(func) or self.target
                groups.setdefault(str(tgt), (tgt, {}))[1][gv] = func
        mod = mod.clone()
        for tgt, funcs in groups.values():
            sub = _c.IRModule(funcs)
            if tgt.kind.name == "llvm":
                if self.int8_dot:
                    sub = use_int8_dot_kernels(sub, tgt)
                rules = llvm_rules()
            else:
                sub, rules = use_gpu_script_kernels(sub), gpu_rules(self.tensor_cores)
            with tgt:
                sub = ApplyRules(*rules)(sub)
            for gv, func in sub.functions_items():
                if tgt.kind.name != "llvm" and _dispatched(func):
                    func = func.with_attr(RULE_ATTR, _DISPATCH_RULE)
                mod[gv] = func
        return mod


# GPU kernels that TVM's library dispatch (DispatchSortScan: the draft's top-k) wrote already
# scheduled, threads bound, which no rule then applies to.
_DISPATCH_RULE = "tvm.DispatchSortScan"


def _dispatched(func) -> bool:
    if func.attrs is not None and RULE_ATTR in func.attrs:
        return False
    return "threadIdx.x" in func.script()
