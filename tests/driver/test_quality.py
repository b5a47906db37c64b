"""hetcomp quality: teacher-forced logits, perplexity and agreement against a reference."""

import json

import numpy as np

from hetcomp.driver.quality import quality, quality_texts, teacher_forced_logits
from hetcomp.runtime import load_artifact
from hetcomp.testing import TINY, assert_one_line_error, compile_tiny, numpy_llama, run_cli


def test_teacher_forced_logits_match_numpy(tiny_artifact):
    (path, weights), cfg = tiny_artifact, TINY
    art = load_artifact(path)
    ids = list(np.random.default_rng(3).integers(0, cfg.vocab_size, 40))  # chunks 16+16+8
    want, _ = numpy_llama.forward(cfg, weights, ids)
    np.testing.assert_allclose(teacher_forced_logits(art, ids), want, atol=2e-4, rtol=1e-4)


def test_quality_against_itself_and_numpy(tiny_artifact):
    (path, weights), cfg = tiny_artifact, TINY
    rc, out, err = run_cli("quality", path, "--reference", path, "--texts", 3, "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["agreement"] == 1.0 and abs(rep["mean_kl"]) < 1e-9
    assert rep["perplexity"] == rep["reference_perplexity"]
    # Perplexity from the numpy model over the same (context-cut) texts.
    tok = load_artifact(path).tokenizer
    nll, n = 0.0, 0
    for text in quality_texts(3):
        ids = tok.encode_text(text)[:cfg.max_context]
        logits, _ = numpy_llama.forward(cfg, weights, ids)
        lp = logits - logits.max(-1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
        nll -= lp[np.arange(len(ids) - 1), ids[1:]].sum()
        n += len(ids) - 1
    assert rep["tokens"] == n
    np.testing.assert_allclose(rep["perplexity"], np.exp(nll / n), rtol=1e-4)
    np.testing.assert_allclose(rep["nll_per_token"], nll / n, rtol=1e-5)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_quality_against_another_model_matches_numpy(tmp_path_factory):
    """Against a reference with other weights (same vocabulary and tokenizer): agreement,
    KL(reference || artifact), both perplexities and the first disagreement, each from the
    numpy model of both weight sets (at a scale where their greedy choices differ)."""
    cfg = TINY
    path, weights = compile_tiny(tmp_path_factory, seed=4, scale=0.3, name="quality_art")
    ref_path, ref_weights = compile_tiny(tmp_path_factory, seed=5, scale=0.3, name="quality_ref")
    rep = quality(path, ref_path, texts=2)
    tok = load_artifact(path).tokenizer
    nll = ref_nll = kl = 0.0
    agree = n = 0
    first = None
    for ti, text in enumerate(quality_texts(2)):
        ids = tok.encode_text(text)[:cfg.max_context]
        lp = _log_softmax(numpy_llama.forward(cfg, weights, ids)[0][:-1])
        rp = _log_softmax(numpy_llama.forward(cfg, ref_weights, ids)[0][:-1])
        nxt = np.asarray(ids[1:])
        nll -= lp[np.arange(len(nxt)), nxt].sum()
        ref_nll -= rp[np.arange(len(nxt)), nxt].sum()
        kl += (np.exp(rp) * (rp - lp)).sum()
        a, b = lp.argmax(-1), rp.argmax(-1)
        agree += int((a == b).sum())
        n += len(nxt)
        if first is None and (a != b).any():
            pos = int(np.argmax(a != b))
            first = (ti, pos + 1, int(a[pos]), int(b[pos]))
    assert 0 < agree < n and first is not None  # the two models do differ
    assert rep["tokens"] == n
    assert rep["agreement"] == agree / n
    np.testing.assert_allclose(rep["perplexity"], np.exp(nll / n), rtol=1e-4)
    np.testing.assert_allclose(rep["reference_perplexity"], np.exp(ref_nll / n), rtol=1e-4)
    np.testing.assert_allclose(rep["mean_kl"], kl / n, rtol=1e-3)
    d = rep["first_disagreement"]
    assert (d["text"], d["position"], d["artifact_top2"][0][0],
            d["reference_top2"][0][0]) == first


def test_quality_refuses_another_model(tiny_artifact, smollm2_artifact, cli):
    # In-process (``cli``); the test above runs `quality` in a real process.
    assert_one_line_error(*cli("quality", tiny_artifact[0], "--reference",
                               smollm2_artifact, "--texts", 1)[::2], "not the same model")
    # more texts than the set has: refused, not fewer scored under the count asked for
    assert_one_line_error(*cli("quality", tiny_artifact[0], "--texts", 10**4)[::2],
                          f"the text set has {len(quality_texts(10**4))} texts")


def test_a_reference_with_a_shorter_context_scores_the_texts_cut_to_it(tiny_artifact,
                                                                        tmp_path_factory):
    """The texts are cut to the shorter of the two contexts, whichever artifact has it: the
    same weights at a context of 32 agree everywhere in both orders (it was refused halfway
    when the reference had the shorter one)."""
    import dataclasses

    path, _ = tiny_artifact
    short, _ = compile_tiny(tmp_path_factory, dataclasses.replace(TINY, max_context=32),
                            name="quality_ctx32")
    tok = load_artifact(path).tokenizer
    n = sum(min(len(tok.encode_text(t)), 32) - 1 for t in quality_texts(3))
    for art, ref in ((path, short), (short, path)):
        rep = quality(art, ref, texts=3)
        assert rep["tokens"] == n and rep["agreement"] == 1.0, (art, ref)
        np.testing.assert_allclose(rep["perplexity"], rep["reference_perplexity"], rtol=1e-5)


def test_a_perplexity_past_float_range_is_null_in_valid_json(tmp_path_factory):
    """Huge random weights give a mean NLL of thousands of nats: perplexity is null (not
    `Infinity`, which is no JSON, nor an OverflowError as before), the NLL stays a number;
    a text count below 1 is refused through the API as through the command."""
    import pytest

    from hetcomp.errors import HetcompError

    path, _ = compile_tiny(tmp_path_factory, scale=3.0, name="wild")
    rc, out, err = run_cli("quality", path, "--texts", 2, "--json")
    assert rc == 0, err
    rep = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} is no JSON"))
    assert rep["perplexity"] is None and 709 < rep["nll_per_token"] < 1e9
    with pytest.raises(HetcompError, match="--texts must be at least 1"):
        quality(path, texts=-210)

