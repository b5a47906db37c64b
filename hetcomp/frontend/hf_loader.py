"""Read an HF LLaMA checkpoint folder as transformers writes it (4.x and 5.x).

``config.json`` (RoPE under ``rope_parameters`` in 5.x, top-level ``rope_theta`` /
``rope_scaling`` before), ``model.safetensors`` or ``model.safetensors.index.json`` with its
shards, ``generation_config.json`` (EOS ids), ``tokenizer.json`` and the chat template
(``chat_template.jinja``, ``chat_template.json`` or ``tokenizer_config.json``).

A config value that changes the model and that hetcomp does not implement is refused with a
:class:`HetcompError`; a missing key means transformers' own ``LlamaConfig`` default, so the
compiled model is the one transformers would run.
"""

from __future__ import annotations

import json
import os

import ml_dtypes  # noqa: F401  (a TVM dependency; registers numpy's bfloat16 for safetensors)
import numpy as np
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer

from ..errors import HetcompError
from .config import DEFAULT_CONTEXT, LlamaConfig, context_length, weight_shapes
from .tokenizer import check_chat_template

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_DTYPES = ("F32", "F16", "BF16")
# Our weight name -> the HF tensor name under ``model.layers.{i}.`` (``.weight``).
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
                "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
                "w_down": "mlp.down_proj"}


def _read_json(path: str) -> dict:
    """A JSON object file of the folder (every file an HF folder keeps is one)."""
    try:
        with open(path) as fh:
            value = json.load(fh)
    except (OSError, ValueError, RecursionError) as e:
        raise HetcompError(f"cannot read {path}: {e}") from None
    if not isinstance(value, dict):
        raise HetcompError(f"{path} is not a JSON object")
    return value


def _rope_theta(hf: dict) -> float:
    """The RoPE base, refusing any RoPE variant other than the default. transformers 5 reads
    ``rope_scaling`` over ``rope_parameters`` when a config has both (one saved by 5.x, then
    given a scaling by hand), and 4.x reads ``rope_scaling`` alone: so does this."""
    given = hf.get("rope_parameters")  # transformers 5
    params = hf.get("rope_scaling") or given
    if params is None:
        params = {}
    if not isinstance(params, dict) or not isinstance(given or {}, dict):
        raise HetcompError(f"unsupported rope_parameters {params!r} (expected one dict)")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise HetcompError(f"unsupported rope_type {kind!r} in config.json (supported: default)")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise HetcompError(f"unsupported partial_rotary_factor {params['partial_rotary_factor']}"
                           " in config.json (supported: 1.0)")
    theta = params.get("rope_theta", (given or {}).get("rope_theta", hf.get("rope_theta")))
    return float(10000.0 if theta is None else theta)


def read_hf_config(folder: str, max_context: int | None = None) -> LlamaConfig:
    """The model's :class:`LlamaConfig` from ``config.json`` (no weights are read)."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise HetcompError(f"not an HF model folder (no config.json): {folder}")
    hf = _read_json(cfg_path)
    # A null value is an absent one (transformers' default), as `"rope_scaling": null` is.
    hf = {k: v for k, v in hf.items() if v is not None}
    archs = hf.get("architectures") or [hf.get("model_type", "?")]
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise HetcompError(f"config.json architectures {archs!r} is not a list of names")
    qwen2 = hf.get("model_type") == "qwen2" or "Qwen2ForCausalLM" in archs
    if hf.get("model_type") != "llama" and "LlamaForCausalLM" not in archs and not qwen2:
        # An HF Gemma folder stores w where the norms multiply by 1 + w (the GGUF stores 1 + w).
        gemma = " in HF folders; gemma3 from its GGUF" if "gemma" in str(archs[0]).lower() else ""
        raise HetcompError(f"unsupported architecture {archs[0]!r} (supported: llama, "
                           f"qwen2{gemma})")
    if qwen2 and hf.get("use_sliding_window", False):
        raise HetcompError("unsupported use_sliding_window: true in config.json")
    # Values that change the model; hetcomp implements one of each.
    if hf.get("hidden_act", "silu") != "silu":
        raise HetcompError(f"unsupported hidden_act {hf['hidden_act']!r} in config.json "
                           "(supported: silu)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key, False):
            raise HetcompError(f"unsupported {key}: true in config.json (hetcomp has no biases)")
    try:
        heads = hf["num_attention_heads"]
        return LlamaConfig(
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads", heads),  # (absent: one per head)
            vocab_size=hf["vocab_size"],
            rope_theta=_rope_theta(hf),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_context=context_length(hf.get("max_position_embeddings", DEFAULT_CONTEXT),
                                       max_context),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            head_dim=hf.get("head_dim") or 0,
            qkv_bias=qwen2,  # Qwen2Attention's q/k/v projections always have biases
        )
    except KeyError as e:
        raise HetcompError(f"config.json lacks {e.args[0]!r}: {cfg_path}") from None
    except (ValueError, TypeError) as e:  # TypeError: a value of the wrong kind
        raise HetcompError(f"inconsistent config.json: {e}") from None


def _shards(folder: str) -> dict[str, list[str]]:
    """``{shard file: tensor names}`` from the index, or the single ``model.safetensors``."""
    present = {f for f in os.listdir(folder) if f.endswith(".safetensors")}
    index_path = os.path.join(folder, INDEX_FILE)
    if not os.path.isfile(index_path):
        if SINGLE_FILE not in present:
            raise HetcompError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}")
        return {SINGLE_FILE: []}  # every tensor in the file
    index = _read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(v, str) for v in weight_map.values()):
        raise HetcompError(f"{index_path} has no weight_map")
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(shard, []).append(name)
    missing = sorted(set(shards) - present)
    if missing:
        raise HetcompError(f"shard {missing[0]} named by {INDEX_FILE} is missing from {folder}")
    extra = sorted(present - set(shards))
    if extra:  # an index left over from another save, or a shard from another model
        raise HetcompError(f"{extra[0]} in {folder} is not named by {INDEX_FILE}")
    return shards


def read_hf_tensors(folder: str, wanted: set[str]) -> dict[str, np.ndarray]:
    """The ``wanted`` tensors as float32, shard by shard.

    safetensors reads one tensor at a time (bf16 and fp16 are widened per tensor), so
    loading holds the float32 weights plus one tensor. Its ``pread`` backend rather than
    ``mmap``: a mapped file's touched pages count in the process's memory until the file is
    closed, so SmolLM2 from one 538 MB file peaked at 1116 MB RSS with mmap, 591 MB with
    pread (sharded in 100 MB files: 658 MB and 589 MB).
    """
    out: dict[str, np.ndarray] = {}
    for shard, listed in _shards(folder).items():
        path = os.path.join(folder, shard)
        try:
            with safe_open(path, framework="numpy", backend="pread") as fh:
                names = set(fh.keys())
                lost = sorted(set(listed) - names)
                if lost:
                    raise HetcompError(f"tensor {lost[0]} named by {INDEX_FILE} is not in {shard}")
                for name in sorted(names & wanted):
                    dtype = fh.get_slice(name).get_dtype()
                    if dtype not in _DTYPES:
                        raise HetcompError(f"unsupported safetensors dtype {dtype} of {name} in "
                                           f"{shard} (supported: {', '.join(_DTYPES)})")
                    arr = fh.get_tensor(name)
                    out[name] = arr if arr.dtype == np.float32 else arr.astype(np.float32)
        except SafetensorError as e:
            raise HetcompError(f"corrupt or truncated safetensors file {path}: {e}") from None
    return out


def load_hf(folder: str, max_context: int | None = None):
    """Load ``(config, float32 weights, tokenizer spec)`` from an HF LLaMA or Qwen2 folder."""
    cfg = read_hf_config(folder, max_context)
    spec = _tokenizer_spec(folder)
    outside = [i for i in spec["eos_token_ids"] + [spec["bos_token_id"]]
               if i is not None and i >= cfg.vocab_size]
    if outside:  # (the model could never emit such an EOS; every prompt would be refused)
        raise HetcompError(f"token id {outside[0]} in the folder's eos/bos ids lies outside "
                           f"the vocabulary of {cfg.vocab_size}")
    names = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight",
             "lm_head": "lm_head.weight"}
    for i in range(cfg.num_layers):
        for ours, theirs in _LAYER_NAMES.items():
            names[f"layers.{i}.{ours}"] = f"model.layers.{i}.{theirs}.weight"
        for x in "qkv":
            names[f"layers.{i}.b{x}"] = f"model.layers.{i}.self_attn.{x}_proj.bias"
    shapes = weight_shapes(cfg)
    # A tied config's checkpoint may still hold an LM head: read it, to compare.
    raw = read_hf_tensors(folder, {names[n] for n in shapes} | {names["lm_head"]})
    w = {}
    for ours, shape in shapes.items():
        hf_name = names[ours]
        arr = raw.pop(hf_name, None)
        if arr is None:
            raise HetcompError(f"HF checkpoint is missing tensor {hf_name}")
        if arr.shape != shape:
            raise HetcompError(f"tensor {hf_name} has shape {list(arr.shape)}, config.json "
                               f"implies {list(shape)}")
        w[ours] = arr
    head = raw.pop(names["lm_head"], None)
    if head is not None and not (head.shape == w["embed"].shape
                                 and np.array_equal(head, w["embed"])):
        # transformers 5 keeps such a head untied, 4.x ties it: which model is meant?
        raise HetcompError("config.json ties the LM head to the embedding but the checkpoint "
                           "holds a different lm_head.weight: set tie_word_embeddings to false "
                           "to compile with that head")
    return cfg, w, spec


def _chat_template(folder: str, tokenizer_config: dict) -> str | None:
    """transformers >= 4.43 writes ``chat_template.jinja`` (or ``.json``); older ones kept
    the template in ``tokenizer_config.json``, possibly as a list of named templates."""
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja) as fh:
            return check_chat_template(fh.read(), jinja)
    cj = os.path.join(folder, "chat_template.json")
    template = (_read_json(cj) if os.path.isfile(cj) else tokenizer_config).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise HetcompError(f"no 'default' among the named chat templates in {folder}")
        template = named["default"]
    return check_chat_template(template, folder)


def _ids(value, name: str) -> list[int]:
    """A token id field (an id or a list of them) of ``config.json`` / ``generation_config``."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise HetcompError(f"{name} is not a token id or a list of them: {value!r}")
    return values


def _tokenizer_spec(folder: str) -> dict:
    tok_path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(tok_path):
        raise HetcompError(f"HF model folder has no tokenizer.json: {folder}")
    with open(tok_path) as fh:
        tokenizer_json = fh.read()
    try:
        tok = Tokenizer.from_str(tokenizer_json)
    except Exception as e:  # noqa: BLE001  tokenizers raises a bare Exception on bad input
        raise HetcompError(f"cannot read {tok_path}: {e}") from None

    def optional(name):
        path = os.path.join(folder, name)
        return _read_json(path) if os.path.isfile(path) else {}

    tokenizer_config = optional("tokenizer_config.json")
    hf, gen = optional("config.json"), optional("generation_config.json")
    # transformers' generate stops on generation_config's EOS ids, which default to config's.
    eos = _ids(gen.get("eos_token_id", hf.get("eos_token_id")), "eos_token_id")
    bos = _ids(gen.get("bos_token_id", hf.get("bos_token_id")), "bos_token_id")
    if len(bos) > 1:
        raise HetcompError(f"bos_token_id is a list: {bos}")
    bos = bos[0] if bos else None
    return {"tokenizer_json": tokenizer_json, "eos_token_ids": eos, "bos_token_id": bos,
            "add_bos_token": _adds_bos(tok, bos, tokenizer_config),
            "chat_template": _chat_template(folder, tokenizer_config)}


def _adds_bos(tok, bos: int | None, tokenizer_config: dict) -> bool:
    """Whether transformers' ``encode`` puts BOS first: transformers 4 may say so in
    ``tokenizer_config.json``; both write it into tokenizer.json's post-processor."""
    if bos is None:
        return False
    if tokenizer_config.get("add_bos_token"):
        return True
    return tok.encode("a").ids == [bos] + tok.encode("a", add_special_tokens=False).ids
