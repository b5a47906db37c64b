"""An independent numpy implementation of the LLaMA forward pass (the tests' reference);
Qwen2's q/k/v biases (``layers.{i}.b{q,k,v}``) are added when the weights have them.

It shares nothing with hetcomp's compiled path: plain float64 numpy on the loader's
unpacked HF-layout weights, with an explicit attention mask over the whole sequence.
"""

from __future__ import annotations

import numpy as np


def rms_norm(x, g, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g


def rope(x, pos, theta):
    # x: [T, heads, D]; HF rotate-half convention, frequencies computed in float32 as HF does.
    d = x.shape[-1]
    inv = (1.0 / (np.float32(theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))))
    ang = pos.astype(np.float32)[:, None] * inv[None, :].astype(np.float32)
    ang = np.concatenate([ang, ang], -1).astype(np.float64)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    half = d // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def forward(cfg, w, tokens, positions=None, mask=None):
    """Logits ``[T, V]`` and final normed hidden ``[T, E]`` for ``tokens[T]``.

    ``mask[T, T]`` (default causal) says which positions each row attends to.
    """
    t = len(tokens)
    positions = np.arange(t) if positions is None else np.asarray(positions)
    mask = np.tril(np.ones((t, t), bool)) if mask is None else np.asarray(mask, bool)
    hq, g, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    f64 = {k: v.astype(np.float64) for k, v in w.items()}
    x = f64["embed"][np.asarray(tokens)]
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        h = rms_norm(x, f64[p + "attn_norm"], cfg.norm_eps)
        q, k, v = (h @ f64[p + x].T + f64.get(p + "b" + x[1], 0.0) for x in ("wq", "wk", "wv"))
        q, k, v = q.reshape(t, hq, d), k.reshape(t, g, d), v.reshape(t, g, d)
        q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
        rep = hq // g
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        s = np.einsum("thd,uhd->htu", q, k) / np.sqrt(d)
        s = np.where(mask[None], s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("htu,uhd->thd", s, v).reshape(t, hq * d)
        x = x + o @ f64[p + "wo"].T
        h = rms_norm(x, f64[p + "ffn_norm"], cfg.norm_eps)
        gate, up = h @ f64[p + "w_gate"].T, h @ f64[p + "w_up"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ f64[p + "w_down"].T
    hidden = rms_norm(x, f64["norm"], cfg.norm_eps)
    head = f64.get("lm_head", f64["embed"])
    return hidden @ head.T, hidden


def greedy(cfg, w, prompt, max_new_tokens, eos=None):
    ids = list(prompt)
    out = []
    for _ in range(max_new_tokens):
        logits, _ = forward(cfg, w, ids)
        nxt = int(np.argmax(logits[-1]))
        out.append(nxt)
        ids.append(nxt)
        if nxt == eos:
            break
    return out
