"""What compile's width timing costs with and without leaving out the widths that cannot win.

`hetcomp compile` times a decode step at every compiled width, twice, to choose the default
one (:func:`hetcomp.runtime.unit_time.decode_step_seconds`); a width whose tokens a second
were not within 15% of the best one's is left out of the second pass
(:func:`hetcomp.planner.may_beat_best`). This runs both on a compiled artifact with the
taus its manifest recorded, interleaved, and prints each one's seconds, chosen width and
step times.

Usage::

    .venv/bin/python benchmarks/width_timing.py ART [--rounds 3]
"""

from __future__ import annotations

import argparse
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from hetcomp.driver.compile import MEASURE_NEW_TOKENS, MEASURE_PROMPT
    from hetcomp.planner import best_width, may_beat_best
    from hetcomp.runtime import load_artifact
    from hetcomp.runtime.unit_time import decode_step_seconds

    art = load_artifact(args.artifact, verify=False)
    measured = art.manifest.get("width_measurement")
    if not measured:
        raise SystemExit("the artifact records no width measurement (a host build with heads)")
    taus = {int(w): t for w, t in measured["tau"].items()}
    widths = sorted(taus)
    prompt = art.tokenizer.encode(MEASURE_PROMPT)[:16]
    for r in range(args.rounds):
        for mode in ("every width", "may beat the best"):
            kwargs = ({} if mode == "every width" else
                      {"worth_timing": lambda w, timed: may_beat_best(w, taus, timed)})
            t0 = time.perf_counter()
            step = decode_step_seconds(art, prompt, widths, MEASURE_NEW_TOKENS, **kwargs)
            seconds = time.perf_counter() - t0
            print(f"round {r + 1}, {mode}: {seconds:.1f} s, W={best_width(taus, step)}, ms "
                  + " ".join(f"{w}:{1e3 * s:.1f}" for w, s in step.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
