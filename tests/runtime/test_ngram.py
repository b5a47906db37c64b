"""The lookup draft's n-gram index (``generate.NgramIndex``), kept as the context grows,
against a scan of the whole context at every length."""

import numpy as np
import pytest

from hetcomp.runtime.generate import NgramIndex


def scan(context, length, max_ngram=3):
    """The tokens after the latest earlier occurrence of the context's last n-gram, longest
    n first, by looking at every start."""
    for n in range(min(max_ngram, len(context) - 1), 0, -1):
        key = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start: start + n] == key:
                return context[start + n: start + n + length]
    return []


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
            assert index.draft(length) == scan(context[:k], length), (context[:k], length)


def test_draft_examples():
    def draft(context, length):
        index = NgramIndex()
        index.extend(context)
        return index.draft(length)

    assert draft([1, 2, 3, 9, 1, 2, 3], 2) == [9, 1]  # the trigram recurs
    assert draft([1, 2, 7, 4, 2, 8, 2], 3) == [8, 2]  # latest occurrence of the unigram
    assert draft([5, 6, 7], 4) == []
    assert draft([4, 4], 3) == [4]  # an occurrence overlapping the suffix counts
    assert draft([3], 3) == []
