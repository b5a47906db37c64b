"""An independent numpy implementation of the LLaMA forward pass (the tests' reference);
Qwen2's q/k/v biases (``layers.{i}.b{q,k,v}``) are added when the weights have them, and
Gemma 3's pieces (scaled embedding, q/k norms, post-norms, GeGLU, sliding-window layers with
their own RoPE base) run when the config asks for them (written from transformers'
``modeling_gemma3.py``).

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


def int8_blocks(x):
    """``x [T, K]`` as the int8-dot linears see it: each row's blocks of 32 rounded to
    ``dx rint(x / dx)``, ``dx = max|x| / 127`` (:mod:`hetcomp.schedules.int8_dot`)."""
    t, k = x.shape
    xb = x.reshape(t, k // 32, 32)
    dx = np.abs(xb).max(-1, keepdims=True) / 127
    return (np.rint(xb / np.where(dx > 0, dx, 1)) * dx).reshape(t, k)


def forward(cfg, w, tokens, positions=None, mask=None, int8_inputs=False):
    """Logits ``[T, V]`` and final normed hidden ``[T, E]`` for ``tokens[T]``.

    ``mask[T, T]`` (default causal) says which positions each row attends to.
    ``int8_inputs``: every linear's input rounded by :func:`int8_blocks` first (a
    quantized model's int8-dot kernels).
    """
    lin_in = int8_blocks if int8_inputs else (lambda v: v)
    t = len(tokens)
    positions = np.arange(t) if positions is None else np.asarray(positions)
    mask = np.tril(np.ones((t, t), bool)) if mask is None else np.asarray(mask, bool)
    hq, g, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    f64 = {k: v.astype(np.float64) for k, v in w.items()}
    x = f64["embed"][np.asarray(tokens)] * getattr(cfg, "embed_scale", 1.0)
    qk_norm, post = getattr(cfg, "qk_norm", False), getattr(cfg, "post_norms", False)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        h = rms_norm(x, f64[p + "attn_norm"], cfg.norm_eps)
        h = lin_in(h)
        q, k, v = (h @ f64[p + x].T + f64.get(p + "b" + x[1], 0.0) for x in ("wq", "wk", "wv"))
        q, k, v = q.reshape(t, hq, d), k.reshape(t, g, d), v.reshape(t, g, d)
        if qk_norm:
            q = rms_norm(q, f64[p + "q_norm"], cfg.norm_eps)
            k = rms_norm(k, f64[p + "k_norm"], cfg.norm_eps)
        # transformers' layer_types: layer i is sliding unless (i + 1) % pattern == 0
        window = (cfg.sliding_window if getattr(cfg, "sliding_window", 0)
                  and (i + 1) % cfg.sliding_pattern else 0)
        theta = cfg.rope_local_theta if window else cfg.rope_theta
        q, k = rope(q, positions, theta), rope(k, positions, theta)
        rep = hq // g
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        s = np.einsum("thd,uhd->htu", q, k) / np.sqrt(d)
        seen = mask
        if window:  # transformers' sliding_window_overlay: q_pos - kv_pos < window
            seen = mask & (positions[:, None] - positions[None, :] < window)
        s = np.where(seen[None], s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("htu,uhd->thd", s, v).reshape(t, hq * d)
        o = lin_in(o) @ f64[p + "wo"].T
        x = x + (rms_norm(o, f64[p + "post_attn_norm"], cfg.norm_eps) if post else o)
        h = lin_in(rms_norm(x, f64[p + "ffn_norm"], cfg.norm_eps))
        gate, up = h @ f64[p + "w_gate"].T, h @ f64[p + "w_up"].T
        if getattr(cfg, "activation", "silu") == "gelu_tanh":  # gelu_pytorch_tanh
            act = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate ** 3)))
        else:
            act = gate / (1 + np.exp(-gate))
        o = lin_in(act * up) @ f64[p + "w_down"].T
        x = x + (rms_norm(o, f64[p + "post_ffn_norm"], cfg.norm_eps) if post else o)
    hidden = rms_norm(x, f64["norm"], cfg.norm_eps)
    head = f64.get("lm_head", f64["embed"])
    return lin_in(hidden) @ head.T, hidden


def greedy(cfg, w, prompt, max_new_tokens, eos=None, int8_inputs=False):
    ids = list(prompt)
    out = []
    for _ in range(max_new_tokens):
        logits, _ = forward(cfg, w, ids, int8_inputs=int8_inputs)
        nxt = int(np.argmax(logits[-1]))
        out.append(nxt)
        ids.append(nxt)
        if nxt == eos:
            break
    return out
