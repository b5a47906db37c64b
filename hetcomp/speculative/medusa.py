"""Medusa heads: ``head_k(h) = lm_head(h + SiLU(W_k h + b_k))``, predicting token t + 2 + k.

Trained by self-distillation (targets are the base model's own greedy tokens) with the base
model's tied LM head frozen. Stored as a small ``.npz`` (float16 weights) plus statistics.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np

from ..errors import HetcompError

TOPK = 10


@dataclasses.dataclass
class MedusaHeads:
    w: np.ndarray  # [K, E, E] float32, HF layout (z = h @ w[k].T)
    b: np.ndarray  # [K, E]
    rank_probs: np.ndarray  # [K, TOPK]: P(rank-r candidate of head k is right), held out
    info: dict

    @property
    def num_heads(self) -> int:
        return int(self.w.shape[0])

    def hidden(self, h: np.ndarray) -> np.ndarray:
        """``[N, E]`` -> ``[K, N, E]`` head hidden states (before the LM head)."""
        z = np.einsum("ne,kfe->knf", h, self.w) + self.b[:, None, :]
        return h[None] + z / (1.0 + np.exp(-z))

    def save(self, path: str) -> None:
        meta = dict(self.info)
        meta["rank_probs"] = self.rank_probs.tolist()
        tmp = path + ".tmp.npz"
        np.savez_compressed(tmp, w=self.w.astype(np.float16), b=self.b.astype(np.float32),
                            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        import os

        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> MedusaHeads:
        try:
            with np.load(path) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                w, b = z["w"].astype(np.float32), z["b"].astype(np.float32)
        except (OSError, KeyError, ValueError) as e:
            raise HetcompError(f"cannot read Medusa heads {path}: {e}") from None
        return cls(w, b, np.asarray(meta.pop("rank_probs")), meta)


def _log_softmax_grad(logits: np.ndarray, target: np.ndarray):
    """Cross-entropy loss and d(loss)/d(logits) for rows of logits."""
    m = logits.max(-1, keepdims=True)
    e = np.exp(logits - m)
    s = e.sum(-1, keepdims=True)
    loss = float((np.log(s[:, 0]) + m[:, 0] - logits[np.arange(len(target)), target]).mean())
    g = e / s
    g[np.arange(len(target)), target] -= 1.0
    return loss, g / len(target)


def train_heads(h: np.ndarray, targets: np.ndarray, embed: np.ndarray, num_heads: int,
                epochs: int = 3, batch: int = 256, lr: float = 1e-3, seed: int = 0,
                progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Adam on the heads' cross-entropy; ``targets[n, k]`` = token 2 + k after row n (-1: none).

    ``embed`` is the tied LM head ``[V, E]`` (frozen). Weights start at zero, i.e. every head
    starts as the base LM head on an unchanged hidden state.
    """
    rng = np.random.default_rng(seed)
    n, e = h.shape
    w = np.zeros((num_heads, e, e), np.float32)
    b = np.zeros((num_heads, e), np.float32)
    mw, vw, mb, vb = (np.zeros_like(w), np.zeros_like(w), np.zeros_like(b), np.zeros_like(b))
    step, b1, b2, eps = 0, 0.9, 0.999, 1e-8
    emb_t = np.ascontiguousarray(embed.T)
    for epoch in range(epochs):
        order = rng.permutation(n)
        losses = []
        for s in range(0, n, batch):
            idx = order[s: s + batch]
            x = h[idx]
            step += 1
            for k in range(num_heads):
                t = targets[idx, k]
                keep = t >= 0
                if not keep.any():
                    continue
                xk, tk = x[keep], t[keep]
                z = xk @ w[k].T + b[k]
                sig = 1.0 / (1.0 + np.exp(-z))
                hk = xk + z * sig
                loss, g = _log_softmax_grad(hk @ emb_t, tk)
                losses.append(loss)
                dh = g @ embed
                dz = dh * (sig * (1 + z * (1 - sig)))
                gw, gb = dz.T @ xk, dz.sum(0)
                for p, gp, m_, v_ in ((w[k], gw, mw[k], vw[k]), (b[k], gb, mb[k], vb[k])):
                    m_ *= b1
                    m_ += (1 - b1) * gp
                    v_ *= b2
                    v_ += (1 - b2) * gp * gp
                    p -= lr * (m_ / (1 - b1 ** step)) / (np.sqrt(v_ / (1 - b2 ** step)) + eps)
            if progress and (s // batch) % 10 == 0:
                print(f"\r  epoch {epoch + 1}/{epochs}  {min(s + batch, n)}/{n}  "
                      f"loss {np.mean(losses[-40:]):.3f}", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
    return w, b


def rank_statistics(heads_hidden_logits, targets: np.ndarray, topk: int = TOPK) -> np.ndarray:
    """``[K, topk]``: fraction of rows whose target is head k's rank-r candidate."""
    logits = heads_hidden_logits  # [K, N, V]
    k_heads = logits.shape[0]
    probs = np.zeros((k_heads, topk))
    for k in range(k_heads):
        t = targets[:, k]
        keep = t >= 0
        lk = logits[k][keep]
        top = np.argsort(-lk, axis=-1)[:, :topk]
        hit = top == t[keep][:, None]
        probs[k] = hit.mean(0)
    return probs
