"""Schedule and compile a Relax module for a target."""

from __future__ import annotations

from .._tvm import compiler
from ..schedules import cpu_rules


def schedule_module(mod, target):
    """Apply the CPU schedule rules to every unscheduled kernel (run before ``tvm.compile``)."""
    c = compiler()
    with target:
        return c.ApplyDefaultSchedule(*cpu_rules())(mod)


def build(mod, target):
    """Schedule and compile ``mod``; returns a ``tvm.runtime.Executable``."""
    c = compiler()
    mod = schedule_module(mod, target)
    return c.compile(mod, target=target)
