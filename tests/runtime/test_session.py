"""`Session.verify` keeps each tree shape's mask and CSR on the device (one copy per shape,
not per step): trees of the same width but another shape never see a stale copy."""

import numpy as np

from hetcomp.speculative.tree import csr_from_mask
from hetcomp.testing import TINY, full_mask, numpy_llama

PROMPT = [5, 17, 99, 3, 42, 7]
CHAIN = np.tril(np.ones((4, 4), "int32"))  # a chain of four nodes
FORK = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], "int32")
TOKENS = [7, 8, 9, 10]
RTOL = 1e-4


def _verify(sess, mask, csr=None):
    n = len(PROMPT)
    depths = mask.sum(axis=1) - 1
    out = sess.verify(TOKENS[:len(mask)], n + depths, mask, csr)
    return out[0], out[2].numpy()


def _numpy_logits(weights, mask):
    """The numpy model's logits of the tree ``mask`` of TOKENS after PROMPT."""
    n = len(PROMPT)
    positions = np.concatenate([np.arange(n), n + mask.sum(axis=1) - 1])
    return numpy_llama.forward(TINY, weights, PROMPT + TOKENS[:len(mask)], positions,
                               full_mask(n, mask))[0][n:]


def test_tree_tensors_are_made_once_per_shape(tiny_reference, tiny_loaded):
    art, weights = tiny_reference, tiny_loaded[1]
    want = {"chain": _numpy_logits(weights, CHAIN), "fork": _numpy_logits(weights, FORK)}
    # the two shapes' last rows differ well beyond the tolerance: a stale mask would show
    assert np.abs(want["chain"][2:] - want["fork"][2:]).max() > 100 * RTOL * np.abs(
        want["chain"]).max()
    art._tree_tensors.clear()
    s = art.new_session()
    s.prefill(PROMPT)
    # The width-specialised verify (W = 4) alternating two shapes through the cache.
    for name, mask in [("chain", CHAIN), ("fork", FORK), ("chain", CHAIN), ("fork", FORK)]:
        s.truncate(len(PROMPT))
        ids, logits = _verify(s, mask)
        np.testing.assert_allclose(logits, want[name], rtol=RTOL, atol=RTOL, err_msg=name)
        np.testing.assert_array_equal(ids, want[name].argmax(-1))
    assert len(art._tree_tensors) == 2  # two shapes, one device copy each
    # The symbolic verify (W = 3, the split path that reads the CSR), the caller's CSR taken
    # on the cache miss.
    s.truncate(len(PROMPT))
    three = FORK[:3, :3]
    _, logits3 = _verify(s, three, csr_from_mask(three))
    np.testing.assert_allclose(logits3, _numpy_logits(weights, three), rtol=RTOL, atol=RTOL)
    assert len(art._tree_tensors) == 3
