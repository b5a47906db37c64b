"""x86 schedule of tree attention, with fp32 AVX-512 and AVX2/FMA intrinsics.

The same :class:`~hetcomp.schedules.arm.TreeAttentionRule` recipe as on ARM, with wider
vectors: the q.k dot product keeps 16-lane (AVX-512, ``vfmadd231ps zmm``) or 8-lane (AVX2+FMA,
``ymm``) accumulators in registers and reduces them by halving (``vextractf`` + ``vaddps``);
P.V is one broadcast FMA per vector. The FMAs are the ``llvm.fma.v16f32`` / ``v8f32``
intrinsics (LLVM retired its x86-specific ``vfmadd`` intrinsics in favour of these). Intrinsics
are registered where the rule first uses them.
"""

from __future__ import annotations

from typing import NamedTuple

from tvm.script import tirx as T

from .._tvm import compiler
from .arm import HEAD_DIMS, F32Intrins, TreeAttentionRule, is_llvm_with
from .cpu import LinearRule as _Linear
from .cpu import LinearTile
from .cpu import QuantLinearRule as _QuantLinear

AVX512_LANES = 16
AVX2_LANES = 8
#: ``{head_dim: name}`` of the AVX-512 q.k dot-product intrinsics.
AVX512_F32_DOT_INTRINS = {d: f"hetcomp_avx512_f32x16_dot_{d}" for d in HEAD_DIMS}
#: The AVX-512 P.V intrinsic, ``c[0:16] += p * b[0:16]``.
AVX512_F32_AXPY_INTRIN = "hetcomp_avx512_f32x16_axpy"
#: The AVX-512 rescale intrinsic, ``c[0:16] *= p``.
AVX512_F32_SCALE_INTRIN = "hetcomp_avx512_f32x16_scale"
#: ``{head_dim: name}`` of the AVX2 q.k dot-product intrinsics.
AVX2_F32_DOT_INTRINS = {d: f"hetcomp_avx2_f32x8_dot_{d}" for d in HEAD_DIMS}
#: The AVX2 P.V intrinsic, ``c[0:8] += p * b[0:8]``.
AVX2_F32_AXPY_INTRIN = "hetcomp_avx2_f32x8_axpy"
#: The AVX2 rescale intrinsic, ``c[0:8] *= p``.
AVX2_F32_SCALE_INTRIN = "hetcomp_avx2_f32x8_scale"


def _halving_hsum(vec, lanes: int):
    # Add the high half onto the low half until two lanes are left; each step's input is
    # bound once (T.Bind) because it is read twice.
    tir = compiler().tir
    while lanes > 2:
        vec = T.Bind(vec)
        lanes //= 2
        half = f"float32x{lanes}"
        vec = tir.vectorlow(half, vec) + tir.vectorhigh(half, vec)
    vec = T.Bind(vec)
    return tir.Shuffle([vec], [0]) + tir.Shuffle([vec], [1])


AVX512_F32 = F32Intrins(AVX512_LANES, AVX512_F32_DOT_INTRINS, AVX512_F32_AXPY_INTRIN,
                        AVX512_F32_SCALE_INTRIN, _halving_hsum)
AVX2_F32 = F32Intrins(AVX2_LANES, AVX2_F32_DOT_INTRINS, AVX2_F32_AXPY_INTRIN,
                      AVX2_F32_SCALE_INTRIN, _halving_hsum)


class SparseTreeAttentionRule(TreeAttentionRule):
    """:class:`TreeAttentionRule` for x86: AVX-512 when the target CPU has it, else AVX2+FMA.

    Targets without AVX2 and FMA (e.g. a bare ``x86_64-linux-gnu`` triple with no ``mcpu``)
    get None: name the CPU (``mcpu``) to enable the rule.
    """

    def intrinsics(self, target) -> F32Intrins | None:
        if is_llvm_with(target, "avx512f"):
            return AVX512_F32
        if is_llvm_with(target, "avx2") and is_llvm_with(target, "fma"):
            return AVX2_F32
        return None


#: How far ahead of its FMAs a one-tile linear prefetches each weight stream (bytes).
PREFETCH_BYTES = 2048


class Prefetch(NamedTuple):
    """Bytes ahead of its arithmetic that a one-tile kernel (its rows fit one tile: each weight
    read once, from DRAM) prefetches its weights on a CPU, per kernel (0: none): the float
    :class:`LinearRule`, the dequantizing :class:`QuantLinearRule` and the int8-dot linear
    (:mod:`hetcomp.schedules.int8_dot`), the last only from ``int8_dot_rows`` rows."""

    linear: int
    quant_linear: int
    int8_dot: int
    int8_dot_rows: int = 1

    def int8_dot_ahead(self, rows: int) -> int:
        """The int8-dot kernel's distance ahead for a one-tile kernel of ``rows`` rows."""
        return self.int8_dot if rows >= self.int8_dot_rows else 0


#: Intel's cores (timed on a Sapphire Rapids Xeon; each rule's docstring has the numbers),
#: and any x86 CPU LLVM does not name as a Zen (the portable ``x86-64-v3`` included).
INTEL_PREFETCH = Prefetch(PREFETCH_BYTES, PREFETCH_BYTES, PREFETCH_BYTES)
#: AMD Zen (LLVM's ``znver*``; timed on a 2-core Zen 4 EPYC, ``znver4``). Its hardware
#: prefetchers keep a streaming kernel fed, and prefetching there cost time: 3072x576
#: float16 from DRAM at W = 1 / 2 / 4, ms, 0.126 / 0.106 / 0.115 without against 0.144 /
#: 0.127 / 0.184 with (1, 4 and 8 KB ahead and the L2-only hint lost too), float32 0.234 /
#: 0.202 / 0.196 against 0.322 / 0.231 / 0.223 (AVX2 code, W = 1: 0.124 against 0.163);
#: int8-dot q8_0 at W = 1 / 2 / 4 56-64 / 47-57 / 57-59 us against 68-77 / 66-67 / 71-81.
#: Where a kernel does more work a byte it still gains: int8-dot q4_1 at W = 8, 70-88 us
#: with against 82-103 (at W <= 4 even; q8_0 at W = 8 even), and the dequantizing rule
#: (SmolLM2 q4_1 ``--no-int8-dot``, W = 1: 153.6 tokens/s with, 130.0 without). SmolLM2
#: decode, held-out prompts, median of 3 interleaved rounds, tokens/s at W = 1 / 2 / 4 / 8,
#: prefetching everywhere -> none: float16 105.2 / 133.7 / 105.4 / 128.3 -> 110.6 / 143.5 /
#: 162.8 / 135.6, q8_0 154.6 / 208.3 / 200.7 / 189.4 -> 196.6 / 261.2 / 262.1 / 196.5,
#: q4_1 199.7 / 215.8 / 211.2 / 164.2 -> 236.7 / 247.4 / 228.9 / 144.1 (W = 8 the int8-dot
#: q4_1 loss above).
ZEN_PREFETCH = Prefetch(0, PREFETCH_BYTES, PREFETCH_BYTES, int8_dot_rows=8)


def prefetch_for(target) -> Prefetch:
    """What one-tile kernels prefetch on ``target``'s CPU (an LLVM x86 target; its ``mcpu``
    names the CPU: ``host`` builds name this machine's)."""
    mcpu = target.attrs.get("mcpu") if target is not None else None
    return ZEN_PREFETCH if str(mcpu or "").startswith("znver") else INTEL_PREFETCH


class LinearRule(_Linear):
    """The float linear (:class:`hetcomp.schedules.cpu.LinearRule`) sized for x86's vector
    registers: three 32-column panels share each k step, with 4 rows a tile on AVX-512
    (3 x 4 x 2 = 24 of the 32 ``zmm`` registers hold accumulators) and 1 on AVX2 below 16 rows
    (3 x 4 = 12 of the 16 ``ymm``).

    Three weight streams a thread keep more DRAM reads in flight than one: a single stream
    leaves the core waiting, so its memory time and its FMA time add up at W > 1. On this
    repository's 2-core AVX-512 host, SmolLM2's 3072x576 float32 linear read from DRAM took
    0.252 / 0.344 / 0.401 / 0.482 ms at W = 1 / 4 / 8 / 16 with one stream and 8-row tiles,
    and 0.221 / 0.265 / 0.318 / 0.397 ms with this tile; AVX2 code on the same host went from
    0.283 / 0.376 / 0.501 / 0.757 to 0.220 / 0.307 / 0.405 / 0.568 ms (one 8-row stream spills
    ``ymm`` registers; W = 16 runs the 2-row tile below).

    Wider kernels are compute-bound, their weights read from cache by every row tile. On
    AVX2, 16 rows and more (prefill's symbolic rows and its 64-row chunks included) run one
    stream of 2-row tiles: the generic 4 rows fill all 16 ``ymm`` registers with
    accumulators (3072x576 at W = 64: 1.42 ms with 2-row tiles, 1.83 with 3 x 1, 2.39 with
    the generic 8 rows; 512 rows: 9.2 ms, against 15.2 with 4-row tiles). On AVX-512 the
    3 x 4 tile stays ahead up to W = 64 (0.889 ms against 1.008 with 8-row tiles; float16
    weights 0.980 against 0.918, the one loss), and prefill keeps the generic 4-row tile.

    Three streams still left the memory and FMA times adding up where the rows fit one tile
    (W <= 4 on AVX-512, W = 1 on AVX2): each weight is read there once, from DRAM, and the
    hardware prefetchers do not run far enough ahead of the FMAs. Such a kernel prefetches
    each stream ``PREFETCH_BYTES`` ahead every k step (:class:`LinearTile` ``prefetch``),
    on the CPUs where that gains (:func:`prefetch_for`: not AMD Zen's).
    3072x576 at W = 1 / 2 / 4, float16: 0.164 / 0.159 / 0.174 ms without, 0.125 / 0.132 /
    0.141 with (1 KB ahead 0.131 / 0.131 / 0.151, 4 KB 0.120 / 0.130 / 0.140); float32
    0.229 / 0.246 / 0.276 without, 0.233 / 0.219 / 0.246 with; AVX2 at W = 1, float16 0.151
    -> 0.118, float32 0.232 -> 0.216. Where the tiles re-read a panel from cache (more rows)
    prefetching every k step cost up to 23% (W = 16), and only in the first tile it still
    lost at W = 12 and 16, so those kernels do not. SmolLM2 decode (``ab_widths.py``,
    held-out prompts, median of 3 interleaved rounds), tokens/s at W = 1 / 2 / 4 / 8:
    float16 83.9 / 110.8 / 116.2 / 102.9 -> 96.9 / 131.7 / 141.5 / 100.9, float32 49.8 /
    62.8 / 68.6 / 66.1 -> 49.1 / 68.3 / 79.3 / 67.9.
    """

    def tile(self, target, rows: int | None) -> LinearTile | None:
        if is_llvm_with(target, "avx512f"):
            if rows is None:
                return LinearTile(1, 4)
            return LinearTile(3, next(t for t in (4, 2, 1) if rows % t == 0),
                              prefetch=prefetch_for(target).linear)
        if not (is_llvm_with(target, "avx2") and is_llvm_with(target, "fma")):
            return None
        if rows is None or rows >= 16:  # compute-bound: 2-row tiles, one stream
            return LinearTile(1, 2 if rows is None or rows % 2 == 0 else 1)
        return LinearTile(3, 1, prefetch=prefetch_for(target).linear)


class QuantLinearRule(_QuantLinear):
    """The block-quantized linear on float FMAs (:class:`hetcomp.schedules.cpu.
    QuantLinearRule`: x86 CPUs without AVX-512 VNNI, or ``--no-int8-dot``), its one-tile
    kernels (W <= 8) prefetching each block ``PREFETCH_BYTES`` ahead, on Intel and AMD Zen
    alike (:func:`prefetch_for`: decoding blocks, it does more work a byte). 3072x576
    q4_1 from DRAM, us at W = 1 / 2 / 4 / 8 (Intel Xeon): AVX-512 84.9 / 91.0 / 102.1 /
    137.0 without, 67.7 / 80.4 / 85.9 / 122.1 with (4 KB ahead 64.2 / 74.1 / 86.0 / 126.2);
    q8_0 119.5 / 122.3 / 128.3 / 141.9 -> 97.3 / 99.7 / 109.6 / 133.4;
    AVX2 (``x86-64-v3``) q4_1 97.8 / 104.2 / 213.2 / 327.2 -> 90.2 / 104.8 / 208.8 / 323.7
    (from W = 4 its FMAs, not DRAM, set the time)."""

    def prefetch_bytes(self, target) -> int:
        return prefetch_for(target).quant_linear

    def applies(self, target) -> bool:
        return is_llvm_with(target, "avx2")


def x86_rules():
    """The x86 rule list (tree attention, the float and the quantized linear), to put before
    the generic CPU rules."""
    return [SparseTreeAttentionRule(), LinearRule(), QuantLinearRule()]
