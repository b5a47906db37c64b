"""CPU schedule rules for the model's kernels, dispatched on the ``hetcomp.op_kind`` attribute.

TVM's unscheduled CPU loops are scalar and single-threaded, and dlight's CPU rules cover only
K-innermost GEMV, so every kernel on the decode path gets a rule here. Decode is memory-bound:
the linear rule streams each packed weight block exactly once per tile of rows, with the
accumulators of a ``rows x B`` tile held in vector registers.
"""

from __future__ import annotations

from .._tvm import compiler
from ..frontend.ops import OP_KIND

_BASE = compiler().ScheduleRule


def _kind(func) -> str | None:
    """The kernel's op kind, or None for kernels that are not ours or not for a CPU."""
    attrs = func.attrs
    if attrs is None or OP_KIND not in attrs:
        return None
    if "target" in attrs and attrs["target"].kind.name != "llvm":
        return None
    return str(attrs[OP_KIND])


class LinearRule(_BASE):
    """``y[w, n] = x[w, k] @ W`` (+ residual) with W packed ``[n // B, k, B]``.

    Loops: ``n // B`` (parallel) > row tiles > k > rows in the tile (unrolled) > B (vector).
    ``row_tile`` rows share each weight load; B lanes form one or two vector registers.
    """

    def __init__(self, row_tile: int = 4):
        self.row_tile = row_tile

    def apply(self, func, target, tunable):
        if _kind(func) != "linear":
            return None
        c = compiler()
        sch = c.Schedule(func)
        b = int(func.attrs["hetcomp.block"])
        extent = func.params[0].shape[0]  # x[w, k]: PrimFunc params carry their shapes
        row_tile = self.row_tile
        if isinstance(extent, c.tir.IntImm):  # static rows: an exact tile, no predicates
            row_tile = next(t for t in (8, 4, 2, 1) if int(extent) % t == 0)
        # Step 1. Tile rows and columns; the reduction sits between the two tiles.
        mm = sch.get_sblock("matmul")
        i, j, k = sch.get_loops(mm)
        jo, ji = sch.split(j, [None, b])
        io, ii = sch.split(i, [None, row_tile])
        sch.reorder(jo, io, k, ii, ji)
        # Step 2. Accumulate in registers, write back (with the residual add) per row tile.
        acc = sch.cache_write(mm, 0, "local")
        sch.reverse_compute_at(acc, io)
        tail = acc
        if int(func.attrs["hetcomp.residual"]):
            add = sch.get_sblock("add_residual")
            sch.reverse_compute_at(add, io)
            sch.compute_inline(acc)
            tail = add
        # Step 3. Parallel over column blocks, vector over a block, unrolled rows.
        sch.parallel(jo)
        sch.vectorize(ji)
        sch.unroll(ii)
        ti, tj = sch.get_loops(tail)[-2:]
        sch.vectorize(tj)
        sch.decompose_reduction(mm, k)
        return sch


class AttentionRule(_BASE):
    """Tree attention: one parallel task per (query row, head), all stages computed there."""

    def __init__(self, key_tile: int = 16):
        self.key_tile = key_tile

    def apply(self, func, target, tunable):
        if _kind(func) != "attention":
            return None
        c = compiler()
        sch = c.Schedule(func)
        out = sch.get_sblock("attn_out")
        pv = sch.get_sblock("pv")
        i, h, _ = sch.get_loops(out)
        row = sch.fuse(i, h)
        # Step 1. Every producer stage is computed inside the (row, head) task.
        sch.compute_at(pv, row)
        for name in ("row_sum", "exp", "row_max", "scores"):
            sch.compute_at(sch.get_sblock(name), row)
        # Step 2. Scores vectorise over keys (K cache is position-contiguous).
        s = sch.get_sblock("scores")
        j, d = sch.get_loops(s)[-2:]
        jo, ji = sch.split(j, [None, self.key_tile])
        sch.reorder(jo, d, ji)
        sch.vectorize(ji)
        # Step 3. P.V vectorises over head_dim (V cache is dim-contiguous).
        dd, jj = sch.get_loops(pv)[-2:]
        sch.reorder(jj, dd)
        sch.vectorize(dd)
        sch.vectorize(sch.get_loops(out)[-1])
        _, ej = sch.split(sch.get_loops(sch.get_sblock("exp"))[-1], [None, self.key_tile])
        sch.vectorize(ej)
        sch.parallel(row)
        sch.decompose_reduction(s, d)
        sch.decompose_reduction(pv, jj)
        return sch


class RowwiseRule(_BASE):
    """RMSNorm: the row reduction computed per row, the scaling vectorised."""

    def apply(self, func, target, tunable):
        if _kind(func) != "rms_norm":
            return None
        sch = compiler().Schedule(func)
        norm = sch.get_sblock("norm")
        i, e = sch.get_loops(norm)
        sch.compute_at(sch.get_sblock("rstd"), i)
        sch.compute_at(sch.get_sblock("sumsq"), i)
        sch.vectorize(e)
        return sch


class ElementwiseRule(_BASE):
    """Elementwise kernels: innermost axis vectorised in 16-lane chunks."""

    def apply(self, func, target, tunable):
        if _kind(func) not in ("elementwise", "embed"):
            return None
        sch = compiler().Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        for blk in blocks:
            loops = sch.get_loops(blk)
            _, inner = sch.split(loops[-1], [None, 16])
            sch.vectorize(inner)
        return sch


def cpu_rules():
    """The ordered CPU rule list (first applicable rule wins)."""
    return [LinearRule(), AttentionRule(), RowwiseRule(), ElementwiseRule()]
