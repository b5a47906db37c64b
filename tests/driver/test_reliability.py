"""Never lose a user's file; bad input of every kind is one line on stderr and exit 2.

The fuzz tests damage real inputs (a GGUF file, a heads file, a plan, an artifact manifest) at
many offsets and run the command that reads each in-process through ``hetcomp.cli.main``:
every truncation must be refused, and every flipped byte either refused cleanly or (where
the damage leaves a valid file, e.g. inside tensor data) accepted; never a traceback.
"""

import dataclasses
import json
import os
import shutil
import types

import numpy as np
import pytest

from hetcomp.cli import main
from hetcomp.errors import HetcompError
from hetcomp.frontend import load_model
from hetcomp.frontend.config import context_length
from hetcomp.frontend.hf_loader import read_hf_config
from hetcomp.frontend.weights import random_weights
from hetcomp.speculative.medusa import MedusaHeads
from hetcomp.testing import TINY, assert_one_line_error, byte_tokenizer_spec
from hetcomp.testing import run_cli as run
from hetcomp.testing.gguf_writer import write_gguf


def cli(capsys, *args) -> tuple[int, str]:
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def tree_state(path):
    """Every file below ``path`` with its bytes (what must stay untouched)."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, TINY, random_weights(TINY), byte_tokenizer_spec(TINY.vocab_size))
    return path


V = TINY.vocab_size


@pytest.mark.parametrize("ids", [
    {"vocab": np.array([5, 9, V], np.int32)}, {"vocab": np.array([-1, 5, 9], np.int32)},
    {"responses": [np.array([5, V])]},
    {"heldout": [(np.array([1, 2]), np.array([V]))], "ranks": np.zeros((1, 1), np.int8)},
    {"heldout": [(np.array([V]), np.array([3]))], "ranks": np.zeros((1, 1), np.int8)}])
def test_heads_drafting_outside_the_vocabulary_are_refused(tmp_path, tiny_gguf, capsys, ids):
    """Heads whose draft vocabulary names tokens this model lacks (heads of another model)
    are refused before the build: an id past the end failed after it as an IndexError, and
    a negative one would have been read from the end of the LM head. So are heads whose kept
    calibration responses (the datastore, the replay's) hold ids past the vocabulary."""
    e = TINY.hidden_size
    MedusaHeads(w=np.zeros((1, e, e), "float32"), b=np.zeros((1, e), "float32"),
                rank_probs=np.tile(np.linspace(0.5, 0.05, 10), (1, 1)), info={},
                **ids).save(str(tmp_path / "h.npz"))
    rc, err = cli(capsys, "compile", "--model", tiny_gguf, "--heads", tmp_path / "h.npz",
                  "--max-context", "64", "-o", tmp_path / "out")
    assert_one_line_error(rc, err, f"outside this model's vocabulary of {TINY.vocab_size}")
    assert not (tmp_path / "out").exists()


def test_max_context_is_at_most_the_trained_context(tmp_path, tiny_gguf, capsys):
    """--max-context above the model's trained context (TINY's 128) is refused: it was cut to
    128 without a word. Below it, it is the cache's capacity; absent, the trained context."""
    assert_one_line_error(*cli(capsys, "compile", "--model", tiny_gguf, "--max-context", 129,
                               "-o", tmp_path / "o"),
                          "--max-context 129 is above the model's trained context of 128 tokens")
    assert not (tmp_path / "o").exists()
    assert load_model(str(tiny_gguf))[0].max_context == TINY.max_context == 128
    assert load_model(str(tiny_gguf), 40)[0].max_context == 40
    with pytest.raises(HetcompError, match="trained context of 2048"):  # an HF folder alike
        context_length(2048, 4096)


def test_a_model_context_below_the_minimum_is_refused(tmp_path, capsys):
    """A GGUF whose context_length is 8 compiled, and then no prompt fit a step."""
    short = types.SimpleNamespace(**{**dataclasses.asdict(TINY), "max_context": 8})
    write_gguf(tmp_path / "c8.gguf", short, random_weights(TINY),
               byte_tokenizer_spec(TINY.vocab_size))
    assert_one_line_error(*cli(capsys, "compile", "--model", tmp_path / "c8.gguf",
                               "-o", tmp_path / "o"),
                          "the model's context of 8 tokens is below hetcomp's minimum of 16")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kv, expect", [(0, "num_kv_heads=0"), (None, 4), ("absent", 4), (2, 2)])
def test_hf_num_key_value_heads(tmp_path, kv, expect):
    """``num_key_value_heads: 0`` is refused (it was read as one KV head per query head, a
    model other than the file's); null or absent is transformers' default, one per head."""
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
              "vocab_size": 300, "max_position_embeddings": 256}
    if kv != "absent":
        config["num_key_value_heads"] = kv
    (tmp_path / "config.json").write_text(json.dumps(config))
    if isinstance(expect, str):
        with pytest.raises(HetcompError, match=expect):
            read_hf_config(str(tmp_path))
    else:
        assert read_hf_config(str(tmp_path)).num_kv_heads == expect


def test_a_text_file_as_heads_is_named_for_what_it_is(tmp_path, tiny_gguf, capsys):
    """numpy read a text file as pickled data and its message spoke of allow_pickle."""
    (tmp_path / "heads.txt").write_text("hello\n")
    rc, err = cli(capsys, "compile", "--model", tiny_gguf, "--heads", tmp_path / "heads.txt",
                  "-o", tmp_path / "o")
    assert_one_line_error(rc, err, f"cannot read Medusa heads {tmp_path / 'heads.txt'}: not an "
                          ".npz archive")
    assert "pickle" not in err


@pytest.mark.parametrize("width, needle", [
    (16, "the plan's width 16: 1 Medusa head(s) draft trees of at most 11 nodes"),
    (3, "the plan's width 3 is not a compiled width (1, 2, 4, 8)"),
])
def test_a_plan_width_the_build_lacks_is_refused_before_the_build(tmp_path, tiny_gguf, capsys,
                                                                  width, needle):
    """The plan's width is the default one; heads that cap the widths, or a width that is
    none of them, were refused only after the progress lines (the first, after a note that
    left the plan's width out)."""
    e = TINY.hidden_size
    MedusaHeads(w=np.zeros((1, e, e), "float32"), b=np.zeros((1, e), "float32"),
                rank_probs=np.tile(np.linspace(0.5, 0.05, 10), (1, 1)),
                info={}).save(str(tmp_path / "h.npz"))
    (tmp_path / "plan.json").write_text(json.dumps({**_CPU_ONLY, "width": width}))
    rc, err = cli(capsys, "compile", "--model", tiny_gguf, "--heads", tmp_path / "h.npz",
                  "--plan", tmp_path / "plan.json", "--max-context", 64, "-o", tmp_path / "o")
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "o").exists()


# ---- outputs -------------------------------------------------------------------------------
def test_compile_refuses_a_folder_that_is_not_an_artifact(tmp_path, capsys):
    """`mkdir X && touch X/keep && hetcomp compile --model smollm2 -o X` keeps X/keep. (The
    first refusal in a real process, for its exit status; the others in-process.)"""
    x = tmp_path / "X"
    x.mkdir()
    (x / "keep").write_text("mine")
    rc, _, err = run("compile", "--model", "smollm2", "-o", x)
    assert_one_line_error(rc, err, "not a hetcomp artifact")
    assert tree_state(x) == {"keep": b"mine"}
    # --force replaces only artifacts, never a user's folder
    rc, err = cli(capsys, "compile", "--model", "smollm2", "--force", "-o", x)
    assert_one_line_error(rc, err, "not a hetcomp artifact")
    assert tree_state(x) == {"keep": b"mine"}
    f = tmp_path / "file.txt"
    f.write_text("mine")
    rc, err = cli(capsys, "compile", "--model", "smollm2", "-o", f)
    assert_one_line_error(rc, err, "is a file")
    assert f.read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".hetcomp")] == []


def test_compile_replaces_an_artifact_only_with_force(tmp_path, tiny_gguf, capsys):
    art = tmp_path / "art"
    assert cli(capsys, "compile", "--model", tiny_gguf, "--max-context", 64, "--quiet",
               "-o", art)[0] == 0
    before = tree_state(art)
    rc, err = cli(capsys, "compile", "--model", tiny_gguf, "--max-context", 64, "-o", art)
    assert_one_line_error(rc, err, "--force")
    assert tree_state(art) == before
    assert cli(capsys, "compile", "--model", tiny_gguf, "--max-context", 32, "--quiet",
               "--force", "-o", art)[0] == 0
    assert json.loads((art / "manifest.json").read_text())["config"]["max_context"] == 32
    (tmp_path / "empty").mkdir()  # an empty folder is a fine output
    assert cli(capsys, "compile", "--model", tiny_gguf, "--max-context", 64, "--quiet",
               "-o", tmp_path / "empty")[0] == 0


def test_an_output_folder_that_cannot_be_written_is_refused_before_the_build(
        tmp_path, tiny_gguf, capsys):
    """/proc passes every permission check for root, yet nothing can be made there: the
    trial folder says so in one line, before the model is read (it was refused at the
    rename, after the whole build). A writable folder is left as it was."""
    assert_one_line_error(*cli(capsys, "compile", "--model", tiny_gguf, "-o", "/proc/hc-out"),
                          "cannot write /proc/hc-out: the folder /proc is not writable")
    assert not os.path.exists("/proc/hc-out")
    rc, err = cli(capsys, "compile", "--model", tmp_path / "none.gguf", "-o", tmp_path / "o")
    assert_one_line_error(rc, err, "none.gguf")  # (the check passed: the model was read)
    assert os.listdir(tmp_path) == []  # (no trial folder left behind)


def test_kit_tune_heads_and_profile_outputs_refuse_other_files(tmp_path, capsys):
    x = tmp_path / "X"
    x.mkdir()
    (x / "keep").write_text("mine")
    for args in (("profile", "--quick", "--kit-out", x),
                 ("profile", "--quick", "--force", "--kit-out", x),
                 ("tune", "--units", "orin-nx", "-o", x),
                 ("tune", "--units", "orin-nx", "--force", "-o", x)):
        rc, err = cli(capsys, *args)
        assert_one_line_error(rc, err, "refusing")
        assert tree_state(x) == {"keep": b"mine"}, args
    notes = tmp_path / "notes.npz"
    notes.write_bytes(b"my notes")
    rc, err = cli(capsys, "calibrate", "--reuse", tmp_path / "none.npz", "-o", notes)
    assert_one_line_error(rc, err, "refusing")
    db = tmp_path / "notes.txt"
    db.write_text("mine")
    rc, err = cli(capsys, "profile", "--quick", "-o", db)  # refused before any measuring
    assert_one_line_error(rc, err, "not a profile database")
    assert notes.read_bytes() == b"my notes" and db.read_text() == "mine"
    # the profile's plot goes beside the database (P.sqlite -> P.png): never over a user's file
    picture = tmp_path / "P.png"
    picture.write_bytes(b"my picture")
    rc, err = cli(capsys, "profile", "--quick", "-o", tmp_path / "P.sqlite")
    assert_one_line_error(rc, err, "not a hetcomp plot")
    assert picture.read_bytes() == b"my picture" and not (tmp_path / "P.sqlite").exists()
    # a tune folder is replaced with --force (spec units: no profiling)
    tune = tmp_path / "tune"
    assert cli(capsys, "tune", "--units", "orin-nx", "-o", tune)[0] == 0
    assert_one_line_error(*cli(capsys, "tune", "--units", "orin-nx", "-o", tune), "--force")
    assert cli(capsys, "tune", "--units", "orin-nx", "--force", "-o", tune)[0] == 0
    assert json.loads((tune / "plan.json").read_text())["format"] == "hetcomp-plan/1"


@pytest.mark.parametrize("args,needle", [
    (("bench", "A", "--widths", "x"), "--widths"),
    (("bench", "A", "--widths", "1,0"), "--widths"),
    (("bench", "A", "--runs", "0"), "--runs"),
    (("generate", "A", "--prompt", "hi", "--width", "0"), "--width"),
    (("generate", "A", "--prompt", "hi", "--width", "-2"), "--width"),
    (("generate", "A", "--prompt", "hi", "--max-new-tokens", "0"), "--max-new-tokens"),
    (("generate", "A", "--prompt-ids", "1,x"), "--prompt-ids"),
    (("generate", "A", "--prompt", "hi", "--lookup", "-1"), "--lookup"),
    (("tune", "--kernels", "--widths", "x", "-o", "D"), "--widths"),
    (("compile", "--max-context", "8", "-o", "D"), "--max-context"),
    (("chat", "A", "--width", "0"), "--width"),
])
def test_bad_numbers_are_assert_one_line_error(capsys, args, needle):
    with pytest.raises(SystemExit) as e:
        main(list(args))
    assert_one_line_error(e.value.code, capsys.readouterr().err, needle)


def test_params_bin_is_checked_against_its_digest(tmp_path, tiny_artifact, capsys):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact[0], art)
    pbin = art / "params.bin"
    data = bytearray(pbin.read_bytes())
    data[len(data) // 2] ^= 0x40
    pbin.write_bytes(bytes(data))
    rc, err = cli(capsys, "generate", art, "--prompt-ids", "5,6", "--max-new-tokens", 2)
    assert_one_line_error(rc, err, "params.bin does not match")
    # --no-verify skips the digest (the size is still checked)
    rc, err = cli(capsys, "generate", art, "--prompt-ids", "5,6", "--max-new-tokens", 2,
                  "--no-verify")
    assert rc == 0, err
    pbin.write_bytes(bytes(data[:-64]))
    assert_one_line_error(*cli(capsys, "generate", art, "--prompt-ids", "5,6", "--no-verify"), "wrong size")


# ---- fuzz ----------------------------------------------------------------------------------
def _offsets(size: int, count: int, dense_head: int = 0) -> list[int]:
    """``count`` offsets spread over ``size`` bytes, plus every 7th byte of the first
    ``dense_head`` (where a format's structure lives)."""
    spread = np.unique(np.linspace(0, size - 1, count).astype(int)).tolist()
    return sorted(set(spread) | set(range(0, min(dense_head, size), 7)))


def _fuzz(capsys, tmp_path, original: bytes, name: str, command, dense_head=0, count=40,
          text=False):
    """Truncate and flip ``original`` written as ``name``; run ``command(path)`` on each.
    ``text``: also flip the low bit of letters and digits, which keeps a JSON file valid
    UTF-8 (a 0xFF flip stops at decoding) and often valid JSON, so the checks behind the
    parser are reached. Returns (cases, refused)."""
    cases = refused = 0
    path = tmp_path / name
    mutants = [("truncate", original[:n]) for n in _offsets(len(original), count)]
    for off in _offsets(len(original), count, dense_head):
        b = bytearray(original)
        b[off] ^= 0xFF
        mutants.append(("flip", bytes(b)))
    if text:
        letters = [i for i, ch in enumerate(original) if chr(ch).isalnum()]
        for i in _offsets(len(letters), count):
            b = bytearray(original)
            b[letters[i]] ^= 0x01
            mutants.append(("flip", bytes(b)))
    for kind, data in mutants:
        path.write_bytes(data)
        rc, err = cli(capsys, *command(path))
        cases += 1
        assert rc in (0, 2), (kind, len(data), err)
        assert "Traceback" not in err and "internal error" not in err, (kind, err)
        if rc == 2:
            refused += 1
            assert len([ln for ln in err.splitlines() if ln.strip()]) == 1, err
        else:
            assert kind == "flip", f"a file truncated to {len(data)} bytes was accepted"
    return cases, refused


def _fuzzed(kind: str, counts: tuple[int, int]) -> None:
    """Each fuzz test checks its own counts (the closing note of issue 15 has them): a
    separate test reading what the others left behind failed when run alone or on
    another worker than theirs."""
    cases, refused = counts
    print(f"fuzz cases ({kind}): {cases} tried, {refused} refused")
    assert cases >= 80 and refused > 0, (kind, counts)


def test_fuzz_gguf(tmp_path, tiny_gguf, capsys):
    # `inspect MODEL.gguf` loads the model exactly as compile does, without building it.
    _fuzzed("gguf", _fuzz(capsys, tmp_path, tiny_gguf.read_bytes(), "m.gguf",
                          lambda p: ("inspect", p), dense_head=4096))


def test_fuzz_heads(tmp_path, capsys):
    rng = np.random.default_rng(0)
    k, e = 2, 16
    heads = MedusaHeads(rng.normal(size=(k, e, e)).astype(np.float32),
                        rng.normal(size=(k, e)).astype(np.float32),
                        rng.random((k, 10)), {"corpus": "test"})
    heads.save(str(tmp_path / "h.npz"))
    _fuzzed("heads", _fuzz(capsys, tmp_path, (tmp_path / "h.npz").read_bytes(),
                           "x.npz", lambda p: ("inspect", p), dense_head=512))


def test_fuzz_plan(tmp_path, capsys):
    """A measured two-unit plan, as `tune` writes it (the planner's fields compile reads)."""
    plan = json.dumps({
        "format": "hetcomp-plan/1", "model": "tiny", "units": ["cpu", "cpu:1"], "host": "cpu",
        "source": "measured", "width": 1, "cache_len": 64, "tau": 1.0, "step_s": 0.01,
        "split": {k: {"cpu": 0.5, "cpu:1": 0.5} for k in ("qkv", "gate_up", "down")},
        "attention": {"dense": "cpu", "sparse": "cpu:1"},
        "candidates": [{"width": 1, "tau": 1.0, "step_s": 0.01}]}, indent=1).encode()
    (tmp_path / "ok.json").write_bytes(plan)
    assert cli(capsys, "inspect", tmp_path / "ok.json")[0] == 0
    _fuzzed("plan", _fuzz(capsys, tmp_path, plan, "p.json",
                          lambda p: ("inspect", p), count=60, text=True))
    # a spec-estimate plan compiles only for its board (refused before any model is loaded)
    assert cli(capsys, "tune", "--units", "orin-nx", "-o", tmp_path / "t")[0] == 0
    assert_one_line_error(*cli(capsys, "compile", "--plan", tmp_path / "t" / "plan.json", "-o",
                  tmp_path / "o"), "--target aarch64 --cuda-arch sm_87")


_PLAN = {"format": "hetcomp-plan/1", "model": "tiny", "units": ["cpu", "cpu:1"], "host": "cpu",
         "source": "measured", "width": 2, "split": {"qkv": {"cpu": 0.5, "cpu:1": 0.5}},
         "attention": {"dense": "cpu", "sparse": "cpu:1"},
         "tree": {"parents": [-1, 0], "ranks": [-1, 0], "probs": [1.0, 0.5]}}


@pytest.mark.parametrize("edit, needle", [
    ({"units": []}, "non-empty list of names"),
    ({"units": ["cpu", "tpu"]}, "unknown unit 'tpu'"),
    ({"units": ["cpu", "cpu:1", "cpu:2"]}, "at most two units, not ['cpu', 'cpu:1', 'cpu:2']"),
    ({"host": 5}, "host 5 is not one of the plan's units"),
    ({"host": "cuda:7"}, "host 'cuda:7' is not one of"),
    ({"split": {"gate-up": {"cpu": 0.5, "cpu:1": 0.5}}}, "unknown linear kind 'gate-up'"),
    ({"split": {"qkv": {"cpu": 0.9, "cpu:1": 0.9}}}, "the shares of qkv sum to 1.8"),
    ({"split": {"qkv": {"cpu": 0.5, "CPU:1": 0.5}}}, "must give shares of the units"),
    ({"attention": {"dense": "cpu", "sparse": "CPU:1"}}, "attention must place"),
    ({"shared_memory": "false"}, "shared_memory must be true or false"),
    ({"width": 0}, "width must be a positive integer"),
    ({"width": 2.7}, "width must be a positive integer"),
    ({"width": True}, "width must be a positive integer"),
    ({"width": 4}, "parents, ranks and probs must list its 4 nodes"),
    ({"tree": {"parents": [-1, 1], "ranks": [-1, 0], "probs": [1, 1]}}, "tree node 1"),
    ({"tree": {"parents": [-1, 0], "ranks": [-1, 10], "probs": [1, 1]}}, "tree node 1"),
])
def test_plans_that_say_what_they_do_not_mean_are_refused(tmp_path, capsys, edit, needle):
    """A plan is applied as written, so a typo, a share that does not add up or a tree of
    another width would compile a model other than the plan (or crash generate): refused,
    in one line, when compile reads it (`inspect` reads it the same way)."""
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({**_PLAN, **edit}))
    assert_one_line_error(*cli(capsys, "compile", "--model", "none.gguf", "--plan", path,
                               "-o", tmp_path / "o"), needle)
    assert_one_line_error(*cli(capsys, "inspect", path), needle)
    path.write_text(json.dumps(_PLAN))
    assert cli(capsys, "inspect", path)[0] == 0


_BARE = {"units": ["cpu", "cpu:1"], "targets": [{"kind": "llvm"}, {"kind": "llvm"}],
         "ratios": {"default": 0.5}}
_BARE_GPU = {"units": ["cpu", "cuda"], "ratios": {"default": 0.5},
             "targets": [{"kind": "llvm"}, {"kind": "cuda", "arch": "sm_90"}]}
_CPU_ONLY = {"format": "hetcomp-plan/1", "source": "measured", "units": ["cpu"], "host": "cpu",
             "split": {"default": {"cpu": 1.0}}, "attention": {"dense": "cpu", "sparse": "cpu"},
             "width": 4}


@pytest.mark.parametrize("plan, args, needle", [
    # A bare plan's targets are the flags': one they do not build is refused, with the flags
    # that do (it was built for its own targets and failed at the link, or ignored the flags).
    (_BARE_GPU, ("--cuda-arch", "sm_87"), "compile it with --target host --cuda-arch sm_90"),
    ({**_BARE_GPU, "targets": [{"kind": "llvm"}, {"kind": "cuda", "arch": "sm_zz"}]}, (),
     "no --target builds it"),
    ({**_BARE, "targets": [{"kind": "llvm", "mtriple": "aarch64-linux-gnu"}, {"kind": "llvm"}]},
     ("--target", "x86-64-v3"), "compile it with --target aarch64"),
    # A plan that places nothing on a GPU is no --target cuda build (nor a bare one).
    (_CPU_ONLY, ("--target", "cuda"), "runs the model on cpu alone: compile it with --target host"),
    (_BARE, ("--target", "cuda"), "compile it with --target host"),
    # The GPU's switches, where the build has no GPU (or no whole-model GPU build): refused.
    (None, ("--no-tensor-cores",), "--no-tensor-cores is for the linears"),
    (None, ("--no-cuda-graph",), "--no-cuda-graph is for a whole-model GPU build"),
    (None, ("--no-fuse",), "--no-fuse is for a whole-model GPU build"),
    (_CPU_ONLY, ("--no-fuse",), "--no-fuse is for a whole-model GPU build"),
    (_BARE_GPU, ("--no-cuda-graph",), "--no-cuda-graph is for a whole-model GPU build"),
    # The quantized linears' switch, where the weights are float (the default float32).
    (None, ("--no-int8-dot",), "--no-int8-dot is for the linears of a block-quantized"),
])
def test_flags_a_plan_or_build_does_not_mean_are_refused(tmp_path, capsys, plan, args, needle):
    """Refused in one line before any model is read (``none.gguf`` does not exist)."""
    extra = ()
    if plan is not None:
        (tmp_path / "plan.json").write_text(json.dumps(plan))
        extra = ("--plan", tmp_path / "plan.json")
    assert_one_line_error(*cli(capsys, "compile", "--model", "none.gguf", *extra, *args,
                               "-o", tmp_path / "o"), needle)
    assert not (tmp_path / "o").exists()


def test_a_missing_cross_linker_is_refused_before_the_build(tmp_path, capsys, monkeypatch):
    """Before any model is read (it was found at the link, after the whole build)."""
    monkeypatch.setenv("PATH", str(tmp_path))
    assert_one_line_error(*cli(capsys, "compile", "--model", "none.gguf", "--target", "aarch64",
                               "-o", tmp_path / "o"), "needs the cross linker")


def test_inspect_describes_every_plan_tune_writes(tmp_path, capsys):
    """A spec-estimate plan is inspected as compile reads it with its board's flags, which it
    names (inspect read every plan with --target host's flags and refused the board's)."""
    for units, flags in (("orin-nx", {"target": "aarch64", "cuda_arch": "sm_87"}),
                         ("orin-nx-gpu", {"target": "aarch64", "cuda_arch": "sm_87"}),
                         ("orin-nx-cpu", {"target": "aarch64", "cuda_arch": None}),
                         ("hopper-gpu", {"target": "cuda", "cuda_arch": "sm_90"})):
        out = tmp_path / units
        assert cli(capsys, "tune", "--units", units, "-o", out)[0] == 0
        assert main(["inspect", str(out / "plan.json")]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["kind"] == "plan" and info["compile_flags"] == flags, info
        assert info["width"] == json.loads((out / "plan.json").read_text())["width"]


def test_a_plan_on_one_gpu_compiles_as_the_whole_model_gpu_build(tmp_path, capsys):
    """A plan that runs every kernel on one GPU (`tune --units hopper-gpu`; a measured
    `--units cuda` one alike) is the whole-model GPU build, CUDA graphs and fused linears, at
    the plan's width and tree (compile refused it: "--target cuda and no --plan"); flags that
    do not build it are refused with those that do."""
    out = tmp_path / "tune"
    assert cli(capsys, "tune", "--units", "hopper-gpu", "-o", out)[0] == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["units"] == ["hopper-gpu"] and plan["width"] > 1
    for args in ((), ("--target", "cuda", "--cuda-arch", "sm_87")):
        assert_one_line_error(*cli(capsys, "compile", "--model", "none.gguf", "--plan",
                                   out / "plan.json", *args, "-o", tmp_path / "o"),
                              "runs the model on hopper-gpu alone: compile it with --target "
                              "cuda --cuda-arch sm_90")
    rc, err = cli(capsys, "compile", "--model", "smollm2", "--target", "cuda", "--plan",
                  out / "plan.json", "--max-context", 128, "--quiet", "-o", tmp_path / "art")
    assert rc == 0, err
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert (m["default_width"], m["default_width_source"]) == (plan["width"], "plan")
    assert m["speculative"]["trees"][str(plan["width"])] == plan["tree"]
    assert m["plan"] is None and m["plan_source"] == "spec-estimate"
    assert m["cuda_graph"] and m["fused_linears"] and m["target_spec"]["arch"] == "sm_90"
    assert [u["device"] for u in m["units"]] == ["cuda"]
    # A plan tuned for another model is refused before the model is read (it was built,
    # with widths, tree and ratios chosen for other shapes).
    model = tmp_path / "tiny.gguf"
    write_gguf(model, TINY, random_weights(TINY, seed=1), byte_tokenizer_spec(TINY.vocab_size))
    assert_one_line_error(*cli(capsys, "compile", "--model", model, "--target", "cuda",
                               "--plan", out / "plan.json", "-o", tmp_path / "other"),
                          "the plan was tuned for smollm2, whose shapes are not those of")
    assert not (tmp_path / "other").exists()


def test_fuzz_manifest(tmp_path, tiny_artifact, capsys):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact[0], art)
    manifest = (art / "manifest.json").read_bytes()
    (art / "manifest.json").unlink()
    cases, refused = _fuzz(capsys, tmp_path / "art", manifest, "manifest.json",
                           lambda p: ("inspect", p.parent), count=60, text=True)
    assert refused == cases  # every edit is refused: the manifest carries its own digest
    _fuzzed("manifest", (cases, refused))
    # loading for generation reads the same checked manifest: an edit that stays valid JSON
    edited = manifest.replace(b'"max_context": 128', b'"max_context": 129', 1)
    assert edited != manifest
    (art / "manifest.json").write_bytes(edited)
    assert_one_line_error(*cli(capsys, "generate", art, "--prompt-ids", "5"),
                          "edited after compilation")


@pytest.mark.parametrize("edit, needle", [
    ("del m['files']", "art: KeyError: 'files'"),
    ("m['params'][-1]['offset'] = 10**9", "lies outside params.bin"),
    ("m['default_width'] = 'abc'", "art: TypeError: default_width 'abc' is not a width"),
    ("m['lookup'] = {'4': 'x'}", "art: TypeError: lookup {'4': 'x'} is not lookup nodes by "
                                 "width"),
    # the caches are shaped from the config, which the library was not compiled for
    ("m['config']['max_context'] = 64",
     "manifest.json does not match lib.so (its prefill refused the shape of k_cache)"),
])
def test_a_manifest_edited_with_its_digest_is_refused(tmp_path, tiny_artifact, capsys, edit,
                                                      needle):
    """An edit that recomputed the digest (or another hetcomp version's manifest): fields
    that are missing or out of range are one line, not a KeyError or a reshape error."""
    from hetcomp.artifact_format import manifest_digest

    art = tmp_path / "art"
    shutil.copytree(tiny_artifact[0], art)
    m = json.loads((art / "manifest.json").read_text())
    exec(edit)
    m["digest"] = manifest_digest(m)
    (art / "manifest.json").write_text(json.dumps(m))
    assert_one_line_error(*cli(capsys, "generate", art, "--prompt-ids", "5"), needle)


def test_json_nested_past_the_recursion_limit_is_one_line(tmp_path, tiny_artifact, capsys):
    """json raises RecursionError, not ValueError, for deep nesting: every JSON a command
    reads (a manifest, a plan, a profile kit, calibration responses) is still one line."""
    deep = "[" * 100000 + "]" * 100000
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact[0], art)
    (art / "manifest.json").write_text(deep)
    assert_one_line_error(*cli(capsys, "generate", art, "--prompt-ids", "5"),
                          "corrupt manifest.json")
    (tmp_path / "plan.json").write_text(deep)
    assert_one_line_error(*cli(capsys, "inspect", tmp_path / "plan.json"), "cannot read plan")
    (tmp_path / "kit").mkdir()
    (tmp_path / "kit" / "kit.json").write_text(deep)
    assert_one_line_error(*cli(capsys, "profile", "--kit", tmp_path / "kit", "-o",
                               tmp_path / "db.sqlite"), "not a profile kit")
    (tmp_path / "r.jsonl").write_text(deep + "\n")
    assert_one_line_error(*cli(capsys, "calibrate", "--model", "smollm2", "--responses",
                               tmp_path / "r.jsonl", "-o", tmp_path / "h"),
                          "cannot read responses")


def test_tune_refuses_bad_heads_before_it_profiles(tmp_path, capsys, monkeypatch):
    """Heads that cannot be read were refused only after the whole profile (minutes)."""
    from hetcomp.driver import tuning

    monkeypatch.setattr(tuning, "profile_command", lambda *a, **k: pytest.fail("profiled"))
    (tmp_path / "h.npz").write_text("not heads")
    assert_one_line_error(*cli(capsys, "tune", "--units", "cpu", "--heads", tmp_path / "h.npz",
                               "-o", tmp_path / "t"), "cannot read Medusa heads")
    assert os.listdir(tmp_path) == ["h.npz"]


def test_tvm_num_threads_empty_means_every_core_and_garbage_is_one_line(tmp_path, capsys,
                                                                         monkeypatch):
    """``TVM_NUM_THREADS=`` is every core (bench failed after its whole run on int('')); a
    value that is no positive integer is refused in one line where hetcomp reads it."""
    import subprocess
    import sys

    from hetcomp.errors import HetcompError
    from hetcomp.hardware import cpu_threads

    env = dict(os.environ, TVM_NUM_THREADS="")
    out = subprocess.run([sys.executable, "-c", "import os, hetcomp._tvm; "
                          "print(os.environ['TVM_NUM_THREADS'])"], env=env, check=True,
                         capture_output=True, text=True).stdout
    assert int(out) == os.cpu_count()
    for value, want in (("", os.cpu_count()), (" 3 ", 3)):
        monkeypatch.setenv("TVM_NUM_THREADS", value)
        assert cpu_threads() == want
    for value in ("abc", "0", "-2", "1.5"):
        monkeypatch.setenv("TVM_NUM_THREADS", value)
        with pytest.raises(HetcompError, match="TVM_NUM_THREADS must be a positive integer"):
            cpu_threads()
    model = tmp_path / "tiny.gguf"
    write_gguf(model, TINY, random_weights(TINY, seed=1), byte_tokenizer_spec(TINY.vocab_size))
    monkeypatch.setenv("TVM_NUM_THREADS", "abc")
    assert_one_line_error(*cli(capsys, "profile", "--model", model, "--quick", "-o",
                               tmp_path / "db.sqlite"), "TVM_NUM_THREADS")
    assert not (tmp_path / "db.sqlite").exists()
