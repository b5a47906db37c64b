"""AnnotateCost: attach each kernel's predicted time per unit (from the cost models) to the IR.

Costs go on the kernels (PrimFunc attribute ``hetcomp.cost``: unit -> seconds at the planned
width and cache length), and each Relax function gets ``hetcomp.cost_total``: unit -> the sum
over its ``call_tir`` sites. Attributes are never put on high-level ``R.matmul`` calls (a dict
attribute there crashes TVM 0.27).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from .._tvm import compiler
from ..kernels.ops import OP_KIND

_c = compiler()
CostFn = Callable[[str, dict], float]


def op_description(func, width: int, cache_len: int) -> dict:
    """What a cost model needs to know about a kernel: its kind, shape attributes and sizes
    (``io_bytes``: its buffers' bytes, symbolic rows taken as ``width``)."""
    attrs = func.attrs
    width = _static_rows(func) or width  # width-specialised kernels (verify_w8's) know theirs
    desc = {"op_kind": str(attrs[OP_KIND]), "w": int(width), "cache_len": int(cache_len),
            "io_bytes": _io_bytes(func, width)}
    for key in ("n", "k", "block", "residual", "part"):
        full = f"hetcomp.{key}"
        if full in attrs:
            v = attrs[full]
            desc[key] = str(v) if key == "part" else int(v)
    if "hetcomp.qtype" in attrs:  # a block-quantized weight: its bytes per weight
        desc["qtype"] = str(attrs["hetcomp.qtype"])
    return desc


@_c.module_pass(opt_level=0, name="AnnotateCost")
class AnnotateCost:
    """Annotate predicted costs for ``units`` at tree width ``width`` and ``cache_len``.

    ``cost_fn(unit, op)`` is a pure function (a fitted cost model or the roofline); ``op`` is
    :func:`op_description`. Run on the unscheduled module (after PartitionHetero, if any).
    """

    def __init__(self, cost_fn: CostFn, units: tuple[str, ...], width: int = 1,
                 cache_len: int = 256):
        if not callable(cost_fn):
            raise TypeError("cost_fn must be callable")
        if width < 1 or cache_len < 0:
            raise ValueError("width must be >= 1 and cache_len >= 0")
        self.cost_fn, self.units = cost_fn, tuple(units)
        self.width, self.cache_len = width, cache_len

    def transform_module(self, mod, ctx):
        relax, tir = _c.relax, _c.tir
        out = _c.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        if mod.global_infos:
            for key, value in mod.global_infos.items():
                out.update_global_info(key, value)
        costs = {}
        for gv, func in mod.functions_items():
            if isinstance(func, tir.PrimFunc) and func.attrs is not None and OP_KIND in func.attrs:
                op = op_description(func, self.width, self.cache_len)
                costs[gv.name_hint] = {u: float(self.cost_fn(u, op)) for u in self.units}
                out[gv] = func.with_attr("hetcomp.cost", json.dumps(costs[gv.name_hint]))
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            total = dict.fromkeys(self.units, 0.0)
            for call in _call_tir_sites(func):
                for u, t in costs.get(call.args[0].name_hint, {}).items():
                    total[u] += t
            out[gv] = func.with_attr("hetcomp.cost_total", json.dumps(total))
        return out


def _static_rows(func) -> int | None:
    """The rows of a kernel built for a static width: its first tensor's leading dimension
    when that is a constant and the kernel's name says so (``*_w8``)."""
    name = str(func.attrs["global_symbol"]) if "global_symbol" in func.attrs else ""
    shape = getattr(func.params[0], "shape", None) if func.params else None
    if "_w" not in name or not shape or not isinstance(shape[0], _c.tir.IntImm):
        return None
    return int(shape[0])


def _io_bytes(func, width: int) -> int:
    """Bytes of the kernel's buffers; a symbolic dimension counts ``width`` (the tree rows)."""
    total = 0
    for param in func.params:  # 0.27: tensor parameters carry their shape and dtype
        shape = getattr(param, "shape", None)
        if shape is None:
            continue
        n = _c.DataType(str(param.dtype)).bits // 8
        for dim in shape:
            n *= int(dim) if isinstance(dim, _c.tir.IntImm) else width
        total += n
    return total


def _call_tir_sites(func) -> list:
    sites = []
    ops = (_c.call_tir_op, _c.Op.get("relax.call_tir_inplace"))

    def visit(e):
        if isinstance(e, _c.relax.Call) and any(e.op.same_as(o) for o in ops):
            sites.append(e)

    _c.relax.analysis.post_order_visit(func.body, visit)
    return sites
