"""The acceptance replay (``speculative.acceptance``): each draft's accepted depth against the
generator's own acceptance (``tree.accept_path``), and the replay's walk over a response.
tests/frontend/test_real_model.py checks a whole replay against real decoding."""

import numpy as np
import pytest

from hetcomp.speculative.acceptance import (
    HORIZONS,
    LOOKUP_GAIN,
    Replayed,
    best_lookup,
    lookup_candidates,
    lookup_depth,
    medusa_depth,
    rank_paths,
    replay_acceptance,
)
from hetcomp.speculative.medusa import TOPK
from hetcomp.speculative.tree import Tree, accept_path, build_tree


def random_tree(rng, nodes):
    parents = [-1] + [int(rng.integers(0, i)) for i in range(1, nodes)]
    return parents


@pytest.mark.parametrize("seed", range(40))
def test_lookup_depth_is_the_generators_acceptance(seed):
    """A lookup tree (parents of its nodes, -1 the root) with tokens from a small alphabet, so
    that siblings repeat tokens and paths match deep: the depth is the generator's accepted
    path's, with the model choosing ``truth[d]`` after every node at depth d."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 24))
    looked = [p - 1 for p in random_tree(rng, n + 1)[1:]]  # node i + 1 of the full tree
    tokens = [int(t) for t in rng.integers(0, 3, n)]
    truth = [int(t) for t in rng.integers(0, 3, int(rng.integers(0, 8)))]
    tree = Tree(tuple([-1] + [p + 1 for p in looked]), (-1,) * (n + 1), (1.0,) * (n + 1))
    depths = tree.depths
    greedy = [truth[d] if d < len(truth) else -5 for d in depths]
    want = len(accept_path(tree, [99, *tokens], greedy)) - 1
    assert lookup_depth(looked, tokens, truth) == want


@pytest.mark.parametrize("seed", range(20))
def test_medusa_depth_is_the_generators_acceptance(seed):
    """A Medusa tree from random joint statistics, its node at depth d holding head d - 1's
    rank-r candidate (token ``d * TOPK + r``); a row's ranks say which candidate the model
    chooses after each depth (-1 or TOPK: none of them)."""
    rng = np.random.default_rng(seed)
    heads = 4
    rows = rng.choice([0, 0, 1, 2, TOPK, -1], size=(200, heads))
    tree = build_tree(np.full((heads, TOPK), 0.1), int(rng.integers(1, 40)), rows)
    depths = tree.depths
    tokens = [0] + [int(depths[i] * TOPK + tree.ranks[i]) for i in range(1, tree.width)]
    paths = rank_paths(tree)
    for ranks in rows[:50]:
        greedy = [(d + 1) * TOPK + ranks[d] if d < heads and 0 <= ranks[d] < TOPK else -5
                  for d in depths]
        want = len(accept_path(tree, tokens, greedy)) - 1
        assert medusa_depth(paths, ranks.tolist()) == want


def chain(width):
    """A Medusa chain of ``width`` nodes, rank 0 at every depth."""
    return Tree(tuple(range(-1, width - 1)), (-1,) + (0,) * (width - 1), (1.0,) * width)


def test_the_replay_walks_as_decoding_does():
    """Medusa alone, a chain of 3 nodes (rank 0 at depths 1 and 2): at each step the row of
    the root's position says how deep it matches, the step emits that and the next token,
    and the next step's row is the last token's. Rows the steps skip do not count."""
    response = list(range(10, 20))
    ranks = np.full((10, 4), TOPK)
    ranks[0, :2] = 0  # row 0: both nodes -> emits 3 tokens, next row 3
    ranks[1, :] = 0  # skipped
    ranks[3, 0] = 0  # one node -> 2 tokens, next row 5
    ranks[5, :2] = (0, 1)  # the chain holds rank 0 at depth 2: one node, next row 7
    out = replay_acceptance([([1, 2], response)], ranks, chain, 3)
    assert out.per_step == (3, 2, 2, 1, 1)  # rows 0, 3, 5, 7, 8 (row 9 is the last token)
    assert (out.tokens, out.steps) == (9, 5) and out.tokens_per_step == 9 / 5
    # W = 1 emits a token a step; a response of one token takes no step
    assert replay_acceptance([([1], response), ([3], [7])], np.full((11, 4), TOPK), chain,
                             1).per_step == (1,) * 9


def test_the_lookup_takes_its_nodes_from_the_width():
    """A response that repeats the prompt: the context's lookup drafts it, so a step accepts
    as deep as its lookup nodes reach, and the Medusa tree (never right here) gets the rest
    of the width: what the lookup leaves (asked for by width)."""
    prompt = [5, 6, 7, 8, 9, 5, 6]
    response = [7, 8, 9, 5, 6, 7, 8, 9]
    asked = []

    def tree(w):
        asked.append(w)
        return chain(w)

    ranks = np.full((len(response), 4), TOPK)
    out = replay_acceptance([(prompt, response)], ranks, tree, 8, lookup=3)
    assert out.per_step == (4, 3) and set(asked) == {5}  # 3 lookup nodes, 3 accepted + 1
    # asked for 6, the first step's lookup finds 5 (the context's one continuation runs 5
    # tokens to its end): the Medusa tree takes 3 nodes, then 2
    asked.clear()
    out = replay_acceptance([(prompt, response)], ranks, tree, 8, lookup=6)
    assert out.per_step == (6, 1) and asked == [3, 2]
    assert replay_acceptance([(prompt, response)], ranks, tree, 8).per_step == (1,) * 7
    with pytest.raises(ValueError, match="rows"):
        replay_acceptance([(prompt, response)], ranks[:-1], tree, 8)


def test_within_is_the_replay_of_the_cut_responses():
    """A replay's decodes of n tokens equal replaying the responses cut at n tokens."""
    rng = np.random.default_rng(3)
    seqs = [([int(t) for t in rng.integers(0, 4, 6)], [int(t) for t in rng.integers(0, 4, m)])
            for m in (1, 9, 30, 17)]
    ranks = rng.choice([0, 0, 1, TOPK], size=(sum(len(r) for _, r in seqs), 3))
    whole = replay_acceptance(seqs, ranks, chain, 6, lookup=3)
    assert whole.within(10**6) == whole and whole.steps > 0
    for n in (1, 2, 5, 12, 29):
        cut = [(p, r[:n]) for p, r in seqs]
        rows = np.concatenate([ranks[s: s + len(c)] for s, (_, c) in zip(
            np.cumsum([0] + [len(r) for _, r in seqs]), cut)])
        assert whole.within(n) == replay_acceptance(cut, rows, chain, 6, lookup=3), n


def replayed(*steps):
    return Replayed((tuple(steps),))


def test_the_lookup_nodes_change_only_for_a_clear_gain_at_every_length():
    """A width's lookup nodes: the default unless a candidate (half, three quarters, all but
    the root) accepts LOOKUP_GAIN times as much at 64 and 128 tokens and over the whole
    responses; then the one whose smallest gain is the largest (the fewer nodes of equals).
    tau is the whole responses'."""
    assert HORIZONS == (64, 128)
    assert lookup_candidates(1, 0) == [0]
    assert lookup_candidates(4, 2) == [2, 3] and lookup_candidates(64, 32) == [32, 48, 63]
    assert lookup_candidates(16, 5) == [5, 8, 12, 15]
    even = replayed(*(2,) * 150)  # 2 tokens a step throughout
    better = replayed(*(3,) * 100)  # 3 throughout
    late = replayed(*(1,) * 63, *(10,) * 50)  # 1 a step over 64 tokens, 4.98 over all
    slight = replayed(*(2,) * 50, *(2.0 * LOOKUP_GAIN,) * 100)  # (a float: a test's scores)
    asked = []

    def replays(table):
        def f(n):
            asked.append(n)
            return table.get(n, even)
        return f

    assert best_lookup(8, 4, replays({6: late, 7: better})) == (7, 3.0)
    assert sorted(asked) == [4, 6, 7]
    assert best_lookup(8, 4, replays({6: late})) == (4, 2.0)  # loses at 64 tokens
    assert late.tokens_per_step > 4 and late.within(64).tokens_per_step == 1.0
    assert best_lookup(8, 4, replays({6: better, 7: better})) == (6, 3.0)
    assert best_lookup(8, 4, replays({6: slight}))[0] == 4  # below the gain at 64 tokens
    assert best_lookup(1, 0, replays({})) == (0, 2.0)
