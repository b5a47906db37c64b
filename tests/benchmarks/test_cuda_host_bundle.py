"""benchmarks/cuda_host/bundle.py splits the model file into parts that each fit a device
call beside the working tree, also when the folder holds an earlier bundle."""

import importlib.util
import os
import pathlib

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "cuda_host",
                     "bundle.py")
_spec = importlib.util.spec_from_file_location("cuda_host_bundle", _PATH)
bundle_py = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bundle_py)


def _parts(out):
    found = sorted((int(f.removeprefix("gguf.part")), os.path.join(r, f))
                   for r, _, fs in os.walk(out) for f in fs if f.startswith("gguf.part"))
    return [p for _, p in found]


def test_parts_fit_the_calls_and_replace_an_earlier_bundle(tmp_path, monkeypatch):
    import hetcomp.frontend

    gguf = tmp_path / "m.gguf"
    data = os.urandom(10_000)
    gguf.write_bytes(data)
    monkeypatch.setattr(hetcomp.frontend, "default_gguf_path", lambda: str(gguf))
    monkeypatch.setattr(bundle_py, "CALL_BYTES", 4_000)
    monkeypatch.setattr(bundle_py, "MARGIN_BYTES", 200)  # room for bundle.json
    monkeypatch.setattr(bundle_py, "_tree_bytes", lambda: 500)
    out = tmp_path / "dev"
    (out / "a").mkdir(parents=True)
    (out / "a" / "payload.tar.xz").write_bytes(b"x" * 1_000)  # the runtime and artifacts
    for stale in ("a/gguf.part0", "b/gguf.part1", "e/gguf.part4"):  # an earlier bundle
        (out / stale).parent.mkdir(exist_ok=True)
        (out / stale).write_bytes(b"s" * 3_000)
    bundle_py._gguf_parts(str(out), ["gpu"])
    parts = _parts(out)
    assert b"".join(pathlib.Path(p).read_bytes() for p in parts) == data
    assert [os.path.basename(os.path.dirname(p)) for p in parts] == ["a", "b", "c", "d"]
    for d in ("a", "b", "c", "d"):  # each folder within a call beside the tree: 3500 bytes
        assert sum(f.stat().st_size for f in (out / d).iterdir()) <= 3_500
    # A first call that cannot hold even the runtime is refused, not split into nonsense.
    (out / "a" / "payload.tar.xz").write_bytes(b"x" * 4_000)
    with pytest.raises(SystemExit, match="more than a call"):
        bundle_py._gguf_parts(str(out), ["gpu"])


def test_the_artifacts_read_float16_and_the_gpu_one_uses_tensor_cores(tmp_path):
    """Every artifact of the bundle is built in its ``--dtype`` (float16 by default) for its
    ``--cuda-arch``, and each GPU variant differs from ``gpu`` in the one option it measures.
    The bundle used to build every artifact in float32: the tensor-core rule takes only
    float16 linears, so ``gpu`` and ``gpu-notc`` were the same build and the GPU read twice
    the bytes a step. The ``gpu`` options, applied to the tiny model, put its 64-row linears
    on the tensor cores."""
    import dataclasses

    from hetcomp.testing import compile_tiny_cuda

    builds = bundle_py.artifact_builds("sm_87", 512)  # the default --dtype
    assert set(builds) == {"cpu", "gpu", "gpu-nograph", "gpu-unfused", "gpu-notc",
                           "split-all", "split-half", "gpu-q4_1", "cpu-q4_1"}
    assert {o.dtype for n, o in builds.items() if "q4_1" not in n} == {"float16"}
    assert {o.cuda_arch for o in builds.values()} == {"sm_87"}
    gpu = builds["gpu"]

    def differ(a, b):
        return {f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)}

    for name, field in (("gpu-nograph", "cuda_graph"), ("gpu-unfused", "fuse_linears"),
                        ("gpu-notc", "tensor_cores")):
        assert differ(gpu, builds[name]) == {field}, name
    # The packaged file's own format beside them: the gpu build in q4_1, and its reference,
    # the cpu build in q4_1 with float activations (as the GPU's quantized kernels). A
    # bundle built in q4_1 has no second pair.
    assert differ(gpu, builds["gpu-q4_1"]) == {"dtype"} and builds["gpu-q4_1"].dtype == "q4_1"
    assert differ(builds["cpu"], builds["cpu-q4_1"]) == {"dtype", "int8_dot"}
    assert builds["cpu-q4_1"].int8_dot is False
    assert not {"gpu-q4_1", "cpu-q4_1"} & set(bundle_py.artifact_builds("sm_87", 512, "q4_1"))
    manifest = compile_tiny_cuda(str(tmp_path / "gpu"), dtype=gpu.dtype,
                                 tensor_cores=gpu.tensor_cores, cuda_arch=gpu.cuda_arch)
    assert "gpu.TensorCoreLinear" in {k["rule"] for k in manifest["kernels"]}


def test_the_artifacts_decode_at_every_width_the_run_measures(tmp_path):
    """run.py decodes and times each artifact at GEN_WIDTHS and STEP_WIDTHS: each must be a
    width the bundle's artifacts decode. The bundle compiled widths 1-16 and a verify
    function for 64 rows, so the run's W = 64 was refused ("width 64 is not available") at
    the first artifact's warm-up, and call 3 would have returned nothing (the rehearsal in
    `make device-kit` found it). The tiny model compiled with the bundle's widths decodes
    at every one of them."""
    from hetcomp.frontend.weights import random_weights
    from hetcomp.runtime import load_artifact
    from hetcomp.runtime.generate import check_decoding
    from hetcomp.testing import TINY, byte_tokenizer_spec, compile_with_random_heads
    from hetcomp.testing.gguf_writer import write_gguf

    spec = importlib.util.spec_from_file_location(
        "cuda_host_run", os.path.join(os.path.dirname(_PATH), "run.py"))
    run_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_py)
    builds = bundle_py.artifact_builds("sm_90", 512)
    measured = {*run_py.GEN_WIDTHS, *run_py.STEP_WIDTHS, *run_py.BREAKDOWN_WIDTHS}
    assert {tuple(o.widths) for o in builds.values()} == {bundle_py.WIDTHS}
    write_gguf(tmp_path / "tiny.gguf", TINY, random_weights(TINY, seed=2),
               byte_tokenizer_spec(TINY.vocab_size))
    art = load_artifact(compile_with_random_heads(tmp_path, str(tmp_path / "tiny.gguf"), TINY,
                                                  bundle_py.WIDTHS, heads=3))
    for w in sorted(measured):
        check_decoding(art, 8, w)  # refuses a width the artifact cannot decode


def test_the_profile_kit_measures_every_width_the_run_times():
    """report.py predicts each artifact's step at every width run.py times from the kit's
    profile. The quick kit profiled W = 1 and 16 only: the rehearsal's cpu predictions were
    -23% to +67% off at W = 1-64 (the fitted trees are piecewise constant in W between the
    widths they saw), -12% to +0% with the decoded widths profiled."""
    spec = importlib.util.spec_from_file_location(
        "cuda_host_run", os.path.join(os.path.dirname(_PATH), "run.py"))
    run_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_py)
    timed = {*run_py.STEP_WIDTHS, *run_py.BREAKDOWN_WIDTHS, *run_py.GEN_WIDTHS}
    for quick in (True, False):
        assert timed <= set(bundle_py.profile_options(quick).widths), quick
    assert bundle_py.profile_options(True).mode == "quick"
