"""Block-quantized linears on integer dot products (x86 AVX-512 VNNI, aarch64 NEON ``sdot``),
as llama.cpp runs them.

The dequantizing kernels (:mod:`hetcomp.kernels.quant`) turn every weight into a float32 and
spend one FMA per weight and row: at the widths a verify step runs they are compute-bound
(SmolLM2 q4_1: a W = 16 step cost 3.8x a W = 1 step). This kernel quantizes the
activations instead, per row and 32-weight block (``dx = max|x| / 127``, ``xq = rint(x /
dx)`` in int8), and sums each block on the integers, 64 products an instruction
(``vpdpbusd``: unsigned bytes times signed bytes into 16 int32 lanes):

    y[i, j] = sum_kb  dx[i, kb] d[j, kb] (sum_t xq[i, kb, t] q[j, kb, t] + o[i, kb])
              (+ m[j, kb] dx[i, kb] sum_t xq[i, kb, t], q4_1)

with ``q`` the block's raw quants and the offset ``o`` folding in what the unsigned
operand adds: ``-8 sum_t xq`` for q4_0 (weights ``d (q - 8)``), ``-128 sum_t xq`` for q8_0
(its signed quants enter as ``q + 128``, the sign bit flipped), nothing for q4_1. The block
sums are exact; the result is the dequantized weights times the dequantized ``xq``, rounded
once per block (``tests/schedules/test_int8_dot.py`` checks it against numpy to float
rounding). That is llama.cpp's ``vec_dot_q4_0_q8_0`` / ``q4_1_q8_1`` / ``q8_0_q8_0`` numerics
with ``dx`` kept in float32 (llama.cpp rounds it to float16).

It reads the weights in the layout every other kernel reads (:mod:`hetcomp.quant_format`:
byte ``c`` of the 32 columns of a panel side by side). ``vpdpbusd`` wants four consecutive
weights of one column in each 32-bit lane, so each group of four quant bytes (128 bytes: 4
rows of 32 columns) is transposed in registers by two ``vpermt2b`` (AVX-512 VBMI), one per
16-column half, then split into low and high nibbles; the decoded block serves every row of
the tile. SmolLM2's 3072x576 q4_0 linear, weights in cache, 2 threads: 12 / 22 / 81 us at W =
1 / 4 / 16 (4-row tiles) against 34 / 71 / 208 for the dequantizing kernel. On aarch64 with
the dot-product extension (``--target aarch64-dotprod``) ``sdot`` takes signed bytes on both
sides, so the nibbles and q8_0's quants enter as they are (q4_0 keeps its ``-8`` offset).

The activations are quantized once per call, before the parallel loop, into a workspace
(``xq``, ``dx`` and the row-block sums). Rows run in tiles of 8 (the largest of 8 / 4 / 2 / 1
that divides a static row count); a symbolic row count (prefill, the any-width verify) runs
its last rows one by one. The instruction set's pieces (transpose, dot product, the q8_0
operand, the tile) are an object (:data:`AVX512`, :data:`NEON_DOT`) that the loop nest calls.

:func:`use_int8_dot_kernels` swaps a module's quantized linears for this kernel where the
target CPU has VNNI and VBMI (Ice Lake, Sapphire Rapids, Zen 4 and later) or NEON's dot
product (``x86.Int8DotLinear``, ``arm.Int8DotLinear``); the kernel keeps
the signature and the ``hetcomp.*`` attributes of the kernel it replaces. Because it
changes the numerics (int8 activations), it replaces every quantized linear of the unit, at
every width: the sequential and the speculative decoder run the same arithmetic per row,
so speculation stays token-identical to greedy.
"""

from __future__ import annotations

from tvm.script import tirx as T

from .._tvm import compiler
from ..kernels.ops import OP_KIND, is_fused_linear
from ..quant_format import QK
from .apply import RULE_ATTR
from .arm import is_llvm_with
from .cpu import CACHE_LINE, prefetch_call
from .x86 import PREFETCH_BYTES, prefetch_for

#: The rule name the swapped x86 kernels carry (``hetcomp.rule``; ARM's: ``arm.Int8DotLinear``).
INT8_DOT_RULE = "x86.Int8DotLinear"
#: Columns a panel (two 16-lane halves).
PANEL = 32
#: ``(byte offset of the quants in a block, quant bytes)`` per format.
_QUANTS = {"q4_0": (2, 16), "q4_1": (4, 16), "q8_0": (2, 32)}
_VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"
_VPERMT2B = "llvm.x86.avx512.vpermi2var.qi.512"


class _Avx512:
    """x86 AVX-512 VNNI + VBMI: 16 int32 lanes, a pass is the whole 32-column panel (two parts of
    16 columns); ``vpermt2b`` transposes, ``vpdpbusd`` sums 64 products. 8-row tiles: 3072x576
    q4_1 at W = 8 / 16, 2 threads, 47.5 / 85.3 us against 54.0 / 107.6 with 4-row ones
    (576x1536: 28.4 / 62.8 against 36.5 / 70.5).

    A one-tile kernel (W <= 8) prefetches each block ``prefetch`` bytes ahead of its dots,
    every k block, as the float linear does (on an Intel Xeon; AMD Zen only at W = 8:
    :data:`hetcomp.schedules.x86.ZEN_PREFETCH`).
    3072x576 from DRAM at W = 1 / 2 / 4 / 8, us: q4_1 74.7 / 76.0 / 82.3 / 97.3 without,
    57.2 / 58.0 / 67.1 / 76.6 with (1 KB ahead 57.7 / 63.7 / 79.7 / 85.1, 4 KB 60.0 / 59.9 /
    64.6 / 76.9); q8_0 109.8 / 109.8 / 113.9 / 135.1 -> 94.2 / 97.1 / 105.1 / 113.9."""

    lanes, parts, span, row_tile = 16, 2, 32, 8
    prefetch = PREFETCH_BYTES
    rule = INT8_DOT_RULE
    features = ("avx512bw", "avx512vnni", "avx512vbmi")

    @staticmethod
    def offset(qtype: str) -> int:
        # q8_0's signed quants enter as unsigned q + 128 (signed_operand).
        return {"q4_0": -8, "q4_1": 0, "q8_0": -128}[qtype]

    def transpose(self, wf, rows4, col):
        """The 4 bytes of the group's rows for columns ``col .. col + 16``, column-major:
        byte ``4 l + r`` = row r, column ``col + l`` (from the 128 contiguous bytes)."""
        tir = compiler().tir
        a, b = (tir.reinterpret("int8x64", wf[tir.Ramp(rows4 + 64 * i, _const(1, "int64"), 64)])
                for i in range(2))
        i8 = tir.Ramp(_const(0, "int8"), _const(1, "int8"), 64)
        perm = (((i8 & _bc(_const(3, "int8"), 64)) << _bc(_const(5, "int8"), 64))
                + (i8 >> _bc(_const(2, "int8"), 64)) + _bc(_const(col % PANEL, "int8"), 64))
        return tir.call_llvm_pure_intrin("int8x64", _VPERMT2B, a, perm, b)

    @staticmethod
    def signed_operand(qd):
        return (qd ^ _bc(_const(-128, "int8"), 64),)

    @staticmethod
    def dot(acc, operand, word):
        tir = compiler().tir
        x = tir.reinterpret("int8x64", _bc(word, 16))
        return tir.call_llvm_pure_intrin("int32x16", _VPDPBUSD, acc, operand[0], x)


class _NeonDot:
    """aarch64 NEON with the dot-product extension (Armv8.2 ``dotprod``: Cortex-A75/A76/A78,
    Jetson Orin, Raspberry Pi 5): 4 int32 lanes, a panel in four passes of 8 columns (two
    parts of 4); the transpose is a byte shuffle of four 8-byte loads, ``sdot`` sums 16
    signed products (the nibbles 0..15 and q8_0's quants are signed bytes as they are: no
    q8_0 offset). A pass holds 2 accumulators a row and a block's 16 decoded registers of
    NEON's 32. Checked under qemu; not timed on ARM hardware."""

    lanes, parts, span, row_tile = 4, 2, 8, 4
    prefetch = 0  # (a panel's four passes; not timed on ARM hardware)
    rule = "arm.Int8DotLinear"
    features = ("neon", "dotprod")

    @staticmethod
    def offset(qtype: str) -> int:
        return {"q4_0": -8, "q4_1": 0, "q8_0": 0}[qtype]

    def transpose(self, wf, rows4, col):
        tir = compiler().tir
        first = col - col % 8  # the pass's 8 columns, loaded once for both parts
        rows = [wf[tir.Ramp(rows4 + r * PANEL + first, _const(1, "int64"), 8)]
                for r in range(4)]
        return tir.reinterpret("int8x16", tir.Shuffle(
            rows, [r * 8 + col % 8 + lane for lane in range(4) for r in range(4)]))

    @staticmethod
    def signed_operand(qd):
        return (qd,)

    @staticmethod
    def dot(acc, operand, word):
        tir = compiler().tir
        x = tir.reinterpret("int8x16", _bc(word, 4))
        return tir.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", acc,
                                         operand[0], x)


AVX512 = _Avx512()
NEON_DOT = _NeonDot()
#: The instruction sets the kernel is written for. An AVX2 one (``vpmaddubsw`` +
#: ``vpmaddwd``, the transpose a byte shuffle of four 8-byte loads, q4 formats only) ran
#: SmolLM2 q4_1 `--target x86-64-v3` at 139.6 / 131.8 / 100.9 / 76.8 tokens/s for W = 1 / 2 /
#: 4 / 8 against 131.9 / 134.5 / 84.2 / 50.6 dequantizing: at the widths worth running no
#: clear gain for the int8 rounding, so AVX2 CPUs keep float activations.
ISAS = (AVX512, NEON_DOT)


def int8_dot_isa(target):
    """The instruction set the kernel uses on ``target`` (one of :data:`ISAS`), or None."""
    for isa in ISAS:
        if all(is_llvm_with(target, f) for f in isa.features):
            return isa
    return None


def has_int8_dot(target) -> bool:
    """Whether ``target`` is a CPU with the instructions this kernel uses."""
    return int8_dot_isa(target) is not None


def eligible(func) -> bool:
    """Whether ``func`` is a quantized linear this kernel can replace: unfused, 32-column
    panels (every linear of the models here; an odd vocabulary's LM head packs narrower
    panels and keeps the dequantizing kernel)."""
    attrs = func.attrs
    if attrs is None or OP_KIND not in attrs or str(attrs[OP_KIND]) != "linear":
        return False
    if "hetcomp.qtype" not in attrs or is_fused_linear(func):
        return False
    return int(attrs["hetcomp.block"]) == PANEL and str(attrs["hetcomp.qtype"]) in _QUANTS


def _bc(value, lanes: int):
    return compiler().tir.Broadcast(value, lanes)


def _const(value, dtype: str):
    return compiler().tir.const(value, dtype)


def _reduce(kind: str, vec, dtype: str):
    """The horizontal ``max``/``add`` of a vector (LLVM's ``vector.reduce`` intrinsics)."""
    name = {"fmaximum": "llvm.vector.reduce.fmaximum", "add": "llvm.vector.reduce.add"}[kind]
    return compiler().tir.call_llvm_pure_intrin(dtype, name, vec)


def linear_int8_dot(func, isa=AVX512, row_tile: int | None = None,
                    prefetch: int | None = None):
    """The int8-dot kernel with ``func``'s signature (a quantized linear of
    :func:`hetcomp.kernels.quant.linear_quant`, :func:`eligible`) and attributes, already
    scheduled, for ``isa`` (:data:`AVX512`, :data:`NEON_DOT`; ``row_tile``: rows a tile,
    default the ISA's; ``prefetch``: bytes a one-tile kernel prefetches ahead, default the
    ISA's)."""
    c = compiler()
    tir = c.tir
    attrs = func.attrs
    n, k, qtype = int(attrs["hetcomp.n"]), int(attrs["hetcomp.k"]), str(attrs["hetcomp.qtype"])
    residual = bool(int(attrs["hetcomp.residual"]))
    params = list(func.params)  # (PrimFunc params are their buffers)
    rows = params[0].shape[0]
    static = isinstance(rows, tir.IntImm)
    panels, nkb, nbytes = (int(s) for s in params[1].shape[:3])
    at, qbytes = _QUANTS[qtype]
    groups = qbytes // 4
    block = nbytes * PANEL  # bytes of one block of a panel
    i64 = "int64"
    row_tile = row_tile or isa.row_tile
    if static:  # an exact tiling: no tail loop
        row_tile = next(t for t in (row_tile, 4, 2, 1) if int(rows) % t == 0 and t <= row_tile)
    # Weights read once (one row tile, one pass a panel): ask for them ahead of the dots.
    ahead = (isa.prefetch if prefetch is None else prefetch) if (
        static and int(rows) == row_tile and isa.span == PANEL) else 0

    def idx(v):
        return tir.const(v, i64) if isinstance(v, int) else v

    with c.IRBuilder() as ib, c.build_prim_func():
        x_buf, wp_buf, *rest = (T.arg(p.name, T.Buffer(p.shape, p.dtype)) for p in params)
        # Flat views: the kernel indexes bytes and rows itself.
        wf = T.decl_buffer((panels * nkb * block,), "uint8", data=wp_buf.data)
        xf = T.decl_buffer((rows * k,), "float32", data=x_buf.data)
        yf = T.decl_buffer((rows * n,), "float32", data=rest[-1].data)
        rf = T.decl_buffer((rows * n,), "float32", data=rest[0].data) if residual else None
        xq = T.alloc_buffer((rows * k,), "int8")
        xqi = T.decl_buffer((rows * k // 4,), "int32", data=xq.data)
        dxs = T.alloc_buffer((rows * nkb,), "float32")
        sums = T.alloc_buffer((rows * nkb,), "int32")

        # Step 1. Quantize the activations: per row and block, scale, int8 values and sum.
        with T.serial(idx(0), rows * nkb) as rb:
            halves = [xf[tir.Ramp(rb * QK + h * 16, idx(1), 16)] for h in range(2)]
            # NaN-propagating maxima (``maximum``, not ``maxnum``): a NaN in the block makes
            # its scale NaN, so the row's outputs are NaN as the dequantizing kernel's are
            # (maxnum skipped it, and rint(NaN) became an int8 0: a silent finite result).
            amax = _reduce("fmaximum", tir.call_llvm_pure_intrin(
                "float32x16", "llvm.maximum.v16f32", tir.abs(halves[0]), tir.abs(halves[1])),
                "float32")
            inv = tir.Select(amax > _const(0.0, "float32"), _const(127.0, "float32") / amax,
                             _const(0.0, "float32"))
            qs = [tir.nearbyint(v * _bc(inv, 16)).astype("int32x16") for v in halves]
            for h in range(2):
                T.buffer_store(xq, qs[h].astype("int8x16"), [tir.Ramp(rb * QK + h * 16,
                                                                      idx(1), 16)])
            T.buffer_store(dxs, amax / _const(127.0, "float32"), [rb])
            T.buffer_store(sums, _reduce("add", qs[0] + qs[1], "int32"), [rb])

        # Step 2. Column panels in parallel, each in passes of ``isa.span`` columns; a pass's
        # blocks decoded once per row tile.
        offset = isa.offset(qtype)

        def decode(base, col0):
            """A block's ``(quads, scales, mins)`` for columns ``col0 ..``: quads[g][h] the
            operand tuples of group g (q4: low, then high nibbles) for the ``isa.lanes``
            columns of part h; scales[h] / mins[h] their float32 vectors."""
            quads = []
            for g in range(groups):
                rows4 = base + (at + 4 * g) * PANEL  # the group's 4 bytes x 32 columns
                per_part = []
                for h in range(isa.parts):
                    qd = isa.transpose(wf, rows4, col0 + h * isa.lanes)
                    if qtype == "q8_0":
                        per_part.append((isa.signed_operand(qd),))
                    else:
                        w = 4 * isa.lanes
                        m15 = _bc(_const(15, "int8"), w)
                        hi = tir.reinterpret(f"int8x{w}", tir.reinterpret(
                            f"int16x{w // 2}", qd) >> _bc(_const(4, "int16"), w // 2))
                        per_part.append(((qd & m15,), (hi & m15,)))
                quads.append(per_part)

            def floats16(byte):  # the float16 at bytes byte, byte + 1 of the pass's columns
                out = []
                for h in range(isa.parts):
                    col = col0 + h * isa.lanes
                    u16 = f"uint16x{isa.lanes}"
                    lo = wf[tir.Ramp(base + byte * PANEL + col, idx(1), isa.lanes)].astype(u16)
                    hi = wf[tir.Ramp(base + (byte + 1) * PANEL + col, idx(1),
                                     isa.lanes)].astype(u16)
                    out.append(tir.reinterpret(f"float16x{isa.lanes}", lo | (
                        hi << _bc(_const(8, "uint16"), isa.lanes))).astype(
                        f"float32x{isa.lanes}"))
                return out

            return quads, floats16(0), (floats16(2) if qtype == "q4_1" else None)

        def tile(p, col0, row0, nrows: int):
            """Rows ``row0 .. row0 + nrows`` of panel ``p``'s pass at column ``col0``."""
            span, lanes = isa.span, isa.lanes
            facc = T.alloc_buffer((nrows * span,), "float32", scope="local")
            everything = tir.Ramp(idx(0), idx(1), nrows * span)
            T.buffer_store(facc, _bc(_const(0.0, "float32"), nrows * span), [everything])
            with T.serial(idx(0), idx(nkb)) as kb:
                if ahead:
                    last = idx(panels * nkb * block - 1)
                    for line in range(0, block, CACHE_LINE):
                        at_byte = tir.min((p * nkb + kb) * block + (ahead + line), last)
                        T.evaluate(prefetch_call(wf[at_byte]))
                quads, scales, mins = decode((p * nkb + kb) * block, col0)
                parts = []
                for r in range(nrows):
                    row = row0 + r
                    rb = row * nkb + kb
                    dx = _bc(dxs[rb], lanes)
                    for h in range(isa.parts):
                        acc = _bc(sums[rb] * _const(offset, "int32"), lanes)
                        for g in range(groups):
                            for t, q in enumerate(quads[g][h]):  # q4: low, then high nibbles
                                word = (row * k + kb * QK + 16 * t) // 4 + g
                                acc = isa.dot(acc, q, xqi[word])
                        part = acc.astype(f"float32x{lanes}") * (scales[h] * dx)
                        if mins is not None:
                            part = part + mins[h] * (dx * _bc(sums[rb].astype("float32"),
                                                              lanes))
                        parts.append(part)
                # One store of the whole tile: the decoded block stays in registers for
                # every row (stores between the rows would reload and re-decode it).
                T.buffer_store(facc, facc[everything] + tir.Shuffle(
                    parts, list(range(lanes * len(parts)))), [everything])
            for r in range(nrows):
                out = tir.Ramp((row0 + r) * n + p * PANEL + col0, idx(1), span)
                val = facc[tir.Ramp(idx(r * span), idx(1), span)]
                T.buffer_store(yf, val + rf[out] if residual else val, [out])

        with T.parallel(idx(0), idx(panels)) as p:
            for col0 in range(0, PANEL, isa.span):  # a panel's later passes read it from cache
                tiles = rows // row_tile
                with T.serial(idx(0), tiles) as io:
                    tile(p, col0, io * row_tile, row_tile)
                if not static or int(rows) % row_tile:
                    with T.serial(tiles * row_tile, rows) as row:
                        tile(p, col0, row, 1)
    new = ib.get()
    for key, value in attrs.items():  # global_symbol, target, the hetcomp.* attributes
        new = new.with_attr(key, value)
    return (new.with_attr("tirx.noalias", True).with_attr("tirx.is_scheduled", True)
            .with_attr(RULE_ATTR, isa.rule))


def use_int8_dot_kernels(mod, target):
    """``mod`` (one unit's kernels, ``target`` theirs) with every unscheduled
    :func:`eligible` quantized linear replaced by :func:`linear_int8_dot` where ``target``
    :func:`has_int8_dot` (a kernel a tuning database scheduled keeps its record)."""
    isa = int8_dot_isa(target)
    if isa is None:
        return mod
    tir = compiler().tir
    # How far ahead a one-tile kernel prefetches on this CPU (x86: Intel and AMD differ).
    policy = prefetch_for(target) if isa is AVX512 else None

    def ahead(f):
        rows = f.params[0].shape[0]
        if policy is None or not isinstance(rows, tir.IntImm):
            return None
        return policy.int8_dot_ahead(int(rows))

    swaps = {gv: linear_int8_dot(f, isa, prefetch=ahead(f)) for gv, f in mod.functions_items()
             if isinstance(f, tir.PrimFunc) and eligible(f)
             and not int(f.attrs.get("tirx.is_scheduled", 0))}  # (a tuned one stays)
    if not swaps:
        return mod
    mod = mod.clone()
    for gv, f in swaps.items():
        mod[gv] = f
    return mod
