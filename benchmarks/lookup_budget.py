"""Accepted tokens per verify step against the n-gram lookup budget: one chain or a trie.

For each width W and lookup budget L, greedy speculative decoding of the held-out prompts
with the artifact's Medusa heads and up to L looked-up nodes inside the tree of W nodes
(`Generation(lookup=L)`). ``trie`` is the generator's draft (`NgramIndex.draft_tree`: the
continuations of the suffix's latest 8 earlier occurrences merged into a tree); ``chain``
the earlier draft, the latest occurrence's continuation alone (``branches=1``). The
``auto`` row of each width is `auto_lookup(W)`, the default of `generate` and `bench`.

Two prompt sets: the 8 held-out prompts `hetcomp bench --prompts heldout` uses (``bench``),
and the 17th-40th held-out prompts, which no default was tuned on (``rest``). Accepted
tokens per step do not depend on the machine's speed, so a run needs no interleaving.

Usage::

    .venv/bin/python benchmarks/lookup_budget.py ART [--prompts bench|rest]
        [--widths 16,64] [--new-tokens 96] [--plot lookup.png]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import sys


@contextlib.contextmanager
def _branches(gen_module, branches: int | None):
    """The generator drafts with ``draft_tree(..., branches=branches)`` inside the block."""
    original = gen_module.NgramIndex.draft_tree
    if branches is not None:
        gen_module.NgramIndex.draft_tree = functools.partialmethod(original, branches=branches)
    try:
        yield
    finally:
        gen_module.NgramIndex.draft_tree = original


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--prompts", choices=("bench", "rest"), default="bench")
    ap.add_argument("--widths", default="4,8,16,32,64")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--plot", help="PNG of accepted tokens per step against the budget")
    args = ap.parse_args()
    from hetcomp.driver.calibrate import heldout_prompts
    from hetcomp.runtime import load_artifact

    gen = importlib.import_module("hetcomp.runtime.generate")  # the module, not the function
    art = load_artifact(args.artifact)
    info = art.manifest["speculative"]["heads_info"]
    prompts = heldout_prompts(info, 40)[:8] if args.prompts == "bench" else \
        heldout_prompts(info, 40)[16:40]
    encoded = [art.tokenizer.encode(p, chat=True) for p in prompts]
    rows = []
    for w in (int(x) for x in args.widths.split(",")):
        budgets = sorted({w // 4, w // 2, 3 * w // 4, gen.auto_lookup(w)} - {0})
        configs = [("chain", min(8, w // 2), 1)] + [("trie", b, None) for b in budgets]
        for kind, budget, branches in configs:
            made = steps = 0
            with _branches(gen, branches):
                for ids in encoded:
                    res = gen.generate(art, ids, max_new_tokens=args.new_tokens,
                                       stop_at_eos=False, width=w, lookup=budget)
                    made, steps = made + len(res.ids) - 1, steps + res.steps
            rows.append((w, kind, budget, made / steps))
            mark = "  (auto)" if kind == "trie" and budget == gen.auto_lookup(w) else ""
            print(f"W={w:3d} {kind:5s} lookup {budget:2d}: {made / steps:.3f} accepted/step"
                  f"{mark}", file=sys.stderr, flush=True)
    print("| W | draft | lookup nodes | accepted tokens / step |")
    print("|---|---|---|---|")
    for w, kind, budget, acc in rows:
        print(f"| {w} | {kind} | {budget} | {acc:.3f} |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for w in sorted({r[0] for r in rows}):
            trie = [(b, a) for ww, k, b, a in rows if ww == w and k == "trie"]
            line, = ax.plot(*zip(*trie), marker="o", label=f"W={w} trie")
            chain = [(b, a) for ww, k, b, a in rows if ww == w and k == "chain"]
            ax.plot(*zip(*chain), marker="x", linestyle="none", color=line.get_color(),
                    markersize=9, label=f"W={w} chain")
        ax.set_xlabel("lookup nodes in the tree")
        ax.set_ylabel("accepted tokens / step")
        ax.set_title(f"{args.prompts} held-out prompts, {args.new_tokens} tokens")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
