"""The command line: JSON output, and one-line errors with exit code 2 for bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import TINY, byte_tokenizer_spec
from gguf_writer import write_gguf

from hetcomp.frontend.weights import random_weights


def run(*args):
    p = subprocess.run([sys.executable, "-m", "hetcomp", *map(str, args)],
                       capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout, p.stderr


def assert_one_line_error(rc, err, needle):
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and needle in lines[0], err


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, TINY, random_weights(TINY), byte_tokenizer_spec(TINY.vocab_size))
    return path


def test_compile_and_generate_json(tmp_path, tiny_gguf):
    rc, _, err = run("compile", "--model", tiny_gguf, "--max-context", 128, "-o", tmp_path / "a")
    assert rc == 0, err
    assert "[1/4]" in err  # progress is shown
    rc, out, err = run("generate", tmp_path / "a", "--prompt-ids", "5,6,7", "--max-new-tokens", 5,
                       "--json")
    assert rc == 0, err
    res = json.loads(out)
    for key in ("prompt_ids", "ids", "text", "steps", "accepted_per_step", "prefill_s",
                "decode_tokens_per_s"):
        assert key in res
    assert res["prompt_ids"] == [5, 6, 7] and 1 <= len(res["ids"]) <= 5
    rc, out, _ = run("inspect", tmp_path / "a")
    assert rc == 0 and '"dtype": "float32"' in out
    # A prompt longer than the context.
    rc, _, err = run("generate", tmp_path / "a", "--prompt-ids", ",".join(["5"] * 200))
    assert_one_line_error(rc, err, "context")


@pytest.mark.parametrize("case", ["missing", "truncated", "bad_magic", "garbage", "arch"])
def test_bad_model_files(tmp_path, tiny_gguf, case):
    src = tmp_path / "m.gguf"
    if case == "truncated":
        data = tiny_gguf.read_bytes()
        src.write_bytes(data[: len(data) // 2])
    elif case == "bad_magic":
        src.write_bytes(b"NOPE" + b"\0" * 1000)
    elif case == "garbage":
        src.write_bytes(b"GGUF" + os.urandom(2000))
    elif case == "arch":
        write_gguf(src, TINY, random_weights(TINY), byte_tokenizer_spec(TINY.vocab_size),
                   arch="gpt2")
    out = tmp_path / "out"
    rc, _, err = run("compile", "--model", src, "-o", out)
    needle = {"missing": "not found", "truncated": "truncated", "bad_magic": "not a GGUF",
              "garbage": "corrupt", "arch": "unsupported architecture"}[case]
    assert_one_line_error(rc, err, needle)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hetcomp-tmp")]


def test_bad_options(tmp_path):
    rc, _, err = run("compile", "--dtype", "int3", "-o", tmp_path / "x")
    assert_one_line_error(rc, err, "dtype")


def test_bad_artifacts(tmp_path, tiny_artifact):
    path, _ = tiny_artifact
    rc, _, err = run("generate", tmp_path, "--prompt", "hi")
    assert_one_line_error(rc, err, "not a hetcomp artifact")
    rc, _, err = run("generate", tmp_path / "nope", "--prompt", "hi")
    assert_one_line_error(rc, err, "not found")

    edited = tmp_path / "edited"
    shutil.copytree(path, edited)
    m = json.loads((edited / "manifest.json").read_text())
    m["dtype"] = "float16"
    (edited / "manifest.json").write_text(json.dumps(m))
    rc, _, err = run("generate", edited, "--prompt", "hi")
    assert_one_line_error(rc, err, "edited")

    missing = tmp_path / "missing"
    shutil.copytree(path, missing)
    (missing / "params.bin").unlink()
    rc, _, err = run("generate", missing, "--prompt", "hi")
    assert_one_line_error(rc, err, "missing params.bin")

    short = tmp_path / "short"
    shutil.copytree(path, short)
    data = (short / "params.bin").read_bytes()
    (short / "params.bin").write_bytes(data[:-100])
    rc, _, err = run("generate", short, "--prompt", "hi")
    assert_one_line_error(rc, err, "wrong size")
