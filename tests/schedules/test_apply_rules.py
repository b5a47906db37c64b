"""ApplyRules schedules with the first applicable rule and records which one did."""

from hetcomp._tvm import compiler
from hetcomp.codegen.build import schedule_module
from hetcomp.frontend.llama import build_module
from hetcomp.hardware import target_dict
from hetcomp.schedules.apply import RULE_ATTR, ApplyRules, rule_name
from hetcomp.schedules.cpu import ElementwiseRule, LinearRule
from hetcomp.testing import TINY, host_linear_rule

c = compiler()


def _rules_of(mod) -> dict[str, str]:
    return {gv.name_hint: str(f.attrs[RULE_ATTR]) for gv, f in mod.functions_items()
            if isinstance(f, c.tir.PrimFunc) and f.attrs is not None and RULE_ATTR in f.attrs}


def test_rule_names():
    assert rule_name(LinearRule()) == "cpu.Linear"
    assert rule_name(c.dlight.gpu.Fallback()) == "dlight.gpu.Fallback"


def test_records_the_rule_that_scheduled_each_kernel():
    mod = build_module(TINY, "float32", 0, static_widths=(4,))
    target = c.Target(target_dict("host"))
    rules = _rules_of(schedule_module(mod, target))
    linear = [n for n in rules if rules[n] == host_linear_rule()]
    assert linear and all(n.startswith("linear") for n in linear), rules
    assert any(r == "cpu.Attention" for r in rules.values())
    # The first applicable rule wins: without LinearRule, linear kernels fall to a later rule
    # or stay unscheduled (no attribute), never keep the name of a rule that did not run.
    with target:
        only = _rules_of(ApplyRules(ElementwiseRule())(mod))
    assert "cpu.Elementwise" in only.values() and not any(n.startswith("linear") for n in only)
    assert set(only.values()) <= {"cpu.Elementwise", "script.rope", "script.kv_commit"}


class _Second(ElementwiseRule):
    """Applies wherever ElementwiseRule does, under another name."""


def test_first_applicable_rule_wins():
    mod = build_module(TINY, "float32", 0, static_widths=(4,))
    second = rule_name(_Second())
    with c.Target(target_dict("host")):
        first = _rules_of(ApplyRules(ElementwiseRule(), _Second())(mod))
        swapped = _rules_of(ApplyRules(_Second(), ElementwiseRule())(mod))
    elementwise = {n for n, r in first.items() if r == "cpu.Elementwise"}
    assert elementwise and second not in first.values()
    assert {n for n, r in swapped.items() if r == second} == elementwise
