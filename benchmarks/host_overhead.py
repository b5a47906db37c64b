"""Host time per decode step: what the generator spends outside the compiled functions.

A step's time is its VM calls (verify, the Medusa draft, commit) plus the host's share:
building the tree inputs, copying tokens and positions, reading the greedy ids back,
accepting a path. On a CPU the VM calls dominate; on a GPU, whose step can take about a
millisecond, the host's share decides how much of the speculation's gain is left. This
times both parts of each step of ``generate`` (greedy, EOS ignored, same prompt for every
width; the first pass of each width is a warm-up).

``python benchmarks/host_overhead.py ART [--widths 1 8 16] [--tokens 96] [--json OUT]``
"""

from __future__ import annotations

import argparse
import json
import time

PROMPT = ("Write a short story about a robot who learns to paint. The robot lives in a small "
          "town.")


def _timed(fn, into: list):
    def call(*args):
        t0 = time.perf_counter()
        out = fn(*args)
        into[0] += time.perf_counter() - t0
        return out
    return call


def measure(path: str, widths, tokens: int) -> list[dict]:
    from hetcomp.runtime import load_artifact
    from hetcomp.runtime.generate import Generation, auto_lookup

    art = load_artifact(path)
    inside = [0.0]
    art._verify_static = {w: _timed(f, inside) for w, f in art._verify_static.items()}
    art._verify, art._commit = _timed(art._verify, inside), _timed(art._commit, inside)
    if art._medusa is not None:
        art._medusa = _timed(art._medusa, inside)
    prompt = art.tokenizer.encode(PROMPT)
    rows = []
    for width in widths:
        for _ in range(2):  # the second pass is kept
            inside[0], steps = 0.0, []
            res = Generation(art, prompt, tokens, False, width, steps,
                             auto_lookup(width)).result()
        total = sum(steps)
        rows.append({"width": width, "steps": res.steps,
                     "accepted_per_step": round(res.accepted_per_step, 3),
                     "step_ms": round(1e3 * total / res.steps, 3),
                     "vm_ms": round(1e3 * inside[0] / res.steps, 3),
                     "host_ms": round(1e3 * (total - inside[0]) / res.steps, 3)})
        r = rows[-1]
        print(f"W={width}: {r['step_ms']} ms a step, {r['vm_ms']} in the VM, "
              f"{r['host_ms']} on the host ({r['accepted_per_step']} tokens a step)")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--widths", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = measure(args.artifact, args.widths, args.tokens)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
