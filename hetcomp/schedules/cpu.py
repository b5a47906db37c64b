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
    """Tree attention: one parallel task per (query row, head), all stages computed there.

    The kernel's key range is a whole number of ``hetcomp.key_tile`` tiles, so the score,
    softmax and reduction loops vectorise over keys without tails; the per-row mask bias is
    its own parallel stage, shared by the heads.
    """

    def apply(self, func, target, tunable):
        if _kind(func) != "attention":
            return None
        c = compiler()
        sch = c.Schedule(func)
        tile = int(func.attrs["hetcomp.key_tile"])
        # Step 1. Max and sum over keys keep tile-wide vector partials (rfactor).
        partials = {}
        for name in ("row_max", "row_sum") if tile > 1 else ():
            _, ri = sch.split(sch.get_loops(sch.get_sblock(name))[-1], [None, tile])
            partials[name] = sch.rfactor(ri, 2)
        # Step 2. Every stage but the bias is computed inside a (row, head) task.
        out = sch.get_sblock("attn_out")
        i, h, _ = sch.get_loops(out)
        row = sch.fuse(i, h)
        stages = ("pv", "row_sum", "row_sum_rf", "exp", "row_max", "row_max_rf", "scores")
        for name in stages:  # consumers first; the _rf stages exist only with partials
            if not name.endswith("_rf") or name[:-3] in partials:
                sch.compute_at(sch.get_sblock(name), row)
        for rf in partials.values():
            lane, ro = sch.get_loops(rf)[-2:]
            sch.reorder(ro, lane)
            sch.vectorize(lane)
        # Step 3. Scores vectorise over keys (K cache is position-contiguous).
        s = sch.get_sblock("scores")
        j, d = sch.get_loops(s)[-2:]
        jo, ji = sch.split(j, [None, tile])
        sch.reorder(jo, d, ji)
        sch.vectorize(ji)
        _, ej = sch.split(sch.get_loops(sch.get_sblock("exp"))[-1], [None, tile])
        sch.vectorize(ej)
        # Step 4. P.V vectorises over head_dim (V cache is dim-contiguous).
        pv = sch.get_sblock("pv")
        dd, jj = sch.get_loops(pv)[-2:]
        sch.reorder(jj, dd)
        sch.vectorize(dd)
        sch.vectorize(sch.get_loops(out)[-1])
        sch.parallel(row)
        sch.decompose_reduction(s, d)
        sch.decompose_reduction(pv, jj)
        # Step 5. The mask bias (a gather through the tree mask, so scalar): rows in parallel.
        sch.parallel(sch.get_loops(sch.get_sblock("bias"))[0])
        return sch


class ArgmaxRule(_BASE):
    """Row maximum, then the first index holding it: each reduction runs ``lanes`` partial
    results in one vector register (rfactor), rows in parallel."""

    def __init__(self, lanes: int = 16):
        self.lanes = lanes

    def apply(self, func, target, tunable):
        if _kind(func) != "argmax":
            return None
        sch = compiler().Schedule(func)
        vocab = int(func.params[0].shape[1])
        # Whole lane tiles only: a vectorised tail would read the next row.
        lanes = next(t for t in (self.lanes, 8, 4, 2, 1) if vocab % t == 0 and t <= self.lanes)
        rfs = []
        for name in ("row_max", "first") if lanes > 1 else ():
            _, r = sch.get_loops(sch.get_sblock(name))
            _, ri = sch.split(r, [None, lanes])
            rfs.append(sch.rfactor(ri, 1))  # partials [rows, lanes]: lanes are spatial there
        # Everything under the output's row loop, consumers first.
        row = sch.get_loops(sch.get_sblock("argmax"))[0]
        for name in ("first", "first_rf", "row_max", "row_max_rf")[:: 1 if rfs else 2]:
            sch.compute_at(sch.get_sblock(name), row)
        for rf in rfs:
            lane, ro = sch.get_loops(rf)[-2:]
            sch.reorder(ro, lane)
            sch.vectorize(lane)
        sch.parallel(row)
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
    return [LinearRule(), AttentionRule(), ArgmaxRule(), RowwiseRule(), ElementwiseRule()]
