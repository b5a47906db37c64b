"""Deployable artifacts: cross builds, runtime-only loading, refusal of mismatched artifacts."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import TINY, byte_tokenizer_spec
from test_cli import assert_one_line_error, run

from hetcomp.codegen.compile import CompileOptions, compile_model
from hetcomp.frontend.weights import random_weights

RUNTIME_ONLY_CHECK = """
import json, sys
from hetcomp.runtime import generate, load_artifact
art = load_artifact(sys.argv[1])
res = generate(art, [5, 6, 7, 8], max_new_tokens=12, stop_at_eos=False)
compiler_modules = [m for m in sys.modules if m in ("tvm.relax", "tvm.s_tir", "tvm.script.parser")]
print(json.dumps({"ids": res.ids, "compiler_modules": compiler_modules}))
"""


def test_runtime_only_load_matches(tiny_artifact):
    from hetcomp.runtime import generate, load_artifact

    path, _ = tiny_artifact
    expected = generate(load_artifact(path), [5, 6, 7, 8], 12, stop_at_eos=False).ids
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    p = subprocess.run([sys.executable, "-c", RUNTIME_ONLY_CHECK, path], capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["ids"] == expected
    assert out["compiler_modules"] == []


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None,
                    reason="needs Debian's gcc-aarch64-linux-gnu (make setup installs it)")
def test_aarch64_artifact(tmp_path):
    loaded = (TINY, random_weights(TINY), byte_tokenizer_spec(TINY.vocab_size), __file__)
    compile_model(CompileOptions(model="tiny", target="aarch64"), str(tmp_path / "arm"),
                  quiet=True, weights=loaded)
    desc = subprocess.run(["file", "-b", str(tmp_path / "arm" / "lib.so")], capture_output=True,
                          text=True).stdout
    assert "ARM aarch64" in desc and "shared object" in desc
    manifest = json.loads((tmp_path / "arm" / "manifest.json").read_text())
    assert manifest["target_spec"]["mtriple"] == "aarch64-linux-gnu"
    # On this x86 machine the artifact is refused with one clear line.
    rc, _, err = run("generate", tmp_path / "arm", "--prompt-ids", "1,2")
    assert_one_line_error(rc, err, "built for aarch64")
