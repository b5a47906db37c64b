"""Host time per decode step: what the generator spends outside the compiled functions.

A step's time is its VM calls (verify, the Medusa draft, commit) plus the host's share:
building the tree inputs, copying tokens and positions, reading the greedy ids back,
accepting a path. On a CPU the VM calls dominate; on a GPU, whose step can take about a
millisecond, the host's share decides how much of the speculation's gain is left. This
times the parts of each step of ``generate`` (``hetcomp.runtime.unit_time.host_split``:
greedy, EOS ignored, same prompt for every width; the first pass of each width is a
warm-up); reading results back is its own part, as a GPU step's wait lands there.

``python benchmarks/host_overhead.py ART [--widths 1 8 16] [--tokens 96] [--json OUT]``

``--replay``: the host's share alone, on the real model (``unit_time.host_replay``): each
prompt (the held-out ones where the heads have them) is decoded once, recording what the
compiled calls returned, then decoded again with every call answered from the record, so a
step costs only the generator's own work, with the host's caches as warm as a GPU host's.
SmolLM2 float16 here (`TVM_NUM_THREADS=1`, 64 tokens, 8 held-out prompts), us a step at
W = 1 / 4 / 16 / 64, median of 3 runs interleaved: 27.9 / 154.2 / 217.0 / 329.6 before the
datastore's continuation hashes, the cached Medusa tree parts and the lookup's branch cap
(the store's searches and new lookup trees' layouts were most of it), 27.3 / 120.5 / 163.0
/ 266.5 after; then, against that code on another day, 24.6 / 93.2 / 144.2 / 241.7 before
and 24.2 / 74.6 / 107.0 / 191.5 after the store's rankings made once per length (a search
126 -> 32 us) and acceptance on the tree's cached children.

To see the host's share alone, use a model whose kernels take little time (SmolLM2's 30
layers at hidden size 64, random weights) and ``TVM_NUM_THREADS=1`` (on a 2-core machine the
thread pool's spinning workers slow the first Python after each call). Measured so and not
worth doing: the weights as one tuple argument (TVM's ``BundleModelParams``). A call with
272 weight tensors costs 12.8 us here, with one tuple of them 24.4 us: the VM unpacks the
tuple item by item.
"""

from __future__ import annotations

import argparse
import json

PROMPT = ("Write a short story about a robot who learns to paint. The robot lives in a small "
          "town.")


def measure(path: str, widths, tokens: int) -> list[dict]:
    from hetcomp.runtime import load_artifact
    from hetcomp.runtime.unit_time import host_split

    art = load_artifact(path)
    rows = host_split(art, art.tokenizer.encode(PROMPT), widths, tokens)
    for r in rows:
        print(f"W={r['width']}: {r['step_ms']} ms a step, {r['vm_ms']} in the VM, "
              f"{r['wait_ms']} reading {r['reads_per_step']} results back, "
              f"{r['host_ms']} on the host ({r['accepted_per_step']} tokens a step)")
    return rows


def replay(path: str, widths, tokens: int) -> list[dict]:
    from hetcomp.driver.benchmark import BENCH_PROMPTS, bench_prompts, encode_prompts
    from hetcomp.runtime import load_artifact
    from hetcomp.runtime.unit_time import host_replay

    art = load_artifact(path)
    info = (art.manifest.get("speculative") or {}).get("heads_info") or {}
    texts = bench_prompts(art.manifest, "heldout") if "corpus" in info else BENCH_PROMPTS
    prompts = encode_prompts(art, texts, tokens, "prompt")
    rows = []
    for w in widths:
        rows.append(host_replay(art, prompts, w, tokens))
        print(f"W={w}: {rows[-1]['host_us']} us a step on the host alone "
              f"({rows[-1]['steps']} steps)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--widths", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--json")
    ap.add_argument("--replay", action="store_true",
                    help="the host's share alone: every compiled call answered from a record")
    args = ap.parse_args()
    rows = (replay if args.replay else measure)(args.artifact, args.widths, args.tokens)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
