"""CPU schedule rules for the model's kernels, dispatched on the ``hetcomp.op_kind`` attribute.

TVM's unscheduled CPU loops are scalar and single-threaded, and dlight's CPU rules cover only
K-innermost GEMV, so every kernel on the decode path gets a rule here. Decode is memory-bound:
the linear rule streams each packed weight block exactly once per tile of rows, with the
accumulators of a ``rows x B`` tile held in vector registers.
"""

from __future__ import annotations

from typing import NamedTuple

from .._tvm import compiler
from ..kernels.ops import OP_KIND, is_fused_linear
from ..kernels.sparse_attention import SPARSE_KIND

_BASE = compiler().ScheduleRule


def _kind(func) -> str | None:
    """The kernel's op kind, or None for kernels that are not ours or not for a CPU."""
    attrs = func.attrs
    if attrs is None or OP_KIND not in attrs:
        return None
    if "target" in attrs and attrs["target"].kind.name != "llvm":
        return None
    return str(attrs[OP_KIND])


#: Below this many elements a cheap row-wise kernel runs faster on one thread: a parallel
#: launch costs ~0.6 us here, what a 16-lane loop does over ~4k float32 elements.
PARALLEL_MIN_ELEMENTS = 8192


def _worth_parallel(buf) -> bool:
    """Whether a kernel over ``buf`` (rows first, static or symbolic) should use threads."""
    c = compiler()
    rows, *rest = buf.shape
    cols = 1
    for r in rest:
        cols *= int(r)
    if not isinstance(rows, c.tir.IntImm):  # symbolic rows (prefill): long prompts
        return True
    return int(rows) * int(cols) >= PARALLEL_MIN_ELEMENTS


def _write_back_per_row_tile(sch, func, mm, io):
    """Accumulate the linear block ``mm`` in a register tile and write it back (with the
    residual add, when the kernel has one) once per row tile ``io``; returns the write-back
    block."""
    acc = sch.cache_write(mm, 0, "local")
    sch.reverse_compute_at(acc, io)
    if not int(func.attrs["hetcomp.residual"]):
        return acc
    add = sch.get_sblock("add_residual")
    sch.reverse_compute_at(add, io)
    sch.compute_inline(acc)
    return add


class LinearTile(NamedTuple):
    """How :class:`LinearRule` tiles one kernel: ``streams`` column panels share each k step,
    ``rows`` rows a tile, and a panel runs ``lanes`` columns at a time (None: all B; fewer
    only with one stream, which the rule checks).
    ``prefetch``: where the kernel's rows fit one tile (each weight read once, from DRAM),
    each k step prefetches its streams' weights this many bytes ahead (0: none)."""

    streams: int
    rows: int
    lanes: int | None = None
    prefetch: int = 0


class LinearRule(_BASE):
    """``y[w, n] = x[w, k] @ W`` (+ residual) with W packed ``[n // B, k, B]``.

    Loops: groups of ``streams`` panels (parallel) > sub-panels of ``lanes`` columns > row
    tiles > k > the group's panels (unrolled) > rows in the tile (unrolled) > lanes (vector).
    The tile's rows share each weight load; a tile holds ``streams x rows x lanes``
    accumulators in vector registers. :meth:`tile` picks the tile; ISA subclasses size it to
    the target's registers (:class:`hetcomp.schedules.x86.LinearRule`,
    :class:`hetcomp.schedules.arm.LinearRule`), and may have a one-tile kernel's k loop
    prefetch its weight streams (``LinearTile.prefetch``; x86's does, ARM's not yet: no ARM
    machine here to time it on).
    """

    def __init__(self, row_tile: int = 4):
        self.row_tile = row_tile

    def tile(self, target, rows: int | None) -> LinearTile | None:
        """The tile of a kernel of ``rows`` rows (None: symbolic, prefill), or None where the
        rule does not apply. Static rows take an exact tile (no predicates); the generic
        tile is one stream of whole panels."""
        if rows is None:
            return LinearTile(1, self.row_tile)
        return LinearTile(1, next(t for t in (8, 4, 2, 1) if rows % t == 0))

    def apply(self, func, target, tunable):
        if _kind(func) != "linear" or "hetcomp.qtype" in func.attrs or is_fused_linear(func):
            return None
        c = compiler()
        extent = func.params[0].shape[0]  # x[w, k]: PrimFunc params carry their shapes
        tile = self.tile(target, int(extent) if isinstance(extent, c.tir.IntImm) else None)
        if tile is None:
            return None
        sch = c.Schedule(func)
        b = int(func.attrs["hetcomp.block"])
        # Groups of the most panels up to `streams` that divide the panel count.
        panels = int(func.attrs["hetcomp.n"]) // b
        streams = next(s for s in range(tile.streams, 0, -1) if panels % s == 0)
        lanes = tile.lanes if tile.lanes is not None and b % tile.lanes == 0 else b
        if streams > 1 and lanes < b:
            # A row tile's write-back would span its panels' columns as one range, over the
            # sub-panels not yet computed (wrong results, not a slower kernel).
            raise ValueError(f"{type(self).__name__}: a tile of {streams} panel streams "
                             f"runs whole {b}-column panels, not {lanes}-column sub-panels")
        # Step 1. Tile rows and columns; the reduction sits between the two tiles, the
        # group's panels inside it, sub-panels outside the row tiles (a panel's later
        # sub-panels read it from cache).
        mm = sch.get_sblock("matmul")
        i, j, k = sch.get_loops(mm)
        io, ii = sch.split(i, [None, tile.rows])
        factors = {"jo": None, "js": streams, "jp": b // lanes, "ji": lanes}
        names = [n for n, f in factors.items() if f != 1 or n == "ji"]
        loops = dict(zip(names, sch.split(j, [factors[n] for n in names]), strict=True))
        sch.reorder(*[loops[n] for n in ("jo", "jp") if n in loops], io, k,
                    *[loops[n] for n in ("js",) if n in loops], ii, loops["ji"])
        if "js" in loops:
            sch.unroll(loops["js"])
        # Step 2. Accumulate in registers, write back (with the residual add) per row tile.
        tail = _write_back_per_row_tile(sch, func, mm, io)
        # Step 3. Parallel over panel groups, vector over lanes, unrolled rows.
        sch.parallel(loops["jo"])
        sch.vectorize(loops["ji"])
        sch.unroll(ii)
        sch.vectorize(sch.get_loops(tail)[-1])
        sch.decompose_reduction(mm, k)
        # Step 4. Weights read once (one row tile): ask for them ahead of the FMAs.
        if tile.prefetch and "jp" not in loops and _one_row_tile(sch, io):
            wp = next(p for p in func.params if p.name == "wp")  # (params are buffers)
            _prefetch_streams(sch, k, wp, sch.get(loops["jo"]).loop_var, streams,
                              tile.prefetch)
        return sch


def _one_row_tile(sch, io) -> bool:
    """Whether the row-tile loop ``io`` runs once (static rows that fit one tile: each
    weight is read once, from DRAM)."""
    tiles = sch.get(io).extent
    return isinstance(tiles, compiler().tir.IntImm) and int(tiles) == 1


#: A cache line's bytes (x86 and the ARM cores here).
CACHE_LINE = 64


def prefetch_call(load):
    """``llvm.prefetch`` of the element ``load`` reads (a read, kept in every cache level)."""
    c = compiler()
    tir = c.tir
    return tir.call_llvm_intrin("void", c.LLVM_PREFETCH, tir.address_of(load),
                                *(tir.const(v, "int32") for v in (0, 3, 1)))


def _start_each_step_with(sch, loop, loads) -> None:
    """Prefetch each of ``loads`` (elements, in the loop's variable) at the start of every
    step of ``loop``: the scheduled loop replaced through the schedule state (a last step;
    TIR has no schedule primitive for it)."""
    tir = compiler().tir
    f = sch.get(loop)
    body = tir.SeqStmt([*(tir.Evaluate(prefetch_call(ld)) for ld in loads), f.body])
    sch.state.replace(sch.get_sref(loop), tir.For(f.loop_var, f.min, f.extent, f.kind, body,
                                                  f.thread_binding, f.annotations), {})


def _prefetch_streams(sch, k, wp, group, streams: int, ahead_bytes: int) -> None:
    """Start each k step of loop ``k`` with a prefetch of the weights ``ahead_bytes``
    further on in each of the ``streams`` panels of group ``group`` (``wp`` packed
    ``[n // B, k, B]``, a panel's k row one cache line or more; the last k rows ask for the
    panel's last row again)."""
    c = compiler()
    tir = c.tir
    _, K, B = (int(d) for d in wp.shape)
    bytes_per_row = B * (c.DataType(wp.dtype).bits // 8)
    ahead = tir.min(sch.get(k).loop_var + max(1, ahead_bytes // bytes_per_row), K - 1)
    _start_each_step_with(sch, k, [
        tir.BufferLoad(wp, [group * streams + s, ahead,
                            tir.const(off * B // bytes_per_row, "int64")])
        for s in range(streams) for off in range(0, bytes_per_row, CACHE_LINE)])


class QuantLinearRule(_BASE):
    """:class:`LinearRule` for block-quantized weights (:mod:`hetcomp.kernels.quant`):
    ``y[w, n] = x[w, k] @ dequant(W)`` (+ residual), fp32 accumulation.

    Loops: ``n // B`` (parallel) > row tiles > k blocks > 32 weights of a block (unrolled:
    nibble selects become constants) > rows in the tile (unrolled) > B (vector). A panel's
    block scales (and mins) are decoded once per k block into B-lane vectors; each weight is
    decoded once per row tile and feeds the tile's ``rows`` FMAs. The factored kernel (narrow
    widths) sums a block into a second ``rows x B`` register tile (``inner``) and scales it
    into the accumulators once per block. LLVM emits AVX-512 or AVX2 for the B-lane loops,
    whichever the target CPU has. A kernel whose rows fit one tile, with whole panels,
    prefetches each k block's lines :meth:`prefetch_bytes` ahead (here none; x86's subclass
    asks the CPU's :func:`hetcomp.schedules.x86.prefetch_for`).
    """

    def __init__(self, row_tile: int = 4, max_row_tile: int = 8, lanes: int | None = None):
        self.row_tile, self.max_row_tile, self.lanes = row_tile, max_row_tile, lanes

    def prefetch_bytes(self, target) -> int:
        """How far ahead a one-tile kernel prefetches its blocks on ``target`` (0: none)."""
        return 0

    def applies(self, target) -> bool:
        """Whether the rule schedules for ``target`` (every LLVM CPU here; ISA subclasses
        narrow it)."""
        return True

    def apply(self, func, target, tunable):
        if (_kind(func) != "linear" or "hetcomp.qtype" not in func.attrs
                or is_fused_linear(func) or not self.applies(target)):
            return None
        c = compiler()
        sch = c.Schedule(func)
        b = int(func.attrs["hetcomp.block"])
        extent = func.params[0].shape[0]
        row_tile = self.row_tile
        if isinstance(extent, c.tir.IntImm):
            row_tile = next(t for t in (8, 4, 2, 1)
                            if int(extent) % t == 0 and t <= self.max_row_tile)
        factored = any(sch.get(blk).name_hint == "inner"
                       for blk in sch.get_child_blocks(sch.get_sblock("root")))
        # Step 1. Tile rows and columns; the reduction (k, or k blocks) sits between them.
        # With ``lanes`` < B a panel runs as B / lanes sub-panels, one after the other (a
        # panel's blocks are 11-31 KB for SmolLM2's rows, so the later passes read them
        # from cache, not DRAM).
        mm = sch.get_sblock("matmul")
        i, j, k = sch.get_loops(mm)
        lanes = self.lanes if self.lanes is not None and b % self.lanes == 0 else b
        jo, js, ji = sch.split(j, [None, b // lanes, lanes])
        io, ii = sch.split(i, [None, row_tile])
        if factored:
            kb, kt = k, None
            sch.reorder(jo, js, io, kb, ii, ji)
        else:
            kb, kt = sch.split(k, [None, 32])
            sch.reorder(jo, js, io, kb, kt, ii, ji)
        # Step 2. Accumulate in registers, write back (with the residual add) per row tile.
        tail = _write_back_per_row_tile(sch, func, mm, io)
        # An odd N packs one-column panels (B = 1): no lane loop to vectorize (compute_at
        # drops its unit loops).
        vec = b > 1
        # Step 3. Factored: a block's raw-quant sums per k block, weights outermost (each
        # loaded once for the tile's rows), rows unrolled, B lanes vector.
        if factored:
            inner = sch.get_sblock("inner")
            sch.compute_at(inner, kb)
            sch.set_scope(inner, 0, "local")
            own = sch.get_loops(inner)[4:]  # (rows,) (B,) t: no row loop in a one-row tile
            sch.reorder(own[-1], *own[:-1])
            sch.unroll(own[-1])
            if len(own) == 2 + vec:
                sch.unroll(own[0])
            if vec:
                sch.vectorize(own[-2])
        # Step 4. The panel's scales (and mins) per k block, B lanes at once.
        for name in ("min", "scale") if str(func.attrs["hetcomp.qtype"]) == "q4_1" else (
                "scale",):
            blk = sch.get_sblock(name)
            sch.compute_at(blk, kb)
            if vec:
                sch.vectorize(sch.get_loops(blk)[-1])  # the panel's B columns
        # Step 5. Parallel over column panels, vector over a panel, unrolled block and rows.
        sch.parallel(jo)
        if vec:
            sch.vectorize(ji)
            sch.vectorize(sch.get_loops(tail)[-1])
        sch.unroll(ii)
        if kt is not None:
            sch.unroll(kt)
        sch.decompose_reduction(mm, kb)
        if factored:
            sch.decompose_reduction(inner, own[-1])
        # Step 6. Blocks read once (one row tile, whole panels): ask for them ahead.
        ahead = self.prefetch_bytes(target)
        if ahead and lanes == b and _one_row_tile(sch, io):
            wp = next(p for p in func.params if p.name == "wp")  # (params are buffers)
            _prefetch_blocks(sch, kb, wp, sch.get(jo).loop_var, ahead)
        return sch


def _prefetch_blocks(sch, kb, wp, panel, ahead_bytes: int) -> None:
    """Start each step of the k-block loop ``kb`` with a prefetch of every cache line of the
    block ``ahead_bytes`` further on in panel ``panel``'s blocks (``wp`` packed
    ``[n // B, k blocks, block bytes, B]``, a panel's blocks contiguous, then the next
    panel's; clamped to the weights' last byte)."""
    tir = compiler().tir
    panels, nkb, nbytes, B = (int(d) for d in wp.shape)
    block = nbytes * B
    loads = []
    for line in range(0, block, CACHE_LINE):
        at = tir.min((panel * nkb + sch.get(kb).loop_var) * block + (ahead_bytes + line),
                     panels * nkb * block - 1)
        loads.append(tir.BufferLoad(wp, [at // (nkb * block), at // block % nkb,
                                         at // B % nbytes, at % B]))
    _start_each_step_with(sch, kb, loads)


class AttentionRule(_BASE):
    """Tree attention: one parallel task per (head, tile of query rows), all stages computed
    there.

    A task's rows share every K and V load: the scores loop runs key tiles > head_dim > rows
    (unrolled) > keys (vector), accumulating a ``rows x tile`` block in registers, and P.V runs
    keys > rows > head_dim (vector). With one task per (row, head), a W = 8 tree read each
    head's cache eight times (attention grew 3x from W = 1 to 8). The kernel's key range is a
    whole number of ``hetcomp.key_tile`` tiles, so the vector loops need no tails; the per-row
    mask bias is its own parallel stage, shared by the heads. Symbolic row counts (prefill)
    keep one row per task.
    """

    def __init__(self, row_tile: int = 4):
        self.row_tile = row_tile

    def apply(self, func, target, tunable):
        if _kind(func) != "attention":
            return None
        c = compiler()
        sch = c.Schedule(func)
        tile = int(func.attrs["hetcomp.key_tile"])
        rows = func.params[0].shape[1]  # q[H, w, D]
        row_tile = 1
        if isinstance(rows, c.tir.IntImm):
            row_tile = next(t for t in (self.row_tile, 4, 2, 1)
                            if int(rows) % t == 0 and t <= self.row_tile)
        # Step 1. Max and sum over keys keep tile-wide vector partials (rfactor).
        partials = {}
        for name in ("row_max", "row_sum") if tile > 1 else ():
            _, ri = sch.split(sch.get_loops(sch.get_sblock(name))[-1], [None, tile])
            partials[name] = sch.rfactor(ri, 2)
        # Step 2. Every stage but the bias is computed inside a (head, row tile) task.
        out = sch.get_sblock("attn_out")
        i, h, dd = sch.get_loops(out)
        io, ii = sch.split(i, [None, row_tile])
        sch.reorder(h, io, ii, dd)
        task = sch.fuse(h, io)
        stages = ("pv", "row_sum", "row_sum_rf", "exp", "row_max", "row_max_rf", "scores")
        for name in stages:  # consumers first; the _rf stages exist only with partials
            if not name.endswith("_rf") or name[:-3] in partials:
                sch.compute_at(sch.get_sblock(name), task)
        for rf in partials.values():
            lane, ro = sch.get_loops(rf)[-2:]
            sch.reorder(ro, lane)
            sch.vectorize(lane)
        # Step 3. Scores: a rows x tile block of accumulators per key tile, K loaded once for
        # the task's rows (the K cache is position-contiguous).
        # (compute_at leaves no loop for a one-row tile.)
        tiled = row_tile > 1
        s = sch.get_sblock("scores")
        *r, j, d = sch.get_loops(s)[-3 if tiled else -2:]
        jo, ji = sch.split(j, [None, tile])
        sch.reorder(jo, d, *r, ji)
        acc = sch.cache_write(s, 0, "local")
        sch.reverse_compute_at(acc, jo)
        if tiled:
            sch.unroll(r[0])
        if tile > 1:  # (a one-key tile leaves no loop: the last one would be all the keys)
            sch.vectorize(sch.get_loops(acc)[-1])
            sch.vectorize(ji)
            _, ej = sch.split(sch.get_loops(sch.get_sblock("exp"))[-1], [None, tile])
            sch.vectorize(ej)
        # Step 4. P.V: each V row (dim-contiguous) loaded once for the task's rows.
        pv = sch.get_sblock("pv")
        *r, dd, jj = sch.get_loops(pv)[-3 if tiled else -2:]
        sch.reorder(jj, *r, dd)
        if tiled:
            sch.unroll(r[0])
        sch.vectorize(dd)
        sch.vectorize(sch.get_loops(out)[-1])
        sch.parallel(task)
        sch.decompose_reduction(s, d)
        sch.decompose_reduction(pv, jj)
        # Step 5. The mask bias (a gather through the tree mask, so scalar): rows in parallel.
        sch.parallel(sch.get_loops(sch.get_sblock("bias"))[0])
        return sch


class MergeRule(_BASE):
    """The log-sum-exp merge of two attention parts: per (row, head) the two weights once,
    then the head_dim vector; rows in parallel where that pays."""

    def apply(self, func, target, tunable):
        if _kind(func) != "attention_merge":
            return None
        sch = compiler().Schedule(func)
        out = sch.get_sblock("merge")
        i, h, dd = sch.get_loops(out)
        for name in ("weight2", "weight1", "m"):  # consumers first
            sch.compute_at(sch.get_sblock(name), h)
        sch.vectorize(dd)
        if _worth_parallel(func.params[-1]):
            sch.parallel(i)
        return sch


class SparseTreeAttentionRule(_BASE):
    """The sparse tree-attention kernel where no ISA rule applies (a CPU without AVX2+FMA or
    NEON, an odd head_dim): one parallel task per (tree node, KV head) row, the rest left to
    LLVM's vectorisers. The x86 and ARM rules tensorize it."""

    def apply(self, func, target, tunable):
        if _kind(func) != SPARSE_KIND:
            return None
        sch = compiler().Schedule(func)
        sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("row"))))
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
    """RMSNorm: per row, the sum of squares in ``lanes`` vector partials (rfactor: a scalar
    sum is one long chain of dependent adds, ~0.7 us per 576-wide row), then the scaling
    vectorised; rows in parallel where that pays (:func:`_worth_parallel`)."""

    def __init__(self, lanes: int = 16):
        self.lanes = lanes

    def apply(self, func, target, tunable):
        if _kind(func) != "rms_norm":
            return None
        sch = compiler().Schedule(func)
        hidden = int(func.params[0].shape[1])
        lanes = next(t for t in (self.lanes, 8, 4, 2, 1) if hidden % t == 0 and t <= self.lanes)
        rf = None
        if lanes > 1:  # partials [rows, lanes] (lanes are spatial there)
            _, ri = sch.split(sch.get_loops(sch.get_sblock("sumsq"))[-1], [None, lanes])
            rf = sch.rfactor(ri, 1)
        norm = sch.get_sblock("norm")
        i, e = sch.get_loops(norm)
        for name in ("rstd", "sumsq", "sumsq_rf") if rf else ("rstd", "sumsq"):
            sch.compute_at(sch.get_sblock(name), i)  # consumers first
        if rf:
            lane, ro = sch.get_loops(rf)[-2:]
            sch.reorder(ro, lane)
            sch.vectorize(lane)
        sch.vectorize(e)
        if _worth_parallel(func.params[0]):
            sch.parallel(i)
        return sch


class ElementwiseRule(_BASE):
    """Elementwise kernels: innermost axis vectorised in 16-lane chunks, the outer loops
    fused and run in parallel where that pays (:func:`_worth_parallel`, by the output)."""

    def apply(self, func, target, tunable):
        if _kind(func) not in ("elementwise", "embed"):
            return None
        sch = compiler().Schedule(func)
        out = func.params[-1]  # PrimFunc params carry their shapes
        threads = len(out.shape) == 2 and _worth_parallel(out)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        return _vectorize_rows(sch, blocks, threads)


def _vectorize_rows(sch, blocks, threads: bool):
    """The elementwise schedule: the innermost loop in 16-lane vectors, the rest fused and (when
    ``threads``) in parallel."""
    for blk in blocks:
        loops = sch.get_loops(blk)
        outer, inner = sch.split(loops[-1], [None, 16])
        sch.vectorize(inner)
        if threads:
            sch.parallel(sch.fuse(*loops[:-1], outer) if len(loops) > 1 else outer)
    return sch


class InjectiveRule(_BASE):
    """Spatial kernels that are not ours (Relax ops legalized by TVM: concat, reshape): the
    elementwise schedule, 16-lane vectors, outer loops in parallel where that pays."""

    def apply(self, func, target, tunable):
        if target.kind.name != "llvm" or (func.attrs is not None and OP_KIND in func.attrs):
            return None
        sch = compiler().Schedule(func)
        try:
            blocks = sch.get_child_blocks(sch.get_sblock("root"))
        except Exception:  # noqa: BLE001  no root block: an extern call (top-k's packed sort)
            return None
        out = func.params[-1]  # PrimFunc params carry their shapes
        if len(getattr(out, "shape", ())) != 2 or not all(
                iv.iter_type == 0 for b in blocks for iv in sch.get(b).iter_vars):
            return None
        threads = _worth_parallel(out)
        return _vectorize_rows(sch, blocks, threads)


class AsWrittenRule(_BASE):
    """The last CPU rule: a kernel no other rule covers (TVM's top-k for the draft) keeps the
    loops TVM wrote, and is recorded as such so that a test can list what runs unscheduled."""

    def apply(self, func, target, tunable):
        if target.kind.name != "llvm":
            return None
        return compiler().Schedule(func)


def cpu_rules():
    """The ordered generic CPU rule list (first applicable rule wins); the ISA rules go first
    (:func:`hetcomp.schedules.llvm.llvm_rules`)."""
    return [QuantLinearRule(), LinearRule(), AttentionRule(), MergeRule(), SparseTreeAttentionRule(), ArgmaxRule(),
            RowwiseRule(), ElementwiseRule(), InjectiveRule(), AsWrittenRule()]
