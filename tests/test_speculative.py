"""Speculative decoding is lossless: token-identical to sequential greedy decoding."""

import numpy as np
import pytest
from conftest import TINY, byte_tokenizer_spec

from hetcomp.codegen.compile import CompileOptions, compile_model
from hetcomp.frontend.weights import random_weights
from hetcomp.runtime import generate, load_artifact
from hetcomp.speculative.calibrate import CalibrateOptions, calibrate, make_targets
from hetcomp.speculative.medusa import MedusaHeads

WIDTHS = (2, 4, 8, 16)


def test_make_targets():
    feats = [np.zeros((5, 2))]
    seqs = [np.array([10, 11, 12, 13, 14])]
    _, roots, t = make_targets(feats, seqs, 2)
    np.testing.assert_array_equal(roots, [10, 11, 12, 13, 14])
    np.testing.assert_array_equal(t, [[11, 12], [12, 13], [13, 14], [14, -1], [-1, -1]])


@pytest.fixture(scope="module")
def tiny_speculative(tmp_path_factory):
    """A tiny random model with Medusa heads calibrated on its own greedy outputs."""
    tmp = tmp_path_factory.mktemp("spec")
    w = random_weights(TINY, seed=11)
    loaded = (TINY, w, byte_tokenizer_spec(TINY.vocab_size), __file__)
    compile_model(CompileOptions(model="tiny"), str(tmp / "base"), quiet=True, weights=loaded)
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(f"prompt {i} {'xyz'[i % 3] * (i % 5)}" for i in range(24)))
    heads = calibrate(load_artifact(str(tmp / "base")), w["embed"],
                      CalibrateOptions(corpus=str(corpus), num_heads=3, new_tokens=40, epochs=6,
                                       held_out=0.25), progress=False)
    heads.save(str(tmp / "heads.npz"))
    loaded_heads = MedusaHeads.load(str(tmp / "heads.npz"))
    assert loaded_heads.num_heads == 3 and loaded_heads.u is not None
    assert loaded_heads.ranks is not None
    compile_model(CompileOptions(model="tiny", heads=str(tmp / "heads.npz"), widths=WIDTHS),
                  str(tmp / "spec"), quiet=True, weights=loaded)
    return load_artifact(str(tmp / "spec"))


def test_tiny_speculation_is_lossless(tiny_speculative):
    art = tiny_speculative
    assert art.widths == list(WIDTHS)
    accepted = []
    for prompt in ([5, 17, 99], [200, 3, 4, 5, 6], [42]):
        seq = generate(art, prompt, max_new_tokens=40, stop_at_eos=False).ids
        for w in WIDTHS:
            res = generate(art, prompt, max_new_tokens=40, stop_at_eos=False, width=w)
            assert res.ids == seq, (prompt, w)
            accepted.append(res.accepted_per_step)
    # Trees do get accepted beyond the root, so the acceptance walk and commit are exercised.
    assert max(accepted) > 1.5


def test_medusa_logits_match_numpy(tiny_speculative):
    art = tiny_speculative
    sess = art.new_session()
    _, hidden = sess.prefill([1, 2, 3])
    root = 17
    cands = art.medusa_candidates(hidden, root, 5)
    from hetcomp import _tvm
    from hetcomp.frontend.ops import unpack_linear_weight

    logits = art._medusa(hidden, _tvm.tensor(np.array([root], "int32")),
                         *art.medusa_params)[0].numpy()
    embed = unpack_linear_weight(art.medusa_params[0].numpy())
    p = art.medusa_params[2:]  # per head: w, b, u
    ws = [unpack_linear_weight(x.numpy()) for x in p[0::3]]
    bs = [x.numpy() for x in p[1::3]]
    us = [unpack_linear_weight(x.numpy()) for x in p[2::3]]
    heads = MedusaHeads(np.stack(ws), np.stack(bs), np.zeros((3, 10)), {}, None, np.stack(us))
    expected = heads.hidden(hidden.numpy().astype(np.float64),
                            embed[[root]].astype(np.float64)) @ embed.T.astype(np.float64)
    np.testing.assert_allclose(logits, expected[:, 0], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(cands, np.argsort(-logits, axis=1)[:, :5])
    assert np.abs(heads.u).max() > 0  # the root embedding really is used


def test_width_not_compiled_is_refused(tiny_artifact):
    from hetcomp.errors import HetcompError

    art = load_artifact(tiny_artifact[0])
    with pytest.raises(HetcompError, match="width 4"):
        generate(art, [1, 2], max_new_tokens=4, width=4)


def test_float16_draft_head(tiny_speculative, tmp_path):
    """``draft_dtype="float16"``: the draft gets its own float16 copy of the LM head (rebuilt
    from the model's weight by its recipe), its logits are those of the rounded head, and
    speculation stays lossless (drafts only propose)."""
    import os

    heads = os.path.join(os.path.dirname(tiny_speculative.path), "heads.npz")
    loaded = (TINY, random_weights(TINY, seed=11), byte_tokenizer_spec(TINY.vocab_size),
              __file__)
    compile_model(CompileOptions(model="tiny", heads=heads, widths=WIDTHS,
                                 draft_dtype="float16"), str(tmp_path / "a"), quiet=True,
                  weights=loaded)
    art = load_artifact(str(tmp_path / "a"))
    assert art.manifest["param_recipes"]["medusa.lm_head"] == {"weight": "embed",
                                                                "dtype": "float16"}
    assert art.manifest["functions"]["medusa"][:2] == ["embed", "medusa.lm_head"]
    head = art.medusa_params[1].numpy()
    assert head.dtype == np.float16
    np.testing.assert_array_equal(head, tiny_speculative.medusa_params[0].numpy()
                                  .astype(np.float16))
    from hetcomp import _tvm

    sess = art.new_session()
    _, hidden = sess.prefill([1, 2, 3])
    root = _tvm.tensor(np.array([17], "int32"))
    l16 = art._medusa(hidden, root, *art.medusa_params)[0].numpy()
    l32 = tiny_speculative._medusa(hidden, root, *tiny_speculative.medusa_params)[0].numpy()
    assert 0 < np.abs(l16 - l32).max() < 1e-2 * np.abs(l32).max()  # rounded, not different
    for prompt in ([5, 17, 99], [42]):
        seq = generate(art, prompt, max_new_tokens=30, stop_at_eos=False).ids
        for w in WIDTHS:
            assert generate(art, prompt, max_new_tokens=30, stop_at_eos=False,
                            width=w).ids == seq
