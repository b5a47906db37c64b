"""`hetcomp compile --datastore`: what the lookup draft searches besides the context.

``auto`` takes the recorded responses the heads trained on (the packaged heads:
tests/frontend/test_real_model.py); these tests use a tiny model with heads that recorded
none, and a responses file given by path."""

import gzip
import json
import os
import shutil

import numpy as np
import pytest

from hetcomp.cli import main
from hetcomp.frontend.weights import random_weights
from hetcomp.runtime import generate, load_artifact
from hetcomp.speculative.medusa import MedusaHeads
from hetcomp.testing import TINY, assert_one_line_error, byte_tokenizer_spec
from hetcomp.testing.gguf_writer import write_gguf

RESPONSES = {"a": [5, 6, 7, 8, 9, 10], "b": [5, 6, 7, 11], "c": [40, 41]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny GGUF, heads for it (recorded no responses), a responses file for it."""
    root = tmp_path_factory.mktemp("ds")
    write_gguf(root / "tiny.gguf", TINY, random_weights(TINY),
               byte_tokenizer_spec(TINY.vocab_size))
    e = TINY.hidden_size
    MedusaHeads(w=np.zeros((1, e, e), "float32"), b=np.zeros((1, e), "float32"),
                rank_probs=np.tile(np.linspace(0.5, 0.05, 10), (1, 1)),
                info={}).save(str(root / "h.npz"))
    with gzip.open(root / "r.jsonl.gz", "wt") as fh:
        for prompt, ids in RESPONSES.items():
            fh.write(json.dumps({"prompt": prompt, "ids": ids}) + "\n")
    return root


def compile_(capsys, inputs, out, *extra):
    rc = main(["compile", "--model", str(inputs / "tiny.gguf"), "--heads",
               str(inputs / "h.npz"), "--max-context", "64", "--width", "4", "--quiet",
               "-o", str(out), *map(str, extra)])
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def stored(inputs, tmp_path_factory):
    """The tiny model compiled with ``--datastore r.jsonl.gz``."""
    out = tmp_path_factory.mktemp("stored") / "f"
    assert main(["compile", "--model", str(inputs / "tiny.gguf"), "--heads",
                 str(inputs / "h.npz"), "--max-context", "64", "--width", "4", "--quiet",
                 "--datastore", str(inputs / "r.jsonl.gz"), "-o", str(out)]) == 0
    return out


def test_a_responses_file_becomes_the_store(stored):
    art = load_artifact(str(stored))
    assert art.manifest["speculative"]["datastore"] == {
        "source": "r.jsonl.gz", "sequences": 3, "tokens": 12}
    assert np.load(stored / "datastore.npy").tolist() == [
        5, 6, 7, 8, 9, 10, -1, 5, 6, 7, 11, -1, 40, 41, -1]
    assert art.datastore.continuations([3, 5, 6], 8, 8) == [[7, 8, 9, 10], [7, 11]]
    # the store drafts, verification keeps greedy output (random weights: whatever it is)
    prompt = [5, 6, 7, 8, 9, 10, 5, 6]
    want = generate(art, prompt, 12, stop_at_eos=False).ids
    for store in (True, False):
        assert generate(art, prompt, 12, stop_at_eos=False, width=4, lookup=3,
                        datastore=store).ids == want


def test_none_and_heads_without_recorded_responses_have_no_store(tmp_path, inputs, capsys):
    for name, extra in (("n", ("--datastore", "none")), ("a", ())):
        rc, err = compile_(capsys, inputs, tmp_path / name, *extra)
        assert rc == 0, err
        art = load_artifact(str(tmp_path / name))
        assert art.datastore is None and "datastore" not in art.manifest["speculative"]
        assert not os.path.exists(tmp_path / name / "datastore.npy")


@pytest.mark.parametrize("content, message", [
    (None, "cannot read responses"),
    ('{"prompt": "a", "ids": [1, 99999]}\n', "outside this model's vocabulary"),
    ("not json\n", "cannot read responses"),
])
def test_a_bad_responses_file_is_refused_before_the_build(tmp_path, inputs, capsys, content,
                                                           message):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    rc, err = compile_(capsys, inputs, tmp_path / "o", "--datastore", path)
    assert_one_line_error(rc, err, message)
    assert not (tmp_path / "o").exists()


def test_a_store_without_heads_is_refused(tmp_path, inputs, capsys):
    rc = main(["compile", "--model", str(inputs / "tiny.gguf"), "--no-heads", "--datastore",
               "none", "-o", str(tmp_path / "o")])
    assert_one_line_error(rc, capsys.readouterr().err, "--datastore feeds the lookup draft")
    assert not (tmp_path / "o").exists()


def test_the_store_is_ranked_before_the_timed_steps(stored, monkeypatch):
    """A decode's first search would rank the store's continuations at its length (~0.1 s
    for a real store): the generator has it done when it is made, outside ``decode_s``."""
    from hetcomp.runtime.generate import Generation
    from hetcomp.speculative.datastore import Datastore

    art = load_artifact(str(stored))
    ranked = []
    real = Datastore._rank_all
    monkeypatch.setattr(Datastore, "_rank_all",
                        lambda self, length: ranked.append(length) or real(self, length))
    gen = Generation(art, [5, 6, 7, 8, 9, 10, 5, 6], 12, False, width=4, lookup=2)
    assert ranked == [2]  # made with the generator, for its lookup's continuation length
    gen.result()
    assert ranked == [2] and gen.steps > 0  # no step ranked again
    Generation(art, [5, 6], 4, False, width=4, lookup=2).result()
    assert ranked == [2]  # once per store and length


def test_a_damaged_store_is_refused_at_load(tmp_path, stored, capsys):
    shutil.copytree(stored, tmp_path / "f")
    with open(tmp_path / "f" / "datastore.npy", "r+b") as fh:
        fh.seek(-3, 2)
        fh.write(b"\x7f\x7f\x7f")
    rc = main(["generate", str(tmp_path / "f"), "--prompt", "hi", "--max-new-tokens", "2"])
    assert_one_line_error(rc, capsys.readouterr().err, "datastore.npy does not match")


def test_bench_rows_say_whether_the_store_was_searched(stored):
    from hetcomp.driver.benchmark import bench_widths

    art = load_artifact(str(stored))
    for store in (True, False):
        rows = bench_widths(art, [1, 4], 4, None, ["hi there"], datastore=store)
        assert [r["datastore"] for r in rows] == [False, store]


def test_auto_follows_the_registry():
    """`auto` gives SmolLM2 its heads' training responses and Qwen2.5-Coder none (its
    registry entry: the 76 code answers cost its stronger heads acceptance); the packaged
    heads' own files, no compile."""
    from hetcomp.driver.compile import CompileOptions, _datastore
    from hetcomp.frontend.models import default_heads

    stores = {}
    for model, vocab in (("smollm2", 49152), ("qwen2.5-coder-0.5b", 151936)):
        heads = default_heads(model)
        stores[model] = _datastore(CompileOptions(model=model, heads=heads),
                                   MedusaHeads.load(heads), vocab)
    assert stores["smollm2"][1]["sequences"] == 864 and stores["qwen2.5-coder-0.5b"] is None
