"""The command line: JSON output, and one-line errors with exit code 2 for bad input.

``run`` starts a real ``python -m hetcomp`` (the runtime-only commands, a compile's progress
and exit status); ``cli`` runs the same ``main`` in this process (compile, calibrate and bench
cases), which saves a process start and TVM's import per call."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from hetcomp.frontend.weights import random_weights
from hetcomp.runtime import load_artifact
from hetcomp.testing import TINY, assert_one_line_error, byte_tokenizer_spec, numpy_llama
from hetcomp.testing import run_cli as run
from hetcomp.testing.gguf_writer import write_gguf

SCALE = 0.3  # a weight scale where greedy tokens vary (at the default they repeat the input)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, TINY, random_weights(TINY, scale=SCALE),
               byte_tokenizer_spec(TINY.vocab_size))
    return path


def test_compile_and_generate_json(tmp_path, tiny_gguf, cli):
    rc, _, err = run("compile", "--model", tiny_gguf, "--max-context", 128, "-o", tmp_path / "a")
    assert rc == 0, err
    assert "[1/4]" in err  # progress is shown
    # Written through temporaries (0700, 0600), the outputs get the modes of the umask, as
    # a folder and file made in place would: an artifact others deploy can be read.
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "a" / "params.bin").stat().st_mode & 0o777 == 0o666 & ~umask
    rc, out, err = run("generate", tmp_path / "a", "--prompt-ids", "40,41,42",
                       "--max-new-tokens", 5, "--json")
    assert rc == 0, err
    res = json.loads(out)
    for key in ("prompt_ids", "ids", "text", "steps", "accepted_per_step", "prefill_s",
                "decode_tokens_per_s"):
        assert key in res
    # the numpy model's greedy tokens (float32 file: the weights as drawn), up to EOS (id 2)
    want = numpy_llama.greedy(TINY, random_weights(TINY, scale=SCALE), [40, 41, 42], 5, eos=2)
    assert res["prompt_ids"] == [40, 41, 42] and res["ids"] == want and len(set(want)) > 3
    assert res["text"] == load_artifact(str(tmp_path / "a")).tokenizer.decode(res["ids"])
    # inspect and the error in-process: generate above and test_bad_artifacts run real
    # runtime-only processes.
    rc, out, _ = cli("inspect", tmp_path / "a")
    assert rc == 0 and '"dtype": "float32"' in out
    # A prompt longer than the context.
    rc, _, err = cli("generate", tmp_path / "a", "--prompt-ids", ",".join(["5"] * 200))
    assert_one_line_error(rc, err, "context")


@pytest.mark.parametrize("case", ["missing", "truncated", "bad_magic", "garbage", "arch",
                                  "gemma3"])
def test_bad_model_files(tmp_path, tiny_gguf, case, cli):
    src = tmp_path / "m.gguf"
    if case == "truncated":
        data = tiny_gguf.read_bytes()
        src.write_bytes(data[: len(data) // 2])
    elif case == "bad_magic":
        src.write_bytes(b"NOPE" + b"\0" * 1000)
    elif case == "garbage":
        src.write_bytes(b"GGUF" + os.urandom(2000))
    elif case in ("arch", "gemma3"):  # gemma3: a gemma3 file without its q/k norm tensors
        write_gguf(src, TINY, random_weights(TINY), byte_tokenizer_spec(TINY.vocab_size),
                   arch="gpt2" if case == "arch" else "gemma3")
    out = tmp_path / "out"
    rc, _, err = cli("compile", "--model", src, "-o", out)
    needle = {"missing": "not found", "truncated": "truncated", "bad_magic": "not a GGUF",
              "garbage": "corrupt", "arch": "unsupported architecture",
              "gemma3": "missing tensor blk.0.attn_q_norm.weight"}[case]
    assert_one_line_error(rc, err, needle)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hetcomp-tmp")]


def test_bad_options(tmp_path, cli):
    rc, _, err = cli("compile", "--dtype", "int3", "-o", tmp_path / "x")
    assert_one_line_error(rc, err, "dtype")
    rc, _, err = cli("compile", "--kv-dtype", "int8", "-o", tmp_path / "x")
    assert_one_line_error(rc, err, "--kv-dtype")
    (tmp_path / "data.npz").write_bytes(b"not an npz")
    rc, _, err = cli("calibrate", "--reuse", tmp_path / "data.npz", "-o", tmp_path / "h")
    assert_one_line_error(rc, err, "cannot read calibration data")
    rc, _, err = cli("calibrate", "--reuse", tmp_path / "data.npz", "--cache", tmp_path / "c",
                     "-o", tmp_path / "h")
    assert_one_line_error(rc, err, "pick one")
    assert not (tmp_path / "h.npz").exists()


def test_options_checked_before_the_work(tmp_path, tiny_artifact, cli):
    """What would fail at the end (a plot's path, TVM's check of the GPU architecture) or be
    ignored (a mistyped tuning root, --cuda-arch of a CPU build, a plot without widths) is
    refused first, in one line; a user's file is never replaced by a plot."""
    art, _ = tiny_artifact
    rc, _, err = cli("bench", art, "--plot", tmp_path / "w.png")
    assert_one_line_error(rc, err, "needs --widths")
    rc, _, err = cli("bench", art, "--widths", "1", "--plot", tmp_path / "w.txt")
    assert_one_line_error(rc, err, "ending in .png")
    notes = tmp_path / "notes.png"
    notes.write_text("mine")
    rc, _, err = cli("bench", art, "--widths", "1", "--plot", notes)
    assert_one_line_error(rc, err, "refusing to replace")
    assert notes.read_text() == "mine"
    plot = tmp_path / "new" / "w.png"  # a missing folder is made; a plot replaces a plot
    for _ in range(2):
        rc, _, err = cli("bench", art, "--widths", "1", "--runs", 1, "--new-tokens", 2,
                         "--plot", plot)
        assert rc == 0, err
        assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert os.listdir(plot.parent) == ["w.png"]  # no temporary file left

    rc, _, err = cli("compile", "--target", "cuda", "--cuda-arch", "ampere", "-o", tmp_path / "x")
    assert_one_line_error(rc, err, "not an NVIDIA GPU architecture")
    rc, _, err = cli("compile", "--target", "cuda", "--cuda-arch", "", "-o", tmp_path / "x")
    assert_one_line_error(rc, err, "'' is not an NVIDIA GPU architecture")  # not sm_90
    rc, _, err = cli("compile", "--target", "cuda", "--cuda-arch", "sm_12", "-o", tmp_path / "x")
    assert_one_line_error(rc, err, "nvcc builds for sm_50 and later")  # an artifact never loaded
    rc, _, err = cli("compile", "--no-heads", "--draft-dtype", "float16", "-o", tmp_path / "x")
    assert_one_line_error(rc, err, "--draft-dtype is the Medusa draft's weight dtype: this build")
    rc, _, err = cli("compile", "--cuda-arch", "sm_87", "-o", tmp_path / "x")
    assert_one_line_error(rc, err, "--cuda-arch is the GPU of --target cuda")
    rc, _, err = cli("compile", "--tuning-db", tmp_path / "no-db", "-o", tmp_path / "x")
    assert_one_line_error(rc, err, "tuning database root not found")
    rc, _, err = cli("calibrate", "--corpus", tmp_path / "none.txt", "-o", tmp_path / "x")
    assert_one_line_error(rc, err, "corpus not found")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9\n")
    rc, _, err = cli("calibrate", "--corpus", latin1, "-o", tmp_path / "x")
    assert_one_line_error(rc, err, "cannot read corpus")
    latin1.unlink()
    rc, _, err = cli("calibrate", "-o", tmp_path / "notes")  # notes.png: the plot's path
    assert_one_line_error(rc, err, "refusing to replace")
    rc, _, err = cli("tune", "--kernels", "-o", notes)
    assert_one_line_error(rc, err, "is a file")
    assert notes.read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["new", "notes.png"]


def test_outputs_are_checked_first_and_never_replace_a_user_file(tmp_path, tiny_gguf,
                                                                 tiny_artifact, cli):
    """Every output path is checked before the work, in one line: a parent that is a file,
    a folder where a file goes, a user's file where calibration data or a plot goes (a PNG
    is replaced only when hetcomp drew it), unknown units before a database is made."""
    import gzip

    import numpy as np

    art, _ = tiny_artifact
    notes = tmp_path / "notes"
    notes.write_text("mine")
    (tmp_path / "data.npz").write_text("mine too")
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"\x89PNG\r\n\x1a\n" + b"a user's image")
    (tmp_path / "empty.png").mkdir()
    (tmp_path / "h.png").write_bytes(photo.read_bytes())
    cases = [
        (("compile", "--model", tiny_gguf, "-o", notes / "art"), "is a file, not a folder"),
        (("tune", "--units", "orin-nx", "-o", notes / "t"), "is a file, not a folder"),
        (("profile", "--quick", "-o", notes / "p.db"), "is a file, not a folder"),
        (("bench", art, "--widths", "1", "--plot", notes / "w.png"), "is a file, not a folder"),
        (("bench", art, "--widths", "1", "--plot", photo), "not a hetcomp plot"),
        (("bench", art, "--widths", "1", "--plot", tmp_path / "empty.png"), "is a folder"),
        (("calibrate", "--model", tiny_gguf, "--cache", tmp_path / "data.npz", "-o",
          tmp_path / "x"), "not a calibration data file"),
        # (the packaged corpus's prompts and 256 new tokens do not fit a context of 128)
        (("calibrate", "--model", tiny_gguf, "-o", tmp_path / "y"), "no prompt of the corpus "
         "fits the model's context of 128 tokens with --new-tokens 256"),
        (("calibrate", "--model", tiny_gguf, "-o", tmp_path / "h"), "not a hetcomp plot"),
        (("calibrate", "--soft", "nan", "-o", tmp_path / "x"), "must lie in [0, 1]"),
        # (one new token is the prefill's: no decode step to time, tokens/s divided by 0)
        (("bench", art, "--widths", "1", "--new-tokens", "1"), "must be at least 2"),
        (("bench", art, "--new-tokens", "500"),
         "plus --new-tokens (500) does not fit the context of 128"),
        (("profile", "--kit-out", tmp_path / "kit", "-o", tmp_path / "p.db"), "leave out -o"),
        (("attach-weights", art, "--model", tiny_gguf, "--heads", photo),
         "has no Medusa heads: leave out --heads"),
        (("tune", "--kernels", "--kinds", "qkv,bogus", "-o", tmp_path / "k"),
         "unknown --kinds bogus"),
        (("tune", "--kernels", "--kinds", ",", "-o", tmp_path / "k"), "unknown --kinds"),
        (("profile", "--quick", "--units", "bogus", "-o", tmp_path / "p.db"), "unknown unit"),
        (("profile", "--quick", "--units", "cpu,bogus", "-o", tmp_path / "sub" / "p.db"),
         "unknown unit"),
    ]
    for args, needle in cases:
        rc, _, err = cli(*args)
        assert_one_line_error(rc, err, needle)
    assert notes.read_text() == "mine" and photo.read_bytes().endswith(b"a user's image")
    assert (tmp_path / "data.npz").read_text() == "mine too"
    assert sorted(os.listdir(tmp_path)) == ["data.npz", "empty.png", "h.png", "notes",
                                            "photo.png"]

    # Saved inputs of the wrong kind: one line before any training.
    responses = tmp_path / "r.jsonl.gz"
    whole = gzip.compress(b"".join(json.dumps({"prompt": f"p{i}", "ids": [5, 6]}).encode()
                                   + b"\n" for i in range(200)))
    responses.write_bytes(whole[: len(whole) // 2])
    corpus = tmp_path / "c.txt"
    corpus.write_text("one\ntwo\nthree\nfour\n")
    rc, _, err = cli("calibrate", "--model", tiny_gguf, "--corpus", corpus, "--responses",
                     responses, "-o", tmp_path / "x")
    assert_one_line_error(rc, err, "cannot read responses")
    rng = np.random.default_rng(0)
    other = {f"{p}_{k}{i}": (rng.standard_normal((5, 32)).astype("float32") if k == "h"
                             else np.arange(5)) for p in ("tr", "ho") for k in "hs"
             for i in range(2)}
    np.savez(tmp_path / "other.npz", **other)  # hidden rows of another model (E = 32)
    rc, _, err = cli("calibrate", "--model", tiny_gguf, "--reuse", tmp_path / "other.npz",
                     "-o", tmp_path / "x")
    assert_one_line_error(rc, err, "not [n, 64]: saved for another model?")
    assert not (tmp_path / "x.npz").exists()


def test_terminated_compile_leaves_nothing(tmp_path, tiny_gguf, cli, monkeypatch):
    """SIGTERM (`kill`, `timeout`) while the artifact is being written: the temporary
    folder beside the output is removed, as for Ctrl-C, and the exit status says so."""
    from hetcomp.codegen import export

    def write_params(*args):
        os.kill(os.getpid(), signal.SIGTERM)  # handled at the next Python instruction
        return real(*args)

    real = export.write_params
    monkeypatch.setattr(export, "write_params", write_params)
    before = signal.getsignal(signal.SIGTERM)
    rc, _, _ = cli("compile", "--model", tiny_gguf, "--max-context", 128, "--quiet",
                   "-o", tmp_path / "art")
    assert rc == 128 + signal.SIGTERM
    assert os.listdir(tmp_path) == []  # neither the artifact nor its temporary folder
    assert signal.getsignal(signal.SIGTERM) == before  # the handler lives as long as main


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_inside_a_tvm_pass_ends_quietly(tmp_path, tiny_gguf, cli, monkeypatch, signum):
    """Ctrl-C or `kill` while TVM runs one of our Python passes: TVM's FFI hands the
    exception back as RuntimeError, yet the command ends with the signal's status, no
    "internal error" line, and no output left behind."""
    from hetcomp.schedules import cpu

    def apply(self, *args):
        os.kill(os.getpid(), signum)  # handled at the next Python instruction, in the pass
        return real(self, *args)

    real = cpu.RowwiseRule.apply
    monkeypatch.setattr(cpu.RowwiseRule, "apply", apply)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    rc, _, err = cli("compile", "--model", tiny_gguf, "--max-context", 128, "--quiet",
                     "-o", tmp_path / "art")
    assert (rc, err) == (128 + signum, "")
    assert os.listdir(tmp_path) == []
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_reader_that_leaves_ends_generate_quietly(tiny_artifact):
    """`hetcomp generate ... | head`: the pipe closes before the text is written; the
    command ends without an error line, with the status a shell gives SIGPIPE."""
    proc = subprocess.Popen([sys.executable, "-m", "hetcomp", "generate", tiny_artifact[0],
                             "--prompt-ids", "5,6,7", "--max-new-tokens", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the only reader: every write now fails with EPIPE
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 128 + signal.SIGPIPE, err
    assert "error" not in err and "Traceback" not in err


def test_bad_artifacts(tmp_path, tiny_artifact, cli):
    path, _ = tiny_artifact
    # A real process (generate loads with the runtime only); the other cases run in-process.
    rc, _, err = run("generate", tmp_path, "--prompt", "hi")
    assert_one_line_error(rc, err, "not a hetcomp artifact")
    rc, _, err = cli("generate", tmp_path / "nope", "--prompt", "hi")
    assert_one_line_error(rc, err, "not found")

    edited = tmp_path / "edited"
    shutil.copytree(path, edited)
    m = json.loads((edited / "manifest.json").read_text())
    m["dtype"] = "float16"
    (edited / "manifest.json").write_text(json.dumps(m))
    rc, _, err = cli("generate", edited, "--prompt", "hi")
    assert_one_line_error(rc, err, "edited")

    missing = tmp_path / "missing"
    shutil.copytree(path, missing)
    (missing / "params.bin").unlink()
    rc, _, err = cli("generate", missing, "--prompt", "hi")
    assert_one_line_error(rc, err, "missing params.bin")
    (missing / "lib.so").unlink()  # inspect refuses what loading refuses
    rc, _, err = cli("inspect", missing)
    assert_one_line_error(rc, err, "artifact is missing lib.so")

    short = tmp_path / "short"
    shutil.copytree(path, short)
    data = (short / "params.bin").read_bytes()
    (short / "params.bin").write_bytes(data[:-100])
    for command in ("generate", "inspect"):  # inspect accepts only what loading accepts
        rc, _, err = cli(command, short, *(["--prompt", "hi"] if command == "generate" else []))
        assert_one_line_error(rc, err, "params.bin has the wrong size")
    (short / "params.bin").write_bytes(data)
    (short / "lib.so").write_bytes(b"junk")
    rc, _, err = cli("inspect", short)
    assert_one_line_error(rc, err, "lib.so does not match its manifest")


def test_bench_reports_unit_busy_time_and_plan_prediction(tmp_path, tiny_gguf, cli):
    """bench on an artifact compiled from a planner's plan.json: per-unit busy time of the
    verify step, and the plan's predicted tokens/s beside the measured one."""
    plan = {"format": "hetcomp-plan/1", "units": ["cpu", "cpu:1"], "host": "cpu",
            "source": "measured", "width": 1,
            "split": {k: {"cpu": 0.5, "cpu:1": 0.5} for k in ("qkv", "gate_up", "down")},
            "attention": {"dense": "cpu", "sparse": "cpu:1"},
            "candidates": [{"width": 1, "tau": 1.0, "step_s": 0.01}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    rc, _, err = cli("compile", "--model", tiny_gguf, "--max-context", 128, "--plan",
                     tmp_path / "plan.json", "-o", tmp_path / "a", "--quiet")
    assert rc == 0, err
    rc, out, err = cli("bench", tmp_path / "a", "--widths", "1", "--new-tokens", 8, "--runs", 1,
                       "--json", "--plot", tmp_path / "w.png", "--kernels", 3, "--rounds", 2)
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["rounds"] == 2 and rep["prompts"] == {"set": "bench", "count": 3}
    (kernels,) = rep["kernels"]  # the slowest kernels of one verify step, slowest first
    assert kernels["width"] == 1 and len(kernels["top"]) == 3 and kernels["timer_us"] > 0
    assert all(k["ms"] > 0 and k["calls"] > 0 for k in kernels["top"])
    assert [k["ms"] for k in kernels["top"]] == sorted((k["ms"] for k in kernels["top"]),
                                                        reverse=True)
    step = rep["verify_steps"][0]
    assert step["width"] == 1 and {"cpu", "cpu:1", "copy"} <= set(step["busy_ms"])
    assert step["serial_ms"] > 0 and step["step_ms"] > 0
    assert rep["widths"][0]["predicted_tokens_per_s"] == pytest.approx(100.0)
    assert (tmp_path / "w.png").stat().st_size > 0
    rc, _, err = cli("bench", tmp_path / "a", "--widths", "1", "--rounds", 0)
    assert_one_line_error(rc, err, "--rounds: must be at least 1")
    rc, _, err = cli("bench", tmp_path / "a", "--widths", "1", "--prompts", "heldout")
    assert_one_line_error(rc, err, "needs an artifact compiled with calibrated heads")
