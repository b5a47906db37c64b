"""Model configuration of the LLaMA family, as read from GGUF metadata or an HF config.json."""

from __future__ import annotations

import dataclasses
import json
import math

from ..errors import HetcompError

MIN_CONTEXT = 16  # tokens: a prompt, a tree and the tokens it accepts
DEFAULT_CONTEXT = 2048  # the KV cache's capacity unless --max-context says otherwise


def context_length(trained: int, requested: int | None = None) -> int:
    """The KV cache's capacity for a model trained on ``trained`` tokens: ``requested``
    (``--max-context``), which may not exceed it (RoPE positions past the trained context
    are ones the model never saw: a request above it used to be cut without a word), else
    the trained context up to :data:`DEFAULT_CONTEXT`."""
    if requested is None:
        return min(trained, DEFAULT_CONTEXT)
    if requested > trained:
        raise HetcompError(f"--max-context {requested} is above the model's trained context "
                           f"of {trained} tokens")
    return requested


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a LLaMA-family decoder (RMSNorm, RoPE, GQA, SwiGLU).

    ``qkv_bias``: the q/k/v projections add a bias (Qwen2).

    Gemma 3's differences (all off by default): ``embed_scale`` multiplies the embedding rows
    (``sqrt(hidden_size)``); ``qk_norm``: an RMSNorm over head_dim on each query and key head
    before RoPE (``q_norm``, ``k_norm`` weights); ``post_norms``: the attention and MLP outputs
    are RMS-normed (``post_attn_norm``, ``post_ffn_norm``) before they join the residual;
    ``activation``: ``silu`` (SwiGLU) or ``gelu_tanh`` (GeGLU, tanh approximation);
    ``sliding_window = S > 0`` with ``sliding_pattern = P``: every layer ``i`` with
    ``(i + 1) % P != 0`` is local, its queries see only keys less than S positions back, and
    its RoPE base is ``rope_local_theta``. Norm weights are applied as stored (a GGUF stores
    Gemma's ``1 + w``).

    ``max_context`` bounds the KV cache the compiled module allocates (at least
    :data:`MIN_CONTEXT`): :func:`context_length` chooses it from the model's trained context.
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_context: int = 2048
    tie_embeddings: bool = True
    head_dim: int = 0  # 0: hidden_size // num_heads
    qkv_bias: bool = False
    embed_scale: float = 1.0
    qk_norm: bool = False
    post_norms: bool = False
    activation: str = "silu"
    sliding_window: int = 0
    sliding_pattern: int = 0
    rope_local_theta: float = 0.0

    def __post_init__(self):
        # Read from model files: a bad value is the user's input, refused in one line.
        sizes = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "vocab_size", "max_context", "head_dim")  # (head_dim 0: hidden / heads)
        bad = [f"{n}={getattr(self, n)!r}" for n in sizes
               if isinstance(getattr(self, n), bool) or not isinstance(getattr(self, n), int)
               or getattr(self, n) < (0 if n == "head_dim" else 1)]
        finite = all(math.isfinite(v) and v > 0 for v in (self.rope_theta, self.norm_eps))
        if bad or not finite:
            raise HetcompError("invalid model configuration: "
                               + (", ".join(bad) or "rope_theta and norm_eps must be positive "
                                  "and finite"))
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.activation not in ("silu", "gelu_tanh"):
            raise HetcompError(f"unsupported activation {self.activation!r} (supported: silu, "
                               "gelu_tanh)")
        if self.sliding_window < 0 or (self.sliding_window and (
                self.sliding_pattern < 1 or not self.rope_local_theta > 0)):
            raise HetcompError("invalid model configuration: a sliding window needs a layer "
                               "pattern and a local RoPE base")
        if self.max_context < MIN_CONTEXT:
            raise HetcompError(f"the model's context of {self.max_context} tokens is below "
                               f"hetcomp's minimum of {MIN_CONTEXT}")
        if self.num_heads % self.num_kv_heads:
            raise HetcompError("invalid model configuration: num_heads must be a multiple of "
                               "num_kv_heads")

    def layer_window(self, i: int) -> int:
        """Layer ``i``'s sliding window (0: global attention over the whole cache)."""
        if self.sliding_window and (i + 1) % self.sliding_pattern:
            return self.sliding_window
        return 0

    def layer_rope_theta(self, i: int) -> float:
        return self.rope_local_theta if self.layer_window(i) else self.rope_theta

    @property
    def qkv_size(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> LlamaConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def weight_count(self) -> int:
        """Parameters read per decoded token (the tied embedding counted once, as the LM head)."""
        e, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        per_layer = (e * self.qkv_size + self.num_heads * d * e + 2 * e * f + f * e + 2 * e
                     + (self.qkv_size if self.qkv_bias else 0) + (2 * d if self.qk_norm else 0)
                     + (2 * e if self.post_norms else 0))
        head = self.vocab_size * e * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + head + e


def kv_cache_shapes(cfg: LlamaConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``k_cache[L, G, D, C]`` (positions contiguous) and ``v_cache[L, G, C, D]``."""
    g, d, nl, c = cfg.num_kv_heads, cfg.head_dim, cfg.num_layers, cfg.max_context
    return (nl, g, d, c), (nl, g, c, d)


def weight_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every weight a loader gives for ``cfg``, by name, with its float ``[out, in]`` (or
    vector) shape: what loaders check a file's tensors against before any work."""
    e, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    shapes = {"embed": (cfg.vocab_size, e), "norm": (e,)}
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (cfg.vocab_size, e)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        shapes.update({p + "attn_norm": (e,), p + "ffn_norm": (e,), p + "wq": (q, e),
                       p + "wk": (kv, e), p + "wv": (kv, e), p + "wo": (e, q),
                       p + "w_gate": (f, e), p + "w_up": (f, e), p + "w_down": (e, f)})
        if cfg.qk_norm:
            shapes.update({p + "q_norm": (d,), p + "k_norm": (d,)})
        if cfg.post_norms:
            shapes.update({p + "post_attn_norm": (e,), p + "post_ffn_norm": (e,)})
        if cfg.qkv_bias:
            shapes.update({p + "bq": (q,), p + "bk": (kv,), p + "bv": (kv,)})
    return shapes
