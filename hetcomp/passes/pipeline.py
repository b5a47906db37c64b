"""The hetcomp pass pipeline, as data: numbered phases, optional passes as empty Sequentials."""

from __future__ import annotations

from .._tvm import compiler
from ..plan import HeteroPlan
from .annotate_cost import AnnotateCost
from .order_for_overlap import OrderForOverlap
from .partition_hetero import PartitionHetero

_c = compiler()


def hetcomp_pipeline(plan: HeteroPlan | None = None, cost_fn=None, width: int = 1,
                     cache_len: int = 256, async_units: tuple[int, ...] | None = None,
                     functions: tuple[str, ...] | None = None):
    """Phase 1 annotate costs, phase 2 partition across units, phase 3 order for overlap,
    phase 4 realise virtual devices. Scheduling and codegen follow in :mod:`hetcomp.codegen`."""
    empty = _c.transform.Sequential([])
    units = plan.units if plan is not None else ("cpu",)
    # By default partition the decoder functions the model builder lists (not medusa/commit).
    return _c.transform.Sequential([
        # Phase 1. Predicted cost per kernel and unit (for reports and later decisions).
        AnnotateCost(cost_fn, units, width, cache_len) if cost_fn is not None else empty,
        # Phase 2. Column-split linears, affinity-split attention, vdevice placement.
        PartitionHetero(plan, functions) if plan is not None else empty,
        # Phase 3. Asynchronous launches first, synchronising uses last.
        OrderForOverlap(async_units) if plan is not None else empty,
        # Phase 4. Propagate placements to every binding.
        _c.relax.transform.RealizeVDevice() if plan is not None else empty,
    ], name="hetcomp")
