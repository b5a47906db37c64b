"""Numpy references for tree attention tests: random trees and q/k/v, masked attention in
float64 with its log-sum-exp."""

from __future__ import annotations

import numpy as np

H, G, D = 9, 3, 64  # SmolLM2-135M: 9 query heads share 3 KV heads, head_dim 64


def random_tree(w: int, rng, max_depth: int = 5) -> list[int]:
    """Parents of a random tree of ``w`` nodes in topological order, depth <= max_depth."""
    parents, depth = [-1], [0]
    for i in range(1, w):
        p = int(rng.choice([j for j in range(i) if depth[j] < max_depth]))
        parents.append(p)
        depth.append(depth[p] + 1)
    return parents


def random_qkv(w: int, rng, h: int = H, g: int = G, d: int = D):
    return (rng.standard_normal((h, w, d), dtype="float32"),
            rng.standard_normal((g, w, d), dtype="float32"),
            rng.standard_normal((g, w, d), dtype="float32"))


def reference_attention(q, k, v, mask):
    """Masked attention in float64: (o [H, W, D], lse [H, W]); ``mask[i, j]`` = key j visible."""
    h, _, d = q.shape
    kk = np.repeat(k.astype(np.float64), h // k.shape[0], axis=0)
    vv = np.repeat(v.astype(np.float64), h // v.shape[0], axis=0)
    s = np.einsum("hid,hjd->hij", q.astype(np.float64), kk) / np.sqrt(d)
    s = np.where(mask[None] != 0, s, -np.inf)
    m = s.max(-1, keepdims=True)
    e = np.exp(s - m)
    z = e.sum(-1, keepdims=True)
    return np.einsum("hij,hjd->hid", e / z, vv), (m + np.log(z))[..., 0]


def split_part(part):
    """A partial ``[W, H, D + 1]`` as ``(o[H, W, D], lse[H, W])``."""
    return part[..., :-1].transpose(1, 0, 2), part[..., -1].T
