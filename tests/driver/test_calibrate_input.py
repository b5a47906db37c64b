"""`hetcomp calibrate`'s input: recorded responses, saved calibration data and the corpus.

Bad input is one line on stderr and exit 2, before the compile (the compile is replaced by
a failure here: a refusal that came after it would fail the test instead of crashing it, as
an out-of-range id used to crash the process).
"""

import json
import pickle
import tempfile

import numpy as np
import pytest

import hetcomp.driver.calibrate as calibrate_mod
from hetcomp.cli import main
from hetcomp.driver.benchmark import bench_prompts
from hetcomp.driver.calibrate import heldout_prompts, is_calibration_data
from hetcomp.frontend.weights import random_weights
from hetcomp.speculative.medusa import MedusaHeads
from hetcomp.testing import TINY, assert_one_line_error, byte_tokenizer_spec
from hetcomp.testing.gguf_writer import write_gguf

PROMPTS = [f"prompt number {i} about topic {7 * i}" for i in range(1, 13)]
OUTSIDE = f"line 3: token ids outside this model's vocabulary of {TINY.vocab_size}"


def cli(capsys, *args) -> tuple[int, str]:
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, TINY, random_weights(TINY, seed=5, scale=0.5),
               byte_tokenizer_spec(TINY.vocab_size))
    return path


@pytest.fixture
def no_compile(tmp_path, monkeypatch):
    """Fails any compile, and sends temporaries to a folder of the test's (to find them)."""
    def compile_model(*args, **kwargs):
        raise AssertionError("bad input reached the compile")

    monkeypatch.setattr(calibrate_mod, "compile_model", compile_model)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def left_behind(tmp_path, no_compile) -> list[str]:
    """Temporaries and partial outputs a refused run left."""
    return ([p.name for p in no_compile.iterdir()]
            + [p.name for p in tmp_path.rglob(".hetcomp-tmp*")])


@pytest.mark.parametrize("bad,needle", [
    ([-5] * 5, OUTSIDE),
    ([7, TINY.vocab_size], OUTSIDE),
    ([99999] * 5, OUTSIDE),
    ([], "line 3: the response is empty"),
], ids=["negative", "vocab-size", "large", "empty"])
def test_responses_outside_the_vocabulary_or_empty_are_refused(tmp_path, tiny_gguf, capsys,
                                                               no_compile, bad, needle):
    """Response ids the compiled model would read its embedding at out of bounds (a negative
    one crashed the process with SIGSEGV, a large one read other memory) and an empty
    response (IndexError) are refused in one line, before the compile."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(PROMPTS) + "\n")
    responses = tmp_path / "r.jsonl"
    responses.write_text("".join(json.dumps({"prompt": p, "ids": bad if i == 2 else [1, 2, 3]})
                                 + "\n" for i, p in enumerate(PROMPTS)))
    rc, err = cli(capsys, "calibrate", "--model", tiny_gguf, "--corpus", corpus,
                  "--new-tokens", 16, "--epochs", 1, "--responses", responses,
                  "-o", tmp_path / "out" / "h")
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "out").exists()
    assert not left_behind(tmp_path, no_compile)


def _not_calibration_data(tmp_path):
    """Files of every kind but a calibration data file, by name."""
    files = {"empty.npz": b"", "text.npz": b"hello\n"}
    for name in ("arr.npy", "arr-npy.npz"):  # a bare array (np.load: an ndarray, no archive)
        np.save(tmp_path / "a.npy", np.zeros(3))
        files[name] = (tmp_path / "a.npy").read_bytes()
    files["pickle.npz"] = pickle.dumps({"tr_h0": np.zeros((2, 3))})
    np.savez(tmp_path / "o.npz", tr_h0=np.array([{}, None], dtype=object),
             tr_s0=np.zeros(2, "int64"), ho_h0=np.zeros((2, 3)), ho_s0=np.zeros(2, "int64"))
    files["objects.npz"] = (tmp_path / "o.npz").read_bytes()  # a member needs unpickling
    for path in (tmp_path / "a.npy", tmp_path / "o.npz"):
        path.unlink()
    return files


def test_files_that_are_not_calibration_data_are_refused(tmp_path, tiny_gguf, capsys,
                                                         no_compile):
    """--reuse of any file that is not saved calibration data (an empty file, a text file,
    a .npy: not an .npz archive) says it cannot read it; --cache refuses to replace it. One line each,
    before the compile, and the file is left as it was."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(PROMPTS) + "\n")
    for name, content in _not_calibration_data(tmp_path).items():
        path = tmp_path / name
        path.write_bytes(content)
        assert not is_calibration_data(str(path)), name
        rc, err = cli(capsys, "calibrate", "--model", tiny_gguf, "--reuse", path,
                      "-o", tmp_path / "out" / "h")
        assert_one_line_error(rc, err, f"cannot read calibration data {path}")
        if name.endswith(".npz"):  # (--cache X writes X.npz)
            rc, err = cli(capsys, "calibrate", "--model", tiny_gguf, "--corpus", corpus,
                          "--new-tokens", 8, "--cache", path, "-o", tmp_path / "out" / "h")
            assert_one_line_error(rc, err, f"{path} is a file that is not a calibration "
                                  "data file")
        assert path.read_bytes() == content, name
    assert not (tmp_path / "out").exists()
    assert not left_behind(tmp_path, no_compile)


def test_heads_record_the_corpus_file_by_its_absolute_path(tmp_path, tiny_gguf, capsys,
                                                           monkeypatch):
    """`--corpus FILE` is recorded as an absolute path, so `bench --prompts heldout` draws
    the held-out prompts from any folder (it looked for the name as typed in the current
    folder: "corpus not found", or another file of that name); heads recorded with a
    relative path are read from the current folder as before."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    (work / "c12.txt").write_text("\n".join(PROMPTS) + "\n")
    (elsewhere / "c12.txt").write_text("another corpus\nof the same name\n")
    monkeypatch.chdir(work)
    rc, err = cli(capsys, "calibrate", "--model", tiny_gguf, "--corpus", "c12.txt",
                  "--new-tokens", 8, "--epochs", 1, "--num-heads", 2, "--cache", "d",
                  "-o", "h")
    assert rc == 0, err
    assert is_calibration_data("d.npz")  # (what --cache saves still reads back)
    info = MedusaHeads.load(str(work / "h.npz")).info
    assert info["corpus"] == str(work / "c12.txt")
    held = heldout_prompts(info)
    assert held and set(held) <= set(PROMPTS)
    monkeypatch.chdir(elsewhere)
    assert bench_prompts({"speculative": {"heads_info": info}}, "heldout") == held
    # older heads: the corpus as typed, read from the current folder
    monkeypatch.chdir(work)
    assert heldout_prompts(dict(info, corpus="c12.txt")) == held
    # a registered corpus stays a name, wherever calibrate runs
    opts = calibrate_mod.CalibrateOptions(corpus="chat", num_heads=2, epochs=1)
    embed = random_weights(TINY, seed=5, scale=0.5)["embed"]
    heads = calibrate_mod.calibrate(None, embed, opts, progress=False,
                                    data=calibrate_mod.load_cache("d.npz"))
    assert heads.info["corpus"] == "chat"
