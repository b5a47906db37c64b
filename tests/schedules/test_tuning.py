"""MetaSchedule tuning database: stored per machine fingerprint, applied by compile, ignored
elsewhere; tuned kernels compute the same as the hand-written ones."""

import json
import os
from pathlib import Path

import numpy as np

from hetcomp.driver.compile import CompileOptions, compile_model
from hetcomp.frontend.weights import random_weights
from hetcomp.testing import TINY, byte_tokenizer_spec, numpy_llama


def test_tuning_database_found_on_this_machine_only(tmp_path, monkeypatch, capfd):
    from hetcomp.frontend.llama import build_module
    from hetcomp.hardware import target_dict
    from hetcomp.profile.units import detect_unit
    from hetcomp.runtime import generate, load_artifact
    from hetcomp.schedules.tuning import (
        database_dir,
        tunable,
        tune_kernels,
        workload_key,
        write_accepted,
    )

    mod = build_module(TINY, "float32", static_widths=(1,))  # as compile builds it
    name, func = next((gv.name_hint, f) for gv, f in mod.functions_items() if tunable(f))
    root = tmp_path / "db"
    digest = detect_unit("cpu").fingerprint.digest
    records = tune_kernels({name: func}, target_dict("host"),
                           database_dir(str(root), digest), trials_per_kernel=4,
                           progress=lambda s: None)
    assert records >= 1

    # weights at a scale where greedy tokens vary (at the default they mostly repeat the input)
    weights = random_weights(TINY, scale=0.3)
    loaded = (TINY, weights, byte_tokenizer_spec(TINY.vocab_size), __file__)
    compile_model(CompileOptions(model="tiny", max_context=64, tuning_db=str(root)),
                  str(tmp_path / "tuned"), quiet=True, weights=loaded)
    compile_model(CompileOptions(model="tiny", max_context=64), str(tmp_path / "plain"),
                  quiet=True, weights=loaded)
    manifest = json.loads((tmp_path / "tuned" / "manifest.json").read_text())
    assert manifest["tuning"]["kernels"] >= 1 and digest in manifest["tuning"]["db"]
    want = numpy_llama.greedy(TINY, weights, [5, 6, 7], 12)
    assert len(set(want)) > 3
    for d in ("tuned", "plain"):  # the tuned kernels compute the model, as the rules' do
        art = load_artifact(str(tmp_path / d))
        assert generate(art, [5, 6, 7], 12, stop_at_eos=False).ids == want, d
        sess = art.new_session()
        sess.prefill([5, 6, 7])
        _, _, logits = sess.verify([9, 4], [3, 4], np.tril(np.ones((2, 2), "int32")))
        np.testing.assert_allclose(logits.numpy(),
                                   numpy_llama.forward(TINY, weights, [5, 6, 7, 9, 4])[0][3:],
                                   rtol=1e-4, atol=1e-4 * float(np.abs(logits.numpy()).max()))
    # Records that did not beat the hand-written rule (not in accepted.json) are not applied.
    write_accepted(database_dir(str(root), digest), [])
    compile_model(CompileOptions(model="tiny", max_context=64, tuning_db=str(root)),
                  str(tmp_path / "rejected"), quiet=True, weights=loaded)
    rejected = json.loads((tmp_path / "rejected" / "manifest.json").read_text())
    assert rejected["tuning"]["kernels"] == 0
    write_accepted(database_dir(str(root), digest), [workload_key(func)])

    # Another machine: a different fingerprint (here: another thread count, which the
    # fingerprint reads from the environment at each compile) finds nothing.
    monkeypatch.setenv("TVM_NUM_THREADS", str(int(os.environ.get("TVM_NUM_THREADS", "2")) + 1))
    assert detect_unit("cpu").fingerprint.digest != digest
    capfd.readouterr()
    compile_model(CompileOptions(model="tiny", max_context=64, tuning_db=str(root)),
                  str(tmp_path / "other"), weights=loaded)
    assert "no tuning records for this machine" in capfd.readouterr().err
    other = json.loads((tmp_path / "other" / "manifest.json").read_text())
    assert other["tuning"] is None


def test_tune_kernels_replaces_the_database_whole_or_not_at_all(tmp_path, monkeypatch):
    """`tune --kernels` writes the machine's database (records and the accepted verdicts)
    through a temporary copy: after a run it holds both, and a run interrupted while tuning
    leaves the database as it was (compile would apply every record of one without
    accepted.json, the slower ones too)."""
    import pytest

    from hetcomp.driver import tuning
    from hetcomp.profile.units import detect_unit
    from hetcomp.schedules.tuning import ACCEPTED_FILE, RECORD_FILE, database_dir
    from hetcomp.testing.gguf_writer import write_gguf

    gguf = tmp_path / "tiny.gguf"
    write_gguf(gguf, TINY, random_weights(TINY), byte_tokenizer_spec(TINY.vocab_size))
    root = tmp_path / "db"
    final = database_dir(str(root), detect_unit("cpu").fingerprint.digest)
    summary = tuning.tune_kernels_command(str(gguf), str(root), widths=(1,), kinds=("o",),
                                          trials=4, progress=lambda s: None)
    assert summary["db"] == final and summary["records"] >= 1
    assert os.path.isfile(os.path.join(final, ACCEPTED_FILE))
    assert sorted(os.listdir(root)) == [os.path.basename(final)]  # no temporary left
    before = {f: Path(final, f).read_bytes() for f in (RECORD_FILE, ACCEPTED_FILE)}

    def interrupted(kernels, target, path, trials, progress):
        with open(os.path.join(path, RECORD_FILE), "a") as fh:
            fh.write("[0, [[], [], [], null], [1e-05], null, null]\n")  # a new record...
        raise KeyboardInterrupt  # ...and Ctrl-C before its verdict

    monkeypatch.setattr(tuning, "tune_kernels", interrupted)
    for db_root in (root, tmp_path / "new"):
        with pytest.raises(KeyboardInterrupt):
            tuning.tune_kernels_command(str(gguf), str(db_root), widths=(1,), kinds=("o",),
                                        trials=4, progress=lambda s: None)
    assert before == {f: Path(final, f).read_bytes() for f in before}
    assert sorted(os.listdir(root)) == [os.path.basename(final)]
    assert os.listdir(tmp_path / "new") == []  # made for the output, holding nothing


def test_tuning_registers_the_cpu_tensor_intrinsics_alone():
    """Inside ``cpu_tensor_intrinsics`` (what tuning runs in) the package import registers
    x86's and Arm's intrinsics and imports no GPU's; after it, the package is no longer the
    partial one, so a plain import runs its own ``__init__``. A fresh process: the suite's
    other tests may have imported the package whole already."""
    import subprocess
    import sys

    code = """
import sys
from hetcomp._tvm import compiler
c = compiler()
name = "tvm.s_tir.tensor_intrin"
with c.cpu_tensor_intrinsics():
    import tvm.s_tir.tensor_intrin
    c.TensorIntrin.get("dot_16x4_avx512")
    c.TensorIntrin.get("dot_4x4_i8i8s32_neon")
    print(sorted(m for m in sys.modules if m.startswith(name + ".")))
    inside = sys.modules[name]
print(sys.modules.get(name) is None, inside is not None)
"""
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr
    inside, after = out.stdout.strip().splitlines()[-2:]
    assert "cuda" not in inside and "rocm" not in inside and "x86" in inside, inside
    assert after == "True True"
