"""Greedy decoding against its replay, step by step, on the held-out prompts of a heads file.

`compile` chooses the width and each width's lookup nodes from a replay of greedy decoding
over the heads' held-out responses (:func:`hetcomp.speculative.acceptance.replay_acceptance`:
no model runs; the draft proposes at each position what calibration ranked there). This
decodes those prompts with the artifact as `generate` does by default (EOS stops; the
manifest's lookup nodes; the datastore), checks that each decode reproduces its recorded
response, and compares every step's accepted tokens with the replay's. Prints per width the
tokens a step decoded and replayed and the steps that differ; exits 1 where any does (or a
decode leaves its response: a quantized artifact, or heads of another dtype).

Usage::

    .venv/bin/python benchmarks/replay_check.py ART HEADS.npz [--widths 4,16,64]
        [--tokens 96] [--prompts 9] [--lookup N]

Measured (session 33): SmolLM2 float16 heads calibrated here on 60 chat prompts
(`hetcomp calibrate --model smollm2 --dtype float16 --max-prompts 60 --new-tokens 96
--epochs 4`), their artifact (`hetcomp compile --model smollm2 --dtype float16 --heads H`),
9 held-out prompts, 96 tokens: 1.663 / 2.084 / 2.344 tokens a step at W = 4 / 16 / 64,
decoded and replayed, no step differing.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("heads", help="the heads file the artifact was compiled with")
    ap.add_argument("--widths", default="4,16,64")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--prompts", type=int, default=9, help="the first N held-out prompts")
    ap.add_argument("--lookup", type=int,
                    help="lookup nodes at every width (default: the artifact's per width)")
    args = ap.parse_args(argv)
    import numpy as np

    from hetcomp.driver.benchmark import decoded_and_replayed
    from hetcomp.errors import HetcompError
    from hetcomp.runtime import load_artifact
    from hetcomp.runtime.generate import default_lookup
    from hetcomp.speculative.medusa import MedusaHeads

    art = load_artifact(args.artifact)
    heads = MedusaHeads.load(args.heads)
    failed = False
    for w in (int(x) for x in args.widths.split(",")):
        lookup = 0 if w == 1 else (default_lookup(art, w) if args.lookup is None
                                   else min(args.lookup, w - 1))
        try:
            pairs = decoded_and_replayed(art, heads, w, lookup, args.tokens, args.prompts)
        except HetcompError as e:
            print(f"replay_check: {e}", file=sys.stderr)
            return 2
        decoded, replayed, differ, left = [], [], 0, 0
        for pair in pairs:
            if pair is None:
                left += 1
                continue
            steps, replay = pair
            decoded += steps
            replayed += replay
            differ += sum(a != b for a, b in zip(steps, replay)) + abs(len(steps) - len(replay))
        failed |= bool(differ or left)
        print(f"W={w:3d} lookup {lookup:2d}: decoded {np.mean(decoded or [0]):.3f}, replayed "
              f"{np.mean(replayed or [0]):.3f} tokens a step over {len(decoded)} steps; "
              f"{differ} steps differ, {left} decodes left their response")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
