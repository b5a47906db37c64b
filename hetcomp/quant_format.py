"""GGUF block-quantized weights (q4_0, q4_1, q8_0): the formats, their device layout and the
host-side conversions (numpy and the ``gguf`` package only: artifacts rebuild their weights
with a runtime-only TVM, so this sits on the ground floor, beside the artifact format).

A GGUF block holds 32 consecutive weights of one output row: a float16 scale ``d`` (q4_1:
then a float16 min ``m``), then the quants: q4_0/q4_1 16 bytes, weight ``t`` in the low nibble
of byte ``t`` and weight ``t + 16`` in its high nibble, value ``d (q - 8)`` / ``d q + m``; q8_0
32 int8, value ``d q``.

Device layout, ``[N // B, K // 32, bytes, B]`` uint8 (B = :func:`pack_block`): the file's
blocks, byte ``c`` of the block of output column ``j`` at ``[j // B, kb, c, j % B]``. It is
the float kernels' ``[N // B, K, B]`` panel layout with whole blocks for rows: a panel of B
columns is one contiguous run that a parallel task streams once, and every byte of a block
(scale halves, min halves, quant bytes) is a B-wide contiguous vector across the panel's
columns, so one vector load dequantizes B columns and the ``W x B`` accumulator tile of the
float rule carries over unchanged. A pure byte permutation of the file's blocks, so it is
exact by construction and reversible (:func:`unpack_quant_weight`); axis 0 is still column
panels, so slicing by panels works as for float weights.
"""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np

from .errors import HetcompError


def pack_block(n: int) -> int:
    """The column block B of a packed linear weight with ``n`` output columns (float and
    quantized layouts alike)."""
    for b in (32, 16, 8, 4, 2):
        if n % b == 0:
            return b
    return 1


QK = 32  # weights per block
#: Bytes per block.
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}
#: Bytes at the front of each block before its quants: the float16 scale (and q4_1's min).
HEADER_BYTES = {"q4_0": 2, "q4_1": 4, "q8_0": 2}
QUANT_DTYPES = tuple(BLOCK_BYTES)


def is_quant(dtype: str | None) -> bool:
    return dtype in BLOCK_BYTES


def head_dtype(wdtype: str) -> str:
    """The format of the embedding table / LM head of a model with weights ``wdtype``: q8_0
    for every block format, else ``wdtype``. It is the one matrix every step reads whole for
    the logits, where 4-bit rounding costs the most, and llama.cpp's own Q4 files store it
    as Q8_0 (SmolLM2's does)."""
    return "q8_0" if is_quant(wdtype) else wdtype


def cache_dtype(wdtype: str) -> str:
    """The KV cache's default element type for weights ``wdtype``: the weights' float dtype,
    float16 for a block format (llama.cpp's default cache)."""
    return "float16" if is_quant(wdtype) else wdtype


def _ggml_type(qtype: str):
    return getattr(gguf.GGMLQuantizationType, qtype.upper())


@dataclasses.dataclass(frozen=True)
class QuantMatrix:
    """An ``[N, K]`` weight as GGUF blocks: ``blocks`` uint8 ``[N, K // 32, BLOCK_BYTES]``."""

    qtype: str
    blocks: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.blocks.shape[0], self.blocks.shape[1] * QK

    @property
    def size(self) -> int:
        n, k = self.shape
        return n * k

    @classmethod
    def from_gguf_bytes(cls, qtype: str, data: np.ndarray, n: int) -> QuantMatrix:
        """The tensor data of a GGUF reader (``[N, K // 32 * bytes]`` uint8), kept as is."""
        return cls(qtype, np.ascontiguousarray(data, dtype=np.uint8).reshape(
            n, -1, BLOCK_BYTES[qtype]))

    @classmethod
    def quantize(cls, w: np.ndarray, qtype: str) -> QuantMatrix:
        """``w`` float ``[N, K]`` quantized with the ``gguf`` package's reference code."""
        n, k = w.shape
        if k % QK:
            raise HetcompError(f"cannot quantize a weight of {k} inputs to {qtype}: the row "
                               f"length must be a multiple of {QK}")
        data = gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), _ggml_type(qtype))
        return cls.from_gguf_bytes(qtype, data, n)

    def dequantize(self) -> np.ndarray:
        n, k = self.shape
        flat = self.blocks.reshape(n, -1)
        return gguf.quants.dequantize(flat, _ggml_type(self.qtype)).reshape(n, k).astype(
            np.float32)

    def rows(self, index) -> QuantMatrix:
        return QuantMatrix(self.qtype, np.ascontiguousarray(self.blocks[index]))

    @staticmethod
    def concat(parts: list[QuantMatrix]) -> QuantMatrix:
        assert len({p.qtype for p in parts}) == 1
        return QuantMatrix(parts[0].qtype, np.concatenate([p.blocks for p in parts], axis=0))


def int8_rounded(x: np.ndarray) -> np.ndarray:
    """``x [rows, K]`` as an int8-dot linear computes with it
    (:mod:`hetcomp.schedules.int8_dot`): each row's blocks of 32 rounded to ``dx rint(x /
    dx)``, ``dx = max|x| / 127``, in float32 as the kernel rounds them."""
    rows, k = x.shape
    xb = np.asarray(x, np.float32).reshape(rows, k // QK, QK)
    amax = np.abs(xb).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    return (np.rint(xb * inv) * (amax / np.float32(127))).reshape(rows, k)


def quant_packed_shape(n: int, k: int, qtype: str) -> tuple[int, int, int, int]:
    b = pack_block(n)
    return (n // b, k // QK, BLOCK_BYTES[qtype], b)


def pack_quant_weight(m: QuantMatrix) -> np.ndarray:
    """``[N, K // 32, bytes]`` blocks -> the device layout ``[N // B, K // 32, bytes, B]``."""
    n, nkb, nb = m.blocks.shape
    b = pack_block(n)
    return np.ascontiguousarray(m.blocks.reshape(n // b, b, nkb, nb).transpose(0, 2, 3, 1))


def unpack_quant_weight(wp: np.ndarray, qtype: str) -> QuantMatrix:
    p, nkb, nb, b = wp.shape
    return QuantMatrix(qtype, np.ascontiguousarray(wp.transpose(0, 3, 1, 2).reshape(
        p * b, nkb, nb)))
