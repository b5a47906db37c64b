"""Compile a Relax module through :func:`hetcomp.passes.pipeline.lowering_pipeline`."""

from __future__ import annotations

import json

from .._tvm import compiler
from ..passes.pipeline import scheduling_pipeline, vm_lowering_pipeline
from ..passes.schedule_units import ScheduleUnits
from .targets import make_target


def schedule_module(mod, target, int8_dot: bool = True):
    """Schedule every unscheduled kernel of ``mod`` for ``target`` (kernels alone, outside a
    model: profiling probes and tests); ``int8_dot=False``: quantized linears dequantize, as
    :func:`build`'s."""
    return ScheduleUnits(target, int8_dot=int8_dot)(mod)


#: The PassContext option under which TVM's RewriteCUDAGraph (in the VM lowering) captures.
CUDA_GRAPH_OPTION = "relax.backend.use_cuda_graph"


def uses_cuda_graph(target, plan=None) -> bool:
    """Whether a build captures CUDA graphs: a whole-model CUDA module (a partitioned module
    allocates through per-device pools, not the static plan that capture needs)."""
    return plan is None and compiler().Target(target).kind.name == "cuda"


def build(mod, target, plan=None, cost=None, scheduled: list | None = None,
          cuda_graph: bool = False, fuse_linears: bool | None = None,
          tensor_cores: bool = True, int8_dot: bool = True):
    """Partition (``plan``), schedule and compile ``mod``; returns a ``tvm.runtime.Executable``.

    ``target`` is the module's target; a partitioned module's is its host unit's
    (``plan.targets[0]``), and kernels placed on the other unit carry their own. ``cost``:
    AnnotateCost's arguments (``{"cost_fn", "units", "width", "cache_len"}``) or None.
    ``scheduled`` (a list) receives the scheduled module, before VM lowering (for
    :func:`kernel_table`). The two halves are :func:`~hetcomp.passes.pipeline.lowering_pipeline`.
    ``cuda_graph``: capture the kernels of each function's static-shape regions as CUDA
    graphs, replayed with one launch (:func:`launch_counts` says how many remain).
    ``fuse_linears``: run FuseLinearChains (None: on whole-model GPU builds,
    :func:`~hetcomp.passes.pipeline.fuses_linears`). ``tensor_cores=False``: no GPU linear on
    tensor cores. ``int8_dot=False``: quantized linears dequantize on every CPU (default:
    int8 activations and VNNI / sdot dot products where the CPU has them,
    :mod:`hetcomp.schedules.int8_dot`).
    """
    c = compiler()
    target = c.Target(target) if isinstance(target, dict | str) else target
    with target:
        mod = scheduling_pipeline(target, plan, **(cost or {}), fuse_linears=fuse_linears,
                                  tensor_cores=tensor_cores, int8_dot=int8_dot)(mod)
    if scheduled is not None:
        scheduled.append(mod)
    with c.transform.PassContext(config={CUDA_GRAPH_OPTION: cuda_graph}):
        return c.compile(mod, target=target, relax_pipeline=vm_lowering_pipeline(plan))


def launch_counts(scheduled, cuda_graph: bool, functions: tuple[str, ...]) -> dict:
    """Per Relax function of a scheduled module (:func:`build`'s ``scheduled``): ``kernels``
    (kernel calls, each its own launch without graphs), ``launches`` (kernel calls left
    outside captured graphs plus one per graph replay) and ``graphs``, after the VM lowering
    with or without CUDA-graph capture.

    Captured are the regions whose shapes are static, whose arguments are fixed (weights,
    the function's own buffers; the caches too where ``num_input`` leaves them out of the
    inputs) and whose results are not the function's outputs. A module built with
    ``device_len`` (:func:`~hetcomp.frontend.llama.build_module`) captures a verify step
    whole; otherwise the kernels that read the cache length or the caches stay out."""
    c = compiler()
    with c.transform.PassContext(config={CUDA_GRAPH_OPTION: cuda_graph}):
        low = vm_lowering_pipeline()(scheduled)
    # Kernels, not the VM's host-side shape functions (sizes of symbolic allocations).
    prims = {gv.name_hint for gv, f in low.functions_items() if isinstance(f, c.tir.PrimFunc)
             and not (f.attrs is not None and "tirx.is_host_func" in f.attrs)}
    run = c.Op.get("relax.call_builtin_with_ctx")

    def calls(func) -> tuple[int, int, int]:
        """(kernels launched on their own, kernels in graphs, graph replays) of one call of
        ``func``; a replay runs its capture function's kernels (the layers share one)."""
        alone = captured = graphs = 0

        def visit(e):
            nonlocal alone, captured, graphs
            if not isinstance(e, c.relax.Call):
                return
            if isinstance(e.op, c.tvm.ir.GlobalVar) and e.op.name_hint in prims:
                alone += 1
            elif (e.op.same_as(run) and isinstance(e.args[0], c.relax.ExternFunc)
                  and str(e.args[0].global_symbol) == "vm.builtin.cuda_graph.run_or_capture"):
                graphs += 1
                captured += calls(low[e.args[1].fields[0]])[0]

        c.relax.analysis.post_order_visit(func.body, visit)
        return alone, captured, graphs

    out = {}
    names = {gv.name_hint for gv in low.get_global_vars()}
    for name in functions:
        if name in names:
            alone, captured, graphs = calls(low[name])
            out[name] = {"kernels": alone + captured, "launches": alone + graphs,
                         "graphs": graphs}
    return out


def cuda_source(executable) -> str:
    """The CUDA C source of an executable's GPU kernels ('' if it has none). Built without a
    GPU, the library keeps this source and compiles it when loaded (``_tvm.ensure_backend``)."""
    stack, out = [executable.mod], []
    while stack:
        m = stack.pop()
        if m.kind == "cuda":
            out.append(m.inspect_source(""))
        stack.extend(m.imports)
    return "\n".join(out)


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
    names = {gv.name_hint for gv in mod.get_global_vars()}
    rows = []
    for gv, func in mod.functions_items():
        if not isinstance(func, c.relax.Function):
            continue
        seen: dict[str, dict] = {}
        for call in _call_sites(func):
            name = call.args[0].name_hint
            kernel = mod[name] if name in names else None
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


def workspace_bytes(mod, plan=None, sizes: dict[str, int] | None = None) -> dict[str, int]:
    """Bytes each Relax function of the scheduled ``mod`` allocates for its intermediate and
    output tensors, after TVM's memory planning (the VM's allocations, weights and KV cache
    excluded: they are its inputs).

    ``sizes`` gives the symbolic dimensions their values (``{"w": 128}``: a prefill chunk);
    a function with another symbolic size is left out. A partitioned module (``plan``) has no
    static memory planning (:func:`~hetcomp.passes.pipeline.vm_lowering_pipeline`): its figure
    counts every tensor once, an upper bound.
    """
    c = compiler()
    tr = c.relax.transform
    planned = c.transform.Sequential([
        tr.ToNonDataflow(), tr.RemovePurityChecking(), tr.CallTIRRewrite(),
        tr.StaticPlanBlockMemory() if plan is None else c.transform.Sequential([])])(mod)
    storage, tensor = c.Op.get("relax.memory.alloc_storage"), c.Op.get("relax.builtin.alloc_tensor")
    out = {}
    for gv, func in planned.functions_items():
        if not isinstance(func, c.relax.Function):
            continue
        allocs = []

        def visit(e, allocs=allocs):
            if isinstance(e, c.relax.Call) and (e.op.same_as(storage) or e.op.same_as(tensor)):
                allocs.append(e)

        c.relax.analysis.post_order_visit(func.body, visit)
        total = 0
        for call in allocs:
            n = 1 if call.op.same_as(storage) else c.DataType(str(call.args[1].value)).bits // 8
            for dim in call.args[0].values:
                free = {v.name: v for v in c.tir.analysis.undefined_vars(dim)}
                if not set(free) <= set(sizes or {}):
                    total = None
                    break
                analyzer = c.Analyzer()
                for k, var in free.items():
                    analyzer.bind(var, c.tir.IntImm("int64", sizes[k]))
                n *= int(analyzer.simplify(dim))
            if total is None:
                break
            total += n
        if total is not None:
            out[gv.name_hint] = total
    return out
