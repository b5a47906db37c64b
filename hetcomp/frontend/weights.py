"""Weight names, the compiled module's parameter order, and the packing into kernel layouts.

Loaders produce float32 ``[out, in]`` matrices named like HF checkpoints, flattened:
``embed``, ``norm``, ``lm_head`` (untied models only) and per layer ``layers.{i}.`` +
``attn_norm, wq, wk, wv, wo, ffn_norm, w_gate, w_up, w_down`` (+ ``bq, bk, bv`` with
``cfg.qkv_bias``; packed as one float32 ``bqkv``; + ``q_norm, k_norm`` with ``cfg.qk_norm`` and
``post_attn_norm, post_ffn_norm`` with ``cfg.post_norms``, Gemma 3); a GGUF loaded for a quantized
compile gives its q4_0/q4_1/q8_0 matrices as :class:`~hetcomp.kernels.quant.QuantMatrix`.

Weight dtypes: ``float32``, ``float16`` and the GGUF block formats ``q4_0``, ``q4_1``,
``q8_0``. A quantized model keeps its embedding / LM head (tied or not) in q8_0
(:func:`hetcomp.quant_format.head_dtype`, which says why).
"""

from __future__ import annotations

import numpy as np

from ..errors import HetcompError
from ..kernels.ops import pack_linear_weight, packed_shape, unpack_linear_weight
from ..quant_format import (
    BLOCK_BYTES,
    QUANT_DTYPES,
    QuantMatrix,
    head_dtype,  # noqa: F401  re-exported (llama.py)
    is_quant,
    pack_quant_weight,
    quant_packed_shape,
    unpack_quant_weight,
)
from .config import LlamaConfig
from .lazy import LazyWeights

WEIGHT_DTYPES = ("float32", "float16", *QUANT_DTYPES)


def weight_spec(name: str, n: int, k: int, fmt: str) -> tuple[str, tuple[int, ...], str]:
    """``(name, shape, dtype)`` of a packed ``[n, k]`` weight in format ``fmt``."""
    if is_quant(fmt):
        return (name, quant_packed_shape(n, k, fmt), "uint8")
    return (name, packed_shape(n, k), fmt)


def check_quantizable(cfg: LlamaConfig, wdtype: str) -> None:
    """Refuse a block format for a model whose linear rows (hidden size, attention width,
    FFN width) are not whole blocks of 32 weights."""
    if not is_quant(wdtype):
        return
    for what, k in (("hidden size", cfg.hidden_size),
                    ("attention width", cfg.num_heads * cfg.head_dim),
                    ("intermediate size", cfg.intermediate_size)):
        if k % 32:
            raise HetcompError(f"--dtype {wdtype} needs rows of whole 32-weight blocks: this "
                               f"model's {what} is {k}")


def param_specs(cfg: LlamaConfig, wdtype: str) -> list[tuple[str, tuple[int, ...], str]]:
    """``(name, shape, dtype)`` of every parameter of the compiled functions, in order."""
    e, f = cfg.hidden_size, cfg.intermediate_size
    hd = cfg.num_heads * cfg.head_dim

    def packed(name, n, k):
        return weight_spec(name, n, k, head_dtype(wdtype) if name in ("embed", "lm_head")
                           else wdtype)

    specs = [packed("embed", cfg.vocab_size, e)]
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        d = cfg.head_dim
        specs += [
            (p + "attn_norm", (e,), "float32"),
            *([(p + "q_norm", (d,), "float32"), (p + "k_norm", (d,), "float32")]
              if cfg.qk_norm else []),
            packed(p + "wqkv", cfg.qkv_size, e),
            *([(p + "bqkv", (cfg.qkv_size,), "float32")] if cfg.qkv_bias else []),
            packed(p + "wo", e, hd),
            *([(p + "post_attn_norm", (e,), "float32")] if cfg.post_norms else []),
            (p + "ffn_norm", (e,), "float32"),
            packed(p + "w_gate_up", 2 * f, e),
            packed(p + "w_down", e, f),
            *([(p + "post_ffn_norm", (e,), "float32")] if cfg.post_norms else []),
        ]
    specs.append(("norm", (e,), "float32"))
    if not cfg.tie_embeddings:
        specs.append(packed("lm_head", cfg.vocab_size, e))
    return specs


def _as_float(m) -> np.ndarray:
    return m.dequantize() if isinstance(m, QuantMatrix) else m


def _pack(mats: list, fmt: str, report: dict | None, sources: list | None = None
          ) -> np.ndarray:
    """Matrices (float32 or QuantMatrix) stacked by rows and packed in format ``fmt``.

    Quantized: a matrix already in ``fmt`` keeps its blocks byte for byte; any other is
    dequantized (if need be) and quantized by ``gguf``'s reference code. ``report`` counts
    both, ``{"kept": {fmt: n}, "converted": {"SRC->fmt": n}}``; SRC is the file's type where
    ``sources`` names it (``q4_k``), else ``float``."""
    if not is_quant(fmt):
        floats = [_as_float(m) for m in mats]
        return pack_linear_weight(floats[0] if len(floats) == 1 else np.concatenate(floats), fmt)
    out = []
    for m, given in zip(mats, sources or [None] * len(mats)):
        src = m.qtype if isinstance(m, QuantMatrix) else (given or "float")
        if src == fmt:
            out.append(m)
            key, what = "kept", fmt
        else:
            out.append(QuantMatrix.quantize(_as_float(m), fmt))
            key, what = "converted", f"{src}->{fmt}"
        if report is not None:
            report.setdefault(key, {})
            report[key][what] = report[key].get(what, 0) + 1
    return pack_quant_weight(QuantMatrix.concat(out))


def pack_weights(cfg: LlamaConfig, w: dict, wdtype: str, report: dict | None = None
                 ) -> dict[str, np.ndarray]:
    """Fuse (qkv, gate_up) and pack the loader's weights into the kernels' layouts
    (``report``: what a quantized pack kept and converted, :func:`_pack`)."""
    if wdtype not in WEIGHT_DTYPES:
        raise HetcompError(f"unsupported dtype {wdtype!r} (use {' | '.join(WEIGHT_DTYPES)})")
    hfmt = head_dtype(wdtype)

    def pack(names: list[str], fmt: str) -> np.ndarray:
        sources = [w.source(n) for n in names] if isinstance(w, LazyWeights) else None
        return _pack([w[n] for n in names], fmt, report, sources)

    out = {"embed": pack(["embed"], hfmt), "norm": _as_float(w["norm"]).astype("float32")}
    if not cfg.tie_embeddings:
        out["lm_head"] = pack(["lm_head"], hfmt)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        out[p + "attn_norm"] = _as_float(w[p + "attn_norm"]).astype("float32")
        out[p + "ffn_norm"] = _as_float(w[p + "ffn_norm"]).astype("float32")
        for name in (("q_norm", "k_norm") if cfg.qk_norm else ()) + (
                ("post_attn_norm", "post_ffn_norm") if cfg.post_norms else ()):
            out[p + name] = _as_float(w[p + name]).astype("float32")
        out[p + "wqkv"] = pack([p + "wq", p + "wk", p + "wv"], wdtype)
        if cfg.qkv_bias:
            out[p + "bqkv"] = np.concatenate([_as_float(w[p + b]) for b in ("bq", "bk", "bv")]
                                             ).astype("float32")
        out[p + "wo"] = pack([p + "wo"], wdtype)
        out[p + "w_gate_up"] = pack([p + "w_gate", p + "w_up"], wdtype)
        out[p + "w_down"] = pack([p + "w_down"], wdtype)
    specs = param_specs(cfg, wdtype)
    for name, shape, dtype in specs:
        arr = out[name]
        assert arr.shape == shape and arr.dtype == np.dtype(dtype), (name, arr.shape, shape)
    return out


def unpack_weight(arr: np.ndarray):
    """A packed weight back to ``[N, K]``: float, or a QuantMatrix for a quantized one (its
    format read off the block size)."""
    if arr.dtype == np.uint8:
        qtype = next(q for q, nb in BLOCK_BYTES.items() if nb == arr.shape[2])
        return unpack_quant_weight(arr, qtype)
    return unpack_linear_weight(arr)


def pack_weight(m, dtype: str) -> np.ndarray:
    """``[N, K]`` float or QuantMatrix -> the packed layout of ``dtype`` (as :func:`_pack`)."""
    return _pack([m], dtype, None)


def param_from_recipe(recipe: dict, packed: dict[str, np.ndarray], heads, wdtype: str
                      ) -> np.ndarray:
    """One artifact parameter from its recipe (``manifest["param_recipes"]``): a packed weight,
    optionally a range of its column blocks (a partitioned layer's slice), or a field of the
    Medusa heads, stacked (``heads``: a :class:`~hetcomp.speculative.medusa.MedusaHeads`;
    ``w`` and ``u`` as one ``[K * E, E]`` linear, ``b`` as ``[K, E]``); ``dtype``: a copy in
    that dtype (the draft's float16 weights); ``rows``: only the output columns the heads'
    draft vocabulary names (the draft's pruned LM head)."""
    if "weight" in recipe:
        arr = packed[recipe["weight"]]
        if "blocks" in recipe:
            lo, hi = recipe["blocks"]
            arr = arr[lo:hi]
        if "rows" in recipe:
            m = unpack_weight(arr)
            rows = getattr(heads, recipe["rows"])
            arr = (pack_quant_weight(m.rows(rows)) if isinstance(m, QuantMatrix)
                   else pack_linear_weight(m[rows], str(arr.dtype)))
        if "dtype" in recipe:
            arr = (pack_weight(unpack_weight(arr), recipe["dtype"]) if arr.dtype == np.uint8
                   else arr.astype(recipe["dtype"]))
        return arr
    if not recipe.get("stacked"):  # a whole field (the draft vocabulary)
        return np.asarray(getattr(heads, recipe["heads"]), dtype=np.int32)
    arr = getattr(heads, recipe["heads"])  # [K, E, E] (w, u) or [K, E] (b)
    if recipe["heads"] == "b":
        return arr.astype("float32")
    # Every head's [E, E] stacked by output column: one [K * E, E] linear.
    return pack_weight(arr.reshape(-1, arr.shape[-1]), recipe.get("dtype", wdtype))


def random_weights(cfg: LlamaConfig, seed: int = 0, scale: float = 0.08) -> dict[str, np.ndarray]:
    """Random float32 weights for a config (tests and tutorials)."""
    rng = np.random.default_rng(seed)
    e, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim

    def m(*shape):
        return (rng.standard_normal(shape) * scale).astype("float32")

    w = {"embed": m(cfg.vocab_size, e) * 10, "norm": 1 + m(e)}
    if not cfg.tie_embeddings:
        w["lm_head"] = m(cfg.vocab_size, e)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        w.update({
            p + "attn_norm": 1 + m(e), p + "ffn_norm": 1 + m(e),
            p + "wq": m(cfg.num_heads * d, e), p + "wk": m(cfg.num_kv_heads * d, e),
            p + "wv": m(cfg.num_kv_heads * d, e), p + "wo": m(e, cfg.num_heads * d),
            p + "w_gate": m(f, e), p + "w_up": m(f, e), p + "w_down": m(e, f),
        })
        if cfg.qk_norm:
            w.update({p + "q_norm": 1 + m(d) * 5, p + "k_norm": 1 + m(d) * 5})
        if cfg.post_norms:
            w.update({p + "post_attn_norm": 1 + m(e) * 5, p + "post_ffn_norm": 1 + m(e) * 5})
        if cfg.qkv_bias:  # large, as Qwen2's K biases are, so that a dropped bias shows
            w.update({p + "bq": m(cfg.num_heads * d) * 10, p + "bk": m(cfg.num_kv_heads * d) * 10,
                      p + "bv": m(cfg.num_kv_heads * d) * 10})
    return w
