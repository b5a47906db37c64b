"""hetcomp quality: teacher-forced logits, perplexity and agreement against a reference."""

import json

import numpy as np

from hetcomp.driver.quality import quality_texts, teacher_forced_logits
from hetcomp.runtime import load_artifact
from hetcomp.testing import TINY, assert_one_line_error, numpy_llama, run_cli


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


def test_quality_refuses_another_model(tiny_artifact, smollm2_artifact, cli):
    # In-process (``cli``); the test above runs `quality` in a real process.
    assert_one_line_error(*cli("quality", tiny_artifact[0], "--reference",
                               smollm2_artifact, "--texts", 1)[::2], "not the same model")
    # more texts than the set has: refused, not fewer scored under the count asked for
    assert_one_line_error(*cli("quality", tiny_artifact[0], "--texts", 10**4)[::2],
                          f"the text set has {len(quality_texts(10**4))} texts")
