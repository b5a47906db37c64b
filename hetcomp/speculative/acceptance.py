"""Accepted tokens a step, without running the model: greedy decoding replayed over the
model's recorded greedy responses.

Where the greedy response to a prompt is recorded, a greedy decode's output is known before
it runs, and so is what each of its steps accepts, given what the drafts propose at each
position: the Medusa draft's proposals are the ranks calibration measured for the tokens
that follow (the heads' held-out ``ranks``, one row per response position,
:func:`~hetcomp.speculative.medusa.heldout_ranks`), the lookup draft's are
:class:`~hetcomp.speculative.lookup.NgramIndex`'s over the context so far, datastore
included. :func:`replay_acceptance` walks each response as
:class:`~hetcomp.runtime.generate.Generation` decodes it: at row ``j`` (the root is
``response[j]``) the lookup tree takes up to ``lookup`` nodes and the Medusa tree the rest of
the width; the Medusa tree accepts its deepest rank path that the row's ranks begin with, the
lookup tree its deepest path the response goes on with; the step emits the deeper one and
the model's next token, and the next step's root is the last of them.

A tree's expected accept length (``Tree.expected_accept_length``) averages over every row,
and of the Medusa draft alone; a decode visits only the rows its steps stop at, and with the
lookup it proposes what the heads do not (SmolLM2 float16, the packaged heads, the 153
held-out recorded responses of 256 tokens: tokens a step at W = 4 / 16 / 64 are 1.58 / 1.89 /
2.08 by the trees, 1.52 / 1.81 / 1.95 replayed without the lookup, 2.04 / 3.07 / 3.77 with
it). Replayed on the first 8 of those prompts for 64 tokens, the tokens a step are the ones
``hetcomp bench --prompts heldout`` decodes, to the third decimal (1.826 / 2.136 / 2.355 /
2.880 at W = 4 / 8 / 16 / 64).

Replays are cheap (a second for SmolLM2's 153 responses at a width), so compile also
chooses each width's lookup nodes by them (:func:`best_lookup`): the heads and the lookup
pay differently per model (Gemma 3 270M's weak heads leave more to the lookup: 3 lookup
nodes of W = 4 decode 95.5 tokens/s where 2 decode 84.2, held-out prompts, 64 tokens).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from .lookup import STORE_LENGTH, NgramIndex
from .tree import Tree


@dataclasses.dataclass(frozen=True)
class Replayed:
    """What a replay decoded: the tokens each step emitted, per response (the first token of
    each comes from prefill, as a decode's does)."""

    per_sequence: tuple[tuple[int, ...], ...]

    @property
    def per_step(self) -> tuple[int, ...]:
        return tuple(n for steps in self.per_sequence for n in steps)

    @property
    def tokens(self) -> int:
        return sum(self.per_step)

    @property
    def steps(self) -> int:
        return len(self.per_step)

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 1.0

    def within(self, new_tokens: int) -> Replayed:
        """The decodes of ``new_tokens`` tokens (the prefill's included): each response's
        steps up to the one that reaches them, that one cut there. Equal to replaying the
        responses cut at ``new_tokens``: a step's drafts read only what came before it."""
        out = []
        for steps in self.per_sequence:
            kept, room = [], new_tokens - 1
            for n in steps:
                if room <= 0:
                    break
                kept.append(min(n, room))
                room -= n
            out.append(tuple(kept))
        return Replayed(tuple(out))


def rank_paths(tree: Tree) -> frozenset[tuple[int, ...]]:
    """Each non-root node of a Medusa tree as the path of ranks from the root to it."""
    path: list[tuple[int, ...]] = [()]
    for i in range(1, tree.width):
        path.append(path[tree.parents[i]] + (tree.ranks[i],))
    return frozenset(path[1:])


def medusa_depth(paths: frozenset, ranks: Sequence[int]) -> int:
    """How deep a Medusa tree (its :func:`rank_paths`) accepts at a row whose targets have
    ``ranks`` (head k's rank of the token k + 1 after the root; -1 or TOPK: none)."""
    depth = 0
    while depth < len(ranks) and tuple(ranks[: depth + 1]) in paths:
        depth += 1
    return depth


def lookup_depth(parents: Sequence[int], tokens: Sequence[int], truth: Sequence[int]) -> int:
    """How deep a lookup tree (:meth:`NgramIndex.draft_tree`'s ``(parents, tokens)``)
    accepts where the response goes on with ``truth``."""
    depth: list[int] = []
    ok: list[bool] = []
    best = 0
    for p, t in zip(parents, tokens):
        d = 0 if p < 0 else depth[p]
        hit = (p < 0 or ok[p]) and d < len(truth) and truth[d] == t
        depth.append(d + 1)
        ok.append(hit)
        if hit and d + 1 > best:
            best = d + 1
    return best


def replay_acceptance(sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
                      ranks: np.ndarray, tree: Callable[[int], Tree], width: int,
                      lookup: int = 0, store=None) -> Replayed:
    """Greedy decoding at ``width`` with ``lookup`` lookup nodes replayed over ``sequences``
    (``(prompt ids, recorded greedy response ids)``), whose positions the rows of ``ranks``
    (``[sum of the responses' lengths, K]``, in the same order) describe. ``tree(w)``: the
    Medusa tree of ``w`` nodes the decode verifies (``Artifact.tree``); ``store``: the lookup
    draft's :class:`~hetcomp.speculative.datastore.Datastore`, or None."""
    rows = sum(len(r) for _, r in sequences)
    if rows != len(ranks):
        raise ValueError(f"{len(ranks)} rows of ranks for responses of {rows} tokens")
    lookup = min(lookup, width - 1)
    if store is not None and lookup:
        store.prepare(min(lookup, STORE_LENGTH))
    paths: dict[int, frozenset] = {}
    per_sequence: list[tuple[int, ...]] = []
    row0 = 0
    for prompt, response in sequences:
        response = [int(t) for t in response]
        index = NgramIndex(store=store) if lookup else None
        if index is not None:
            index.extend([*prompt, response[0]])
        j = 0  # response[j]: the last token emitted, the step's root
        per_step: list[int] = []
        while j < len(response) - 1:
            looked, looked_ids = index.draft_tree(lookup) if index is not None else ((), [])
            medusa = width - len(looked)
            if medusa not in paths:
                paths[medusa] = rank_paths(tree(medusa))
            depth = max(medusa_depth(paths[medusa], ranks[row0 + j].tolist()),
                        lookup_depth(looked, looked_ids, response[j + 1:]))
            new = response[j + 1: j + 2 + depth]
            if index is not None:
                index.extend(new)
            per_step.append(len(new))
            j += len(new)
        per_sequence.append(tuple(per_step))
        row0 += len(response)
    return Replayed(tuple(per_sequence))


#: Generation lengths a width's lookup nodes are chosen for, besides the recorded
#: responses' whole length (`generate`'s default 64 tokens, bench's longer runs): more
#: lookup nodes pay later in a response, where it repeats itself, and cost early on (SmolLM2,
#: W = 4 with 3 lookup nodes instead of 2: 1.582 against 1.699 tokens a step at 64 tokens,
#: 2.061 against 2.039 over the whole 256).
HORIZONS = (64, 128)

#: A width's lookup nodes other than the generator's default are chosen only where they
#: accept this much more at every horizon: the held-out responses are few (13 for
#: Qwen2.5-Coder), and a choice made on half of them and replayed on the other half lost
#: 1-3% at W = 16 where the halves disagreed.
LOOKUP_GAIN = 1.01


def lookup_candidates(width: int, default: int) -> list[int]:
    """The lookup nodes tried at ``width``: ``default``, half, three quarters and all but
    the root."""
    return sorted({default, width // 2, 3 * width // 4, width - 1} & set(range(width)))


def best_lookup(width: int, default: int, replay: Callable[[int], Replayed]
                ) -> tuple[int, float]:
    """``(lookup nodes, tokens a step over the whole responses)`` at ``width``: ``default``,
    unless one of the :func:`lookup_candidates` accepts :data:`LOOKUP_GAIN` times as much
    at each of the :data:`HORIZONS` and over the whole responses (``replay(n)``: a
    :func:`replay_acceptance` with ``n`` lookup nodes); then the one whose smallest gain is
    the largest (the fewer nodes of equals)."""
    def scores(r: Replayed) -> list[float]:
        return [r.within(h).tokens_per_step for h in HORIZONS] + [r.tokens_per_step]

    base = scores(replay(default))
    gains = {default: 1.0}
    whole = {default: base[-1]}
    for n in lookup_candidates(width, default):
        if n != default:
            s = scores(replay(n))
            gains[n], whole[n] = min(a / b for a, b in zip(s, base)), s[-1]
    best = max(gains, key=lambda n: (gains[n], -n))
    return (best, whole[best]) if gains[best] >= LOOKUP_GAIN else (default, base[-1])
