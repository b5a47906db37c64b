"""A datastore draft: what the model itself wrote after the context's last n-gram elsewhere.

The n-gram lookup of the generator (:class:`hetcomp.speculative.lookup.NgramIndex`) drafts the
tokens that followed earlier occurrences of the context's suffix in the context itself. The
datastore adds the model's own greedy responses to other prompts (the responses its Medusa
heads were trained on, held-out prompts excluded): retrieval-based drafting as REST does it
(He et al. 2024), over text the model would write, so the phrases it keeps using ("Here are
some", "I'm sorry, but", a list's markup) are drafted from the first step of an answer.
Drafts only propose: verification keeps the output that of greedy decoding.

The store is one int32 array of token ids, the sequences separated by -1. For every n up to
``max_ngram`` the positions whose last n tokens form an n-gram are sorted by a 64-bit
polynomial hash of it, so a lookup is a binary search (no Python dict of ~700K n-grams to
build at load: SmolLM2's 165K tokens index in ~60 ms). :meth:`Datastore.continuations`
gives, for the longest n-gram that occurs, then shorter ones, the most frequent of the token
sequences that followed it (among up to ``scan`` occurrences), counted by a hash of the
tokens after every position, made at load for each length up to :data:`MAX_LENGTH`. Those
rankings are made for every n-gram at once, the first time a search asks for a continuation
length (~0.1 s for SmolLM2's store; :data:`RANKED` per n-gram), so a search is a binary search
per n and a slice (32 us here, 126 us when each search counted its own occurrences: most of
the host's time in a W = 64 GPU step).
"""

from __future__ import annotations

import numpy as np

from ..errors import HetcompError

SEPARATOR = -1
_MULT = 0x9E3779B97F4A7C15  # the hash's multiplier (odd: a bijection per step mod 2**64)
_MASK = (1 << 64) - 1
_CACHED = 4096  # searches remembered (then forgotten all at once), by default
#: Searches the acceptance replay's store remembers: every width's replays search the same
#: positions of the same responses (SmolLM2's 153 held-out ones: 33K searches, ~40 MB; its
#: replay at 7 widths 5.4 -> 4.3 s against the default's).
REPLAY_CACHED = 1 << 17
MAX_LENGTH = 8  # the longest continuation a search returns
RANKED = 8  # the continuations ranked ahead for each n-gram (a search asking more counts them)


def pack_sequences(seqs) -> np.ndarray:
    """Token sequences as one int32 array, each followed by :data:`SEPARATOR`."""
    parts = []
    for s in seqs:
        parts.append(np.asarray(s, dtype=np.int32).ravel())
        parts.append(np.array([SEPARATOR], np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def unpack_sequences(tokens: np.ndarray) -> list[np.ndarray]:
    """:func:`pack_sequences`'s sequences (int32); ValueError where ``tokens`` is not such a
    packing (other negative ids, or a last sequence without its separator)."""
    if (tokens.ndim != 1 or tokens.dtype.kind not in "iu" or tokens.size and (
            tokens.min() < SEPARATOR or tokens[-1] != SEPARATOR
            or tokens.max() > np.iinfo(np.int32).max)):
        raise ValueError("not token sequences, each followed by a separator")
    ends = np.flatnonzero(tokens == SEPARATOR)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokens[a:b].astype(np.int32) for a, b in zip(starts, ends, strict=True)]


def _hash_key(ngram) -> int:
    h = 0
    for t in ngram:
        h = (h * _MULT + int(t) + 1) & _MASK
    return h


class Datastore:
    """The n-gram index over ``tokens`` (:func:`pack_sequences`' layout); ``cached``: how
    many searches it remembers (a decode that loops asks the same again; the acceptance
    replay asks each position of every response once a width)."""

    def __init__(self, tokens: np.ndarray, max_ngram: int = 4, scan: int = 256,
                 cached: int = _CACHED):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise HetcompError("a datastore is a 1-D array of integer token ids")
        if tokens.size and tokens.min() < SEPARATOR:
            raise HetcompError(f"a datastore holds token ids and {SEPARATOR} separators")
        self.tokens = tokens.astype(np.int64)
        self.max_ngram, self.scan, self.cached = max_ngram, scan, cached
        t = self.tokens
        n_tok = len(t)
        # Position i ends an n-gram with a follower: t[i - n + 1 .. i + 1] hold no separator.
        follow = np.zeros(n_tok, bool)
        follow[:-1] = t[1:] >= 0
        h = np.zeros(n_tok, np.uint64)
        ok = follow & (t >= 0)
        self._keys, self._ends = [], []
        with np.errstate(over="ignore"):
            for n in range(1, max_ngram + 1):
                if n > 1:  # t[i - n + 1] joins the window at the front
                    ok[n - 1:] &= t[: n_tok - n + 1] >= 0
                    ok[: n - 1] = False
                # h_n[i] = h_{n-1}[i] + (t[i-n+1] + 1) * M**(n-1): a window's hash, the
                # same as _hash_key's (computed front to back)
                prev = np.zeros(n_tok, np.uint64)
                prev[n - 1:] = (t[: n_tok - n + 1] + 1).astype(np.uint64)
                h = h + prev * np.uint64(pow(_MULT, n - 1, 1 << 64))
                ends = np.flatnonzero(ok)
                order = np.argsort(h[ends], kind="stable")
                self._keys.append(h[ends][order])
                self._ends.append(ends[order])
        self._padded = np.concatenate([t, np.full(MAX_LENGTH, SEPARATOR, np.int64)])
        # _cont_hash[L - 1][i]: a hash of the L tokens after position i, cut at the sequence's
        # end, so that counting a search's distinct continuations is one gather and a sort
        # (1.3 MB a length for SmolLM2's 165K tokens, built in ~10 ms)
        self._cont_hash = []
        h = np.zeros(n_tok, np.uint64)
        alive = np.ones(n_tok, bool)
        with np.errstate(over="ignore"):
            for d in range(MAX_LENGTH):
                nxt = self._padded[1 + d: 1 + d + n_tok]
                alive &= nxt >= 0
                h = np.where(alive, h * np.uint64(_MULT) + (nxt + 2).astype(np.uint64), h)
                self._cont_hash.append(h)
        # Searches by the context's last n-grams: a decode that loops asks the same again.
        self._found: dict = {}
        self._ranked: dict = {}  # by continuation length: _rank_all's tables

    @classmethod
    def from_sequences(cls, seqs, **kw) -> Datastore:
        return cls(pack_sequences(seqs), **kw)

    @property
    def num_tokens(self) -> int:
        return int((self.tokens >= 0).sum())

    def continuations(self, context, length: int, count: int) -> list[list[int]]:
        """Up to ``count`` distinct continuations of up to ``length`` (at most
        :data:`MAX_LENGTH`) tokens that followed the context's last n-gram in the store:
        longest n first, then by how often each followed it (ties: the earlier occurrence
        first)."""
        length = min(length, MAX_LENGTH)
        if length < 1 or count < 1:
            return []
        key = (tuple(int(x) for x in context[max(0, len(context) - self.max_ngram):]), length,
               count)
        found = self._found.get(key)
        if found is None:
            if len(self._found) >= self.cached:
                self._found.clear()
            found = self._found[key] = self._search(key[0], length, count)
        return [list(c) for c in found]

    def _search(self, context: tuple, length: int, count: int) -> list[list[int]]:
        # Up to RANKED continuations come from the tables ranked ahead (made at the first
        # search of a length); more are counted here, over each n-gram's occurrences.
        ranked = self.prepare(length) if count <= RANKED else None
        out: list[list[int]] = []
        for n in range(min(self.max_ngram, len(context)), 0, -1):
            ngram = [int(x) for x in context[len(context) - n:]]
            key = np.uint64(_hash_key(ngram))
            ends = (self._ranked_ends(ranked[n - 1], key) if ranked is not None
                    else self._counted_ends(n, key, length))
            if ends and self.tokens[ends[0] - n + 1: ends[0] + 1].tolist() != ngram:
                continue  # a hash collision (never seen: 2**-64 per pair)
            for end in ends:
                cont = []
                for x in self._padded[end + 1: end + 1 + length].tolist():
                    if x < 0:
                        break
                    cont.append(x)
                if cont not in out:  # (never empty: every indexed n-gram has a follower)
                    out.append(cont)
                    if len(out) == count:
                        return out
        return out

    @staticmethod
    def _ranked_ends(table: tuple, key) -> list[int]:
        """Where the ranked continuations of the n-gram with hash ``key`` start (one n's
        :meth:`_rank_all` table), or [] if it does not occur."""
        keys, ptr, ends = table
        g = int(np.searchsorted(keys, key))
        if g == len(keys) or keys[g] != key:
            return []
        return ends[ptr[g]: ptr[g + 1]].tolist()

    def _counted_ends(self, n: int, key, length: int) -> list[int]:
        """:meth:`_ranked_ends` counted over the n-gram's first ``scan`` occurrences now."""
        keys = self._keys[n - 1]
        lo, hi = np.searchsorted(keys, key, "left"), np.searchsorted(keys, key, "right")
        ends = self._ends[n - 1][lo: min(hi, lo + self.scan)]
        # Distinct continuations by their hashes (np.unique over rows of tokens sorts them as
        # records: 20x slower at 256 rows), the most frequent first, ties by the earliest
        _, first, counts = np.unique(self._cont_hash[length - 1][ends], return_index=True,
                                     return_counts=True)
        return ends[first[np.lexsort((first, -counts))]].tolist()

    def prepare(self, length: int) -> list[tuple]:
        """Rank every n-gram's continuations of ``length`` tokens now, if not done yet (the
        first search at a length does it: a decoder calls this before its timed steps)."""
        ranked = self._ranked.get(length)
        if ranked is None:
            ranked = self._ranked[length] = self._rank_all(length)
        return ranked

    def _rank_all(self, length: int) -> list[tuple]:
        """For each n, every n-gram's continuations of ``length`` tokens ranked as
        :meth:`_counted_ends` ranks one n-gram's (the first ``scan`` occurrences counted, the
        most frequent first, ties by the earliest), the first :data:`RANKED` kept: per n
        ``(keys, ptr, ends)``, the n-grams' sorted hashes and ``ends[ptr[g]:ptr[g + 1]]``,
        the positions n-gram ``g``'s ranked continuations follow."""
        tables = []
        cont_hash = self._cont_hash[length - 1]
        for keys, ends in zip(self._keys, self._ends):
            m = len(keys)
            new = np.ones(m, bool)
            new[1:] = keys[1:] != keys[:-1]
            starts = np.flatnonzero(new)
            group = np.cumsum(new) - 1
            idx = np.arange(m)
            idx = idx[idx - starts[group] < self.scan]  # (ends: by position in each n-gram)
            grp, ch = group[idx], cont_hash[ends[idx]]
            order = np.lexsort((idx, ch, grp))
            idx, grp, ch = idx[order], grp[order], ch[order]
            run = np.ones(len(idx), bool)  # a distinct continuation of an n-gram starts
            run[1:] = (grp[1:] != grp[:-1]) | (ch[1:] != ch[:-1])
            runs = np.flatnonzero(run)
            counts = np.diff(np.append(runs, len(idx)))
            first, grp = idx[runs], grp[runs]  # its earliest occurrence, its n-gram
            order = np.lexsort((first, -counts, grp))
            first, grp = first[order], grp[order]
            lead = np.ones(len(grp), bool)
            lead[1:] = grp[1:] != grp[:-1]
            rank = np.arange(len(grp)) - np.flatnonzero(lead)[np.cumsum(lead) - 1]
            keep = rank < RANKED
            ptr = np.zeros(len(starts) + 1, np.int64)
            ptr[1:] = np.cumsum(np.bincount(grp[keep], minlength=len(starts)))
            tables.append((keys[starts], ptr, ends[first[keep]]))
        return tables
