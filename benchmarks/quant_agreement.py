"""Greedy agreement of a quantized artifact with a float reference artifact of the same file.

For each prompt (chat-rendered): greedy ids of both (W = 1, to EOS or ``--new-tokens``);
equal, or the first divergent position with both artifacts' logits of both candidate tokens
there (each artifact replays the common prefix, then one verify step), so a difference can
be told apart from summation order (a near tie) or a real loss. Also params.bin sizes.

Usage::

    .venv/bin/python benchmarks/quant_agreement.py QUANT_ART FLOAT_ART
        [--prompts chat,bench,heldout] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def _logits_at(art, ids: list[int]) -> np.ndarray:
    """Logits of the token after ``ids`` (prefill all but the last, verify the last)."""
    sess = art.new_session()
    sess.prefill(ids[:-1])
    _, _, logits = sess.verify([ids[-1]], [len(ids) - 1], np.ones((1, 1), "int32"))
    return logits.numpy()[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("quant")
    ap.add_argument("reference")
    ap.add_argument("--prompts", default="chat,bench,heldout")
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    from hetcomp.driver.benchmark import bench_prompts
    from hetcomp.runtime import generate, load_artifact
    from hetcomp.testing.reference import CHAT_PROMPTS

    q, f = load_artifact(args.quant), load_artifact(args.reference)
    prompts = []
    for which in args.prompts.split(","):
        prompts += CHAT_PROMPTS if which == "chat" else bench_prompts(q.manifest, which)
    same = 0
    for p in prompts:
        ids = q.tokenizer.encode(p, chat=True)
        a = generate(q, ids, args.new_tokens).ids
        b = generate(f, ids, args.new_tokens).ids
        if a == b:
            same += 1
            print(f"equal ({len(a)} tokens): {p!r}")
            continue
        n = next(i for i, (x, y) in enumerate(zip(a + [-1], b + [-2])) if x != y)
        ctx = ids + a[:n]
        lq, lf = _logits_at(q, ctx), _logits_at(f, ctx)
        ta, tb = a[n] if n < len(a) else None, b[n] if n < len(b) else None
        print(f"differ at new token {n} of {p!r}: quant picks {ta}, reference {tb}; "
              f"logits quant [{lq[ta]:.4f}, {lq[tb]:.4f}] reference [{lf[ta]:.4f}, "
              f"{lf[tb]:.4f}] (max |diff| over the vocabulary {np.abs(lq - lf).max():.2e})"
              if ta is not None and tb is not None else
              f"differ at new token {n} of {p!r}: one stopped (EOS) earlier")
    sq = os.path.getsize(os.path.join(args.quant, "params.bin"))
    sf = os.path.getsize(os.path.join(args.reference, "params.bin"))
    print(f"{same}/{len(prompts)} prompts equal; params.bin {sq / 1e6:.1f} MB vs "
          f"{sf / 1e6:.1f} MB ({100 * sq / sf:.1f}%); weight bytes per token "
          f"{q.bytes_per_token() / 1e6:.1f} MB vs {f.bytes_per_token() / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
