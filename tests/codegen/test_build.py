"""The one build path: every kernel of every unit is scheduled by a named rule."""

import pytest

from hetcomp import _tvm
from hetcomp.frontend.llama import build_module
from hetcomp.hardware import target_dict
from hetcomp.passes.pipeline import scheduling_pipeline
from hetcomp.passes.schedule_units import ScheduleUnits
from hetcomp.plan import HeteroPlan, unit_target
from hetcomp.schedules.apply import RULE_ATTR
from hetcomp.testing import TINY

c = _tvm.compiler()
HOST = target_dict("host")
CPU_HOSTED = HeteroPlan(units=("cpu", "cuda"), targets=(HOST, unit_target("cuda", False)),
                        ratios=(("default", 0.5), ("lm_head", 1.0)), dense_attention=1)
GPU_HOSTED = HeteroPlan(units=("cuda", "cpu"), targets=(unit_target("cuda", True, "cuda"),
                                                        unit_target("cpu", False, "cuda")),
                        ratios=(("default", 0.37),), dense_attention=0, sparse_attention=1)
TWO_CPUS = HeteroPlan(targets=(HOST, HOST), ratios=(("default", 0.5),), sparse_attention=1)


def test_schedule_units_name_equals_class_name():
    assert ScheduleUnits(HOST).info.name == "ScheduleUnits"


@pytest.mark.parametrize("target,plan", [
    (HOST, None), (target_dict("cuda"), None), (HOST, TWO_CPUS), (HOST, CPU_HOSTED),
    (GPU_HOSTED.targets[0], GPU_HOSTED)], ids=["host", "cuda", "two-cpus", "cpu-hosted",
                                              "gpu-hosted"])
def test_every_kernel_is_scheduled_by_a_rule(target, plan):
    mod = build_module(TINY, "float32", 2, static_widths=(4,))
    target = c.Target(target)
    with target:  # as tvm.compile runs its relax_pipeline
        mod = scheduling_pipeline(target, plan)(mod)
    kernels = {gv.name_hint: f for gv, f in mod.functions_items()
               if isinstance(f, c.tir.PrimFunc)}
    missing = [n for n, f in kernels.items() if f.attrs is None or RULE_ATTR not in f.attrs]
    assert kernels and not missing, missing
    rules = {str(f.attrs[RULE_ATTR]) for f in kernels.values()}
    if plan is not None and any(t["kind"] == "cuda" for t in plan.targets):
        # Both units' rules ran: each kernel by the rules of its own target.
        assert any(r.startswith("cpu.") for r in rules)
        assert any(r.startswith(("gpu.", "dlight.gpu.")) for r in rules)
