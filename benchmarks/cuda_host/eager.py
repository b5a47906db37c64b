"""PyTorch eager decoding of a LLaMA-shaped model: the baseline issue #19 measures the GPU
artifact against, on the same host in the same run.

Random weights of the model's shape (the issue allows them: eager's speed does not depend on
the values), bfloat16 by default, a static KV cache, greedy. Two numbers per width W: the time
of one step that runs W new rows against a cache of ``cache_len`` (tree verification's shape;
the rows attend causally, which costs what a tree mask does) and sequential tokens/s over
``new_tokens`` greedy steps (decode only: the prompt's prefill is not timed).

``python benchmarks/cuda_host/eager.py [--device cuda] [--dtype bfloat16] [--out eager.json]``
imports nothing from hetcomp, so it runs wherever torch does.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import time

#: SmolLM2-135M's shape (hetcomp's default model).
SMOLLM2 = {"hidden": 576, "ffn": 1536, "layers": 30, "heads": 9, "kv_heads": 3,
           "head_dim": 64, "vocab": 49152, "rope_theta": 100000.0, "eps": 1e-5}


def random_weights(cfg: dict, device, dtype, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    e, f, d = cfg["hidden"], cfg["ffn"], cfg["head_dim"]
    qkv = (cfg["heads"] + 2 * cfg["kv_heads"]) * d

    def m(*shape, scale=0.02):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    w = {"embed": m(cfg["vocab"], e), "norm": m(e, scale=0.0) + 1}
    for i in range(cfg["layers"]):
        w[f"{i}.attn_norm"], w[f"{i}.ffn_norm"] = m(e, scale=0.0) + 1, m(e, scale=0.0) + 1
        w[f"{i}.wqkv"], w[f"{i}.wo"] = m(qkv, e), m(e, cfg["heads"] * d)
        w[f"{i}.w_gate_up"], w[f"{i}.w_down"] = m(2 * f, e), m(e, f)
    return w


def _rms(x, weight, eps):
    import torch

    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def _rope(x, pos, theta):
    """Rotate-half RoPE of ``x[H, W, D]`` at positions ``pos[W]``."""
    import torch

    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = pos.float()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return (x.float() * cos + torch.cat([-x2, x1], -1).float() * sin).to(x.dtype)


def step(w: dict, cfg: dict, tokens, k_cache, v_cache, n: int):
    """One step: rows ``tokens[W]`` at positions ``n .. n + W - 1`` (causal among themselves)
    against the cache ``[0, n)``; writes their K/V at ``[n, n + W)``; returns logits [W, V]."""
    import torch
    import torch.nn.functional as F

    hq, g, d, eps = cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["eps"]
    wid = tokens.shape[0]
    pos = torch.arange(n, n + wid, device=tokens.device)
    x = w["embed"][tokens]
    mask = torch.ones(wid, n + wid, dtype=torch.bool, device=tokens.device).tril(n)
    for i in range(cfg["layers"]):
        h = _rms(x, w[f"{i}.attn_norm"], eps) @ w[f"{i}.wqkv"].T
        q, k, v = h.split([hq * d, g * d, g * d], -1)
        q = _rope(q.view(wid, hq, d).transpose(0, 1), pos, cfg["rope_theta"])
        k_cache[i, :, n:n + wid] = _rope(k.view(wid, g, d).transpose(0, 1), pos,
                                         cfg["rope_theta"])
        v_cache[i, :, n:n + wid] = v.view(wid, g, d).transpose(0, 1)
        keys = k_cache[i, :, : n + wid].repeat_interleave(hq // g, 0)
        vals = v_cache[i, :, : n + wid].repeat_interleave(hq // g, 0)
        a = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask)
        x = x + a.transpose(0, 1).reshape(wid, hq * d) @ w[f"{i}.wo"].T
        gate, up = (_rms(x, w[f"{i}.ffn_norm"], eps) @ w[f"{i}.w_gate_up"].T).chunk(2, -1)
        x = x + (F.silu(gate) * up) @ w[f"{i}.w_down"].T
    return (_rms(x, w["norm"], eps) @ w["embed"].T).float()


@contextlib.contextmanager
def _no_gc():
    """Timed without the cyclic garbage collector, as hetcomp's decodes are
    (``hetcomp.runtime.unit_time.gc_paused``, which this file may not import)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def bench(cfg: dict, device: str = "cuda", dtype: str = "bfloat16",
          widths=(1, 4, 16, 64), cache_len: int = 256, new_tokens: int = 128,
          repeat: int = 20) -> dict:
    import torch

    dt = getattr(torch, dtype)
    w = random_weights(cfg, device, dt)
    ctx = cache_len + max(max(widths), new_tokens) + 1
    shape = (cfg["layers"], cfg["kv_heads"], ctx, cfg["head_dim"])
    k_cache = torch.zeros(shape, device=device, dtype=dt)
    v_cache = torch.zeros(shape, device=device, dtype=dt)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    out = {"device": device, "dtype": dtype, "cache_len": cache_len, "step_ms": {}}
    with torch.inference_mode(), _no_gc():
        for wid in widths:
            tokens = torch.arange(wid, device=device) % cfg["vocab"]
            step(w, cfg, tokens, k_cache, v_cache, cache_len)  # warm-up
            sync()
            best = math.inf
            for _ in range(repeat):
                t0 = time.perf_counter()
                step(w, cfg, tokens, k_cache, v_cache, cache_len)
                sync()
                best = min(best, time.perf_counter() - t0)
            out["step_ms"][str(wid)] = 1e3 * best
        tok = torch.tensor([1], device=device)
        sync()
        t0 = time.perf_counter()
        for i in range(new_tokens):
            tok = step(w, cfg, tok, k_cache, v_cache, cache_len + i).argmax(-1)
        sync()
        out["tokens_per_s"] = new_tokens / (time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", default="eager.json")
    args = ap.parse_args()
    res = bench(SMOLLM2, args.device, args.dtype, new_tokens=args.new_tokens)
    print(json.dumps(res, indent=1))
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
