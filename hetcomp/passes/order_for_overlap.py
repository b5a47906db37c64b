"""OrderForOverlap: order bindings so asynchronous units start early and are waited on late.

The Relax VM runs bindings in order, and GPU kernels launch asynchronously, so placing every
launch on an asynchronous unit before the host's own independent work makes the units run at
the same time; the first host use of an asynchronous result is the synchronisation point and
is placed as late as its consumers allow. This is list scheduling on the data-dependence
graph of each dataflow block: ready bindings are taken launches first, host work next,
synchronising uses last, ties in the original order.
"""

from __future__ import annotations

import heapq

from .._tvm import compiler

_c = compiler()
_LAUNCH, _HOST, _SYNC = 0, 1, 2


def _vdevice_index(ty, vdevices) -> int | None:
    vd = getattr(ty, "vdevice", None)
    if vd is None:
        fields = getattr(ty, "fields", None)
        if fields:
            found = [_vdevice_index(f, vdevices) for f in fields]
            found = [f for f in found if f is not None]
            return found[0] if found else None
        return None
    for i, v in enumerate(vdevices):
        if _c.same_vdevice(vd, v):
            return i
    return None


def _used_vars(expr) -> list:
    return list(_c.relax.analysis.free_vars(expr))


def reorder_block(block, async_units: set[int], vdevices):
    """The block's bindings in overlap order (a permutation respecting every dependence)."""
    relax = _c.relax
    bindings = list(block.bindings)
    index = {b.var: i for i, b in enumerate(bindings)}
    deps = [set() for _ in bindings]
    readers: dict = {}
    for i, b in enumerate(bindings):
        for v in _used_vars(b.value):
            if v in index:
                deps[i].add(index[v])
                readers.setdefault(v, []).append(i)
    # In-place calls overwrite their argument: every other reader of it must run first.
    inplace = _c.Op.get("relax.call_tir_inplace")
    for i, b in enumerate(bindings):
        v = b.value
        if isinstance(v, relax.Call) and v.op.same_as(inplace):
            for j in v.attrs.inplace_indices:
                arg = v.args[1].fields[int(j)] if int(j) >= 0 else None
                for r in readers.get(arg, []):
                    if r != i:
                        deps[i].add(r)
    # A value without a vdevice is the host's, unit 0 (a GPU in a GPU-hosted plan).
    on_async = [((_vdevice_index(b.var.ty, vdevices) or 0) in async_units) for b in bindings]
    cls = []
    for i, b in enumerate(bindings):
        if on_async[i]:
            cls.append(_LAUNCH)
        elif any(on_async[d] for d in deps[i] if bindings[d].var in set(_used_vars(b.value))):
            cls.append(_SYNC)
        else:
            cls.append(_HOST)
    users = [[] for _ in bindings]
    for i, ds in enumerate(deps):
        for d in ds:
            users[d].append(i)
    missing = [len(d) for d in deps]
    ready = [(cls[i], i) for i in range(len(bindings)) if missing[i] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(bindings[i])
        for u in users[i]:
            missing[u] -= 1
            if missing[u] == 0:
                heapq.heappush(ready, (cls[u], u))
    assert len(order) == len(bindings), "dependence cycle in a dataflow block"
    return relax.DataflowBlock(order)


@_c.module_pass(opt_level=0, name="OrderForOverlap")
class OrderForOverlap:
    """Reorder each dataflow block for overlap across the module's virtual devices.

    ``async_units`` are indices into the module's ``vdevice`` global info whose work runs
    asynchronously (by default every unit whose target is not ``llvm``). Run after
    PartitionHetero and before ``RealizeVDevice``; a module without vdevices is unchanged.
    """

    def __init__(self, async_units: tuple[int, ...] | None = None):
        self.async_units = None if async_units is None else set(async_units)

    def transform_module(self, mod, ctx):
        relax = _c.relax
        infos = mod.global_infos
        vdevices = list(infos["vdevice"]) if infos and "vdevice" in infos else []
        if not vdevices:
            return mod
        async_units = self.async_units
        if async_units is None:
            async_units = {i for i, v in enumerate(vdevices) if str(v.target.kind.name) != "llvm"}
        out = _c.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        out.update_global_info("vdevice", vdevices)
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
                continue
            blocks = [reorder_block(b, async_units, vdevices)
                      if isinstance(b, relax.DataflowBlock) else b for b in func.body.blocks]
            body = relax.BlockBuilder().normalize(relax.SeqExpr(blocks, func.body.body))
            out[gv] = relax.Function(func.params, body, None, func.is_pure, func.attrs)
        return relax.transform.Normalize()(out)
