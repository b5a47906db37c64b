"""ARM (aarch64 ``+neon``) schedules: tree attention, with the project's fp32 NEON intrinsics, and
the block-quantized linear sized for NEON's registers (:class:`QuantLinearRule`).

Three tensor intrinsics carry the inner loops of the sparse (and the dense masked) tree-attention
kernels of :mod:`hetcomp.kernels.sparse_attention`:

- ``dot``: ``c[0] += sum_e a[e] * b[e]`` over the whole head_dim, the q.k score. The
  implementation keeps several independent 4-lane accumulators in ``v`` registers (one
  ``fmla v.4s`` per 4 elements) and reduces them once at the end (``faddv``, which LLVM
  emits as pairwise ``faddp``), so the accumulation never goes through memory.
- ``axpy``: ``c[0:4] += p[0] * b[0:4]``, the P.V update ``o += p * v``: one ``fmla`` with a
  broadcast scalar.
- ``scale``: ``c[0:4] *= p[0]``, the online-softmax rescale of the accumulator row by
  ``exp(m_old - m_new)`` (a block that reads and writes ``c``, which ``vectorize`` refuses).

The FMAs are the generic ``llvm.fma.v4f32`` intrinsic, which LLVM selects as ``fmla`` on
aarch64. The descriptions and the builders are ISA-neutral and :mod:`.x86` reuses them, as
it reuses :class:`TreeAttentionRule`, the schedule recipe (ARM is this kernel's main target).
Intrinsics are registered under the module-level names below, once, where a rule first uses them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tvm.script import tirx as T

from .._tvm import compiler
from ..kernels.ops import OP_KIND
from ..kernels.sparse_attention import DENSE_KIND, SPARSE_KIND
from .cpu import LinearRule as _Linear
from .cpu import LinearTile
from .cpu import QuantLinearRule as _QuantLinear

#: Head dims with a registered dot-product intrinsic.
HEAD_DIMS = (16, 32, 64, 128)
NEON_LANES = 4
#: ``{head_dim: name}`` of the NEON q.k dot-product intrinsics.
NEON_F32_DOT_INTRINS = {d: f"hetcomp_neon_f32x4_dot_{d}" for d in HEAD_DIMS}
#: The NEON P.V intrinsic, ``c[0:4] += p * b[0:4]``.
NEON_F32_AXPY_INTRIN = "hetcomp_neon_f32x4_axpy"
#: The NEON rescale intrinsic, ``c[0:4] *= p``.
NEON_F32_SCALE_INTRIN = "hetcomp_neon_f32x4_scale"


# ----------------------------------------------------------------------------- intrinsics


def f32_dot_desc(d: int):
    """Description of ``c[0] += a[0:d] . b[0:d]`` (``c`` a register-resident scalar)."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle):
        A = T.match_buffer(a, (d,), "float32", offset_factor=1)
        B = T.match_buffer(b, (d,), "float32", offset_factor=1)
        C = T.match_buffer(c, (1,), "float32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:1], A[0:d], B[0:d])
            T.writes(C[0:1])
            for e in range(d):
                with T.sblock("update"):
                    ve = T.axis.remap("R", [e])
                    C[0] = C[0] + A[ve] * B[ve]

    return desc


def f32_dot_impl(d: int, lanes: int, accumulators: int, hsum):
    """``c[0] += a . b`` with ``accumulators`` independent ``lanes``-wide FMA chains.

    Parameters
    ----------
    d : int
        Vector length; a multiple of ``lanes * accumulators``.
    lanes, accumulators : int
        Width of one vector register in fp32 lanes, and how many FMA chains run side by side
        (enough to hide the FMA latency).
    hsum : callable
        ``hsum(vec, lanes) -> scalar``: the horizontal sum of one vector, built inside the
        implementation's IRBuilder frame (it may emit ``T.Bind``).
    """
    c = compiler()
    vt = f"float32x{lanes}"
    fma = f"llvm.fma.v{lanes}f32"
    with c.IRBuilder() as ib, c.build_prim_func():
        a = T.arg("a", T.handle())
        b = T.arg("b", T.handle())
        out = T.arg("c", T.handle())
        A = T.match_buffer(a, (d,), "float32", offset_factor=1)
        B = T.match_buffer(b, (d,), "float32", offset_factor=1)
        C = T.match_buffer(out, (1,), "float32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:1], A[0:d], B[0:d])
            T.writes(C[0:1])
            acc = []
            for chunk in range(d // lanes):
                x = A.vload([chunk * lanes], vt)
                y = B.vload([chunk * lanes], vt)
                if len(acc) < accumulators:
                    acc.append(x * y)
                else:
                    slot = chunk % accumulators
                    acc[slot] = c.tir.call_llvm_pure_intrin(vt, fma, x, y, acc[slot])
            while len(acc) > 1:  # pairwise: a short dependency chain
                acc = [acc[i] + acc[i + 1] for i in range(0, len(acc), 2)]
            T.buffer_store(C, C[0] + hsum(acc[0], lanes), [0])
    return ib.get()


def f32_axpy_desc(lanes: int):
    """Description of ``c[0:lanes] += p[0] * b[0:lanes]`` (``c`` and ``p`` in registers)."""

    @T.prim_func(s_tir=True)
    def desc(p: T.handle, b: T.handle, c: T.handle):
        P = T.match_buffer(p, (1,), "float32", offset_factor=1)
        B = T.match_buffer(b, (lanes,), "float32", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "float32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], P[0:1], B[0:lanes])
            T.writes(C[0:lanes])
            for e in range(lanes):
                with T.sblock("update"):
                    ve = T.axis.remap("S", [e])
                    C[ve] = C[ve] + P[0] * B[ve]

    return desc


def f32_axpy_impl(lanes: int):
    """One ``lanes``-wide FMA with a broadcast scalar: ``c = fma(broadcast(p), b, c)``."""
    vt = f"float32x{lanes}"
    fma = f"llvm.fma.v{lanes}f32"

    @T.prim_func(s_tir=True)
    def impl(p: T.handle, b: T.handle, c: T.handle):
        P = T.match_buffer(p, (1,), "float32", offset_factor=1)
        B = T.match_buffer(b, (lanes,), "float32", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "float32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], P[0:1], B[0:lanes])
            T.writes(C[0:lanes])
            C[T.ramp(0, 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(fma), T.broadcast(P[0], lanes),
                B[T.ramp(0, 1, lanes)], C[T.ramp(0, 1, lanes)], dtype=vt)

    return impl


def f32_scale_desc(lanes: int):
    """Description of ``c[0:lanes] *= p[0]`` (``c`` and ``p`` in registers)."""

    @T.prim_func(s_tir=True)
    def desc(p: T.handle, c: T.handle):
        P = T.match_buffer(p, (1,), "float32", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "float32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], P[0:1])
            T.writes(C[0:lanes])
            for e in range(lanes):
                with T.sblock("update"):
                    ve = T.axis.remap("S", [e])
                    C[ve] = C[ve] * P[0]

    return desc


def f32_scale_impl(lanes: int):
    """One ``lanes``-wide multiply by a broadcast scalar."""

    @T.prim_func(s_tir=True)
    def impl(p: T.handle, c: T.handle):
        P = T.match_buffer(p, (1,), "float32", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "float32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], P[0:1])
            T.writes(C[0:lanes])
            C[T.ramp(0, 1, lanes)] = C[T.ramp(0, 1, lanes)] * T.broadcast(P[0], lanes)

    return impl


@dataclass(frozen=True)
class F32Intrins:
    """The names of one ISA's fp32 tree-attention intrinsics and their vector width."""

    lanes: int
    dot: dict[int, str]  # head_dim -> q.k dot product
    axpy: str  # c[0:lanes] += p * b[0:lanes]
    scale: str  # c[0:lanes] *= p
    hsum: Callable  # (vector, lanes) -> the dot's horizontal sum

    def register(self) -> F32Intrins:
        """Register every intrinsic not yet registered; returns ``self``. Called where a rule
        first uses them, not at import: TVMScript's parser walks the caller's stack for each
        function, and inside an import (the import machinery's frames) that cost seconds of
        every process that imported the schedules."""
        ti = compiler().TensorIntrin
        lanes = self.lanes
        builders = {name: lambda d=d: (f32_dot_desc(d),
                                       f32_dot_impl(d, lanes, min(4, d // lanes), self.hsum))
                    for d, name in self.dot.items()}
        builders[self.axpy] = lambda: (f32_axpy_desc(lanes), f32_axpy_impl(lanes))
        builders[self.scale] = lambda: (f32_scale_desc(lanes), f32_scale_impl(lanes))
        for name, build in builders.items():
            if ti.get(name, allow_missing=True) is None:
                ti.register(name, *build())
        return self


def _neon_hsum(vec, lanes: int):
    return compiler().tir.call_llvm_pure_intrin(
        "float32", f"llvm.aarch64.neon.faddv.f32.v{lanes}f32", vec)


NEON_F32 = F32Intrins(NEON_LANES, NEON_F32_DOT_INTRINS, NEON_F32_AXPY_INTRIN,
                      NEON_F32_SCALE_INTRIN, _neon_hsum)


# ----------------------------------------------------------------------------- schedule


def _kind(func) -> str | None:
    attrs = func.attrs
    return str(attrs[OP_KIND]) if attrs is not None and OP_KIND in attrs else None


def is_llvm_with(target, feature: str) -> bool:
    """Whether ``target`` is an LLVM CPU target whose CPU has ``feature`` (e.g. ``neon``)."""
    if target is None or target.kind.name != "llvm":
        return False
    return bool(compiler().llvm_cpu_has_features([feature], target))


class TreeAttentionRule(compiler().ScheduleRule):
    """Tensorized schedule of the sparse and the dense masked tree-attention kernels.

    ISA-neutral recipe; a subclass supplies :meth:`intrinsics` for its targets. Applies to
    ``hetcomp.op_kind`` ``"sparse_tree_attention"`` and ``"tree_attention_dense"`` (both share
    the row > key > head_dim block nest) and returns None for anything else.
    """

    def intrinsics(self, target) -> F32Intrins | None:
        """The intrinsics for ``target``, or None where the rule does not apply."""
        raise NotImplementedError

    def apply(self, func, target, tunable):
        if _kind(func) not in (SPARSE_KIND, DENSE_KIND):
            return None
        intrins = self.intrinsics(target)
        head_dim = int(func.attrs["hetcomp.head_dim"])
        if intrins is None or head_dim not in intrins.dot:
            return None
        intrins.register()
        lanes = intrins.lanes
        c = compiler()
        sch = c.Schedule(func.with_attr(c.IS_SCHEDULED, True))
        # Step 1. One parallel task per (tree node, KV head) row.
        sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("row"))))
        # The loops over the query heads of a KV head, taken before tensorize renames blocks.
        heads = [sch.get_loops(sch.get_sblock(name))[-2] for name in ("acc_init", "qk", "out")]
        # Step 2. The q.k score over head_dim is one dot intrinsic: its FMA chains stay in
        # vector registers and are reduced once.
        sch.tensorize(sch.get_loops(sch.get_sblock("qk"))[-1], intrins.dot[head_dim])
        # Step 3. o += p * v and the rescale o *= alpha: one vector op per `lanes` elements
        # of head_dim, unrolled.
        for name, intrin in (("pv", intrins.axpy), ("rescale", intrins.scale)):
            outer, inner = sch.split(sch.get_loops(sch.get_sblock(name))[-1], [None, lanes])
            sch.tensorize(inner, intrin)
            sch.unroll(outer)
        # Step 4. Zeroing and normalising the accumulators: vectorised, unrolled.
        for name in ("acc_init", "out"):
            outer, inner = sch.split(sch.get_loops(sch.get_sblock(name))[-1], [None, lanes])
            sch.vectorize(inner)
            sch.unroll(outer)
        # Step 5. Unroll the loops over the query heads sharing a KV head: straight-line,
        # branch-free code whose independent chains (one per head) LLVM interleaves, and
        # constant indices that keep the per-head state in registers.
        for loop in heads:
            sch.unroll(loop)
        return sch


class SparseTreeAttentionRule(TreeAttentionRule):
    """:class:`TreeAttentionRule` with the NEON intrinsics, for aarch64 targets with NEON."""

    def intrinsics(self, target) -> F32Intrins | None:
        return NEON_F32 if is_llvm_with(target, "neon") else None


class QuantLinearRule(_QuantLinear):
    """The block-quantized linear (:class:`hetcomp.schedules.cpu.QuantLinearRule`) sized for
    NEON's 32 128-bit registers: each 32-column panel runs as four 8-column sub-panels (two
    ``v`` registers a row) with up to 8 rows a tile. The whole-panel tile of the x86 rule
    (8 registers a row, for 4-8 rows, plus the block's scales and decoded weights) spills:
    on a 96x128 q4_1 kernel at W = 16 LLVM's aarch64 code reloads 2128 ``q`` registers from
    the stack, against 36 with 8-column sub-panels (``tests/schedules/test_arm_quant.py``
    counts them). A panel's blocks are 11-31 KB for SmolLM2's rows, so the later sub-panels
    read them from cache. Not yet timed on ARM hardware (qemu checks numerics only).
    """

    def __init__(self):
        super().__init__(row_tile=4, max_row_tile=8, lanes=2 * NEON_LANES)

    def applies(self, target) -> bool:
        return is_llvm_with(target, "neon")


class LinearRule(_Linear):
    """The float linear (:class:`hetcomp.schedules.cpu.LinearRule`) sized for NEON's 32
    128-bit registers: a 32-column panel is 8 registers a row, so the generic 8-row tile
    holds 64 registers of accumulators. From 4 rows a tile, the panel runs as sub-panels of
    16 or 8 columns, one after the other, so that a tile's accumulators stay within 16
    registers (rows x lanes / 4). On a 96x128 kernel LLVM's aarch64 code reloads 13 / 62 /
    63 ``q`` registers from the stack at W = 4 / 8 / 16 with the generic tile, none with
    this one (``tests/schedules/test_arm_linear.py`` counts them); one and two rows keep
    whole panels (8 and 16 accumulators: enough independent FMAs to hide their latency).
    Not yet timed on ARM hardware (qemu checks numerics only).
    """

    def tile(self, target, rows: int | None) -> LinearTile | None:
        if not is_llvm_with(target, "neon"):
            return None
        tile = super().tile(target, rows)
        lanes = next(n for n in (32, 16, 8) if tile.rows * n // NEON_LANES <= 16)
        return tile._replace(lanes=lanes)


def arm_rules():
    """The ARM rule list (tree attention, the quantized and the float linear), to put before
    the generic CPU rules."""
    return [SparseTreeAttentionRule(), QuantLinearRule(), LinearRule()]
