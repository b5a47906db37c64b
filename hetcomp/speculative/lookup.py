"""The lookup draft: the tokens that followed the context's current suffix earlier in the
context (and, with a :class:`~hetcomp.speculative.datastore.Datastore`, in the model's own
responses to other prompts), merged into a tree under the root. The generator
(:class:`hetcomp.runtime.generate.Generation`) verifies it beside the Medusa tree; the
acceptance replay (:mod:`hetcomp.speculative.acceptance`) drafts with the same index."""

from __future__ import annotations

#: The longest datastore continuation a lookup tree takes (offline, on the held-out recorded
#: responses, 8 drafted as much as 16 did up to 64 nodes: the longer ones take the nodes of
#: other branches).
STORE_LENGTH = 8


class NgramIndex:
    """The context's n-grams (n <= ``max_ngram``) by their latest occurrences that some token
    follows (up to ``occurrences`` of each), kept as the context grows, so a step's lookup
    draft costs a dict lookup per n, not a scan of the context (110 us a step at 2000 tokens
    here, 14 at 100).

    :meth:`continuations` gives the distinct tokens that followed earlier occurrences of the
    context's last n-gram, longest n first, latest first (the occurrence at the end itself
    excluded), and :meth:`draft_tree` them merged into a tree (what the generator verifies)."""

    def __init__(self, max_ngram: int = 3, occurrences: int = 8, store=None):
        self.max_ngram, self.occurrences = max_ngram, occurrences
        self.store = store  # a Datastore: its continuations follow the context's
        self.seq: list[int] = []
        # by n: n-gram -> the starts of its latest occurrences, oldest first
        self._starts: list[dict] = [{} for _ in range(max_ngram + 1)]

    def extend(self, tokens) -> None:
        for t in tokens:
            self.seq.append(int(t))
            end = len(self.seq) - 1  # the n-grams ending just before it now have a follower
            for n in range(1, min(self.max_ngram, end) + 1):
                starts = self._starts[n].setdefault(tuple(self.seq[end - n: end]), [])
                starts.append(end - n)
                if len(starts) > self.occurrences:
                    del starts[0]

    def continuations(self, length: int, count: int) -> list[list[int]]:
        """Up to ``count`` distinct continuations of up to ``length`` tokens: after the
        occurrences of the context's last n-gram, longest n first, latest first."""
        seq, out = self.seq, []
        for n in range(min(self.max_ngram, len(seq) - 1), 0, -1):
            for start in reversed(self._starts[n].get(tuple(seq[len(seq) - n:]), ())):
                cont = seq[start + n: start + n + length]
                if cont not in out:
                    out.append(cont)
                    if len(out) == count:
                        return out
        return out

    def draft_tree(self, nodes: int, branches: int = 8) -> tuple[tuple[int, ...], list[int]]:
        """The first ``branches`` (at most ``nodes``) :meth:`continuations` (of up to ``nodes``
        tokens), then the datastore's first ``branches`` (of up to :data:`STORE_LENGTH`),
        merged into a tree of at most ``nodes`` nodes, in their order: ``(parents, tokens)``,
        a node's parent an earlier node's index or -1 (the tree's root, the last token)."""
        children: dict = {}  # (parent node, token) -> node
        parents: list[int] = []
        tokens: list[int] = []
        # (a tree of N nodes has at most N leaves: more continuations cannot fit, and the
        # store's search stops sooner)
        branches = min(branches, nodes)
        sources = [lambda: self.continuations(nodes, branches)]
        if self.store is not None:  # searched only where the context's leave nodes free
            sources.append(lambda: self.store.continuations(
                self.seq, min(nodes, STORE_LENGTH), branches))
        for source in sources:
            if len(tokens) == nodes:
                break
            for cont in source():
                node = -1
                for tok in cont:
                    child = children.get((node, tok))
                    if child is None:
                        if len(tokens) == nodes:
                            return tuple(parents), tokens
                        child = children[node, tok] = len(tokens)
                        parents.append(node)
                        tokens.append(tok)
                    node = child
        return tuple(parents), tokens
