"""Compile a Relax module through :func:`hetcomp.passes.pipeline.lowering_pipeline`."""

from __future__ import annotations

from .._tvm import compiler
from ..passes.pipeline import lowering_pipeline
from ..passes.schedule_units import ScheduleUnits
from .targets import make_target


def schedule_module(mod, target):
    """Schedule every unscheduled kernel of ``mod`` for ``target`` (kernels alone, outside a
    model: profiling probes and tests)."""
    return ScheduleUnits(target)(mod)


def build(mod, target, plan=None):
    """Partition (``plan``), schedule and compile ``mod``; returns a ``tvm.runtime.Executable``.

    ``target`` is the module's target; a partitioned module's is its host unit's
    (``plan.targets[0]``), and kernels placed on the other unit carry their own.
    """
    c = compiler()
    target = c.Target(target) if isinstance(target, dict | str) else target
    return c.compile(mod, target=target, relax_pipeline=lowering_pipeline(target, plan))


def compile_relax(mod, target: str = "host"):
    """Legalize, fuse and compile an imported Relax module (``from_torch``) for a named
    target; returns a ``tvm.runtime.Executable``."""
    c = compiler()
    mod = c.relax.get_pipeline("zero")(mod)
    return c.compile(mod, target=make_target(target))
