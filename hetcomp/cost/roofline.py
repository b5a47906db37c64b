"""Static flops/bytes of every kernel of a decode step, and the analytic roofline cost.

:class:`Features` describes one kernel call (op class, shape, split ratio, co-run flag) with
its static flop and byte counts; the profiler stores them next to each measurement, the
XGBoost models learn from them, and :class:`RooflineCost` turns them into seconds for units
known only by a :class:`~hetcomp.profile.units.DeviceSpec` (and as the fallback for op
classes a unit was not measured on). :func:`model_step` lists the kernels of one ``verify``
call of the LLaMA module (:mod:`hetcomp.frontend.llama`), which is what the planner costs.

Pure Python: no TVM.
"""

from __future__ import annotations

import dataclasses

from ..decoder import (
    ACTIVATION_KERNELS,
    FUSED_WIDTHS,
    LINEAR_KINDS,
    attention_kernels,
    estimated_tree_nnz,
    norm_kernels,
    residual_linears,
    rope_tables,
)
from ..hardware import DeviceSpec
from ..quant_format import BLOCK_BYTES, QK, head_dtype, is_quant, pack_block


#: Op classes, each with its own cost model per unit: the three kernels of split attention
#: scale differently (cache length, ancestor count, rows) from the fused one.
OP_CLASSES = ("linear", "attention", "attention_dense", "attention_sparse", "attention_merge",
              "tree_attention", "rms_norm", "rope", "elementwise", "embed", "argmax", "copy")
FEATURE_NAMES = ("flops", "bytes", "w", "n", "k", "r", "corun", "cache_len")
_F32 = 4


def dtype_bytes(dtype: str) -> float:
    """Bytes per weight of a weight dtype: float32, float16 or a GGUF block format
    (fractional: 32 weights share a float16 scale, q4_1 also a float16 min)."""
    if dtype in BLOCK_BYTES:
        return BLOCK_BYTES[dtype] / QK
    return 2 if dtype == "float16" else _F32


def split_columns(n: int, r: float) -> int:
    """Output columns of a kernel holding the fraction ``r`` of ``n``, in whole pack blocks."""
    if r <= 0:
        return 0
    b = pack_block(n)
    return min(n // b, max(1, round(n * r / b))) * b


@dataclasses.dataclass(frozen=True)
class Features:
    """One kernel call: op class, shape, split fraction, co-run flag, static flops and bytes.

    ``n`` is the output columns the call computes (after a split), ``k`` the reduction length,
    ``r`` the fraction of the layer's full output columns, ``cache_len`` the committed KV
    length an attention call reads (0: tree-vs-tree only, the sparse part).
    """

    op: str
    kind: str = ""
    w: int = 1
    n: int = 0
    k: int = 0
    r: float = 1.0
    cache_len: int = 0
    corun: bool = False
    flops: float = 0.0
    bytes: float = 0.0

    def vector(self) -> list[float]:
        """The model features, in :data:`FEATURE_NAMES` order."""
        return [self.flops, self.bytes, self.w, self.n, self.k, self.r, float(self.corun),
                self.cache_len]

    def with_corun(self, corun: bool) -> Features:
        return dataclasses.replace(self, corun=corun)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The shapes of a LLaMA-family decoder that the kernels' costs depend on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_context: int = 2048
    weight_bytes: float = _F32
    kv_bytes: int = _F32  # per KV-cache element
    qkv_bias: bool = False  # a bias_add kernel after each layer's qkv linear (Qwen2)
    # Bytes per weight of the embedding / LM head when they differ from the layers' (0: the
    # same): a block-quantized model keeps them in q8_0 (``head_dtype``).
    head_bytes: float = 0.0
    # Gemma 3 (hetcomp.decoder): q/k norms, post-norms, the activation, the sliding window
    # (a second RoPE table; the attention kernels still scan the whole cache).
    qk_norm: bool = False
    post_norms: bool = False
    activation: str = "silu"
    sliding_window: int = 0

    @classmethod
    def from_config(cls, cfg, dtype: str = "float32", kv_dtype: str = "float32") -> ModelShape:
        """From a :class:`~hetcomp.frontend.config.LlamaConfig` (duck-typed); ``dtype``: the
        weights', ``kv_dtype``: the KV cache's."""
        head = head_dtype(dtype)
        return cls(cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
                   cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size, cfg.max_context,
                   dtype_bytes(dtype), dtype_bytes(kv_dtype),
                   bool(getattr(cfg, "qkv_bias", False)),
                   head_bytes=dtype_bytes(head) if head != dtype else 0.0,
                   qk_norm=bool(getattr(cfg, "qk_norm", False)),
                   post_norms=bool(getattr(cfg, "post_norms", False)),
                   activation=getattr(cfg, "activation", "silu"),
                   sliding_window=int(getattr(cfg, "sliding_window", 0)))

    @property
    def lm_head_bytes(self) -> float:
        """Bytes per weight of the embedding / LM head."""
        return self.head_bytes or self.weight_bytes

    @property
    def qkv_size(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    def linear_dims(self, kind: str) -> tuple[int, int, bool]:
        """``(N, K, residual)`` of a linear kind (the layouts of ``llama.py``)."""
        e, f, hd = self.hidden, self.intermediate, self.heads * self.head_dim
        res = residual_linears(self.post_norms)
        dims = {"qkv": (self.qkv_size, e, False), "o": (e, hd, "o" in res),
                "gate_up": (2 * f, e, False), "down": (e, f, "down" in res),
                "lm_head": (self.vocab, e, False), "medusa": (e, e, False)}
        if kind not in dims:
            raise ValueError(f"unknown linear kind {kind!r}")
        return dims[kind]

    def to_json(self) -> dict:
        """The fields, without those added since profiles were first stored where they hold
        their defaults (``head_bytes``, the Gemma 3 fields): a profile's key hashes this, and
        a LLaMA model's profiles stored before them keep their key."""
        d = dataclasses.asdict(self)
        for name, default in _LATER_FIELDS.items():
            if d[name] == default:
                del d[name]
        return d


_LATER_FIELDS = {"head_bytes": 0.0, "qk_norm": False, "post_norms": False,
                 "activation": "silu", "sliding_window": 0}


def linear_features(shape: ModelShape, kind: str, w: int, r: float = 1.0,
                    corun: bool = False, weight_bytes: float = 0) -> Features:
    """A linear kernel holding the fraction ``r`` of ``kind``'s output columns, ``w`` rows;
    ``weight_bytes`` per weight (0: the model's, the LM head's for ``lm_head``)."""
    full, k, residual = shape.linear_dims(kind)
    n = split_columns(full, r)
    flops = 2.0 * w * n * k + (w * n if residual else 0)
    own = shape.lm_head_bytes if kind == "lm_head" else shape.weight_bytes
    nbytes = (n * k * (weight_bytes or own)
              + _F32 * (w * k + w * n * (2 if residual else 1)))
    return Features("linear", kind, w, n, k, n / full, 0, corun, flops, nbytes)


def attention_features(shape: ModelShape, w: int, cache_len: int, corun: bool = False
                       ) -> Features:
    """The fused masked kernel: ``w`` tree queries over ``cache_len`` committed keys and the
    ``w`` tree keys under the ancestor mask (every tree key is scored). ``n``: keys."""
    h, g, d = shape.heads, shape.kv_heads, shape.head_dim
    keys = cache_len + w
    flops = 4.0 * h * w * keys * d + 5.0 * h * w * keys
    # The cache's K and V (the tree's too: rope_kv wrote them there) in its element type.
    nbytes = shape.kv_bytes * 2 * g * d * keys + _F32 * (2 * h * w * d + w * w)
    return Features("attention", "fused", w, keys, d, 1.0, cache_len, corun, flops, nbytes)


def tree_attention_features(shape: ModelShape, w: int, cache_len: int, corun: bool = False
                            ) -> Features:
    """The CUDA-graph build's attention (``script_ops.tree_attention``): the fused kernel's
    work and RoPE's (it reads the qkv rows and writes the tree's K/V into the caches,
    :func:`rope_features` without the row-major copies; Gemma's q/k norm's flops too), its
    own op class (another kernel, timed by its own probes)."""
    fused = attention_features(shape, w, cache_len, corun)
    h, g, d = shape.heads, shape.kv_heads, shape.head_dim
    rope_flops = 6.0 * w * (h + g) * d / 2 + (4.0 * w * (h + g) * d if shape.qk_norm else 0.0)
    rope_bytes = _F32 * (w * shape.qkv_size + w * d) + shape.kv_bytes * 2 * g * w * d
    return dataclasses.replace(fused, op="tree_attention", flops=fused.flops + rope_flops,
                               bytes=fused.bytes + rope_bytes)


def dense_attention_features(shape: ModelShape, w: int, cache_len: int,
                             corun: bool = False) -> Features:
    """The dense part: ``w`` tree queries over the ``cache_len`` committed keys, no mask; its
    output is a partial ``[w, H, D + 1]`` (with the log-sum-exp)."""
    h, g, d = shape.heads, shape.kv_heads, shape.head_dim
    flops = 4.0 * h * w * cache_len * d + 5.0 * h * w * cache_len
    nbytes = shape.kv_bytes * 2 * g * d * cache_len + _F32 * (h * w * d + h * w * (d + 1))
    return Features("attention_dense", "dense", w, cache_len, d, 1.0, cache_len, corun, flops,
                    nbytes)


def sparse_attention_features(shape: ModelShape, w: int, nnz: int,
                              corun: bool = False) -> Features:
    """The sparse part: each of ``w`` tree rows against its ancestors and itself, ``nnz``
    (row, key) pairs in all (the CSR's length); ``n``: ``nnz``. It reads the tree's q, K and
    V rows and the CSR, and writes a partial ``[w, H, D + 1]``."""
    h, g, d = shape.heads, shape.kv_heads, shape.head_dim
    flops = 4.0 * h * nnz * d + 5.0 * h * nnz
    nbytes = _F32 * (h * w * d + 2 * g * w * d + h * w * (d + 1)) + 4 * (w + 1 + nnz)
    return Features("attention_sparse", "sparse", w, nnz, d, 1.0, 0, corun, flops, nbytes)


def merge_features(shape: ModelShape, w: int, corun: bool = False) -> Features:
    """The exact log-sum-exp merge of the two partials into ``[w, H, D]``."""
    h, d = shape.heads, shape.head_dim
    return Features("attention_merge", "merge", w, h * d, 0, 1.0, 0, corun,
                    w * h * (3.0 * d + 10.0), _F32 * (2 * w * h * (d + 1) + w * h * d))


def layer_attention(shape: ModelShape, w: int, cache_len: int, nnz: int | None = None,
                    fused_widths: tuple[int, ...] = FUSED_WIDTHS, device_len: bool = False,
                    exact: bool = False) -> dict[str, Features]:
    """The attention kernels one layer of a verify step runs
    (:func:`hetcomp.decoder.attention_kernels`), name -> features; ``nnz``: the tree's mask
    non-zeros (None: :func:`~hetcomp.decoder.estimated_tree_nnz`); ``device_len``: the build
    for CUDA graphs; ``exact``: the fused kernel at every width (int8 activations)."""
    nnz = estimated_tree_nnz(w) if nnz is None else nnz
    build = {"attention": lambda: attention_features(shape, w, cache_len),
             "tree_attention": lambda: tree_attention_features(shape, w, cache_len),
             "attention_dense": lambda: dense_attention_features(shape, w, cache_len),
             "attention_sparse": lambda: sparse_attention_features(shape, w, nnz),
             "attention_merge": lambda: merge_features(shape, w)}
    return {name: build[name]() for name in attention_kernels(w, fused_widths, device_len,
                                                              exact)}


def rms_norm_features(shape: ModelShape, w: int, corun: bool = False,
                      residual: bool = False) -> Features:
    """An RMSNorm of ``w`` hidden rows (``residual``: and the residual added, Gemma's
    post-norms)."""
    e = shape.hidden
    return Features("rms_norm", "rms_norm", w, e, e, 1.0, 0, corun,
                    (5.0 if residual else 4.0) * w * e,
                    _F32 * ((3 if residual else 2) * w * e + e))


def qk_norm_features(shape: ModelShape, w: int, corun: bool = False) -> Features:
    """Gemma's per-head RMSNorm of the query and key heads of ``qkv`` (the V heads copied)."""
    h, g, d = shape.heads, shape.kv_heads, shape.head_dim
    return Features("rms_norm", "qk_norm", w, shape.qkv_size, d, 1.0, 0, corun,
                    4.0 * w * (h + g) * d, _F32 * (2 * w * shape.qkv_size + 2 * d))


def rope_features(shape: ModelShape, w: int, corun: bool = False) -> Features:
    h, g, d = shape.heads, shape.kv_heads, shape.head_dim
    # Per rotated pair: six multiply-adds against the step's cos/sin table; V is copied.
    # Written: q, K and V into the caches and once more row-major (k_tree, v_tree).
    flops = 6.0 * w * (h + g) * d / 2
    nbytes = _F32 * (w * shape.qkv_size + w * (h + 4 * g) * d + w * d)
    return Features("rope", "rope", w, shape.qkv_size, d, 1.0, 0, corun, flops, nbytes)


def rope_table_features(shape: ModelShape, w: int, corun: bool = False) -> Features:
    """The step's cos/sin table (once per call): a pow and a cos or sin per entry."""
    d = shape.head_dim
    return Features("rope", "rope_table", w, d, 0, 1.0, 0, corun, 40.0 * w * d,
                    _F32 * (w + w * d))


def silu_mul_features(shape: ModelShape, w: int, corun: bool = False) -> Features:
    """The gated activation (SwiGLU, or GeGLU: a cube and two more multiplies)."""
    f = shape.intermediate
    flops = (5.0 if shape.activation == "silu" else 9.0) * w * f
    return Features("elementwise", ACTIVATION_KERNELS[shape.activation], w, f, 0, 1.0, 0, corun,
                    flops, _F32 * 3 * w * f)


def bias_add_features(shape: ModelShape, w: int, corun: bool = False) -> Features:
    """The q/k/v bias added to the qkv linear's ``[w, qkv_size]`` output (on the host unit)."""
    n = shape.qkv_size
    return Features("elementwise", "bias_add", w, n, 0, 1.0, 0, corun, 1.0 * w * n,
                    _F32 * (2 * w * n + n))


def medusa_act_features(shape: ModelShape, w: int, corun: bool = False) -> Features:
    e = shape.hidden
    return Features("elementwise", "medusa_act", w, e, 0, 1.0, 0, corun, 6.0 * w * e,
                    _F32 * (3 * w * e + e))


def embed_features(shape: ModelShape, w: int, corun: bool = False) -> Features:
    e = shape.hidden
    return Features("embed", "embed", w, e, 0, 1.0, 0, corun, 0.0,
                    w * e * (shape.lm_head_bytes + _F32) + 4 * w)


def argmax_features(shape: ModelShape, w: int, corun: bool = False, n: int = 0) -> Features:
    """Row maxima of ``w`` logit rows of ``n`` columns (0: the whole vocabulary)."""
    v = n or shape.vocab
    return Features("argmax", "argmax", w, v, v, 1.0, 0, corun, 2.0 * w * v, _F32 * w * (v + 1))


def copy_features(w: int, n: int, corun: bool = False) -> Features:
    """Copying ``w x n`` float32 activations (between units, or a concat)."""
    return Features("copy", "copy", w, n, 0, 1.0, 0, corun, 0.0, 2.0 * _F32 * w * n)


def kernel_features(shape: ModelShape, op: dict) -> Features:
    """Features of one compiled kernel from its description (``AnnotateCost``'s
    :func:`~hetcomp.passes.annotate_cost.op_description`: op kind, rows ``w``, ``cache_len``,
    linear ``n``/``k``/``residual``, attention ``part``, the tree's ``nnz`` if known, and
    ``io_bytes``, the bytes of its buffers at that width). Kernels without a model of their
    own (elementwise, commit) cost what they read and write."""
    kind, w, cache_len = op["op_kind"], int(op["w"]), int(op.get("cache_len", 0))
    if kind == "linear":
        n, k, residual = int(op["n"]), int(op["k"]), bool(op.get("residual", 0))
        flops = 2.0 * w * n * k + (w * n if residual else 0)
        # A quantized kernel names its format (the LM head's q8_0 beside q4_1 layers).
        wbytes = dtype_bytes(op["qtype"]) if op.get("qtype") else shape.weight_bytes
        nbytes = n * k * wbytes + _F32 * (w * k + w * n * (2 if residual else 1))
        return Features("linear", "linear", w, n, k, 1.0, 0, False, flops, nbytes)
    if kind == "attention":
        return (dense_attention_features(shape, w, cache_len) if op.get("part") == "dense"
                else attention_features(shape, w, cache_len))
    if kind == "tree_attention":
        return tree_attention_features(shape, w, cache_len)
    if kind == "sparse_tree_attention":  # hetcomp.kernels.sparse_attention.SPARSE_KIND
        return sparse_attention_features(shape, w, int(op.get("nnz") or estimated_tree_nnz(w)))
    if kind == "attention_merge":
        return merge_features(shape, w)
    if kind == "rms_norm":
        return rms_norm_features(shape, w, residual=bool(op.get("residual", 0)))
    if kind == "topk":  # the draft's candidates (script_ops.topk_rows): one pass, as argmax
        return argmax_features(shape, w, n=int(op.get("n", 0)))
    simple = {"rope": rope_features, "embed": embed_features, "argmax": argmax_features,
              "qk_norm": qk_norm_features}
    if kind in simple:
        return simple[kind](shape, w)
    nbytes = float(op.get("io_bytes", 0))
    return Features("elementwise", kind, w, 0, 0, 1.0, 0, False, nbytes / _F32, nbytes)


@dataclasses.dataclass(frozen=True)
class StepOp:
    """A kernel of the decode step: its features, how often it runs, and what can move.

    ``split`` names what the planner may distribute across units: a linear kind (column
    split), ``"attention"`` (dense/sparse placement), or ``""`` (runs on the host unit).
    """

    name: str
    features: Features
    count: int
    split: str = ""


def model_step(shape: ModelShape, w: int, cache_len: int, nnz: int | None = None,
               device_len: bool = False, fused_linears: bool = False,
               exact_attention: bool = False) -> list[StepOp]:
    """The kernels of one ``verify`` call with ``w`` tree nodes after ``cache_len`` tokens
    (``nnz``: the tree's mask non-zeros, for the sparse attention part). The attention
    kernels (:func:`layer_attention`) carry ``split="attention"``: the planner places them
    together. ``device_len``: the build for CUDA graphs (one attention kernel, RoPE inside
    it, and the copy of the tree inputs, ``stage_tree``). ``fused_linears``: the layers'
    RMSNorms, gated activation and q/k/v bias run inside the qkv and gate_up kernels
    (``passes.fuse_linear_chains``; their bytes and flops are those kernels' own, negligible
    beside the weights). ``exact_attention``: the fused attention kernel at every width (a
    build whose linears take int8 activations, :data:`hetcomp.decoder.FUSED_WIDTHS`)."""
    nl = shape.layers
    attention = [StepOp(name, feat, nl, "attention") for name, feat in layer_attention(
        shape, w, cache_len, nnz, device_len=device_len, exact=exact_attention).items()]
    staged = 4 * (w + w * w)  # positions and mask, read and written
    stage = [StepOp("stage_tree", Features("elementwise", "stage_tree", w, 0, 0, 1.0, 0, False,
                                           staged / _F32, 2.0 * staged), 1)] if device_len else []
    norms = {"rms_norm": lambda: rms_norm_features(shape, w),
             "rms_norm_res": lambda: rms_norm_features(shape, w, residual=True),
             "qk_norm": lambda: qk_norm_features(shape, w)}
    return [
        *stage,
        StepOp("embed", embed_features(shape, w), 1),
        StepOp("rope_table", rope_table_features(shape, w), rope_tables(shape.sliding_window)),
        *[StepOp(name, norms[name](), count) for name, count in
          norm_kernels(nl, shape.post_norms, shape.qk_norm, fused_linears,
                       device_len).items()],
        StepOp("qkv", linear_features(shape, "qkv", w), nl, "qkv"),
        *([StepOp("bias_add", bias_add_features(shape, w), nl)]
          if shape.qkv_bias and not fused_linears else []),
        *([] if device_len else [StepOp("rope", rope_features(shape, w), nl)]),
        *attention,
        StepOp("o", linear_features(shape, "o", w), nl, "o"),
        StepOp("gate_up", linear_features(shape, "gate_up", w), nl, "gate_up"),
        *([] if fused_linears else [StepOp(ACTIVATION_KERNELS[shape.activation],
                                           silu_mul_features(shape, w), nl)]),
        StepOp("down", linear_features(shape, "down", w), nl, "down"),
        StepOp("lm_head", linear_features(shape, "lm_head", w), 1, "lm_head"),
        StepOp("argmax", argmax_features(shape, w), 1),
    ]


@dataclasses.dataclass(frozen=True)
class DraftShape:
    """The Medusa draft call's shapes (``hetcomp.frontend.llama._add_medusa``).

    ``vocab``: rows of the draft's LM head (a pruned draft vocabulary; 0: the whole one);
    ``weight_bytes``: bytes per weight of the heads and their LM head (a float16 draft of a
    float32 model; 0: the model's); ``root``: heads conditioned on the root token's embedding
    (a second ``E x E`` linear per head and one embedding row).
    """

    heads: int
    vocab: int = 0
    weight_bytes: int = 0
    root: bool = False


def draft_step(shape: ModelShape, draft: DraftShape) -> list[StepOp]:
    """The kernels of the Medusa ``medusa`` call that proposes the next tree (one hidden row).

    The draft function is not partitioned (only the decoder's functions are), so every
    kernel runs on the host unit.
    """
    k = draft.heads
    vocab = draft.vocab or shape.vocab
    head = linear_features(shape, "medusa", 1, weight_bytes=draft.weight_bytes)
    # The heads stacked into one linear of K * E columns (one more for the root's term):
    # K times the weights, flops and outputs, the input row read once.
    stacked = dataclasses.replace(head, n=k * head.n, flops=k * head.flops,
                                  bytes=k * (head.bytes - _F32 * head.k) + _F32 * head.k)
    ops = [StepOp("medusa", stacked, 2 if draft.root else 1)]
    if draft.root:
        ops.append(StepOp("medusa_embed", embed_features(shape, 1), 1))
    return ops + [
        StepOp("medusa_act", medusa_act_features(shape, k), 1),
        # A quantized model's draft reads its LM head in the model's q8_0 blocks.
        StepOp("medusa_lm_head", linear_features(
            shape, "lm_head", k, vocab / shape.vocab,
            weight_bytes=shape.head_bytes or draft.weight_bytes), 1),
        StepOp("medusa_topk", argmax_features(shape, k, n=vocab), 1),
    ]


#: Rows of a linear the cuda build runs on tensor cores (gpu.TensorCoreLinear,
#: gpu.QuantTensorCoreLinear: 16-row WMMA tiles).
TENSOR_CORE_ROWS = (16, 64)


def tensor_core_products(dtype: str, tensor_cores: bool = True) -> int:
    """Tensor-core products per multiply-add of the model in a cuda build's linears of
    16-64 rows: 2 with float16 weights (x as float16 hi and lo terms), 4 with block-quantized
    ones (the dequantized weights' hi and lo terms too), 0 where they run on the CUDA cores
    (float32 weights, ``--no-tensor-cores``)."""
    if not tensor_cores:
        return 0
    return 4 if is_quant(dtype) else 2 if dtype == "float16" else 0


@dataclasses.dataclass(frozen=True)
class RooflineCost:
    """``time = max(flops / peak, bytes / bandwidth) + launch`` for a :class:`DeviceSpec`.

    A pure function of :class:`Features`; it ignores ``corun`` (the planner bounds co-running
    units on shared memory by their summed bytes over the shared bandwidth).
    ``tensor_products`` (:func:`tensor_core_products`; 0: none): a linear of 16-64 rows
    (a multiple of 16) runs on the spec's tensor cores, its flops times that many products
    at ``tensor_gflops``.
    """

    spec: DeviceSpec
    tensor_products: int = 0

    def __call__(self, feat: Features) -> float:
        return (max(feat.flops / (self._rate(feat) * 1e9),
                    feat.bytes / (self.spec.mem_bw_gbs * 1e9)) + self.spec.launch_s)

    predict = __call__

    def _rate(self, feat: Features) -> float:
        """GFLOP/s of the model's own flops for this kernel."""
        lo, hi = TENSOR_CORE_ROWS
        if (self.tensor_products and self.spec.tensor_gflops and feat.op == "linear"
                and lo <= feat.w <= hi and feat.w % lo == 0):
            return self.spec.tensor_gflops / self.tensor_products
        return self.spec.peak_gflops


def roofline_step_time(shape: ModelShape, spec: DeviceSpec, w: int, cache_len: int,
                       nnz: int | None = None) -> float:
    """Roofline time of one ``verify`` call run entirely on one unit."""
    cost = RooflineCost(spec)
    return sum(op.count * cost(op.features) for op in model_step(shape, w, cache_len, nnz))
