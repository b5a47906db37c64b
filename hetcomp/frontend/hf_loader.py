"""Read an HF LLaMA checkpoint folder: config.json, *.safetensors and tokenizer.json."""

from __future__ import annotations

import glob
import json
import os
import struct

import numpy as np

from ..errors import HetcompError
from .config import LlamaConfig

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": "bf16", "F64": np.float64}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Parse a safetensors file (8-byte header size, JSON header, raw little-endian data)."""
    try:
        with open(path, "rb") as fh:
            (hlen,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(hlen))
            base = 8 + hlen
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError, struct.error) as e:
        raise HetcompError(f"corrupt safetensors file {path}: {e}") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = _DTYPES.get(info["dtype"])
        if dt is None:
            raise HetcompError(f"unsupported safetensors dtype {info['dtype']} in {name}")
        start, end = info["data_offsets"]
        if base + end > data.size:
            raise HetcompError(f"truncated safetensors file {path}")
        raw = np.asarray(data[base + start: base + end])
        if dt == "bf16":
            arr = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = raw.view(dt)
        out[name] = arr.reshape(info["shape"]).astype(np.float32)
    return out


def load_hf(folder: str, max_context: int | None = None):
    """Load ``(config, float32 weights, tokenizer spec)`` from an HF LLaMA folder."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise HetcompError(f"not an HF model folder (no config.json): {folder}")
    with open(cfg_path) as fh:
        hf = json.load(fh)
    archs = hf.get("architectures") or [hf.get("model_type", "?")]
    if hf.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        raise HetcompError(f"unsupported architecture {archs[0]!r} (supported: llama)")
    cfg = LlamaConfig(
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        vocab_size=hf["vocab_size"],
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        max_context=min(hf.get("max_position_embeddings", 2048), max_context or 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise HetcompError(f"no *.safetensors weights in {folder}")
    raw: dict[str, np.ndarray] = {}
    for f in files:
        raw.update(read_safetensors(f))

    def get(name):
        if name not in raw:
            raise HetcompError(f"HF checkpoint is missing tensor {name}")
        return raw[name]

    w = {"embed": get("model.embed_tokens.weight"), "norm": get("model.norm.weight")}
    if not cfg.tie_embeddings:
        w["lm_head"] = get("lm_head.weight")
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
             "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
             "w_down": "mlp.down_proj"}
    for i in range(cfg.num_layers):
        for ours, theirs in names.items():
            w[f"layers.{i}.{ours}"] = get(f"model.layers.{i}.{theirs}.weight")
    spec = _tokenizer_spec(folder)
    return cfg, w, spec


def _tokenizer_spec(folder: str) -> dict:
    tok_path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(tok_path):
        raise HetcompError(f"HF model folder has no tokenizer.json: {folder}")
    with open(tok_path) as fh:
        tokenizer_json = fh.read()
    meta = {}
    tc_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(tc_path):
        with open(tc_path) as fh:
            meta = json.load(fh)
    gen = {}
    gc_path = os.path.join(folder, "generation_config.json")
    if os.path.isfile(gc_path):
        with open(gc_path) as fh:
            gen = json.load(fh)
    eos = gen.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0]
    return {"tokenizer_json": tokenizer_json, "eos_token_id": eos,
            "bos_token_id": gen.get("bos_token_id"), "add_bos_token": False,
            "chat_template": meta.get("chat_template")}
