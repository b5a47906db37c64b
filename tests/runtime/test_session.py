"""`Session.verify` keeps each tree shape's mask and CSR on the device (one copy per shape,
not per step): trees of the same width but another shape never see a stale copy."""

import numpy as np

from hetcomp.speculative.tree import csr_from_mask

PROMPT = [5, 17, 99, 3, 42, 7]
CHAIN = np.tril(np.ones((4, 4), "int32"))  # a chain of four nodes
FORK = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], "int32")


def _verify(sess, mask, csr=None):
    n = len(PROMPT)
    depths = mask.sum(axis=1) - 1
    out = sess.verify([7, 8, 9, 10][:len(mask)], n + depths, mask, csr)
    return out[0], out[2].numpy()


def test_tree_tensors_are_made_once_per_shape(tiny_reference):
    art = tiny_reference
    fresh = {}
    for name, mask in (("chain", CHAIN), ("fork", FORK)):  # each alone, on a fresh cache
        s = art.new_session()
        s.prefill(PROMPT)
        fresh[name] = _verify(s, mask)
    art._tree_tensors.clear()
    s = art.new_session()
    s.prefill(PROMPT)
    # The width-specialised verify (W = 4) and the symbolic one (W = 3, the split path that
    # reads the CSR) both go through the cache.
    for step, (name, mask) in enumerate([("chain", CHAIN), ("fork", FORK), ("chain", CHAIN),
                                         ("fork", FORK)]):
        s.truncate(len(PROMPT))
        ids, logits = _verify(s, mask, csr_from_mask(mask) if step == 3 else None)
        np.testing.assert_array_equal(ids, fresh[name][0])
        np.testing.assert_array_equal(logits, fresh[name][1])
    assert len(art._tree_tensors) == 2  # two shapes, one device copy each
    s.truncate(len(PROMPT))
    three = FORK[:3, :3]
    _, logits3 = _verify(s, three)
    t = art.new_session()
    t.prefill(PROMPT)
    depths = three.sum(axis=1) - 1
    ref = t.verify([7, 8, 9], len(PROMPT) + depths, three)
    np.testing.assert_array_equal(logits3, ref[2].numpy())
    assert len(art._tree_tensors) == 3
