"""Record greedy responses of a compiled artifact to a corpus' prompts, for calibration.

Writes JSON lines ``{"prompt": ..., "ids": [...]}`` (the format ``hetcomp calibrate
--responses`` replays), one per prompt as it finishes, so a stopped run resumes where it
left off: prompts already in ``OUT`` or in any ``--skip`` file are not generated again.
Speculative decoding (``--width``) is lossless, so the ids are those of sequential greedy
decoding, only made faster; the calibration replay checks them against the model anyway.

``--extend RESPONSES``: continue the responses recorded there that stopped at their token
budget (not at EOS) to ``--new-tokens`` in all (the prompt and the recorded ids are the new
prompt); ``--training-only`` restricts that to the prompts `hetcomp calibrate` trains on
(its held-out split of ``--corpus`` keeps its responses as they are, so its statistics stay
comparable). Continued responses are written whole. Measured for SmolLM2 (534 training
prompts to 512 tokens, 18 minutes at W = 8): heads trained on them are no better on the
held-out prompts, the continuations being mostly loops (`benchmarks/draft_heads.py`).

Usage::

    .venv/bin/python benchmarks/record_responses.py ART OUT.jsonl --corpus alpaca
        [--skip hetcomp/data/smollm2-responses.jsonl.gz] [--width 8 --lookup 2]
        [--new-tokens 256] [--limit N]
    .venv/bin/python benchmarks/record_responses.py ART OUT.jsonl --corpus chat
        --extend hetcomp/data/smollm2-responses.jsonl.gz --training-only --new-tokens 512
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("out")
    ap.add_argument("--corpus", default="alpaca")
    ap.add_argument("--skip", action="append", default=[], help="responses file to not redo")
    ap.add_argument("--width", type=int, default=1)
    ap.add_argument("--lookup", type=int, default=0)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--limit", type=int, default=0, help="stop after N new responses")
    ap.add_argument("--extend", help="responses to continue to --new-tokens")
    ap.add_argument("--training-only", action="store_true")
    args = ap.parse_args()
    from hetcomp.driver.calibrate import CalibrateOptions, read_responses, split_prompts
    from hetcomp.runtime import generate, load_artifact
    from hetcomp.speculative.corpus import load_corpus

    done = set()
    for path in [*args.skip, *([args.out] if os.path.exists(args.out) else [])]:
        done |= set(read_responses(path))
    earlier = read_responses(args.extend) if args.extend else {}
    if args.extend:  # the responses cut at their budget: the longest ones recorded
        cap = max(len(r) for r in earlier.values())
        todo = [p for p, r in earlier.items() if len(r) == cap and p not in done]
        if args.training_only:
            train = set(split_prompts(CalibrateOptions(corpus=args.corpus, recorded_only=True,
                                                       responses=args.extend), earlier)[0])
            todo = [p for p in todo if p in train]
    else:
        todo = [p for p in load_corpus(args.corpus) if p not in done]
    if args.limit:
        todo = todo[: args.limit]
    art = load_artifact(args.artifact)
    chat = art.tokenizer.chat_template is not None
    made, t0 = 0, time.time()
    with open(args.out, "a") as fh:
        for i, prompt in enumerate(todo):
            ids = art.tokenizer.encode(prompt, chat=chat)
            before = earlier.get(prompt, [])
            if len(ids) + args.new_tokens + args.width >= art.config.max_context:
                continue
            r = generate(art, ids + before, args.new_tokens - len(before), width=args.width,
                         lookup=args.lookup)
            fh.write(json.dumps({"prompt": prompt, "ids": before + r.ids}) + "\n")
            fh.flush()
            made += len(r.ids)
            print(f"\r{i + 1}/{len(todo)} prompts, {made / (time.time() - t0):.0f} tokens/s",
                  end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
