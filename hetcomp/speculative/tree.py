"""Token trees for Medusa verification, kept as data (parent index and head/rank per node).

Node 0 is the root: the token the base model already chose. A node at depth d >= 1 takes the
``rank``-th candidate of Medusa head ``d - 1``. Nodes are in topological (BFS) order, so a
node's parent has a smaller index, as ``commit`` requires.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq

import numpy as np


def csr_from_mask(mask) -> tuple[np.ndarray, np.ndarray]:
    """``(row_ptr[W + 1], col_idx[nnz])`` int32 of the non-zeros of a ``[W, W]`` mask, row by
    row, columns increasing (a causal mask gives the chain's ancestor lists)."""
    mask = np.asarray(mask) != 0
    row_ptr = np.zeros(mask.shape[0] + 1, "int32")
    row_ptr[1:] = np.cumsum(mask.sum(axis=1))
    return row_ptr, np.nonzero(mask)[1].astype("int32")


@dataclasses.dataclass(frozen=True)
class Tree:
    parents: tuple[int, ...]
    ranks: tuple[int, ...]  # candidate rank per node (-1 for the root)
    probs: tuple[float, ...]  # modelled acceptance probability per node (1 for the root)

    @property
    def width(self) -> int:
        return len(self.parents)

    @property
    def depths(self) -> np.ndarray:
        d = np.zeros(self.width, "int32")
        for i, p in enumerate(self.parents):
            d[i] = 0 if p < 0 else d[p] + 1
        return d

    @property
    def heads(self) -> np.ndarray:
        """Medusa head per node (depth - 1; -1 for the root)."""
        return self.depths - 1

    def mask(self) -> np.ndarray:
        """``[W, W]`` int32: node i attends to node j iff j is i or an ancestor of i."""
        m = np.zeros((self.width, self.width), "int32")
        for i in range(self.width):
            j = i
            while j >= 0:
                m[i, j] = 1
                j = self.parents[j]
        return m

    def csr(self) -> tuple[np.ndarray, np.ndarray]:
        """The mask as CSR ancestor lists (``row_ptr[W + 1]``, ``col_idx[nnz]``, int32): row i
        lists node i's ancestors and i itself in increasing order (what verify's sparse
        tree-attention kernel reads)."""
        return csr_from_mask(self.mask())

    @functools.cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        """Each node's children, in node order; made once (the generator accepts a path in
        the same tree at many steps)."""
        ch: list[list[int]] = [[] for _ in range(self.width)]
        for i, p in enumerate(self.parents):
            if p >= 0:
                ch[p].append(i)
        return tuple(map(tuple, ch))

    @property
    def expected_accept_length(self) -> float:
        return float(sum(self.probs))

    def to_json(self) -> dict:
        return {"parents": list(self.parents), "ranks": list(self.ranks),
                "probs": list(self.probs), "tau": self.expected_accept_length}

    @classmethod
    def from_json(cls, d: dict) -> Tree:
        return cls(tuple(d["parents"]), tuple(d["ranks"]), tuple(d["probs"]))


def build_tree(rank_probs: np.ndarray, width: int, ranks: np.ndarray | None = None) -> Tree:
    """The tree of ``width`` nodes that maximises the expected accepted length.

    ``rank_probs[k, r]`` is the probability that head k's rank-r candidate is the token the
    base model will choose (measured on held-out data). Under Medusa's independence model a
    node's acceptance probability is the product along its path; it never exceeds its
    parent's, so the ``width - 1`` most probable paths form a tree and maximise
    ``tau = sum of node probabilities`` (best-first search over paths).
    """
    if width < 1:
        raise ValueError("width must be >= 1")
    # The joint statistics where a held-out row has a target for the first head (none: a
    # joint tree would stop at its root, short of the width verify_w{W} was built for).
    if ranks is not None and len(ranks) and (np.asarray(ranks)[:, 0] >= 0).any():
        return _build_tree_joint(np.asarray(ranks), width, np.asarray(rank_probs).shape[1])
    probs = np.asarray(rank_probs, dtype=np.float64)
    heads, top = probs.shape
    # Best-first over paths (tuples of ranks): choosing a path makes all its children
    # available. Ranks are not assumed to be ordered by probability.
    chosen: list[tuple[tuple[int, ...], float]] = []
    heap = [(-probs[0, r], (r,)) for r in range(top)] if heads else []
    heapq.heapify(heap)
    while heap and len(chosen) < width - 1:
        negp, path = heapq.heappop(heap)
        chosen.append((path, -negp))
        d = len(path)
        if d < heads:
            for r in range(top):
                heapq.heappush(heap, (negp * probs[d, r], path + (r,)))
    return _tree_from_paths(chosen)


def _build_tree_joint(ranks: np.ndarray, width: int, top: int) -> Tree:
    """Best-first tree under the measured joint statistics: a path's probability is the
    fraction of held-out rows where every head on it ranked the true token as the path says
    (no independence assumption; still never above its prefix's, so best-first is optimal)."""
    rows = ranks[(ranks[:, 0] >= 0)]  # (build_tree calls it only when there is one)
    heads = ranks.shape[1]
    n = len(rows)

    def prob(mask):
        return mask.sum() / n

    chosen = []
    masks = {(r,): rows[:, 0] == r for r in range(top)}
    heap = [(-prob(m), p) for p, m in masks.items()]
    heapq.heapify(heap)
    while heap and len(chosen) < width - 1:
        negp, path = heapq.heappop(heap)
        chosen.append((path, -negp))
        m = masks.pop(path)
        d = len(path)
        if d < heads:
            for r in range(top):
                masks[path + (r,)] = m & (rows[:, d] == r)
                heapq.heappush(heap, (-prob(masks[path + (r,)]), path + (r,)))
    return _tree_from_paths(chosen)


def _tree_from_paths(chosen) -> Tree:
    chosen.sort(key=lambda x: (len(x[0]), -x[1], x[0]))
    index = {(): 0}
    parents, ranks, node_probs = [-1], [-1], [1.0]
    for path, p in chosen:
        index[path] = len(parents)
        parents.append(index[path[:-1]])
        ranks.append(path[-1])
        node_probs.append(float(p))
    return Tree(tuple(parents), tuple(ranks), tuple(node_probs))


def largest_tree(num_heads: int, top: int) -> int:
    """Nodes of the widest tree ``num_heads`` heads of ``top`` candidates each can draft (every
    path of ranks, the root too): :func:`build_tree` stops there."""
    return 1 + sum(top ** d for d in range(1, num_heads + 1))


def expected_accept_length(rank_probs: np.ndarray, width: int) -> float:
    return build_tree(rank_probs, width).expected_accept_length


def accept_path(tree: Tree, tokens, greedy_ids) -> list[int]:
    """The longest path from the root whose every node holds the token the base model chose
    at its parent. Siblings may hold the same token (a lookup chain beside a Medusa
    candidate, each drafted without the other), so every matching child is followed and the
    deepest path kept; of equally deep ones, the first in node order."""
    children = tree.children
    tokens, greedy_ids = np.asarray(tokens).tolist(), np.asarray(greedy_ids).tolist()

    def deepest(u: int) -> list[int]:
        want, best = greedy_ids[u], []
        for c in children[u]:
            if tokens[c] == want:
                path = deepest(c)
                if len(path) > len(best):
                    best = path
        return [u, *best]

    return deepest(0)
