"""Decode speed of (width, lookup nodes) configurations, interleaved, with the replay beside.

`hetcomp bench --lookup L` gives every width the same lookup nodes, one run per L; this
decodes each prompt at every configuration in turn (a slow phase of a shared machine lands
on all of them), EOS ignored as bench decodes, and prints per configuration the decode
tokens/s, the accepted tokens a step, and the replay's over the prompts' recorded
responses (`hetcomp.driver.benchmark.replayed_steps`; "-" where there is none to replay).
It measured compile's lookup choice for Gemma 3 270M (3 of W = 4's nodes, not 2).

Usage::

    .venv/bin/python benchmarks/lookup_ab.py ART --configs 4:2,4:3,8:4,8:6
        [--prompts heldout|bench] [--new-tokens 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import gc
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--configs", required=True,
                    help="comma-separated WIDTH:LOOKUP pairs, e.g. 4:2,4:3")
    ap.add_argument("--prompts", choices=("heldout", "bench"), default="heldout")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    from hetcomp.driver.benchmark import bench_prompts, encode_prompts, replayed_steps
    from hetcomp.runtime import generate, load_artifact

    art = load_artifact(args.artifact)
    configs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")]
    prompts = encode_prompts(art, bench_prompts(art.manifest, args.prompts), args.new_tokens,
                             "prompt")
    for w, lookup in configs:  # warm-up: each width's workspace and tree shapes
        generate(art, prompts[0], 8, stop_at_eos=False, width=w, lookup=lookup)
    made = dict.fromkeys(configs, 0)
    secs = dict.fromkeys(configs, 0.0)
    steps = dict.fromkeys(configs, 0)
    for r in range(args.rounds):
        gc.disable()  # (as bench times: a collection between rounds is not timed)
        try:
            for ids in prompts:
                for c in configs:
                    res = generate(art, ids, args.new_tokens, stop_at_eos=False, width=c[0],
                                   lookup=c[1])
                    made[c] += len(res.ids) - 1
                    secs[c] += res.decode_s
                    steps[c] += res.steps
        finally:
            gc.enable()
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    for c in configs:
        runs = replayed_steps(art, prompts, args.new_tokens, {c[0]: c[1]})
        again = (f"{sum(x.tokens for x in runs[c[0]]) / sum(x.steps for x in runs[c[0]]):.3f}"
                 if runs else "-")
        print(f"W={c[0]:3d} lookup {c[1]:2d}: {made[c] / secs[c]:6.1f} tokens/s, "
              f"{made[c] / steps[c]:.3f} accepted/step (replayed {again})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
