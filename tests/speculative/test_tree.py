"""Token trees: optimality on hand-made statistics, masks, positions and acceptance walks."""

import itertools

import numpy as np
import pytest

from hetcomp.speculative.tree import Tree, accept_path, build_tree


def brute_force_tau(probs, width):
    """Best tau over every prefix-closed set of width - 1 paths (small cases only)."""
    heads, top = probs.shape
    paths = [p for d in range(1, heads + 1) for p in itertools.product(range(top), repeat=d)]
    best = 1.0
    for subset in itertools.combinations(paths, width - 1):
        s = set(subset)
        if any(len(p) > 1 and p[:-1] not in s for p in s):
            continue
        best = max(best, 1.0 + sum(np.prod([probs[i, r] for i, r in enumerate(p)]) for p in s))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("width", [1, 2, 3, 4, 5])
def test_greedy_tree_is_optimal(seed, width):
    rng = np.random.default_rng(seed)
    probs = np.sort(rng.dirichlet(np.ones(4), size=2)[:, :3], axis=1)[:, ::-1]
    tree = build_tree(probs, width)
    assert tree.width == width
    assert tree.expected_accept_length == pytest.approx(brute_force_tau(probs, width))


def test_known_tree():
    probs = np.array([[0.6, 0.2, 0.1], [0.5, 0.2, 0.1], [0.4, 0.1, 0.1]])
    t = build_tree(probs, 4)
    # Paths by probability: (0)=.6, (0,0)=.3, (1)=.2 -> tau = 2.1
    assert t.parents == (-1, 0, 0, 1)
    assert t.ranks == (-1, 0, 1, 0)
    assert t.expected_accept_length == pytest.approx(2.1)
    np.testing.assert_array_equal(t.depths, [0, 1, 1, 2])
    np.testing.assert_array_equal(t.heads, [-1, 0, 0, 1])
    np.testing.assert_array_equal(t.mask(), [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0],
                                             [1, 1, 0, 1]])


def test_tau_grows_with_width_and_parents_precede_children():
    probs = np.array([[0.7, 0.1, 0.05, 0.02], [0.6, 0.1, 0.05, 0.02], [0.5, 0.1, 0.05, 0.02]])
    taus = [build_tree(probs, w).expected_accept_length for w in (1, 2, 4, 8, 16, 32, 64)]
    assert taus == sorted(taus) and taus[0] == 1.0
    t = build_tree(probs, 64)
    assert all(p < i for i, p in enumerate(t.parents) if p >= 0)
    assert Tree.from_json(t.to_json()) == t


def test_accept_path():
    t = Tree(parents=(-1, 0, 0, 1, 2), ranks=(-1, 0, 1, 0, 0), probs=(1, .5, .2, .3, .1))
    tokens = [10, 11, 12, 13, 14]
    # Base model's greedy choice after each node.
    assert accept_path(t, tokens, [12, 0, 14, 0, 99]) == [0, 2, 4]
    assert accept_path(t, tokens, [11, 13, 0, 7, 0]) == [0, 1, 3]
    assert accept_path(t, tokens, [55, 0, 0, 0, 0]) == [0]


def test_accept_path_takes_the_longest_of_equal_siblings():
    # A lookup chain (3 -> 4) beside a Medusa candidate (1) of the same token 9: the chain
    # is accepted, not the first match.
    t = Tree((-1, 0, 0, 2, 3), (-1, 0, -1, -1, -1), (1, .5, 0, 0, 0))
    assert accept_path(t, [7, 9, 9, 11, 12], [9, 5, 11, 12, 0]) == [0, 2, 3, 4]
    # equally deep: the first in node order
    assert accept_path(t, [7, 9, 9, 11, 12], [9, 5, 5, 0, 0]) == [0, 1]
    # Against every root path, on random trees whose nodes share few tokens.
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 40))
        parents = (-1, *(int(rng.integers(0, i)) for i in range(1, n)))
        t = Tree(parents, (-1,) * n, (0.0,) * n)
        tokens, greedy = rng.integers(0, 3, n), rng.integers(0, 3, n)
        paths = []
        for node in range(n):
            path = [node]
            while path[-1] != 0:
                path.append(parents[path[-1]])
            path.reverse()
            if all(tokens[c] == greedy[p] for p, c in itertools.pairwise(path)):
                paths.append(path)
        got = accept_path(t, tokens, greedy)
        assert got in paths and len(got) == max(len(p) for p in paths)


def joint_prob(ranks, path):
    rows = ranks[ranks[:, 0] >= 0]
    ok = np.ones(len(rows), bool)
    for d, r in enumerate(path):
        ok &= rows[:, d] == r
    return ok.mean()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("width", [2, 3, 4, 5])
def test_joint_statistics_tree_is_optimal(seed, width):
    """With measured joint ranks (no independence assumption) best-first is still optimal."""
    rng = np.random.default_rng(seed)
    ranks = rng.choice(4, size=(60, 2), p=[0.5, 0.2, 0.1, 0.2]).astype(np.int8)
    same = rng.random(60) < 0.5
    ranks[same, 1] = ranks[same, 0]  # correlated heads, as real ones are
    probs = np.zeros((2, 3))
    tree = build_tree(probs, width, ranks)
    paths = [p for d in (1, 2) for p in itertools.product(range(3), repeat=d)]
    best = 1.0
    for subset in itertools.combinations(paths, width - 1):
        s = set(subset)
        if any(len(p) > 1 and p[:-1] not in s for p in s):
            continue
        best = max(best, 1.0 + sum(joint_prob(ranks, p) for p in s))
    assert tree.expected_accept_length == pytest.approx(best)


def test_joint_statistics_without_a_first_target_fall_back_to_rank_probs():
    """Held-out rows where no head had a target (ranks -1): the joint tree stopped at its
    root, short of the width verify_w{W} is compiled for, and decoding crashed. The tree
    then comes from ``rank_probs``, with every node."""
    probs = np.array([[0.5, 0.2, 0.1], [0.3, 0.2, 0.1]])
    ranks = np.full((5, 2), -1, np.int8)
    for width in (2, 4, 7):
        tree = build_tree(probs, width, ranks)
        assert len(tree.parents) == width
        assert tree.to_json() == build_tree(probs, width).to_json()
