"""ApplyRules: schedule every unscheduled kernel with the first rule that applies, and record it.

dlight's ``ApplyDefaultSchedule`` with one addition: each kernel a rule schedules carries the
rule's name in the function attribute ``hetcomp.rule`` (``cpu.Linear``, ``x86.TreeAttention``,
``dlight.gpu.Fallback``), so a built module can say which rule scheduled what and a test can
find a kernel that none did. Run inside the target (``with target:``) for kernels without one.
"""

from __future__ import annotations

from .._tvm import compiler

RULE_ATTR = "hetcomp.rule"
_c = compiler()


def rule_name(rule) -> str:
    """``cpu.Linear`` for ``hetcomp.schedules.cpu.LinearRule``; ``dlight.gpu.Matmul`` for
    dlight's."""
    cls = type(rule)
    name = cls.__name__.removesuffix("Rule")
    module = cls.__module__
    if module.startswith("hetcomp.schedules."):
        return f"{module.rsplit('.', 1)[1]}.{name}"
    parts = module.split(".")
    where = parts[parts.index("dlight") + 1] if "dlight" in parts else module
    return f"dlight.{where}.{name}"


def _is_scheduled(func) -> bool:
    return func.attrs is not None and int(func.attrs.get("tirx.is_scheduled", 0)) == 1


@_c.module_pass(opt_level=0, name="ApplyRules")
class ApplyRules:
    """Schedule each unscheduled PrimFunc with the first of ``rules`` that applies."""

    def __init__(self, *rules):
        self.rules = list(rules)

    def transform_module(self, mod, _ctx):
        updated = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, _c.tir.PrimFunc) or _is_scheduled(func):
                continue
            target = func.attrs.get("target") if func.attrs is not None else None
            target = target if target is not None else _c.Target.current(allow_none=False)
            for rule in self.rules:
                sch = rule.apply(func, target, False)
                if sch is None:
                    continue
                sch = sch[0] if isinstance(sch, list | tuple) else sch
                updated[gv] = (sch.mod["main"].with_attr("tirx.is_scheduled", True)
                               .with_attr(RULE_ATTR, rule_name(rule)))
                break
        mod = mod.clone()  # the input module stays as it was
        for gv, func in updated.items():
            mod[gv] = func
        return mod
