"""Weight names, the compiled module's parameter order, and the packing into kernel layouts.

Loaders produce float32 ``[out, in]`` matrices named like HF checkpoints, flattened:
``embed``, ``norm``, ``lm_head`` (untied models only) and per layer ``layers.{i}.`` +
``attn_norm, wq, wk, wv, wo, ffn_norm, w_gate, w_up, w_down`` (+ ``bq, bk, bv`` with
``cfg.qkv_bias``; packed as one float32 ``bqkv``).
"""

from __future__ import annotations

import numpy as np

from ..kernels.ops import pack_linear_weight, packed_shape, unpack_linear_weight
from .config import LlamaConfig

WEIGHT_DTYPES = ("float32", "float16")


def param_specs(cfg: LlamaConfig, wdtype: str) -> list[tuple[str, tuple[int, ...], str]]:
    """``(name, shape, dtype)`` of every parameter of the compiled functions, in order."""
    e, f = cfg.hidden_size, cfg.intermediate_size
    hd = cfg.num_heads * cfg.head_dim

    def packed(name, n, k):
        return (name, packed_shape(n, k), wdtype)

    specs = [packed("embed", cfg.vocab_size, e)]
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        specs += [
            (p + "attn_norm", (e,), "float32"),
            packed(p + "wqkv", cfg.qkv_size, e),
            *([(p + "bqkv", (cfg.qkv_size,), "float32")] if cfg.qkv_bias else []),
            packed(p + "wo", e, hd),
            (p + "ffn_norm", (e,), "float32"),
            packed(p + "w_gate_up", 2 * f, e),
            packed(p + "w_down", e, f),
        ]
    specs.append(("norm", (e,), "float32"))
    if not cfg.tie_embeddings:
        specs.append(packed("lm_head", cfg.vocab_size, e))
    return specs


def pack_weights(cfg: LlamaConfig, w: dict[str, np.ndarray], wdtype: str) -> dict[str, np.ndarray]:
    """Fuse (qkv, gate_up) and pack the loader's float32 weights into the kernels' layouts."""
    out = {"embed": pack_linear_weight(w["embed"], wdtype),
           "norm": w["norm"].astype("float32")}
    if not cfg.tie_embeddings:
        out["lm_head"] = pack_linear_weight(w["lm_head"], wdtype)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        out[p + "attn_norm"] = w[p + "attn_norm"].astype("float32")
        out[p + "ffn_norm"] = w[p + "ffn_norm"].astype("float32")
        qkv = np.concatenate([w[p + "wq"], w[p + "wk"], w[p + "wv"]], axis=0)
        out[p + "wqkv"] = pack_linear_weight(qkv, wdtype)
        if cfg.qkv_bias:
            out[p + "bqkv"] = np.concatenate([w[p + "bq"], w[p + "bk"], w[p + "bv"]]
                                             ).astype("float32")
        out[p + "wo"] = pack_linear_weight(w[p + "wo"], wdtype)
        gu = np.concatenate([w[p + "w_gate"], w[p + "w_up"]], axis=0)
        out[p + "w_gate_up"] = pack_linear_weight(gu, wdtype)
        out[p + "w_down"] = pack_linear_weight(w[p + "w_down"], wdtype)
    specs = param_specs(cfg, wdtype)
    for name, shape, dtype in specs:
        arr = out[name]
        assert arr.shape == shape and arr.dtype == np.dtype(dtype), (name, arr.shape, shape)
    return out


def param_from_recipe(recipe: dict, packed: dict[str, np.ndarray], heads, wdtype: str
                      ) -> np.ndarray:
    """One artifact parameter from its recipe (``manifest["param_recipes"]``): a packed weight,
    optionally a range of its column blocks (a partitioned layer's slice), or one Medusa head's
    field (``heads``: a :class:`~hetcomp.speculative.medusa.MedusaHeads`); ``dtype``: a copy in
    that dtype (the draft's float16 weights); ``rows``: only the output columns the heads'
    draft vocabulary names (the draft's pruned LM head)."""
    if "weight" in recipe:
        arr = packed[recipe["weight"]]
        if "blocks" in recipe:
            lo, hi = recipe["blocks"]
            arr = arr[lo:hi]
        if "rows" in recipe:
            arr = pack_linear_weight(unpack_linear_weight(arr)[getattr(heads, recipe["rows"])],
                                     str(arr.dtype))
        if "dtype" in recipe:
            arr = arr.astype(recipe["dtype"])
        return arr
    if "index" not in recipe:  # a whole field (the draft vocabulary)
        return np.asarray(getattr(heads, recipe["heads"]), dtype=np.int32)
    arr = getattr(heads, recipe["heads"])[recipe["index"]]
    if recipe["heads"] == "b":
        return arr.astype("float32")
    return pack_linear_weight(arr, recipe.get("dtype", wdtype))


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
        if cfg.qkv_bias:  # large, as Qwen2's K biases are, so that a dropped bias shows
            w.update({p + "bq": m(cfg.num_heads * d) * 10, p + "bk": m(cfg.num_kv_heads * d) * 10,
                      p + "bv": m(cfg.num_kv_heads * d) * 10})
    return w
