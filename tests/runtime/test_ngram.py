"""The lookup draft's n-gram index (``lookup.NgramIndex``), kept as the context grows,
against a scan of the whole context at every length."""

import numpy as np
import pytest

from hetcomp.speculative.lookup import NgramIndex


def scan(context, length, count, max_ngram=3, occurrences=8):
    """The distinct continuations after the latest ``occurrences`` earlier occurrences of the
    context's last n-gram, for each n, longest n first, latest first (by looking at every
    start)."""
    out = []
    for n in range(min(max_ngram, len(context) - 1), 0, -1):
        key = context[-n:]
        starts = [s for s in range(len(context) - n) if context[s: s + n] == key]
        for start in reversed(starts[-occurrences:]):
            cont = context[start + n: start + n + length]
            if cont not in out:
                out.append(cont)
    return out[:count]


@pytest.mark.parametrize("alphabet", [2, 5, 40])
def test_index_drafts_what_a_scan_finds(alphabet):
    """Random contexts (few symbols: many partial matches, repeats of the last n-gram next to
    each other, no match at all), extended a token or several at a time, at every length."""
    rng = np.random.default_rng(alphabet)
    for _ in range(40):
        context = [int(t) for t in rng.integers(0, alphabet, int(rng.integers(1, 120)))]
        index, k = NgramIndex(), 0
        while k < len(context):
            step = int(rng.integers(1, 4))  # a step accepts 1..3 tokens
            index.extend(context[k: k + step])
            k = min(len(context), k + step)
            length = int(rng.integers(1, 9))
            assert index.continuations(length, 1) == scan(context[:k], length, 1), \
                (context[:k], length)


def test_draft_examples():
    def draft(context, length):  # the latest occurrence's continuation
        index = NgramIndex()
        index.extend(context)
        return index.continuations(length, 1)

    assert draft([1, 2, 3, 9, 1, 2, 3], 2) == [[9, 1]]  # the trigram recurs
    assert draft([1, 2, 7, 4, 2, 8, 2], 3) == [[8, 2]]  # latest occurrence of the unigram
    assert draft([5, 6, 7], 4) == []
    assert draft([4, 4], 3) == [[4]]  # an occurrence overlapping the suffix counts
    assert draft([3], 3) == []


@pytest.mark.parametrize("alphabet", [2, 5, 40])
def test_continuations_and_their_tree(alphabet):
    """Several occurrences' continuations equal a scan's; their tree holds exactly the
    paths they start with, within its node budget, parents before children."""
    rng = np.random.default_rng(alphabet + 100)
    for _ in range(40):
        context = [int(t) for t in rng.integers(0, alphabet, int(rng.integers(1, 120)))]
        index = NgramIndex()
        index.extend(context)
        length, count = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        conts = index.continuations(length, count)
        assert conts == scan(context, length, count), (context, length, count)
        parents, tokens = index.draft_tree(length, count)
        assert len(parents) == len(tokens) <= length
        paths = []
        for i, p in enumerate(parents):
            assert p < i
            paths.append((paths[p] if p >= 0 else ()) + (tokens[i],))
        assert len(set(paths)) == len(paths)  # a trie: no path twice
        prefixes = {tuple(c[:d]) for c in conts for d in range(1, len(c) + 1)}
        assert set(paths) <= prefixes
        if len(prefixes) <= length:  # everything fits: every prefix is there
            assert set(paths) == prefixes


def test_draft_tree_examples():
    index = NgramIndex()
    index.extend([1, 2, 3, 9, 1, 2, 4, 1, 2])
    # "1 2" was followed by 4 (latest), then by 3; "2" likewise; "1" by 2 only.
    assert index.continuations(2, 8) == [[4, 1], [3, 9]]
    assert index.draft_tree(2) == ((-1, 0), [4, 1])  # the budget is spent on the latest
    assert index.draft_tree(4) == ((-1, 0, 1, -1), [4, 1, 2, 3])
    assert index.draft_tree(6) == ((-1, 0, 1, -1, 3, 4), [4, 1, 2, 3, 9, 1])
    assert index.draft_tree(6, branches=1) == ((-1, 0, 1), [4, 1, 2])
    shared = NgramIndex()
    shared.extend([7, 5, 6, 7, 5, 8, 7])  # both continuations start with 5: one node
    assert shared.continuations(3, 8) == [[5, 8, 7], [5, 6, 7]]
    assert shared.draft_tree(4) == ((-1, 0, 1, 0), [5, 8, 7, 6])
