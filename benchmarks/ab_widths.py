"""Interleaved A/B of decode speed: artifacts x (width, lookup) configurations, in rounds.

Each round runs every artifact at every configuration on the same prompts, so a slow phase
of a shared machine lands on one round of all of them; the table reports the median
tokens/s per configuration, its ratio to the first artifact's W=1, and accepted tokens per
verify step. ``--prompts heldout`` uses the first artifact's heads' held-out calibration
prompts (the ones the trees' expected acceptance is measured on) instead of the bench prompts.

Usage::

    .venv/bin/python benchmarks/ab_widths.py ART [ART ...] [--configs 1:0,2:0,4:1]
        [--rounds 3] [--new-tokens 64] [--prompts bench|heldout]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--configs", default="1:0,2:0,4:0,8:0", help="width:lookup pairs")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", choices=("bench", "heldout"), default="bench")
    args = ap.parse_args()
    from hetcomp.driver.benchmark import bench_prompts
    from hetcomp.runtime import generate, load_artifact

    configs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")]
    arts = {a: load_artifact(a) for a in args.artifacts}
    prompts = bench_prompts(arts[args.artifacts[0]].manifest, args.prompts)
    # (a chat template where the model has one, as `hetcomp bench` and calibrate run it)
    ids = {a: [art.tokenizer.encode(p, chat=art.tokenizer.chat_template is not None)
               for p in prompts] for a, art in arts.items()}
    speed: dict = {}
    accepted: dict = {}
    for r in range(args.rounds):
        for a, art in arts.items():
            for width, lookup in configs:
                runs = [generate(art, x, args.new_tokens, stop_at_eos=False, width=width,
                                 lookup=lookup) for x in ids[a]]
                key = (a, width, lookup)
                speed.setdefault(key, []).append(
                    sum(len(x.ids) - 1 for x in runs) / sum(x.decode_s for x in runs))
                accepted[key] = float(np.mean([x.accepted_per_step for x in runs]))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    first = args.artifacts[0]
    base = statistics.median(speed.get((first, 1, 0), next(iter(speed.values()))))
    print("| artifact | W | lookup | tokens/s (median) | vs first W=1 | accepted/step |")
    print("|---|---|---|---|---|---|")
    for (a, w, lk), v in speed.items():
        med = statistics.median(v)
        print(f"| {a} | {w} | {lk} | {med:.1f} | {med / base:.3f}x | {accepted[(a, w, lk)]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
