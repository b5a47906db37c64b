"""The hetcomp pass pipeline, as data: numbered phases, optional passes as empty Sequentials.

:func:`lowering_pipeline` owns the whole lowering that ``tvm.compile`` runs (passed as its
``relax_pipeline``): partitioning, legalization, schedule rules per unit, and the VM lowering
of TVM's default build. ``codegen.build`` only calls ``tvm.compile`` with it.
"""

from __future__ import annotations

from .._tvm import compiler
from ..plan import HeteroPlan
from .annotate_cost import AnnotateCost
from .order_for_overlap import OrderForOverlap
from .partition_hetero import PartitionHetero
from .schedule_units import ScheduleUnits

_c = compiler()


def hetcomp_pipeline(plan: HeteroPlan | None = None, cost_fn=None, width: int = 1,
                     cache_len: int = 256, async_units: tuple[int, ...] | None = None,
                     functions: tuple[str, ...] | None = None):
    """Phase 1 annotate costs, phase 2 partition across units, phase 3 order for overlap,
    phase 4 realise virtual devices (the Relax-level phases of :func:`lowering_pipeline`)."""
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


def scheduling_pipeline(target, plan: HeteroPlan | None = None, cost_fn=None, width: int = 1,
                        cache_len: int = 256):
    """Phases 1-6 of :func:`lowering_pipeline`: the module with every kernel scheduled."""
    relax = _c.relax
    tr = relax.transform
    return _c.transform.Sequential([
        # Phases 1-4. Costs, partition, overlap order, vdevices (see hetcomp_pipeline).
        hetcomp_pipeline(plan, cost_fn, width, cache_len),
        # Phase 5. Library dispatch of sampling, sort and scan ops (the draft's top-k).
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        # Phase 6. Relax ops become kernels; every kernel is scheduled by a rule of its unit.
        tr.LegalizeOps(),
        tr.RewriteDataflowReshape(),
        ScheduleUnits(target),
    ], name="hetcomp_scheduling")


def lowering_pipeline(target, plan: HeteroPlan | None = None, cost_fn=None, width: int = 1,
                      cache_len: int = 256):
    """Everything ``tvm.compile(mod, target, relax_pipeline=...)`` runs, in one Sequential.

    ``target`` is the module's target: the host unit's (``plan.targets[0]``) for a
    partitioned module, whose other units' kernels carry their own. Phases 5 and 7 are the
    passes of TVM's default build (``relax.pipeline.default_build_pipeline``), kept as they
    are so that numerics and speed do not change; its LegalizeOps moves before scheduling.
    For GPU targets TVM's own default (``backend.cuda``) would also fuse (FuseOps, FuseTIR)
    and schedule the fused kernels with dlight; here every kernel keeps its own rule.
    """
    tr = _c.relax.transform
    return _c.transform.Sequential([
        # Phases 1-6. Partition and schedule (see scheduling_pipeline).
        scheduling_pipeline(target, plan, cost_fn, width, cache_len),
        # Phase 7. VM lowering: leave dataflow, plan memory, lower builtins and shapes.
        tr.ToNonDataflow(),
        tr.RemovePurityChecking(),
        tr.CallTIRRewrite(),
        # Static memory planning shares storage between tensors regardless of their device
        # in TVM 0.27 (a partitioned SmolLM2 wrote a host concat into a unit-1 buffer): a
        # partitioned module allocates through the VM's per-device pools instead.
        tr.StaticPlanBlockMemory() if plan is None else _c.transform.Sequential([]),
        tr.RewriteCUDAGraph(),
        tr.LowerAllocTensor(),
        tr.KillAfterLastUse(),
        tr.LowerRuntimeBuiltin(),
        tr.ComputePrimValue(),
        tr.VMShapeLower(),
        tr.AttachGlobalSymbol(),
    ], name="hetcomp_lowering")
