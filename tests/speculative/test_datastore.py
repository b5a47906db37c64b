"""The lookup draft's datastore (``speculative.datastore``) against a plain scan of its
sequences, and the lookup tree it joins (``lookup.NgramIndex``)."""

import collections

import numpy as np
import pytest

from hetcomp.errors import HetcompError
from hetcomp.speculative.datastore import MAX_LENGTH, RANKED, Datastore, pack_sequences
from hetcomp.speculative.lookup import STORE_LENGTH, NgramIndex


def scan(seqs, context, length, count, max_ngram=4):
    """For the longest n-gram first: every continuation that followed it in some sequence
    (cut at that sequence's end), most frequent first, ties in corpus order."""
    out = []
    for n in range(min(max_ngram, len(context)), 0, -1):
        key, counts, first = list(context[-n:]), collections.Counter(), {}
        for s in seqs:
            for end in range(n - 1, len(s) - 1):
                if list(s[end - n + 1: end + 1]) == key:
                    cont = tuple(s[end + 1: end + 1 + length])
                    counts[cont] += 1
                    first.setdefault(cont, len(first))
        for cont in sorted(counts, key=lambda c: (-counts[c], first[c])):
            if list(cont) not in out:
                out.append(list(cont))
                if len(out) == count:
                    return out
    return out


@pytest.mark.parametrize("alphabet,cached", [(2, 4096), (6, 4096), (50, 4096), (6, 3)])
def test_continuations_are_what_a_scan_finds(alphabet, cached):
    """Few symbols: long runs of matches, ranges of hundreds of occurrences, continuations
    cut at a sequence's end, n-grams that would span two sequences (never matched); up to
    RANKED continuations from the tables ranked ahead, more counted by each search. The
    searches it remembers (``cached``, forgotten all at once) change no answer."""
    rng = np.random.default_rng(alphabet)
    seqs = [[int(t) for t in rng.integers(0, alphabet, int(rng.integers(1, 60)))]
            for _ in range(60)]
    store = Datastore.from_sequences(seqs, scan=10 ** 6, cached=cached)
    for _ in range(300):
        context = [int(t) for t in rng.integers(0, alphabet, int(rng.integers(0, 9)))]
        length, count = int(rng.integers(1, 9)), int(rng.integers(1, RANKED + 5))
        assert store.continuations(context, length, count) == \
            scan(seqs, context, length, count), (context, length, count)
        # asked again (a decode that loops): the remembered answer, unchanged
        assert store.continuations(context, length, count) == \
            scan(seqs, context, length, count)
        assert 1 <= len(store._found) <= cached


def test_ngrams_do_not_span_sequences():
    store = Datastore.from_sequences([[1, 2], [3, 4, 5]])
    assert store.continuations([2, 3], 4, 8) == [[4, 5]]  # by "3" alone, not "2 3"
    assert store.continuations([2], 4, 8) == []  # "2" ends its sequence: nothing follows
    assert store.continuations([9], 4, 8) == []
    assert store.num_tokens == 5


def test_continuations_stop_at_the_longest_length():
    """Continuations longer than :data:`MAX_LENGTH` are cut there (what the distinct
    continuations are counted by)."""
    seqs = [list(range(30)), list(range(10)) + [99] * 20]
    store = Datastore.from_sequences(seqs)
    assert store.continuations([3], 20, 8) == [list(range(4, 4 + MAX_LENGTH)),
                                               [4, 5, 6, 7, 8, 9, 99, 99]]
    assert store.continuations([3], 20, 8) == scan(seqs, [3], MAX_LENGTH, 8)
    assert store.continuations([8], 20, 8) == [list(range(9, 9 + MAX_LENGTH)), [9] + [99] * 7]


def test_scan_bounds_the_occurrences_counted():
    """A common n-gram's continuations are counted over its first ``scan`` occurrences."""
    seqs = [[7, 1]] * 3 + [[7, 2]] * 5
    for count in (2, RANKED + 1):  # (the ranked tables, and each search's own count)
        assert Datastore.from_sequences(seqs).continuations([7], 1, count) == [[2], [1]]
        assert Datastore.from_sequences(seqs, scan=4).continuations([7], 1, count) == [[1], [2]]
        # 3 and 3: the earlier first; 3 and 4
        assert Datastore.from_sequences(seqs, scan=6).continuations([7], 1, count) == [[1], [2]]
        assert Datastore.from_sequences(seqs, scan=7).continuations([7], 1, count) == [[2], [1]]


@pytest.mark.parametrize("tokens", [np.zeros((2, 3), np.int32), np.array([1.5, 2.0]),
                                    np.array([3, -2, 4])])
def test_malformed_store_is_refused(tokens):
    with pytest.raises(HetcompError, match="datastore"):
        Datastore(tokens)


def trie(conts, nodes):
    children, parents, tokens = {}, [], []
    for cont in conts:
        node = -1
        for tok in cont:
            if (node, tok) not in children:
                if len(tokens) == nodes:
                    return tuple(parents), tokens
                children[node, tok] = len(tokens)
                parents.append(node)
                tokens.append(tok)
            node = children[node, tok]
    return tuple(parents), tokens


class Spy:
    """A datastore that records the count each search asks for."""

    def __init__(self, store, asked):
        self.store, self.asked = store, asked

    def continuations(self, context, length, count):
        self.asked.append(count)
        return self.store.continuations(context, length, count)


def test_lookup_tree_takes_the_context_first_then_the_store():
    """The lookup tree merges the context's continuations, then the store's (of at most
    STORE_LENGTH tokens), into one trie of at most ``nodes`` nodes; each source is asked
    for no more continuations than the trie has nodes (no more could add one)."""
    rng = np.random.default_rng(0)
    seqs = [[int(t) for t in rng.integers(0, 5, 40)] for _ in range(30)]
    store = Datastore.from_sequences(seqs)
    capped = 0
    for _ in range(100):
        context = [int(t) for t in rng.integers(0, 5, int(rng.integers(1, 30)))]
        nodes = int(rng.integers(1, 40))
        plain, with_store = NgramIndex(), NgramIndex(store=store)
        plain.extend(context)
        with_store.extend(context)
        branches = min(nodes, 8)
        want = trie(plain.continuations(nodes, branches)
                    + store.continuations(context, min(nodes, STORE_LENGTH), branches), nodes)
        asked = []
        with_store.store = Spy(store, asked)
        assert with_store.draft_tree(nodes) == want
        assert all(count == branches for count in asked)
        capped += bool(asked) and branches < 8
        assert len(want[1]) == nodes or len(want[1]) >= len(plain.draft_tree(nodes)[1])
    assert capped  # the store was searched with fewer nodes than 8


def test_pack_sequences_separates_them():
    assert pack_sequences([[4, 5], [6]]).tolist() == [4, 5, -1, 6, -1]
    assert pack_sequences([]).tolist() == []
