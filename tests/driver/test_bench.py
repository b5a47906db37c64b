"""hetcomp bench: llama-bench's pp512 and tg128 beside its decode figures; the widths it
benches, what it reports for them, and what it refuses before the long work."""

import dataclasses
import importlib
import json
import os
import shutil

import pytest

from hetcomp.artifact_format import is_plot
from hetcomp.driver.benchmark import bench, bench_prompts, llama_bench
from hetcomp.errors import HetcompError
from hetcomp.frontend.weights import random_weights
from hetcomp.runtime import load_artifact
from hetcomp.testing import (
    TINY,
    assert_one_line_error,
    byte_tokenizer_spec,
    compile_tiny,
    compile_with_random_heads,
    edit_manifest,
    run_cli,
)
from hetcomp.testing.gguf_writer import write_gguf

# (the module: hetcomp.driver's attribute ``bench`` is not reliably it or the function)
bench_module = importlib.import_module("hetcomp.driver.benchmark")


def test_bench_reports_pp512_and_tg128(tmp_path_factory):
    path, _ = compile_tiny(tmp_path_factory, dataclasses.replace(TINY, max_context=640))
    rc, out, err = run_cli("bench", path, "--runs", 1, "--new-tokens", 4, "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["pp512"] > 0 and rep["tg128"] > 0 and rep["decode_tokens_per_s"] > 0
    # A context shorter than the prompt leaves pp out rather than failing.
    assert set(llama_bench(load_artifact(path), 1, prompt=700, gen=8)) == {"tg8"}


def heads_artifact(tmp_path_factory, context: int, widths) -> str:
    """A tiny model (byte tokens) with untrained Medusa heads and trees up to
    ``max(widths)``, compiled for a context of ``context`` tokens."""
    cfg = dataclasses.replace(TINY, max_context=context)
    tmp = tmp_path_factory.mktemp(f"c{context}")
    write_gguf(tmp / "tiny.gguf", cfg, random_weights(cfg, seed=5, scale=0.5),
               byte_tokenizer_spec(cfg.vocab_size))
    return compile_with_random_heads(tmp, str(tmp / "tiny.gguf"), cfg, widths)


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """Trees up to W = 8; room for the bench prompts and the warm-ups' 8 tokens."""
    return heads_artifact(tmp_path_factory, 128, (2, 4, 8))


@pytest.fixture(scope="module")
def art60(tmp_path_factory):
    """Trees up to W = 64 in a context of 60 tokens: after the first bench prompt (54 tokens)
    only 7 new tokens fit, and a tree of W = 60 or more only shrunk."""
    return heads_artifact(tmp_path_factory, 60, (2, 64))


@pytest.fixture
def art_copy(art, tmp_path):
    """A copy of :func:`art` for a test that changes the folder."""
    return shutil.copytree(art, tmp_path / "art")


@pytest.fixture
def no_decoding(monkeypatch):
    """Refusals come before the long work: bench must not decode anything first."""
    def refuse(*args, **kwargs):
        raise AssertionError("bench decoded before refusing")

    monkeypatch.setattr(bench_module, "generate", refuse)


def bench_json(cli, *args) -> dict:
    rc, out, err = cli("bench", *args, "--runs", 1, "--json")
    assert rc == 0, err
    return json.loads(out)


def test_every_heldout_prompt_checked_first(art_copy, cli, no_decoding):
    """--prompts heldout decodes longer prompts than the first bench prompt: one too long for
    the context is refused before any decoding, naming bench's own flag."""
    # (their 1st prompt fits with 4 new tokens, the 6th, of 219 bytes, does not)
    edit_manifest(art_copy, lambda m: m["speculative"].update(
        heads_info={"corpus": "mtbench", "seed": 0}))
    rc, _, err = cli("bench", art_copy, "--widths", "1", "--prompts", "heldout", "--runs", 1,
                     "--new-tokens", 4)
    assert_one_line_error(rc, err, "plus --new-tokens (4) does not fit the context of 128")
    assert "held-out prompt " in err


def test_width_warm_up_fits_few_new_tokens(art60, cli):
    """The widths' warm-up asks for no more tokens than the bench does (8 would not fit)."""
    rep = bench_json(cli, art60, "--widths", "1,32", "--new-tokens", 4)
    assert [r["width"] for r in rep["widths"]] == [1, 32]


def test_breakdowns_leave_out_a_tree_wider_than_the_context(art60, cli):
    """W = 64 decodes in a 60-token context (its tree shrinks); the verify step breakdowns,
    which time the whole tree, leave it out and say so instead of failing the bench."""
    rc, out, err = cli("bench", art60, "--widths", "1,64", "--runs", 1, "--new-tokens", 4,
                       "--kernels", 2, "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert [r["width"] for r in rep["widths"]] == [1, 64]
    assert [s["width"] for s in rep["verify_steps"]] == [1]
    assert [k["width"] for k in rep["kernels"]] == [1]
    assert "leave out W=64" in err


def test_speedup_is_against_w1_measured_alongside(art, cli):
    """W = 1 is always benched, first, whatever --widths names: the speedup's base."""
    rep = bench_json(cli, art, "--widths", "4,2", "--new-tokens", 8)
    rows = rep["widths"]
    assert [r["width"] for r in rows] == [1, 4, 2]
    best = max(r["tokens_per_s"] for r in rows)
    assert rep["speedup_best_vs_w1"] == pytest.approx(best / rows[0]["tokens_per_s"])


def test_timed_decodes_run_without_the_cyclic_collector(art_copy, monkeypatch):
    """Every timed decode of bench (the widths' and the sequential runs') runs with the
    cyclic garbage collector paused, as ``timeit`` times, and the collector is back on
    after; the warm-ups need not be."""
    import gc

    from hetcomp.runtime.unit_time import gc_paused

    real, seen = bench_module.generate, []

    def spy(*args, **kwargs):
        seen.append((kwargs.get("max_new_tokens"), gc.isenabled()))
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_module, "generate", spy)
    assert gc.isenabled()
    bench(str(art_copy), widths=[1, 4], runs=2, new_tokens=9)
    timed = [enabled for tokens, enabled in seen if tokens == 9]
    assert len(timed) >= 2 + 2 * len(bench_module.BENCH_PROMPTS) and not any(timed)
    assert gc.isenabled()
    # restored after an error too, and left off if it was
    with pytest.raises(ValueError), gc_paused():
        assert not gc.isenabled()
        raise ValueError
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_duplicate_widths_bench_once(art, cli):
    """A width named twice is decoded and reported once, in the order first named."""
    rep = bench_json(cli, art, "--widths", "2,2,4,2", "--new-tokens", 8)
    widths = [r["width"] for r in rep["widths"]]
    assert len(widths) == len(set(widths))
    assert widths == [1, 2, 4]


def test_default_plot_leaves_a_users_png(art_copy, cli):
    """The default plot (not asked for) replaces only a plot of ours; a user's PNG at its
    path stays, and no plot is drawn."""
    default = os.path.join(art_copy, "bench_widths.png")
    rep = bench_json(cli, art_copy, "--widths", "1", "--new-tokens", 2)
    assert rep["plot"] == default and is_plot(default)
    rep = bench_json(cli, art_copy, "--widths", "1", "--new-tokens", 2)  # ours: replaced
    assert rep["plot"] == default
    photo = b"\x89PNG\r\n\x1a\n a photo"
    with open(default, "wb") as fh:
        fh.write(photo)
    rc, out, err = cli("bench", art_copy, "--widths", "1", "--runs", 1, "--new-tokens", 2,
                       "--json")
    assert rc == 0, err
    assert json.loads(out)["plot"] is None and "not a hetcomp plot" in err
    with open(default, "rb") as fh:
        assert fh.read() == photo


def test_empty_thread_count_reads_as_unset(art, cli, monkeypatch):
    """``TVM_NUM_THREADS=`` is no count: the report gives the default (every core)."""
    monkeypatch.setenv("TVM_NUM_THREADS", "")
    rep = bench_json(cli, art, "--new-tokens", 2)
    assert rep["threads"] == (os.cpu_count() or 1)


def test_lookup_reported_as_used(art, cli):
    """A step looks up at most W - 1 nodes: each row reports the number it used."""
    rep = bench_json(cli, art, "--widths", "2,8", "--new-tokens", 8, "--lookup", 5)
    lookups = {r["width"]: r["lookup"] for r in rep["widths"]}
    assert lookups[2] == 1 and lookups[8] == 5 and lookups.get(1, 0) == 0
    # heads that recorded no responses: no datastore was searched
    assert not any(r["datastore"] for r in rep["widths"])


def test_unknown_prompt_set_refused(art, no_decoding):
    """The API takes any string: one that is no prompt set is refused, not read as heldout."""
    with pytest.raises(HetcompError, match="bench or heldout, not 'bogus'"):
        bench(art, widths=[1, 2], prompts="bogus")
    with pytest.raises(HetcompError, match="bench or heldout"):
        bench_prompts(load_artifact(art).manifest, "bogus")


def test_missing_width_names_the_artifacts_widths(art, cli, no_decoding):
    """An artifact with heads lacks a width because its trees stop short of it: say where."""
    rc, _, err = cli("bench", art, "--widths", "2,16", "--runs", 1, "--new-tokens", 4)
    assert_one_line_error(rc, err, "widths [16] are not in this artifact (its trees have at most 8 nodes)")


def test_bench_puts_the_replayed_acceptance_beside_the_measured(smollm2_medusa_artifact,
                                                                tmp_path):
    """`bench --prompts heldout` replays each width's decodes over the held-out prompts'
    recorded responses: the accepted tokens a step it reports are the ones it measured (to
    rounding: the draft proposes what calibration measured), with and without the
    datastore, and the plot shows them. Past a recorded response (here 300 tokens) and on
    the bench prompts there is nothing to replay."""
    art = load_artifact(str(smollm2_medusa_artifact))
    held = bench_prompts(art.manifest, "heldout")[:2]
    for datastore, widths in ((True, [4, 16]), (False, [16])):
        rows = bench_module.bench_widths(art, widths, 24, None, held, 1, datastore)
        for r in rows:
            assert r["replayed_accepted_per_step"] == pytest.approx(
                r["accepted_per_step"], abs=1e-9), (datastore, r)
            assert r["replayed_accepted_per_step"] > 1
    bench_module.plot_widths(rows, str(tmp_path / "w.png"), "widths")
    assert is_plot(str(tmp_path / "w.png"))
    encoded = bench_module.encode_prompts(art, held, 300, "prompt")
    assert bench_module.replayed_steps(art, encoded, 300, {4: 2}) is None
    bench = bench_module.encode_prompts(art, bench_module.BENCH_PROMPTS, 40, "prompt")
    assert bench_module.replayed_steps(art, bench, 40, {4: 2}) is None
