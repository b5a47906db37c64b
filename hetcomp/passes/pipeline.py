"""The hetcomp pass pipeline, as data: numbered phases, optional passes as empty Sequentials.

:func:`lowering_pipeline` owns the whole lowering that ``tvm.compile`` runs (passed as its
``relax_pipeline``): partitioning, legalization, schedule rules per unit, and the VM lowering
of TVM's default build. ``codegen.build`` only calls ``tvm.compile`` with it.
"""

from __future__ import annotations

from .._tvm import compiler
from ..plan import HeteroPlan
from .annotate_cost import AnnotateCost
from .fuse_linear_chains import FuseLinearChains
from .order_for_overlap import OrderForOverlap
from .partition_hetero import PartitionHetero
from .schedule_units import ScheduleUnits

_c = compiler()


def hetcomp_pipeline(plan: HeteroPlan | None = None, cost_fn=None,
                     units: tuple[str, ...] | None = None, width: int = 1,
                     cache_len: int = 256, async_units: tuple[int, ...] | None = None,
                     functions: tuple[str, ...] | None = None, fuse_linears: bool = False):
    """Phase 1 partition across units (or, unpartitioned, fuse the elementwise kernels
    around linears: ``fuse_linears``), phase 2 order for overlap, phase 3 realise virtual
    devices, phase 4 annotate costs (the Relax-level phases of :func:`lowering_pipeline`).
    ``units``: the names AnnotateCost costs for (default: the plan's, else ``cpu``)."""
    empty = _c.transform.Sequential([])
    units = units or (plan.units if plan is not None else ("cpu",))
    if fuse_linears and plan is not None:
        raise ValueError("FuseLinearChains runs on unpartitioned modules")
    # By default partition the decoder functions the model builder lists (not medusa/commit).
    return _c.transform.Sequential([
        # Phase 1. Column-split linears, affinity-split attention, vdevice placement; or the
        # norm -> linear -> activation chains as one kernel each (GPU rules schedule them).
        PartitionHetero(plan, functions) if plan is not None else empty,
        FuseLinearChains() if fuse_linears else empty,
        # Phase 2. Asynchronous launches first, synchronising uses last.
        OrderForOverlap(async_units) if plan is not None else empty,
        # Phase 3. Propagate placements to every binding.
        _c.relax.transform.RealizeVDevice() if plan is not None else empty,
        # Phase 4. Predicted cost per kernel and unit, after partitioning so that split
        # kernels are costed at their own sizes (for reports and `hetcomp inspect`).
        AnnotateCost(cost_fn, units, width, cache_len) if cost_fn is not None else empty,
    ], name="hetcomp")


def fuses_linears(target, plan: HeteroPlan | None = None) -> bool:
    """Whether a build fuses norm -> linear -> activation chains by default: a whole-model
    GPU build (on a CPU each kernel call costs microseconds, not a launch, and the CPU
    rules schedule the linears unfused)."""
    kind = _c.Target(target).kind.name if isinstance(target, dict | str) else target.kind.name
    return plan is None and kind != "llvm"


def scheduling_pipeline(target, plan: HeteroPlan | None = None, cost_fn=None,
                        units: tuple[str, ...] | None = None, width: int = 1,
                        cache_len: int = 256, fuse_linears: bool | None = None,
                        tensor_cores: bool = True, int8_dot: bool = True):
    """Phases 1-6 of :func:`lowering_pipeline`: the module with every kernel scheduled.
    ``fuse_linears``: None fuses where :func:`fuses_linears` says. ``tensor_cores=False``:
    no GPU linear on tensor cores (``gpu.TensorCoreLinear``, ``gpu.QuantTensorCoreLinear``).
    ``int8_dot=False``: no quantized linear on int8 dot products (``x86/arm.Int8DotLinear``).
    """
    relax = _c.relax
    tr = relax.transform
    if fuse_linears is None:
        fuse_linears = fuses_linears(target, plan)
    return _c.transform.Sequential([
        # Phases 1-4. Partition or fuse, overlap order, vdevices, costs (hetcomp_pipeline).
        hetcomp_pipeline(plan, cost_fn, units, width, cache_len, fuse_linears=fuse_linears),
        # Phase 5. Library dispatch of sampling, sort and scan ops (the draft's top-k).
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        # Phase 6. Relax ops become kernels; every kernel is scheduled by a rule of its unit.
        tr.LegalizeOps(),
        tr.RewriteDataflowReshape(),
        ScheduleUnits(target, tensor_cores, int8_dot),
    ], name="hetcomp_scheduling")


def lowering_pipeline(target, plan: HeteroPlan | None = None, cost_fn=None,
                      units: tuple[str, ...] | None = None, width: int = 1,
                      cache_len: int = 256, fuse_linears: bool | None = None):
    """Everything ``tvm.compile(mod, target, relax_pipeline=...)`` runs, in one Sequential:
    :func:`scheduling_pipeline` (phases 1-6) then :func:`vm_lowering_pipeline` (phase 7).

    ``target`` is the module's target: the host unit's (``plan.targets[0]``) for a
    partitioned module, whose other units' kernels carry their own. Phases 5 and 7 are the
    passes of TVM's default build (``relax.pipeline.default_build_pipeline``), kept as they
    are so that numerics and speed do not change; its LegalizeOps moves before scheduling.
    For GPU targets TVM's own default (``backend.cuda``) would also fuse (FuseOps, FuseTIR)
    and schedule the fused kernels with dlight; here every kernel keeps its own rule.
    """
    return _c.transform.Sequential([
        scheduling_pipeline(target, plan, cost_fn, units, width, cache_len, fuse_linears),
        vm_lowering_pipeline(plan),
    ], name="hetcomp_lowering")


def vm_lowering_pipeline(plan: HeteroPlan | None = None):
    """Phase 7 of :func:`lowering_pipeline`: leave dataflow, plan memory, lower builtins and
    shapes (TVM's default build, as it is)."""
    tr = _c.relax.transform
    return _c.transform.Sequential([
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
    ], name="hetcomp_vm_lowering")
