"""Deployable artifacts: cross builds, runtime-only loading, refusal of mismatched artifacts."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from hetcomp.driver.compile import CompileOptions, compile_model
from hetcomp.frontend.weights import random_weights
from hetcomp.testing import (
    TINY,
    assert_one_line_error,
    byte_tokenizer_spec,
    compile_tiny,
    numpy_llama,
)
from hetcomp.testing import run_cli as run

RUNTIME_ONLY_CHECK = """
import json, sys
from hetcomp.runtime import generate, load_artifact
art = load_artifact(sys.argv[1])
res = generate(art, [40, 41, 42], max_new_tokens=12, stop_at_eos=False)
compiler_modules = [m for m in sys.modules if m in ("tvm.relax", "tvm.s_tir", "tvm.script.parser")]
print(json.dumps({"ids": res.ids, "compiler_modules": compiler_modules}))
"""


def test_runtime_only_load_matches(tmp_path_factory):
    """Loaded with the TVM runtime alone, the artifact decodes the numpy model's greedy
    tokens (weights at a scale where they vary) and imports no compiler module."""
    path, weights = compile_tiny(tmp_path_factory, scale=0.3, name="deploy")
    expected = numpy_llama.greedy(TINY, weights, [40, 41, 42], 12)
    assert len(set(expected)) > 3
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
    assert manifest["cpu"] == {"arch": "aarch64", "features": ["neon"]}
    # On this x86 machine the artifact is refused with one clear line.
    rc, _, err = run("generate", tmp_path / "arm", "--prompt-ids", "1,2")
    assert_one_line_error(rc, err, "built for aarch64")


def test_artifact_records_the_cpu_extensions_its_code_may_use():
    """What LLVM enables for a target's CPU is what the artifact must find on the CPU that
    runs it: AVX2 and FMA but no AVX-512 for x86-64-v3, AVX-512 for a Skylake server."""
    from hetcomp.codegen.export import cpu_requirements
    from hetcomp.hardware import target_dict

    v3 = cpu_requirements([target_dict("x86-64-v3")])
    assert v3["arch"] == "x86_64"
    assert {"avx", "avx2", "fma", "f16c"} <= set(v3["features"])
    assert not any(f.startswith("avx512") for f in v3["features"])
    assert cpu_requirements([target_dict("x86-64")])["features"] == []  # SSE2 is x86-64's
    skx = cpu_requirements([{"kind": "llvm", "mtriple": "x86_64-linux-gnu",
                             "mcpu": "skylake-avx512"}])
    assert {"avx512f", "avx512bw", "avx512vl"} <= set(skx["features"])
    # A GPU target's host code runs on the CPU: its features are the host's.
    assert cpu_requirements([target_dict("cuda")]) == v3


def test_artifact_for_a_richer_cpu_is_refused_in_one_line(tmp_path, tiny_artifact):
    """An artifact whose code uses an extension this CPU lacks would die with SIGILL at its
    first such instruction: it is refused at load, in one line naming the extension."""
    import platform

    from hetcomp.testing import edit_manifest, lacking_cpu_feature

    lacking = lacking_cpu_feature()
    if lacking is None:
        pytest.skip("this CPU has every extension the loader knows (or its flags are unknown)")
    path = str(tmp_path / "art")
    shutil.copytree(tiny_artifact[0], path)
    with open(os.path.join(path, "manifest.json")) as fh:
        own = json.load(fh)["cpu"]
    assert own["arch"] == platform.machine() and own["features"]  # a host build records some
    rc, _, err = run("generate", path, "--prompt-ids", "1,2", "--max-new-tokens", "2")
    assert rc == 0, err
    edit_manifest(path, lambda m: m["cpu"]["features"].append(lacking))
    rc, _, err = run("generate", path, "--prompt-ids", "1,2", "--max-new-tokens", "2")
    assert_one_line_error(rc, err, f"CPU features this machine lacks ({lacking})")


def test_cpu_flags_are_read_for_the_machine_s_own_architecture(tmp_path):
    """/proc/cpuinfo names x86 extensions on its "flags" line and ARM ones on "Features";
    under qemu-user an aarch64 process sees the x86 host's file: unknown, not "lacking"."""
    from hetcomp.hardware import machine_cpu_flags, missing_cpu_features

    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma f16c\n\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 asimdhp\n")
    assert machine_cpu_flags(str(x86), "x86_64") == {"fpu", "sse2", "avx", "avx2", "fma",
                                                     "f16c"}
    assert machine_cpu_flags(str(arm), "aarch64") >= {"asimd", "asimdhp"}
    assert machine_cpu_flags(str(x86), "aarch64") is None
    assert machine_cpu_flags(str(tmp_path / "none"), "x86_64") is None
    flags = machine_cpu_flags(str(x86), "x86_64")
    assert missing_cpu_features(["avx2", "avx512f", "avx512vnni"], "x86_64", flags) == [
        "avx512f", "avx512vnni"]
    assert missing_cpu_features(["neon", "dotprod"], "aarch64",
                                machine_cpu_flags(str(arm), "aarch64")) == ["dotprod"]
    assert missing_cpu_features(["avx512f"], "x86_64", None) == []


def test_separate_weights_attach_where_it_runs(tmp_path):
    """An artifact compiled without params.bin gets it rebuilt from the model file (and the
    heads file, by default the one compile read), byte-identical to the embedded weights,
    split per unit as the plan says."""
    import numpy as np

    from hetcomp.hardware import target_dict
    from hetcomp.plan import HeteroPlan
    from hetcomp.runtime import attach_weights, generate, load_artifact
    from hetcomp.speculative.medusa import MedusaHeads
    from hetcomp.testing.gguf_writer import write_gguf

    gguf = tmp_path / "tiny.gguf"
    write_gguf(gguf, TINY, random_weights(TINY), byte_tokenizer_spec(TINY.vocab_size))
    rng = np.random.default_rng(1)
    e = TINY.hidden_size
    heads = MedusaHeads(rng.standard_normal((2, e, e)).astype("float16").astype("float32") * 0.1,
                        rng.standard_normal((2, e)).astype("float32"), np.full((2, 10), 0.1), {},
                        None, rng.standard_normal((2, e, e)).astype("float16").astype("float32"))
    heads.save(str(tmp_path / "heads.npz"))
    host = target_dict("host")
    plan = HeteroPlan(targets=(host, host), ratios=(("gate_up", 0.5), ("qkv", 0.25)))
    common = dict(model=str(gguf), max_context=64, heads=str(tmp_path / "heads.npz"), plan=plan,
                  widths=(1, 4))
    compile_model(CompileOptions(**common), str(tmp_path / "full"), quiet=True)
    compile_model(CompileOptions(**common, separate_weights=True), str(tmp_path / "lean"),
                  quiet=True)
    assert not (tmp_path / "lean" / "params.bin").exists()
    rc, _, err = run("generate", tmp_path / "lean", "--prompt-ids", "1,2")
    assert_one_line_error(rc, err, "attach-weights")
    # The wrong model file is refused; nothing is left behind.
    other = tmp_path / "other.gguf"
    write_gguf(other, TINY, random_weights(TINY, seed=5), byte_tokenizer_spec(TINY.vocab_size))
    rc, _, err = run("attach-weights", tmp_path / "lean", "--model", other,
                     "--heads", tmp_path / "heads.npz")
    assert_one_line_error(rc, err, "differ")
    assert sorted(os.listdir(tmp_path / "lean")) == ["lib.so", "manifest.json", "tokenizer.json"]
    # (no --heads: the heads compile read, found where it read them, their sha256 checked)
    attach_weights(str(tmp_path / "lean"), quiet=True, model=str(gguf))
    assert ((tmp_path / "lean" / "params.bin").read_bytes()
            == (tmp_path / "full" / "params.bin").read_bytes())
    modes = [(tmp_path / d / "params.bin").stat().st_mode & 0o777 for d in ("full", "lean")]
    assert modes[0] == modes[1]  # the umask's, not the temporary's 0600
    ids = [generate(load_artifact(str(tmp_path / d)), [5, 6, 7], 10, stop_at_eos=False,
                    width=4).ids for d in ("full", "lean")]
    assert ids[0] == ids[1]


def test_a_gpu_artifact_where_there_is_no_gpu_says_so(tmp_path, cli):
    """On a machine without a GPU (this one, CI) a cuda artifact is refused in one line naming
    the missing device, not TVM's 'loader of that name is not registered' for its library."""
    from hetcomp import _tvm
    from hetcomp.testing import compile_tiny_cuda

    if _tvm.device("cuda", 0).exist:
        pytest.skip("this machine has a GPU")
    compile_tiny_cuda(str(tmp_path / "cu"))
    rc, _, err = cli("generate", tmp_path / "cu", "--prompt-ids", "1,2", "--max-new-tokens", 2)
    assert_one_line_error(rc, err, "lacks a device the artifact needs: cuda:0 (no GPU")
