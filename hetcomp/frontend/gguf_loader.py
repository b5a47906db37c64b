"""Read a LLaMA-family GGUF file (architectures llama, qwen2 and gemma3): metadata, dequantized
weights and the tokenizer vocabulary."""

from __future__ import annotations

import os

import gguf
import numpy as np

from ..errors import HetcompError
from ..quant_format import BLOCK_BYTES, QuantMatrix
from .config import LlamaConfig, context_length, weight_shapes
from .lazy import Deferred, LazyWeights
from .tokenizer import check_chat_template

SUPPORTED_ARCHS = ("llama", "qwen2", "gemma3")
# Architectures whose Q/K rows llama.cpp's converter permutes (LlamaModel.modify_tensors);
# Qwen2Model stores HF's rows as they are.
_PERMUTED_QK = ("llama",)
# Architectures with q/k/v biases (blk.N.attn_{q,k,v}.bias).
_QKV_BIAS = ("qwen2",)
# Gemma 3 as llama.cpp builds it (llama-model.cpp, LLM_ARCH_GEMMA3), for what the file does not
# store: every 6th layer global, the others sliding-window with RoPE base 10000.
_GEMMA3_PATTERN, _GEMMA3_LOCAL_THETA = 6, 10000.0
# Dequantized by gguf.quants (K-quants and Q5_0 included: Qwen2.5 GGUFs mix them).
_SUPPORTED_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "BF16", "Q5_0", "Q5_1", "Q2_K",
                    "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    return value


class _Reader(gguf.GGUFReader):
    """gguf's reader over the file's bytes as a plain array (still the file's mapping, a view
    of it): every slice of numpy's ``memmap`` subclass runs its Python hooks, and the reader
    slices once per value it parses, so opening SmolLM2's file (a 49152-token vocabulary and
    its merges) took 2.2 s, Qwen2.5-0.5B's 6.5 s; as a plain array 0.6 and 1.7 s. Its tensors'
    ``data`` are then plain arrays too, which ``gguf.quants`` dequantizes 1.7x faster."""

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, mapped):  # (set once, by GGUFReader.__init__, to np.memmap(path))
        self._data = mapped.view(np.ndarray)


def open_gguf(path: str):
    """Open a GGUF file, turning every way it can be broken into one HetcompError."""
    if not os.path.isfile(path):
        raise HetcompError(f"model file not found: {path}")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic != b"GGUF":
            raise HetcompError(f"not a GGUF file (bad magic {magic!r}): {path}")
        reader = _Reader(path, "r")
        # Touch every tensor's extent: a truncated file fails here rather than mid-compile.
        size = os.path.getsize(path)
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise HetcompError(f"truncated GGUF file (tensor {t.name} runs past the end): {path}")
    except HetcompError:
        raise
    except Exception as e:  # gguf raises ValueError/IndexError/struct errors on corrupt input
        raise HetcompError(f"corrupt GGUF file {path}: {type(e).__name__}: {e}") from None
    return reader


# ``{arch}.`` keys hetcomp reads, or that llama.cpp reads without changing this model.
_KNOWN_KEYS = {
    "vocab_size", "context_length", "embedding_length", "feed_forward_length", "block_count",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "attention.key_length", "attention.value_length", "rope.freq_base", "rope.dimension_count",
    "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length",
    "rope.scaling.finetuned", "expert_count", "expert_used_count",
}
# ...and those an architecture adds (elsewhere they would change the model unread).
_ARCH_KEYS = {"gemma3": {"attention.sliding_window"}}


def _check_supported(reader, arch: str) -> None:
    """Refuse metadata that changes the model in a way hetcomp does not implement."""
    for key in reader.fields:
        if key.startswith(arch + ".") and key[len(arch) + 1:] not in (
                _KNOWN_KEYS | _ARCH_KEYS.get(arch, set())):
            raise HetcompError(f"unsupported GGUF metadata key {key} (hetcomp does not "
                               "implement what it changes)")
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise HetcompError(f"unsupported GGUF {arch}.rope.scaling.type {scaling!r} "
                           "(supported: none)")
    factor = _field(reader, f"{arch}.rope.scaling.factor", 0.0)
    if factor not in (0.0, 1.0):  # llama.cpp scales positions by it whatever the type
        raise HetcompError(f"unsupported GGUF {arch}.rope.scaling.factor {factor} "
                           "(supported: 1)")
    if _field(reader, f"{arch}.expert_count", 0):
        raise HetcompError(f"unsupported GGUF {arch}.expert_count (mixture of experts)")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):  # llama3 RoPE scaling
        raise HetcompError("unsupported GGUF tensor rope_freqs.weight (scaled RoPE frequencies)")


def read_config(reader, max_context: int | None = None) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise HetcompError(
            f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    _check_supported(reader, arch)
    names = {t.name for t in reader.tensors}
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if emb is None:
        raise HetcompError("GGUF file has no token_embd.weight tensor")
    vocab = int(_field(reader, f"{arch}.vocab_size", int(emb.shape[1])))
    ctx = int(_field(reader, f"{arch}.context_length", 2048))
    try:
        cfg = LlamaConfig(
            hidden_size=int(_field(reader, f"{arch}.embedding_length")),
            intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
            num_layers=int(_field(reader, f"{arch}.block_count")),
            num_heads=int(_field(reader, f"{arch}.attention.head_count")),
            num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv")),
            vocab_size=vocab,
            rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
            norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            max_context=context_length(ctx, max_context),
            tie_embeddings="output.weight" not in names,
            head_dim=int(_field(reader, f"{arch}.attention.key_length", 0)),
            qkv_bias=arch in _QKV_BIAS,
            **(_gemma3_fields(reader) if arch == "gemma3" else {}),
        )
    except TypeError:
        raise HetcompError(f"GGUF file lacks required {arch}.* metadata") from None
    except ValueError as e:
        raise HetcompError(f"inconsistent GGUF metadata: {e}") from None
    for key in ("attention.value_length", "rope.dimension_count"):  # llama.cpp's defaults
        value = _field(reader, f"{arch}.{key}", cfg.head_dim)
        if value != cfg.head_dim:
            raise HetcompError(f"unsupported GGUF {arch}.{key} {value} (hetcomp needs the "
                               f"head dimension, {cfg.head_dim})")
    return cfg


def _gemma3_fields(reader) -> dict:
    """Gemma 3's :class:`LlamaConfig` fields: what llama.cpp derives (module constants)."""
    e = int(_field(reader, "gemma3.embedding_length"))
    heads = int(_field(reader, "gemma3.attention.head_count"))
    if int(_field(reader, "gemma3.block_count")) == 62 and e // heads != int(
            _field(reader, "gemma3.attention.key_length", e // heads)):
        # llama.cpp scales the 27B's scores by (E / H)^-1/2, not head_dim^-1/2.
        raise HetcompError("unsupported gemma3 27B (attention scale (E / H)^-1/2)")
    window = int(_field(reader, "gemma3.attention.sliding_window", 0))
    return {"embed_scale": float(e) ** 0.5, "qk_norm": True, "post_norms": True,
            "activation": "gelu_tanh", "sliding_window": window,
            "sliding_pattern": _GEMMA3_PATTERN if window else 0,
            "rope_local_theta": _GEMMA3_LOCAL_THETA if window else 0.0}


def _unpermute_rope(w, n_head: int):
    """Undo llama.cpp's Q/K row permutation so RoPE can use the rotate-half (HF) convention.

    A permutation of whole rows, so a :class:`QuantMatrix` moves its rows' blocks unchanged."""
    if isinstance(w, QuantMatrix):
        n, nkb, nb = w.blocks.shape
        return QuantMatrix(w.qtype, _unpermute_rope(w.blocks.reshape(n, nkb * nb), n_head)
                           .reshape(n, nkb, nb))
    out, inp = w.shape
    return np.ascontiguousarray(
        w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp))


def read_weights(reader, cfg: LlamaConfig, keep_quant: bool = False) -> LazyWeights:
    """Every tensor, named as in :mod:`hetcomp.frontend.weights`, dequantized to float32 when
    read (:class:`~hetcomp.frontend.weights.LazyWeights`: the file is mapped, so nothing is
    decoded until packing asks for it); ``keep_quant``: matrices stored as q4_0, q4_1 or q8_0
    come as their file blocks (:class:`~hetcomp.kernels.quant.QuantMatrix`), byte for byte.
    Missing tensors, shapes the metadata does not imply, unsupported types and tensors no
    weight is read from (llama.cpp would add a bias hetcomp would drop) are refused here,
    before any work."""
    tensors = {t.name: t for t in reader.tensors}
    expected = weight_shapes(cfg)
    used: set[str] = set()

    def read(name: str, t, shape: tuple[int, ...]):
        qtype = t.tensor_type.name.lower()
        if keep_quant and qtype in BLOCK_BYTES and len(shape) == 2:
            return QuantMatrix.from_gguf_bytes(qtype, t.data, shape[0])
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        except Exception as e:  # a damaged tensor: the user's input, one line
            raise HetcompError(f"cannot dequantize {name}: {e}") from None
        return np.ascontiguousarray(arr, dtype=np.float32)

    def get(name: str, ours: str) -> Deferred:
        t = tensors.get(name)
        if t is None:
            raise HetcompError(f"GGUF file is missing tensor {name}")
        if t.tensor_type.name not in _SUPPORTED_TYPES:
            raise HetcompError(f"unsupported GGUF tensor type {t.tensor_type.name} in {name}")
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        if shape != expected[ours]:
            raise HetcompError(f"GGUF tensor {name} has shape {list(shape)}, its metadata "
                               f"implies {list(expected[ours])}")
        used.add(name)
        return Deferred(shape, lambda: read(name, t, shape), t.tensor_type.name.lower())

    arch = _field(reader, "general.architecture")

    def qk(d: Deferred, n_head: int) -> Deferred:
        return d.map(lambda m: _unpermute_rope(m, n_head)) if arch in _PERMUTED_QK else d

    names = {"embed": "token_embd.weight", "norm": "output_norm.weight",
             "lm_head": "output.weight"}
    layer_names = {"attn_norm": "attn_norm.weight", "wq": "attn_q.weight",
                   "wk": "attn_k.weight", "wv": "attn_v.weight", "bq": "attn_q.bias",
                   "bk": "attn_k.bias", "bv": "attn_v.bias", "wo": "attn_output.weight",
                   "ffn_norm": "ffn_norm.weight", "w_gate": "ffn_gate.weight",
                   "w_up": "ffn_up.weight", "w_down": "ffn_down.weight",
                   "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight",
                   "post_attn_norm": "post_attention_norm.weight",
                   "post_ffn_norm": "post_ffw_norm.weight"}
    w = LazyWeights()
    for ours in expected:  # the config's weights, in order
        if ours.startswith("layers."):
            _, i, base = ours.split(".")
            d = get(f"blk.{i}.{layer_names[base]}", ours)
            if base in ("wq", "wk"):
                d = qk(d, cfg.num_heads if base == "wq" else cfg.num_kv_heads)
            w[ours] = d
        else:
            w[ours] = get(names[ours], ours)
    unread = sorted(set(tensors) - used)
    if unread:  # llama.cpp adds such tensors (a llama's optional biases): refuse, not drop
        raise HetcompError(f"unsupported GGUF tensor {unread[0]} (hetcomp would compile the "
                           f"model without it; {len(unread)} such tensor(s))")
    return w


# The token texts llama.cpp ends generation at, whatever the file's eos id (llama-vocab.cpp,
# special_eog_ids; ggml-org/llama.cpp#9606).
END_OF_GENERATION_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
    "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>",
    "<end_of_utterance>"})
# llama.cpp's fill-in-the-middle pad, repository and file-separator tokens end generation
# too (a FIM completion stops at the next file): the file's tokenizer.ggml.fim_*_token_id,
# else the first token of one of these texts.
FIM_END_OF_GENERATION = {
    "pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "sep": ("<|file_sep|>",),
}


def _fim_end_ids(reader, tokens: list[str]) -> list[int]:
    """The FIM tokens llama.cpp ends generation at (:data:`FIM_END_OF_GENERATION`)."""
    ids = []
    for kind, texts in FIM_END_OF_GENERATION.items():
        i = _field(reader, f"tokenizer.ggml.fim_{kind}_token_id")
        if i is None:
            i = next((j for j, t in enumerate(tokens) if t in texts), None)
        if i is not None:
            ids.append(int(i))
    return ids


def read_tokenizer_spec(reader) -> dict:
    """The vocabulary, merges, token types, special ids and chat template stored in the file."""
    model = _field(reader, "tokenizer.ggml.model")
    if model not in ("gpt2", "llama"):
        raise HetcompError(f"unsupported tokenizer model {model!r} (supported: gpt2 byte-level "
                           "BPE, llama SentencePiece)")
    if model == "llama" and _field(reader, "tokenizer.ggml.add_space_prefix", True):
        raise HetcompError("unsupported tokenizer: SentencePiece with a space prefix")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    # llama.cpp also ends generation on the end-of-turn and end-of-text tokens it finds by
    # their text (Qwen2.5's <|endoftext|> beside its <|im_end|>, Gemma's <end_of_turn>).
    eog = [i for i, t in enumerate(tokens) if t in END_OF_GENERATION_TEXTS]
    return {
        "model": model,
        "pre": _field(reader, "tokenizer.ggml.pre", "default"),
        "tokens": tokens,
        "scores": ([float(x) for x in _field(reader, "tokenizer.ggml.scores")]
                   if model == "llama" else None),
        "merges": list(_field(reader, "tokenizer.ggml.merges", [])),
        "token_type": [int(x) for x in _field(reader, "tokenizer.ggml.token_type", [])],
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "unk_token_id": _field(reader, "tokenizer.ggml.unknown_token_id"),
        # llama.cpp ends generation on end-of-turn and end-of-message tokens too, and on
        # the FIM ones.
        "eos_token_ids": list(dict.fromkeys(
            [int(i) for i in (_field(reader, f"tokenizer.ggml.{k}_token_id")
                              for k in ("eos", "eot", "eom")) if i is not None] + eog
            + _fim_end_ids(reader, tokens))),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "chat_template": check_chat_template(_field(reader, "tokenizer.chat_template"),
                                             "the GGUF file"),
    }


def load_gguf(path: str, max_context: int | None = None, keep_quant: bool = False):
    """Load ``(config, weights, tokenizer spec)`` from a GGUF file: float32 weights, or with
    ``keep_quant`` the q4_0/q4_1/q8_0 matrices as their blocks, each read when asked for
    (:func:`read_weights`)."""
    reader = open_gguf(path)
    cfg = read_config(reader, max_context)
    spec = read_tokenizer_spec(reader)
    weights = read_weights(reader, cfg, keep_quant)
    return cfg, weights, spec
