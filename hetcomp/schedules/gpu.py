"""GPU schedule rules for our multi-stage kernels that dlight's rules do not cover.

Tree attention parts are a chain of reductions over a dynamic key range; each stage becomes
its own kernel launch with one thread per output element (reductions run serially in the
thread). Simple and correct; tuned GPU attention is future work (dense decode attention is
memory-bound on the KV cache, which this reads once per query row).
"""

from __future__ import annotations

from .._tvm import compiler
from ..hardware import base_cuda_arch
from ..kernels import ops, quant
from ..kernels.ops import OP_KIND, is_fused_linear
from ..kernels.script_ops import for_gpu
from ..kernels.sparse_attention import SPARSE_KIND
from .wmma import intrinsics as wmma_intrinsics

_BASE = compiler().ScheduleRule
_KINDS = ("attention_merge", "attention", "rms_norm", "elementwise", "embed")
_GPU_KINDS = ("cuda", "rocm", "vulkan", "metal", "opencl")


def _gpu_kind(func, target) -> str | None:
    """The kernel's op kind when it is ours and ``target`` is a GPU, else None."""
    attrs = func.attrs
    if target.kind.name not in _GPU_KINDS or attrs is None or OP_KIND not in attrs:
        return None
    return str(attrs[OP_KIND])


class PerStageThreadRule(_BASE):
    """Each block: fuse its spatial loops, bind them to (blockIdx.x, threadIdx.x)."""

    def __init__(self, threads: int = 128):
        self.threads = threads

    def apply(self, func, target, tunable):
        if _gpu_kind(func, target) not in _KINDS:
            return None
        c = compiler()
        sch = c.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        read = [r.source for b in blocks for r in sch.get(b).reads]
        # Step 1. Every block becomes its own launch, threads over its spatial iterations.
        for blk in blocks:
            # Step 2. A by-product no other stage reads (argmax's running maximum) lives in
            # registers: CUDA kernels cannot allocate global memory.
            for i, region in enumerate(sch.get(blk).writes):
                buf = region.source  # a Buffer is a typed Var in 0.27
                if (str(buf.scope()) == "global"
                        and not any(buf.same_as(v) for v in [*func.params, *read])):
                    sch.set_scope(blk, i, "local")
            loops = sch.get_loops(blk)
            iters = sch.get(blk).iter_vars
            spatial = [lp for lp, iv in zip(loops, iters) if iv.iter_type == 0]
            if len(spatial) != len([iv for iv in iters if iv.iter_type == 0]):
                return None
            fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
            bx, tx = sch.split(fused, [None, self.threads])
            sch.bind(bx, "blockIdx.x")
            sch.bind(tx, "threadIdx.x")
        return sch


class SparseTreeAttentionRule(_BASE):
    """The sparse tree-attention kernel: one thread per (tree node, KV head) row walking its
    CSR ancestors, the online-softmax state (accumulator row, max, denominator) in the
    thread's registers. A row has depth + 1 keys, so a thread's work is small and even."""

    def __init__(self, threads: int = 64):
        self.threads = threads

    def apply(self, func, target, tunable):
        if _gpu_kind(func, target) != SPARSE_KIND:
            return None
        sch = compiler().Schedule(func)
        # Step 1. The row state (allocated by the row block) lives in registers.
        state = {str(b.name) for b in sch.get(sch.get_sblock("row")).alloc_buffers}
        for name in ("acc_init", "key"):
            blk = sch.get_sblock(name)
            for i, region in enumerate(sch.get(blk).writes):
                if str(region.source.name) in state:
                    state.discard(str(region.source.name))
                    sch.set_scope(blk, i, "local")
        # Step 2. Rows over (blockIdx.x, threadIdx.x).
        bx, tx = sch.split(sch.fuse(*sch.get_loops(sch.get_sblock("row"))),
                           [None, self.threads])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        return sch


def _write_back_in_registers(sch, func, mm, anchor) -> None:
    """A linear's accumulators in registers, written back by the thread at ``anchor`` (the
    residual add done there)."""
    if bool(int(func.attrs.get("hetcomp.residual", 0))):
        sch.reverse_compute_at(sch.get_sblock("add_residual"), anchor)
        sch.set_scope(mm, 0, "local")
    else:
        sch.reverse_compute_at(sch.cache_write(mm, 0, "local"), anchor)


class LinearColumnRule(_BASE):
    """Decode-width linear layers ``y[w, n] = x[w, k] @ W`` (W packed ``[n / B, k, B]``).

    One thread per output column: it streams its column of W once, coalesced across the warp
    (32 neighbouring columns are contiguous in a pack block), against the ``w`` rows of x,
    keeping ``w`` accumulators in registers (static widths up to 64; a symbolic width, as in
    prefill, loops over the rows instead). The residual add happens in the same thread.
    Small, memory-bound and compact: dlight's Matmul rule unrolls ~100 KB of CUDA per kernel,
    which makes loading a library (nvcc at load time) take minutes.
    """

    def __init__(self, threads: int = 64, max_rows: int = 64):
        self.threads, self.max_rows = threads, max_rows

    def apply(self, func, target, tunable):
        if _gpu_kind(func, target) != "linear" or "hetcomp.qtype" in func.attrs:
            return None
        c = compiler()
        sch, mm = _float_blocks(func)
        i, j, k = (sch.get_loops(mm)[n] for n in (0, -2, -1))
        extent = sch.get(i).extent
        static = isinstance(extent, c.tir.IntImm) and int(extent) <= self.max_rows
        if is_fused_linear(func):
            _fused_columns(sch, func, self.threads, static)
            return sch
        # Step 1. Columns over (blockIdx.x, threadIdx.x); per thread the rows inside the
        # reduction (static) or around it (symbolic).
        jb, jt = sch.split(j, [None, self.threads])
        if static:
            sch.reorder(jb, jt, k, i)
        else:
            sch.reorder(jb, jt, i, k)
        sch.bind(jb, "blockIdx.x")
        sch.bind(jt, "threadIdx.x")
        # Step 2. Accumulators in registers, written back (with the residual) by the thread.
        _write_back_in_registers(sch, func, mm, jt if static else i)
        # Step 3. Zero the accumulators before the reduction; unroll the rows.
        sch.decompose_reduction(mm, k)
        if static:
            sch.unroll(sch.get_loops(mm)[-1])
        return sch


def _fused_columns(sch, func, threads: int, static: bool) -> None:
    """:class:`LinearColumnRule` for a fused linear: a thread per output column (and a gated
    kernel's gate and up columns), anchored at the epilogue (:func:`_fused_split_k` says
    why); a fused norm's sum of squares is a serial loop in the thread."""
    epi, mm = sch.get_sblock("epilogue"), sch.get_sblock("matmul")
    # Step 1. The epilogue's columns over (blockIdx.x, threadIdx.x), its rows in the thread.
    i, j = sch.get_loops(epi)
    jb, jt = sch.split(j, [None, threads])
    sch.reorder(jb, jt, i)
    sch.bind(jb, "blockIdx.x")
    sch.bind(jt, "threadIdx.x")
    # Step 2. The thread's accumulators (every row inside the reduction for a static width;
    # a row at a time around it for a symbolic one) and the squares, in registers.
    anchor = jt if static else i
    sch.compute_at(mm, anchor, preserve_unit_loops=True)
    if "hetcomp.norm_eps" in func.attrs:
        ss = sch.get_sblock("sumsq")
        sch.compute_at(ss, anchor, preserve_unit_loops=True)
        sch.set_scope(ss, 0, "local")
    sch.set_scope(mm, 0, "local")
    loops = sch.get_loops(mm)[3 if static else 4:]  # (rows,) (halves,) column, k
    if static:
        sch.reorder(loops[-1], *loops[:-1])
    # Step 3. Zero the accumulators before the reduction; unroll the rows and halves.
    init = sch.decompose_reduction(mm, sch.get_loops(mm)[3 if static else 4])
    if static:
        for loop in sch.get_loops(mm)[4:] + sch.get_loops(init)[3:]:
            sch.unroll(loop)


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two that divides ``n`` and is at most ``cap`` (at least 1)."""
    d = 1
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


def _static_rows(c, loop, max_rows: int) -> int | None:
    """A loop's extent when it is a static row count up to ``max_rows``, else None."""
    extent = loop.extent
    if isinstance(extent, c.tir.IntImm) and int(extent) <= max_rows:
        return int(extent)
    return None


def _split_k_threads(threads: int, rows: int, partial_bytes: int) -> int:
    """Threads of a split-K block: ``threads``, fewer (a power of two) where the ``rows``
    float32 partials of each thread would exceed ``partial_bytes`` of shared memory."""
    return min(threads, _pow2_divisor(1 << 20, partial_bytes // (4 * rows)))


def _unroll_by_nvcc(sch, loops) -> None:
    """Unrolled by nvcc (``#pragma unroll``), not in the source: the source stays a few KB
    (nvcc compiles it when the library loads) and the rows' accumulators still become
    registers."""
    for loop in loops:
        sch.unroll(loop)
        sch.annotate(loop, "pragma_unroll_explicit", 0)


def _slice_partials(sch, mm, cols: int, kt, outer, i):
    """Split-K, part 1: columns over (blockIdx.x, threadIdx.x) in groups of ``cols``, the
    reduction's slice loop ``kt`` over threadIdx.y; a thread's partial sums of its slice (one
    per row; ``outer``: the reduction loops it walks, rows ``i`` innermost) in registers
    (``rfactor`` over the slice), stored to a shared ``[slice, row, column]`` buffer.
    Returns the rfactor block (loops: block, column, slice, *outer, rows) and the store."""
    jb, jt = sch.split(sch.get_loops(mm)[1], [None, cols])
    sch.reorder(jb, jt, kt, *outer, i)
    rf = sch.rfactor(kt, 0)
    jb, jt, kt = sch.get_loops(rf)[:3]
    sch.bind(jb, "blockIdx.x")
    sch.bind(jt, "threadIdx.x")
    sch.bind(kt, "threadIdx.y")
    sch.set_scope(rf, 0, "shared")
    partial = sch.cache_write(rf, 0, "local")
    sch.reverse_compute_at(partial, kt, preserve_unit_loops=True)
    return rf, partial


def _sum_slices(sch, func, mm, rf, slices: int) -> list:
    """Split-K, part 2: after one barrier (TVM inserts it for the shared buffer) each thread
    sums the slices of one (row, column) output, rows over threadIdx.y, in a register, and
    writes it back (with the residual add). Returns the loops nvcc should unroll (the zeroing
    and the sum over slices)."""
    # The write-back block's loops come as its iter vars: slice, row, column.
    sch.reverse_compute_at(mm, sch.get_loops(rf)[0], preserve_unit_loops=True)
    rk, ri, rj = sch.get_loops(mm)[1:]
    rio, rit = sch.split(ri, [None, slices])
    sch.reorder(rj, rit, rio, rk)
    sch.bind(rj, "threadIdx.x")
    sch.bind(rit, "threadIdx.y")
    _write_back_in_registers(sch, func, mm, rio)
    init = sch.decompose_reduction(mm, rk)
    return [sch.get_loops(init)[-1], sch.get_loops(mm)[-1]]


def _fused_split_k(sch, func, cols: int, slices: int, quant: tuple | None = None) -> list:
    """Split-K for a fused linear (:func:`~hetcomp.kernels.ops.linear`'s ``norm_eps``,
    ``activation`` and ``bias`` forms, and :func:`~hetcomp.kernels.quant.linear_quant`'s:
    ``quant = (block names, factored)``): :class:`SplitKLinearRule`'s blocks and threads
    (:class:`QuantSplitKLinearRule`'s, slices of k blocks), with the epilogue as the anchor.
    Returns the loops nvcc should unroll.

    The epilogue reads two producers (the matmul and the norm's sum of squares), and TIR
    moves a block under a loop only with all its producers already there: so the epilogue's
    columns are the grid and everything else is computed at that block loop. In a block:

    1. the sum of squares split as the matmul is: thread ``(x, y)`` sums the squares of rows
       ``x, x + C, ...`` over slice ``y`` of K into a shared ``[slice, row]`` buffer (an
       rfactor: no reduction across threads);
    2. the matmul's partials, as :func:`_slice_partials` (a gated kernel's thread holds the
       gate and the up column of its output column); a quantized kernel decodes a k block's
       scale (and min) once per half, and sums the block on the raw quants (factored) or
       dequantizes its 32 weights against the rows (a loop);
    3. after the one barrier, each thread sums the slices of its (row, column) outputs into
       registers, and
    4. the same thread (same rows, same column) sums its row's ``T`` squares partials and
       writes the epilogue: the norm's scale, the gate's activation times up, the bias.
    """
    epi, mm = sch.get_sblock("epilogue"), sch.get_sblock("matmul")
    norm = "hetcomp.norm_eps" in func.attrs
    names, factored = quant if quant is not None else ((), False)
    # Step 1. Both reductions split over K slices (rfactor), still at the root; a quantized
    # kernel's over slices of k blocks (its dequantizing form: a block's 32 weights inside).
    blocks = []
    if norm:
        ss = sch.get_sblock("sumsq")
        ss_rf = sch.rfactor(sch.split(sch.get_loops(ss)[-1], [None, slices])[1], 0)
        blocks = [ss, ss_rf]
    k = sch.get_loops(mm)[-1]
    if quant is not None and not factored:
        k = sch.split(k, [None, 32])[0]
    rf = sch.rfactor(sch.split(k, [None, slices])[1], 0)
    # Step 2. The epilogue's columns over blockIdx.x; the rest computed in each block (the
    # squares first: then one barrier serves both reductions' partials).
    i, j = sch.get_loops(epi)
    jb, jc = sch.split(j, [None, cols])
    sch.reorder(jb, jc, i)
    sch.bind(jb, "blockIdx.x")
    for blk in [*blocks, mm, rf]:
        sch.compute_at(blk, jb, preserve_unit_loops=True)
    if norm:
        st, si, sro = sch.get_loops(ss_rf)[1:]
        sio, sic = sch.split(si, [None, cols])
        sch.reorder(st, sic, sio, sro)
        sch.bind(st, "threadIdx.y")
        sch.bind(sic, "threadIdx.x")
        sch.set_scope(ss_rf, 0, "shared")
        # Accumulated in a register, stored once (a shared read-modify-write under the rows'
        # predicate is where TVM cannot place its barrier).
        sch.reverse_compute_at(sch.cache_write(ss_rf, 0, "local"), sio, preserve_unit_loops=True)
    # Step 3. The matmul's partials: columns over threadIdx.x, K slices over threadIdx.y, a
    # thread's rows (and halves) in registers, stored to shared memory. A quantized kernel
    # walks halves outside rows, so a half's k-block stages sit inside its loop.
    t, ri, *rest = sch.get_loops(rf)[1:]
    rkt = rest[-1:] if quant is not None and not factored else []  # a block's 32 weights
    *rh, rj, rko = rest[:len(rest) - len(rkt)]
    if quant is None:
        sch.reorder(rj, t, rko, ri, *rh)
    else:
        sch.reorder(rj, t, rko, *rh, *rkt, ri)
    sch.bind(rj, "threadIdx.x")
    sch.bind(t, "threadIdx.y")
    sch.set_scope(rf, 0, "shared")
    partial = sch.cache_write(rf, 0, "local")
    sch.reverse_compute_at(partial, t, preserve_unit_loops=True)
    # A quantized kernel's k-block stages, in registers: the raw-quant block sums
    # (factored) and the column's scale and min per half, x's block sums per k block.
    staged = []
    for name in ("inner", "xsum", "min", "scale"):  # consumers first
        if name in names:
            blk = sch.get_sblock(name)
            sch.compute_at(blk, rh[0] if rh and name != "xsum" else rko)
            sch.set_scope(blk, 0, "local")
            staged.append(blk)
    # Step 4. After the barrier each thread sums the slices of its outputs (rows over
    # threadIdx.y) into registers, and writes the epilogue for the same outputs.
    wt, wi, *wh, wj = sch.get_loops(mm)[1:]
    wio, wit = sch.split(wi, [None, slices])
    sch.reorder(wj, wit, wio, *wh, wt)
    sch.bind(wj, "threadIdx.x")
    sch.bind(wit, "threadIdx.y")
    sch.set_scope(mm, 0, "local")
    ec, ei = sch.get_loops(epi)[1:]
    eio, eit = sch.split(ei, [None, slices])
    sch.reorder(ec, eit, eio)
    sch.bind(ec, "threadIdx.x")
    sch.bind(eit, "threadIdx.y")
    if norm:
        sch.compute_at(ss, eio, preserve_unit_loops=True)
        sch.set_scope(ss, 0, "local")
    # Step 5. Zero the accumulators before their reductions.
    rf_init = sch.decompose_reduction(rf, sch.get_loops(rf)[3])
    mm_init = sch.decompose_reduction(mm, wt)
    # nvcc unrolls a thread's rows and halves (their accumulators are then registers) and a
    # factored block's 32 raw quants; a dequantizing block's 32 weights stay a loop
    # (QuantLinearRule says why).
    unroll = [*sch.get_loops(rf_init)[3:], *(sch.get_loops(rf)[4:] if quant is None else
                                            [*sch.get_loops(rf)[4:4 + len(rh)],
                                             sch.get_loops(rf)[-1]]),
              *sch.get_loops(partial)[3:], wio, *wh, sch.get_loops(mm_init)[-1], eio]
    for blk in staged:  # the block sums' own loops: (rows,) the block's 32 quants
        name = sch.get(blk).name_hint
        if name in ("inner", "xsum"):
            own = sch.get_loops(blk)[4 + (len(rh) if name == "inner" else 0):]
            sch.decompose_reduction(blk, own[-1])
            unroll += own
    return unroll


class SplitKLinearRule(_BASE):
    """Decode-width float linear layers, split over K inside a thread block (static widths).

    :class:`LinearColumnRule` gives one thread a whole column: SmolLM2's 576x576 layer is 9
    blocks of 64 threads on a 132-SM H200, each thread a 576-long dependent FMA chain. Here a
    thread block takes ``C`` columns (``threadIdx.x``) by ``T`` slices of K (``threadIdx.y``):

    - ``C`` columns are one 32-byte DRAM sector of a pack panel's row (8 float32 or 16
      float16), not the panel's 32: a warp's lanes read ``32 / C`` neighbouring rows of W,
      each a full sector, so loads stay coalesced while the grid has ``n / C`` blocks (72
      for 576 columns in float32, not 18);
    - slice ``t`` of K is the rows ``k = t, t + T, ...``, so at each step the block streams
      ``T`` consecutive rows of the panel, and a thread keeps its ``W`` row accumulators in
      registers (``rfactor`` over the slice);
    - the ``T x W x C`` partial sums meet in shared memory after one barrier, and the block's
      threads then each sum ``T`` partials of one (row, column) output (rows over
      ``threadIdx.y``) and write it back with the residual add. TVM's cross-thread reduction
      (the reduction loop bound to ``threadIdx.y``; what dlight does) lowers each of the
      ``W`` rows to its own shared-memory tree with ``log2 T + 2`` barriers, because only a
      reduction over ``threadIdx.x`` becomes warp shuffles: 448 barriers at W = 64.

    Threads: ``T x C`` up to 256, fewer where the partials would exceed 32 KB of shared
    memory (W = 64: 128 threads). Symbolic widths (prefill) are left to
    :class:`LinearColumnRule`. dlight's GEMV and LowBatchGEMV do not apply to the packed
    layout: their normalisation accepts a split only on the reduction axis, and our weight
    index splits the column (``wp[j // B, k, j % B]``); from W = 2 on dlight sees a GEMM
    (``Matmul``). Measurements: ``benchmarks/gemv.md``.
    """

    def __init__(self, threads: int = 256, max_rows: int = 64, partial_bytes: int = 32 << 10,
                 sector_bytes: int = 32):
        self.threads, self.max_rows = threads, max_rows
        self.partial_bytes, self.sector_bytes = partial_bytes, sector_bytes

    def shape(self, rows: int, n: int, k: int, wdtype: str) -> tuple[int, int] | None:
        """``(C, T)``: columns and K slices of a thread block, or None when it would not pay
        (fewer than 4 columns or 2 slices)."""
        bits = int(compiler().DataType(wdtype).bits)
        cols = _pow2_divisor(n, self.sector_bytes * 8 // bits)
        threads = _split_k_threads(self.threads, rows, self.partial_bytes)
        slices = _pow2_divisor(k, threads // cols)
        return (cols, slices) if cols >= 4 and slices >= 2 else None

    def apply(self, func, target, tunable):
        if _gpu_kind(func, target) != "linear" or "hetcomp.qtype" in func.attrs:
            return None
        c = compiler()
        sch, mm = _float_blocks(func)
        i, j, k = (sch.get_loops(mm)[n] for n in (0, -2, -1))
        halves = sch.get_loops(mm)[1:-2]  # a gated kernel's [gate, up]
        rows = _static_rows(c, sch.get(i), self.max_rows)
        if rows is None:
            return None
        wdtype = _weight_dtype(func)
        # A gated kernel's thread holds both halves of its columns: twice the partials.
        shape = self.shape(rows * (1 + len(halves)), int(sch.get(j).extent),
                           int(sch.get(k).extent), wdtype)
        if shape is None:
            return None
        cols, slices = shape
        if is_fused_linear(func):
            _unroll_by_nvcc(sch, _fused_split_k(sch, func, cols, slices))
            return sch
        # Step 1. Columns over (blockIdx.x, threadIdx.x), K slices over threadIdx.y; a
        # thread's partial sums of its slice, one per row, in registers (rfactor).
        ko, kt = sch.split(k, [None, slices])
        rf, partial = _slice_partials(sch, mm, cols, kt, [ko], i)
        # Step 2. The partials meet in shared memory; each thread sums the slices of one
        # (row, column) output and writes it back (with the residual).
        unroll = _sum_slices(sch, func, mm, rf, slices)
        # Step 3. Zero the accumulators before the slice's reduction; nvcc unrolls the rows
        # (so the accumulators are registers) and the sum over slices.
        unroll += [sch.get_loops(sch.decompose_reduction(rf, sch.get_loops(rf)[3]))[-1],
                   sch.get_loops(rf)[-1], sch.get_loops(partial)[-1]]
        _unroll_by_nvcc(sch, unroll)
        return sch


def _weight_dtype(func) -> str:
    """A linear kernel's weight element type: ``wp``, after x (and a fused norm's gamma; a
    Buffer is a typed Var in 0.27)."""
    return str(func.params[2 if "hetcomp.norm_eps" in func.attrs else 1].dtype)


def _linear_form(attrs) -> dict:
    """The form arguments of the linear kernel with ``attrs`` (``residual``, ``norm_eps``,
    ``activation``, ``bias``), for :func:`~hetcomp.kernels.ops.linear` and
    :func:`~hetcomp.kernels.quant.linear_quant`."""
    return {"residual": bool(int(attrs.get("hetcomp.residual", 0))),
            "norm_eps": (float(attrs["hetcomp.norm_eps"]) if "hetcomp.norm_eps" in attrs
                         else None),
            "activation": (str(attrs["hetcomp.activation"]) if "hetcomp.activation" in attrs
                           else None),
            "bias": "hetcomp.bias" in attrs}


def _sm(target) -> int:
    """The CUDA target's compute capability as a number (``sm_90`` and ``sm_90a`` -> 90; 0 if
    unknown): an architecture-specific or family name has its base's features."""
    arch = base_cuda_arch(str(target.attrs.get("arch", "")) if "arch" in target.attrs else "")
    return int(arch[3:]) if arch.startswith("sm_") and arch[3:].isdigit() else 0


class TensorCoreLinearRule(_BASE):
    """Float16 linears at static widths of 16 to 64 rows (the GPU's wide verify steps) on
    tensor cores: WMMA 16x16x16, float16 in, float32 accumulators (sm_70 and later).

    On CUDA cores a width-W step does W multiply-adds per weight and as many loads of x, so
    :class:`SplitKLinearRule`'s W = 64 step issues ~60x the instructions of W = 1; a tensor
    core does a warp's 16x16x16 tile in one instruction and leaves the step bound by reading
    W, as W = 1 is. The rule schedules :func:`~hetcomp.kernels.ops.linear`'s ``split_x``
    form of the kernel (same arguments, same result): each row of x over its largest
    magnitude (a warp-shuffle reduction per row, first) as float16 hi and lo terms (x alone
    in float16 would move the logits by ~2e-4 of their scale), two products per tile, the
    sums scaled back.

    A thread block takes ``16 J`` output columns (of each half, for a gated kernel) and ``T``
    warps (``threadIdx.y``), each a contiguous slice of K, ``S`` 16-row k steps. A warp
    walks its slice ``D`` steps at a time:

    1. it loads W's ``16 x 16`` tiles of the next ``D`` steps (``J`` per half and step) as
       WMMA fragments straight from the packed layout (a pack block's row is 16 contiguous
       float16 values: stride ``B``), all issued before any is used (with ``D = S``, first
       thing in the kernel, ahead of the rows' reductions);
    2. ``D_x`` steps at a time (``D_x`` divides ``D``) it writes its ``16 D_x`` columns of
       x (times gamma) as hi and lo rows to shared memory (its lanes over the values, a
       row's columns contiguous), one barrier, then
    3. multiplies, per step, the ``2W / 16`` x fragments into its ``J W / 16``
       accumulators.

    A step's W tile is a DRAM round trip (several hundred ns) and a barrier pair stands
    between steps that stage x: one step at a time (``D = D_x = 1``) the warp waits for DRAM
    ``S`` times (9 for SmolLM2's K = 576 over 4 warps), with ``D`` steps in flight ``S / D``.
    ``D`` is the largest divisor of ``S`` whose fragments stay within ``fragment_regs``
    registers a thread beside the accumulators; ``D_x`` the largest divisor of ``D`` whose
    x terms fit beside the partials in shared memory (SmolLM2 at W = 16: ``D = D_x = S``
    for qkv, o and gate_up, one wait; at W = 64 qkv, o and down load all ``S`` steps
    ahead and stage x a step at a time). ``prefetch=False``: ``D = D_x = 1`` (the device
    kit times both).

    The warps' accumulators meet in shared memory; then each thread sums the ``T`` partials
    of its outputs in registers and writes them with the residual add or the fused
    epilogue (a fused norm's sums of squares: a warp-shuffle reduction per row, in the
    same pass over x as the rows' largest magnitudes, a few rows at a time).
    Every block stages all of x, so a wide layer takes ``J = 4`` column tiles a block where
    that still leaves ``min_blocks`` blocks (SmolLM2's LM head: 768), else ``J = 1``. ``T``
    is the largest of 8, 4, 2, 1 that divides K into 16-row steps and keeps the x terms and
    the partials within 48 KB of shared memory. ``tiles`` fixes ``J`` instead (the rule then
    takes only layers whose columns it divides): the device kit times ``J`` = 2 and 4 on
    every layer, since where ``J`` pays (x read once per 16 J columns against a grid of
    fewer blocks) is a measurement, not a rule of thumb.

    ``fewest_rounds=True`` picks ``T`` for the fewest staging rounds (``S / D_x``, a barrier
    pair and an L2 round trip for x each) instead of the most warps: SmolLM2 at W = 64
    stages x in 9 rounds with T = 4 warps, in 6 with 2, in 4 with 1. Fewer warps leave a
    block fewer products in flight; which costs more is a measurement (the device kit's
    ``tensorcore_rounds``), so the default stays the most warps.

    ``tensorize=False`` leaves the WMMA stages as plain blocks (the same loops and buffers),
    which the CPU can run (:func:`hetcomp.testing.gpu.emulated_module`). The rule reads only
    the kernel's attributes and arguments, so it also applies to a kernel it scheduled.
    """

    def __init__(self, tensorize: bool = True, max_rows: int = 64, max_slices: int = 8,
                 shared_bytes: int = 48 << 10, min_blocks: int = 256, tiles: int | None = None,
                 prefetch: bool = True, fragment_regs: int = 128, fewest_rounds: bool = False):
        self.tensorize, self.max_rows = tensorize, max_rows
        self.max_slices, self.shared_bytes = max_slices, shared_bytes
        self.min_blocks, self.tiles = min_blocks, tiles
        self.prefetch, self.fragment_regs = prefetch, fragment_regs
        self.fewest_rounds = fewest_rounds

    def column_tiles(self, cols: int, rows: int = 16, halves: int = 1) -> int | None:
        """``J``: 16-column tiles a block (of each half's ``cols`` columns), at most as many
        as leave the ``rows x 16 J`` accumulators (each half's) within ``fragment_regs``
        registers a thread (8 a 16x16 tile); None where a fixed ``tiles`` does not divide
        the columns or its accumulators would not fit."""
        def fits(j):
            return 8 * j * halves * rows // 16 <= self.fragment_regs

        if self.tiles is not None:
            return self.tiles if cols % (16 * self.tiles) == 0 and fits(self.tiles) else None
        return 4 if cols % 64 == 0 and cols // 64 >= self.min_blocks and fits(4) else 1

    def slices(self, rows: int, halves: int, k: int, tiles: int = 1) -> int | None:
        """Warps (K slices) of a block, or None when K is not a multiple of 16: the most
        that fit, or with ``fewest_rounds`` the fewest staging rounds (ties: more warps)."""
        fits = [t for t in (8, 4, 2, 1) if t <= self.max_slices and k % (16 * t) == 0
                # x's hi and lo terms (float16) and the partials (float32) per warp, and a
                # fused norm's sums of squares
                and self._shared(rows, halves * tiles, t, 1) <= self.shared_bytes]
        if not fits or not self.fewest_rounds:
            return fits[0] if fits else None
        return min(fits, key=lambda t: (self.staging_rounds(rows, halves, k, tiles, t), -t))

    def staging_rounds(self, rows: int, halves: int, k: int, tiles: int, slices: int) -> int:
        """Barrier pairs a warp stages x in: its ``S`` k steps, ``D_x`` a round."""
        return k // (16 * slices) // self.depths(rows, halves, k, tiles, slices)[1]

    def depths(self, rows: int, halves: int, k: int, tiles: int, slices: int
               ) -> tuple[int, int]:
        """``(D, D_x)``: k steps whose W tiles a warp loads at once, and whose x terms it
        stages at once (see the class doc)."""
        if not self.prefetch:
            return 1, 1
        steps, frags = k // (16 * slices), tiles * halves
        # A thread holds 8 registers of each 16x16 float32 accumulator, 4 of each float16
        # fragment of W (a W staged in shared memory: as many of its decoded weights, 8 a
        # lane and fragment, each a hi and lo term, as nvcc's unrolled decoding keeps live).
        room = (self.fragment_regs - 8 * frags * rows // 16) // (4 * frags)
        depth = max(d for d in range(1, steps + 1) if steps % d == 0 and d <= max(1, room)
                    and (not self.w_shared
                         or self._shared(rows, frags, slices, d) <= self.shared_bytes))
        x_depth = max(d for d in range(1, depth + 1) if depth % d == 0 and (
            self._shared(rows, frags, slices, d) <= self.shared_bytes))
        return depth, x_depth

    #: Whether W's terms are staged in shared memory (a quantized W, dequantized there).
    w_shared = False

    def _shared(self, rows: int, frags: int, slices: int, steps: int) -> int:
        """Shared-memory bytes of a block staging ``steps`` k steps a round: x's terms
        (float16 hi and lo) and the partials (float32) per warp, a fused norm's sums of
        squares, and where W is staged there, its terms (1 KB a 16 x 16 fragment)."""
        w = 1024 * slices * steps * frags if self.w_shared else 0
        return 64 * slices * rows * (steps + frags) + 4 * rows + w

    def takes(self, func) -> bool:
        """Whether ``func``'s weights are this rule's: float16 (not block-quantized)."""
        return "hetcomp.qtype" not in func.attrs and _weight_dtype(func) == "float16"

    def split_form(self, attrs, rows: int):
        """The ``split_x`` form of the kernel with ``attrs``: the same arguments, x (and,
        quantized, W) as float16 hi and lo terms."""
        return ops.linear(int(attrs["hetcomp.n"]), int(attrs["hetcomp.k"]), "float16",
                          rows=rows, split_x=True, **_linear_form(attrs))

    def apply(self, func, target, tunable):
        if (_gpu_kind(func, target) != "linear" or target.kind.name != "cuda"
                or _sm(target) < 70 or not self.takes(func)):
            return None
        c = compiler()
        attrs = func.attrs
        activation = "hetcomp.activation" in attrs
        rows = func.params[0].shape[0]  # x (a Buffer is a typed Var in 0.27)
        if not isinstance(rows, c.tir.IntImm):
            return None
        rows, halves = int(rows), 2 if activation else 1
        n, k, b = (int(attrs[f"hetcomp.{a}"]) for a in ("n", "k", "block"))
        if rows % 16 or not 16 <= rows <= self.max_rows or b % 16 or (n // halves) % b:
            return None
        tiles = self.column_tiles(n // halves, rows, halves)
        slices = None if tiles is None else self.slices(rows, halves, k, tiles)
        if slices is None:
            return None
        split = self.split_form(attrs, rows)
        for key, value in attrs.items():
            split = split.with_attr(key, value)
        sch = c.Schedule(split)
        _tensor_core_linear(sch, slices, tiles, self.tensorize,
                            *self.depths(rows, halves, k, tiles, slices))
        return sch


class QuantTensorCoreLinearRule(TensorCoreLinearRule):
    """Block-quantized linears (q4_0, q4_1, q8_0) at static widths of 16 to 64 rows on
    tensor cores: :class:`TensorCoreLinearRule`'s schedule, its W tiles dequantized on the
    way (:func:`hetcomp.kernels.quant.linear_quant`'s ``split_x`` form).

    On the CUDA cores (:class:`QuantSplitKLinearRule`) a W-row step decodes each weight once
    and does W multiply-adds with it; here a warp decodes each weight of its k steps once,
    ``d q + m`` in float32, as float16 hi and lo terms into shared memory (beside x's, in
    the same staging rounds: ``D = D_x``, the steps whose x and W terms fit in 48 KB and
    whose decoded weights nvcc's unrolled loop keeps in registers beside the accumulators), and
    multiplies the four products of each 16 x 16 x 16 tile on the tensor cores, float32
    accumulators. Both operands keep ~22 bits, so the result is within a few 1e-7 of the
    float32 reference, where float16 weights would round each one by up to 2^-12 of itself.
    A warp's lanes decode its tiles a column and every second k each (a panel row's 16
    columns are 16 consecutive bytes), both terms from one decode.
    """

    w_shared = True

    def takes(self, func) -> bool:
        return "hetcomp.qtype" in func.attrs

    def split_form(self, attrs, rows: int):
        return quant.linear_quant(int(attrs["hetcomp.n"]), int(attrs["hetcomp.k"]),
                                  str(attrs["hetcomp.qtype"]), rows=rows, split_x=True,
                                  **_linear_form(attrs))


def _tensor_core_linear(sch, slices: int, tiles: int, tensorize: bool, depth: int,
                        x_depth: int) -> None:
    """:class:`TensorCoreLinearRule`'s schedule of a ``split_x`` linear, float16 or
    block-quantized (:class:`QuantTensorCoreLinearRule`: W's terms, ``w_split``, are
    dequantized into shared memory with x's, ``depth == x_depth``)."""
    c = compiler()
    names = {str(sch.get(b).name_hint) for b in sch.get_child_blocks(sch.get_sblock("root"))}
    mm = sch.get_sblock("matmul_raw")
    # Step 1. The block that writes the result anchors the rest: the fused epilogue, the
    # residual add, or the sums scaled back by their rows' scales (inlined into the others).
    if "epilogue" in names or "add_residual" in names:
        final = sch.get_sblock("epilogue" if "epilogue" in names else "add_residual")
        sch.compute_inline(sch.get_sblock("matmul"))
    else:
        final = sch.get_sblock("matmul")
    # Step 2. K in 16-row steps, a contiguous slice ``kt`` of them per warp (rfactor: a
    # warp's partial sums stay its own until they meet in shared memory).
    k = sch.get_loops(mm)[-1]
    kt, _, _ = sch.split(k, [slices, None, 16])
    rf = sch.rfactor(kt, 0)
    gated = len(sch.get(rf).writes[0].source.shape) == 4
    quantized = "w_split" in names
    if gated:  # gated: [warp, half, row, column]
        sch.transform_layout(rf, ("write", 0), lambda t, i, h, j: (t, h, i, j))
    # x's terms and W's tiles get buffers indexed by the rf block's own iterators (warp, k
    # step, ...: ``reindex_cache_read``), so a buffer placed at a loop later holds exactly
    # the steps under it: x's for every warp's D_x steps (shared), W's for a warp's D steps
    # (fragments; a quantized W's terms: shared, as x's), and a gated kernel's two halves
    # as an axis.
    reads = [str(r.source.name) for r in sch.get(rf).reads]

    def iters(f):
        """An index map of the rf block's iterators: warp, row, [half], column, x's term,
        [W's term], step, k."""
        def named(t, i, *rest):
            h, (j, s, *u, st, kk) = (rest[:1], rest[1:]) if gated else ((), rest)
            return f(t, i, h, j, s, u, st, kk)
        return c.tir.IndexMap.from_func(named, ndim=6 + gated + quantized)

    def w_tile(t, h, j, u, st, kk):  # W's buffer: (warp, step, [term], [half], tile, k, col)
        return (t, st, *u, *h, j // 16, kk, j % 16)

    xr = sch.reindex_cache_read(rf, reads.index("x_split"), "global", iters(
        lambda t, i, h, j, s, u, st, kk: (t, st, s, i, kk)))
    b = sch.reindex_cache_read(rf, reads.index("w_split" if quantized else "wp"),
                               "global" if quantized else "wmma.matrix_b", iters(
        lambda t, i, h, j, s, u, st, kk: w_tile(t, h, j, u, st, kk)))
    # its iterators in the buffer's order: a 16 x 16 tile's (k, column) innermost (its
    # loops first in its iterators' order, which the reindex does not keep)
    _loops_in_iter_order(sch, b)

    def b_layout(t, *rest):  # b's iterators: warp, [half], column, [term], step, k
        h, (j, *u, st, kk) = (rest[:1], rest[1:]) if gated else ((), rest)
        return w_tile(t, h, j, u, st, kk)

    sch.transform_block_layout(b, c.tir.IndexMap.from_func(b_layout, ndim=4 + gated + quantized))
    # Step 3. The result's column tiles (``tiles`` x 16 columns) are the grid; the block's
    # threads walk its (row, column) outputs, columns fastest (coalesced writes).
    i, j = sch.get_loops(final)
    jb, jc = sch.split(j, [None, 16 * tiles])
    sch.reorder(jb, i, jc)
    sch.bind(jb, "blockIdx.x")
    _, ty, tx = sch.split(sch.fuse(i, jc), [None, slices, 32])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    # Step 4. Each thread sums the warps' partials of its outputs (both halves of a gated
    # kernel's column) in registers, right before it writes them.
    sch.compute_at(mm, tx, preserve_unit_loops=True)
    sch.set_scope(mm, 0, "local")
    sch.compute_at(rf, jb, preserve_unit_loops=True)
    # Step 5. The warps' tiles: loops (warp, D steps, D_x steps, k step, [half], column
    # tile, term, row tile) around a 16x16x16 block, the tensor core's instruction.
    loops = sch.get_loops(rf)[1:]
    wt, ri = loops[:2]
    rh, (rj, rs, *ru, rko, rki) = (loops[2:3], loops[3:]) if gated else ([], loops[2:])
    rio, rii = sch.split(ri, [None, 16])
    rjo, rj = sch.split(rj, [tiles, 16])
    rkd, rkx, rko = sch.split(rko, [None, depth // x_depth, x_depth])
    sch.reorder(wt, rkd, rkx, rko, *rh, rjo, *ru, rs, rio, rii, rj, rki)
    sch.bind(wt, "threadIdx.y")
    tile = sch.blockize(rii)
    tile_reads = [str(r.source.name) for r in sch.get(tile).reads]
    a = sch.cache_read(tile, tile_reads.index(str(sch.get(xr).writes[0].source.name)),
                       "wmma.matrix_a")
    sch.compute_at(a, rio)
    if quantized:
        # W's terms staged in shared memory with x's, their fragments loaded where a
        # product needs them: D = D_x.
        frag = _quant_w_terms(sch, b, tile, tile_reads, ru[0], rkx, gated)
        _unroll_by_nvcc(sch, [rkx, rko, *rh, rjo, *ru, rs, rio])
    else:
        # W's fragments of the next D steps, loaded together. Where they are all of a
        # warp's steps (D = S), their loads go first in the kernel, each warp its own:
        # their DRAM round trip then overlaps the rows' reductions and x's staging, which
        # do not need W.
        whole = int(sch.get(rkd).extent) == 1
        anchor = jb if whole else rkd
        sch.compute_at(b, anchor, preserve_unit_loops=True)
        b_loops = sch.get_loops(b)
        own = [sch.get(loop).same_as(sch.get(anchor)) for loop in b_loops].index(True) + 1
        if whole:
            sch.bind(b_loops[own], "threadIdx.y")  # the warp
            own += 1
        # Fragments are registers only where every loop indexing them is unrolled: W's
        # loads (step, [half], tile), and the products' (D_x steps, step, [half], tile,
        # term, rows).
        _unroll_by_nvcc(sch, [*b_loops[own:-2], rkx, rko, *rh, rjo, rs, rio])
        frag = b
    acc = sch.cache_write(tile, 0, "wmma.accumulator")
    sch.reverse_compute_at(acc, wt)
    sch.set_scope(acc, 0, "shared.dyn")  # the partials (not "shared": see below)
    init = sch.decompose_reduction(tile, rkd)
    # Step 6. x's hi and lo terms for the warps' next D_x steps, computed straight into
    # their buffer, each warp's lanes over its own (row, step, column): a row's columns of
    # consecutive steps are consecutive in x. In static shared memory: TVM's
    # storage rewrite would reuse it for the partials, which then fails to lower (a
    # float32 access pointer into a float16 buffer).
    sch.compute_inline(sch.get_sblock("x_split"))
    sch.compute_at(xr, rkx, preserve_unit_loops=True)  # the warp's own (shared: after)
    sch.set_scope(xr, 0, "shared")
    # A lane's values, 8 at a time unrolled by nvcc (their loads issue together; a loop
    # of one value at a time waited for each), hi and lo from one load.
    xi, xs_, xst, xk = sch.get_loops(xr)[-4:]  # its iterators' order: the rf block's
    sch.reorder(xi, xst, xk, xs_)
    _, values, lane = sch.split(sch.fuse(xi, xst, xk), [None, 8, 32])
    sch.reorder(lane, values, xs_)
    sch.bind(lane, "threadIdx.x")
    _unroll_by_nvcc(sch, [values, xs_])
    # The rows' scales (and a fused norm's sums of squares, in the same pass), first.
    _row_reduction(sch, [sch.get_sblock(b) for b in ("x_max", "sumsq") if b in names], jb,
                   slices)
    if not tensorize:
        return
    wmma = wmma_intrinsics()
    sch.tensorize(sch.get_loops(a)[-2], wmma["load_a"])
    # (step, [half], tile), 16 x 16; a quantized W's from shared memory
    sch.tensorize(sch.get_loops(frag)[-2], wmma["load_b_shared" if quantized else "load_b"])
    sch.tensorize(sch.get_loops(sch.get_child_blocks(init)[0])[-2], wmma["fill"])
    rows, cols = sch.get_loops(acc)[-2:]
    ro, ri_ = sch.split(rows, [None, 16])
    co, ci = sch.split(cols, [None, 16])
    sch.reorder(ro, co, ri_, ci)
    sch.tensorize(ri_, wmma["store"])
    sch.tensorize(sch.get_loops(sch.get_child_blocks(tile)[0])[-3], wmma["mma"])


def _quant_w_terms(sch, terms, tile, tile_reads, term_loop, stage_at, gated: bool):
    """A quantized W's hi and lo terms (the reindexed block ``terms``, ``[warp, step,
    term, [half], tile, k, column]``), dequantized straight into shared memory at
    ``stage_at`` (each warp its own D_x steps, with x's); their WMMA fragments loaded at
    ``term_loop``, where the product loops take each term. Returns the fragments' block."""
    frag = sch.cache_read(tile, tile_reads.index(str(sch.get(terms).writes[0].source.name)),
                          "wmma.matrix_b")
    sch.compute_at(frag, term_loop)
    # Each weight decoded where its terms are written: its block's scale (and q4_1 min)
    # and its quant, d q + m in float32, then hi and lo.
    names = {str(sch.get(b).name_hint) for b in sch.get_child_blocks(sch.get_sblock("root"))}
    for name in ("w_split", "scale", "min"):
        if name in names:
            sch.compute_inline(sch.get_sblock(name))
    sch.compute_at(terms, stage_at, preserve_unit_loops=True)  # the warp's own
    sch.set_scope(terms, 0, "shared")  # after: a shared buffer's region spans the warps
    # A lane's weights, a column (of 16) and every second k: a row of a panel's 16
    # columns is 16 consecutive bytes, so each half warp reads one run of them. Both terms
    # from one decode; nvcc unrolls a lane's weights.
    # its own loops: warp (1), step, term, [half], tile, k, column
    _, step, term, *cols, kk, col = sch.get_loops(terms)[-(6 + gated):]
    sch.reorder(step, *cols, kk, col, term)
    values, lane = sch.split(sch.fuse(step, *cols, kk, col), [None, 32])
    sch.bind(lane, "threadIdx.x")
    _unroll_by_nvcc(sch, [values, term])
    return frag


def _loops_in_iter_order(sch, block) -> None:
    """Reorder a block's loops (one per iterator, each bound to it) as its iterators."""
    loops = sch.get_loops(block)
    realize = sch.get(loops[-1]).body
    by_var = {sch.get(loop).loop_var: loop for loop in loops}
    sch.reorder(*[by_var[v] for v in realize.iter_values])


def _row_reduction(sch, blocks, anchor, slices: int, row_regs: int = 96) -> None:
    """Per-row reductions over K (the rows' largest magnitudes, a fused norm's sums of
    squares) at ``anchor``, in one pass: rows over the warps, a row's K over the lanes (warp
    shuffles), a value a row in shared memory. The blocks share their row loop (``merge``),
    so a row's second reduction reads what its first loaded (nvcc loads it once).

    A warp's rows are independent, but as a loop each waits for its loads (an L2 round trip)
    and its shuffles before the next row's loads issue: 4 round trips a warp at 16 rows, 16
    at 64. So ``U`` rows at a time are unrolled by nvcc, which then issues their loads
    together: the largest power of two dividing the warp's rows whose values (``K / 32`` a
    row and lane) stay within ``row_regs`` registers."""
    for block in blocks:
        sch.compute_at(block, anchor, preserve_unit_loops=True)
    rows = [sch.get_loops(block)[-2] for block in blocks]
    # merge leaves the loop where its last argument was: the first block's (the scales'),
    # ahead of the x staging that reads them, not the sums', ahead of the epilogue.
    rows = rows[0] if len(rows) == 1 else sch.merge(*rows[::-1])
    # a lane's values of a row (the blocks reduce the same K)
    loads = -(-int(sch.get(sch.get_loops(blocks[0])[-1]).extent) // 32)
    for block in blocks:  # each its own lanes: TVM lowers one reduction under a lane loop
        sch.bind(sch.split(sch.get_loops(block)[-1], [None, 32])[1], "threadIdx.x")
    per_warp, warp = sch.split(rows, [None, slices])
    sch.bind(warp, "threadIdx.y")
    count = int(sch.get(per_warp).extent)
    unroll = max(u for u in (1, 2, 4, 8, 16)
                 if u == 1 or count % u == 0 and u * loads <= row_regs)
    if unroll > 1:
        _unroll_by_nvcc(sch, [sch.split(per_warp, [None, unroll])[1]])
    for block in blocks:
        sch.set_scope(block, 0, "shared")


def _float_blocks(func):
    """A float linear's schedule and its ``matmul`` block."""
    sch = compiler().Schedule(func)
    return sch, sch.get_sblock("matmul")


def _quant_blocks(func):
    """A quantized linear's schedule, its block names, whether it is the factored kernel
    (raw-quant block sums, ``inner``) and its ``matmul`` block."""
    sch = compiler().Schedule(func)
    names = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    return sch, names, "inner" in names, sch.get_sblock("matmul")


class QuantLinearRule(_BASE):
    """Block-quantized linear layers (:mod:`hetcomp.kernels.quant`, weights packed
    ``[n / B, k / 32, bytes, B]``): :class:`LinearColumnRule`'s one thread per output column,
    dequantizing in registers with fp32 accumulation.

    A thread walks its column's blocks: it decodes the block's float16 scale (and q4_1 min)
    once into a register, then the block's 32 weights (unrolled, so nibble selects are
    constants) against its ``w`` rows of x. The warp's 32 threads are one panel's 32 columns,
    so every block byte they load is one contiguous 32-byte segment (coalesced). Narrow
    static widths (the factored kernel) sum a block on the raw quants in ``w`` registers and
    scale once per block; the block sums of x (``xsum``) are recomputed by each thread, 32
    adds a block against its 32 FMAs. A symbolic width (prefill) loops over rows outside.
    """

    def __init__(self, threads: int = 64, max_rows: int = 64):
        self.threads, self.max_rows = threads, max_rows

    def apply(self, func, target, tunable):
        # Fused forms exist at static widths only (FuseLinearChains), where
        # QuantSplitKLinearRule schedules them.
        if (_gpu_kind(func, target) != "linear" or "hetcomp.qtype" not in func.attrs
                or is_fused_linear(func)):
            return None
        c = compiler()
        sch, names, factored, mm = _quant_blocks(func)
        i, j, k = sch.get_loops(mm)
        extent = sch.get(i).extent
        static = isinstance(extent, c.tir.IntImm) and int(extent) <= self.max_rows
        # Step 1. Columns over (blockIdx.x, threadIdx.x); per thread the k blocks, then (the
        # dequantizing kernel) a block's 32 weights, then the rows (static: inside, so each
        # decoded weight feeds every row; symbolic: outside).
        jb, jt = sch.split(j, [None, self.threads])
        kb, kt = (k, None) if factored else sch.split(k, [None, 32])
        inner_loops = [kb] if kt is None else [kb, kt]
        if static:
            sch.reorder(jb, jt, *inner_loops, i)
        else:
            sch.reorder(jb, jt, i, *inner_loops)
        sch.bind(jb, "blockIdx.x")
        sch.bind(jt, "threadIdx.x")
        # Step 2. Accumulators in registers, written back (with the residual) by the thread.
        _write_back_in_registers(sch, func, mm, jt if static else i)
        # Step 3. Per k block, in registers: the raw-quant block sums (factored), x's block
        # sums, the column's scale and min.
        for name in ("inner", "xsum", "min", "scale"):  # consumers first
            if name in names:
                blk = sch.get_sblock(name)
                sch.compute_at(blk, kb)
                sch.set_scope(blk, 0, "local")
        # Step 4. Zero the accumulators before the reduction; unroll the rows (their
        # accumulators then live in registers) and, in the factored kernel, a block's 32
        # raw quants (nibble selects become constants). Unrolled by nvcc (``#pragma
        # unroll``), not in the source: TVM's explicit unrolling made a W = 1 q4_0 kernel
        # 57 KB of CUDA, which nvcc compiles when the library loads. The dequantizing
        # kernel's 32-weight loop stays a loop (a select per weight; unrolled under 64
        # rows it would be ~2000 statements).
        unroll = []
        init = sch.decompose_reduction(mm, kb)
        if static:
            unroll += [sch.get_loops(mm)[-1], sch.get_loops(init)[-1]]
        for name in ("inner", "xsum"):
            if name in names:
                blk = sch.get_sblock(name)
                own = sch.get_loops(blk)[3:]  # (rows,) t: compute_at drops a 1-row loop
                sch.decompose_reduction(blk, own[-1])
                unroll += own
        for loop in unroll:
            sch.unroll(loop)
            sch.annotate(loop, "pragma_unroll_explicit", 0)
        return sch


def _divisor(n: int, cap: int) -> int:
    """The largest divisor of ``n`` that is at most ``cap`` (at least 1)."""
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


class QuantSplitKLinearRule(_BASE):
    """Block-quantized linear layers at static widths, split over the k blocks inside a
    thread block: :class:`SplitKLinearRule`'s schedule on :class:`QuantLinearRule`'s
    arithmetic.

    A thread block takes ``C`` columns (``threadIdx.x``) by ``T`` slices of the ``k / 32``
    blocks (``threadIdx.y``); slice ``t`` walks blocks ``t, t + T, ...``, so at each step the
    block reads ``T`` consecutive k blocks of its panel. Per k block a thread decodes the
    scale (and q4_1 min) once into registers and, like :class:`QuantLinearRule`, either sums
    the block on the raw quants (factored kernel, W <= 2: 32 unrolled steps, constant nibble
    selects, x's block sum recomputed per thread) or dequantizes its 32 weights (a loop)
    against the ``W`` rows; the ``T x W x C`` partials then meet in shared memory after one
    barrier and are summed and written back (with the residual) as in the float rule.

    ``C`` is 32, a whole panel row (``pack_block``; fewer where ``n`` has no factor 32): the
    layout ``[n / B, k / 32, bytes, B]`` puts the 32 columns of one byte index of one k block
    in one 32-byte sector, so a warp (32 columns of one slice) reads whole sectors for every
    byte. The float rule's sector-wide 8-16 columns would be 8-16 bytes here: each sector
    split over 2-4 thread blocks, fetched from L2 2-4 times. The price is the grid: ``n /
    32`` blocks (18 for a 576-column layer), 2x the column rule's 64-column blocks, not the
    float rule's 4-8x; the win is the chain, 3 k blocks a thread for K = 576 instead of 18.
    ``cols=16`` doubles the grid at half-sector reads (the kit's ``splitk16``, to time on
    the GPU host). ``T`` divides ``k / 32`` (18 for SmolLM2's 576: 6 slices of 3 blocks; 48
    for 1536: 8 of 6), so no slice is predicated off; threads up to 256, fewer where the
    partials would exceed 32 KB of shared memory (W = 64: 96-128). Symbolic widths stay with
    :class:`QuantLinearRule`. The fused forms (FuseLinearChains: norm, gated activation,
    bias) take :func:`_fused_split_k`'s epilogue-anchored form of the same schedule.
    Measurements: ``benchmarks/gemv.md``.
    """

    def __init__(self, threads: int = 256, max_rows: int = 64, partial_bytes: int = 32 << 10,
                 cols: int = 32):
        self.threads, self.max_rows = threads, max_rows
        self.partial_bytes, self.cols = partial_bytes, cols

    def shape(self, rows: int, n: int, k: int) -> tuple[int, int] | None:
        """``(C, T)``: columns and k-block slices of a thread block, or None when it would
        not pay (fewer than 4 columns or 2 slices)."""
        cols = _pow2_divisor(n, self.cols)
        threads = _split_k_threads(self.threads, rows, self.partial_bytes)
        slices = _divisor(k // 32, threads // cols)
        return (cols, slices) if cols >= 4 and slices >= 2 else None

    def apply(self, func, target, tunable):
        if _gpu_kind(func, target) != "linear" or "hetcomp.qtype" not in func.attrs:
            return None
        c = compiler()
        sch, names, factored, mm = _quant_blocks(func)
        i, *halves, j, k = sch.get_loops(mm)
        rows = _static_rows(c, sch.get(i), self.max_rows)
        if rows is None:
            return None
        # A gated kernel's thread holds both halves of its columns: twice the partials.
        shape = self.shape(rows * (1 + len(halves)), int(sch.get(j).extent),
                           int(func.attrs["hetcomp.k"]))
        if shape is None:
            return None
        cols, slices = shape
        if is_fused_linear(func):
            _unroll_by_nvcc(sch, _fused_split_k(sch, func, cols, slices, (names, factored)))
            return sch
        # Step 1. Columns over (blockIdx.x, threadIdx.x), k-block slices over threadIdx.y;
        # per thread its slice's blocks, then (the dequantizing kernel) a block's 32
        # weights, then the rows; the partials in registers, stored to shared memory.
        kb, kt = (k, None) if factored else sch.split(k, [None, 32])
        ko, ks = sch.split(kb, [None, slices])
        rf, partial = _slice_partials(sch, mm, cols, ks, [ko] if factored else [ko, kt], i)
        ko = sch.get_loops(rf)[3]
        # Step 2. Per k block, in registers: the raw-quant block sums (factored), x's block
        # sums, the column's scale and min.
        for name in ("inner", "xsum", "min", "scale"):  # consumers first
            if name in names:
                blk = sch.get_sblock(name)
                sch.compute_at(blk, ko)
                sch.set_scope(blk, 0, "local")
        # Step 3. The partials meet in shared memory; each thread sums the slices of one
        # (row, column) output and writes it back (with the residual).
        unroll = _sum_slices(sch, func, mm, rf, slices)
        # Step 4. Zero the accumulators before the slice's reduction; nvcc unrolls the rows,
        # the store of the partials, the sum over slices and, in the factored kernel, a
        # block's 32 raw quants (constant nibble selects). The dequantizing kernel's
        # 32-weight loop stays a loop (QuantLinearRule says why).
        init = sch.decompose_reduction(rf, ko)
        unroll += [sch.get_loops(init)[-1], sch.get_loops(rf)[-1], sch.get_loops(partial)[-1]]
        for name in ("inner", "xsum"):
            if name in names:
                blk = sch.get_sblock(name)
                own = sch.get_loops(blk)[4:]  # (rows,) t: compute_at drops a 1-row loop
                sch.decompose_reduction(blk, own[-1])
                unroll += own
        _unroll_by_nvcc(sch, unroll)
        return sch


class RMSNormRule(_BASE):
    """RMSNorm (``rms_norm``, and ``rms_norm_res``, Gemma's norm with the residual add): one
    thread block per row, one launch for the whole kernel.

    :class:`PerStageThreadRule` gave each stage its own launch with a thread per row: the
    sum of squares a serial chain over the hidden size (576 dependent adds for SmolLM2) in
    as many threads as rows (1 at W = 1), then two more launches. Here the block's threads
    stride over the row (coalesced), the sum of squares is a cross-thread reduction over
    threadIdx.x (warp shuffles, then one shared-memory step across warps; what
    :class:`ArgmaxRowRule` does) and the same threads scale their elements. ``rstd`` is
    inlined into the scaling (an rsqrt per element, a few per thread): a register copy per
    thread was merged by TVM's storage rewrite into the reduction's shared result, which
    every thread then overwrote while others still read it (a race in the CUDA source).
    Threads: a power of two up to 256 covering the row; the tail of a row that is not a
    multiple of them is predicated.
    """

    def __init__(self, threads: int = 256):
        self.threads = threads

    def apply(self, func, target, tunable):
        if _gpu_kind(func, target) != "rms_norm":
            return None
        sch = compiler().Schedule(func)
        hidden = int(func.params[0].shape[1])
        threads = 32
        while threads < min(hidden, self.threads):
            threads *= 2
        # Step 1. rstd inlined into the scaling; the sum of squares per row (block).
        sch.compute_inline(sch.get_sblock("rstd"))
        norm = sch.get_sblock("norm")
        row, e = sch.get_loops(norm)
        ss = sch.get_sblock("sumsq")
        sch.compute_at(ss, row)
        # Step 2. Rows over blockIdx.x; the threads stride over the row, reducing the sum of
        # squares across threadIdx.x (its result in registers: every thread reads it).
        _, tx = sch.split(sch.get_loops(ss)[-1], [None, threads])
        sch.bind(tx, "threadIdx.x")
        sch.set_scope(ss, 0, "local")
        # Step 3. The same threads scale their elements.
        _, tx = sch.split(e, [None, threads])
        sch.bind(tx, "threadIdx.x")
        sch.bind(row, "blockIdx.x")
        return sch


class ArgmaxRowRule(_BASE):
    """Argmax (row maximum, then the first index holding it): a thread block per row, the
    threads splitting the vocabulary and combining by a cross-thread reduction. dlight's
    GeneralReduction does the same but unrolls the per-thread loop (~100 KB of CUDA per
    width, all compiled by nvcc at load)."""

    def __init__(self, threads: int = 256):
        self.threads = threads

    def apply(self, func, target, tunable):
        if _gpu_kind(func, target) != "argmax":
            return None
        sch = compiler().Schedule(func)
        (row,) = sch.get_loops(sch.get_sblock("argmax"))
        for name in ("first", "row_max"):  # consumers first
            sch.compute_at(sch.get_sblock(name), row)
        for name in ("row_max", "first"):
            blk = sch.get_sblock(name)
            _, inner = sch.split(sch.get_loops(blk)[-1], [None, self.threads])
            sch.bind(inner, "threadIdx.x")
            sch.set_scope(blk, 0, "shared")  # one value per row, read by the block's threads
        sch.bind(row, "blockIdx.x")
        return sch


def use_gpu_script_kernels(mod):
    """Replace the in-place TVMScript kernels (CPU loops, already scheduled) by their GPU
    versions."""
    c = compiler()
    mod = c.IRModule(dict(mod.functions_items()), attrs=mod.attrs,
                     global_infos=mod.global_infos)
    for gv, func in list(mod.functions_items()):
        gpu = for_gpu(func) if isinstance(func, c.tir.PrimFunc) else None
        if gpu is not None:
            mod[gv] = gpu
    return mod


def gpu_rules(tensor_cores: bool = True):
    """Our GPU rules first, then dlight's. The tensor-core rules (static widths of 16-64
    rows; left out with ``tensor_cores=False``) before split K, each split-K rule (static
    widths) before the rule that takes the same linears at any width; RMSNorm before
    PerStageThread (which takes any of our kinds it lists, rms_norm included)."""
    gpu = compiler().dlight.gpu
    return [*([QuantTensorCoreLinearRule()] if tensor_cores else []),
            QuantSplitKLinearRule(), QuantLinearRule(),
            *([TensorCoreLinearRule()] if tensor_cores else []), SplitKLinearRule(),
            LinearColumnRule(),
            RMSNormRule(), ArgmaxRowRule(), SparseTreeAttentionRule(), PerStageThreadRule(),
            gpu.Matmul(), gpu.GEMV(), gpu.LowBatchGEMV(), gpu.Reduction(),
            gpu.GeneralReduction(), gpu.Fallback()]
