"""The one build path: every kernel of every unit is scheduled by a named rule."""

import dataclasses
import json
import shutil

import pytest

from hetcomp import _tvm
from hetcomp.codegen.build import CUDA_GRAPH_OPTION
from hetcomp.driver.compile import CompileOptions, compile_model
from hetcomp.frontend.llama import build_module
from hetcomp.frontend.weights import random_weights
from hetcomp.hardware import target_dict
from hetcomp.passes.pipeline import scheduling_pipeline, vm_lowering_pipeline
from hetcomp.plan import HeteroPlan, load_plan, unit_target
from hetcomp.schedules.apply import RULE_ATTR
from hetcomp.testing import TINY, byte_tokenizer_spec

c = _tvm.compiler()
HOST = target_dict("host")
CPU_HOSTED = HeteroPlan(units=("cpu", "cuda"), targets=(HOST, unit_target("cuda", False)),
                        ratios=(("default", 0.5), ("lm_head", 1.0)), dense_attention=1)
GPU_HOSTED = HeteroPlan(units=("cuda", "cpu"), targets=(unit_target("cuda", True, "cuda"),
                                                        unit_target("cpu", False, "cuda")),
                        ratios=(("default", 0.37),), dense_attention=0, sparse_attention=1)
TWO_CPUS = HeteroPlan(targets=(HOST, HOST), ratios=(("default", 0.5),), sparse_attention=1)


@pytest.mark.parametrize("target,plan", [
    (HOST, None), (target_dict("cuda"), None), (HOST, TWO_CPUS), (HOST, CPU_HOSTED),
    (GPU_HOSTED.targets[0], GPU_HOSTED)], ids=["host", "cuda", "two-cpus", "cpu-hosted",
                                              "gpu-hosted"])
def test_every_kernel_is_scheduled_by_a_rule(target, plan):
    mod = build_module(TINY, "float32", 2, static_widths=(4,))
    _check_scheduled(mod, target, plan)


def test_every_kernel_of_the_cuda_graph_build_is_scheduled():
    """The build for CUDA graphs (device_len) adds script kernels (copies, tree attention):
    each has its GPU form, and every other kernel a GPU rule."""
    mod = build_module(TINY, "float16", 2, static_widths=(1, 4), kv_dtype="float16",
                       device_len=True)
    _check_scheduled(mod, target_dict("cuda"), None)


@pytest.mark.parametrize("target", ["host", "aarch64", "cuda"])
def test_qwen2_kernels_are_scheduled_on_every_target(target):
    """Qwen2's extra kernel (the q/k/v bias) is scheduled by a rule of every target."""
    cfg = dataclasses.replace(TINY, qkv_bias=True)
    mod = build_module(cfg, "float16", 2, static_widths=(1, 4), kv_dtype="float16")
    assert any("bias_add" in gv.name_hint for gv in mod.get_global_vars())
    _check_scheduled(mod, target_dict(target), None)


def _check_scheduled(mod, target, plan):
    target = c.Target(target)
    with target:  # as tvm.compile runs its relax_pipeline
        mod = scheduling_pipeline(target, plan)(mod)
    kernels = {gv.name_hint: f for gv, f in mod.functions_items()
               if isinstance(f, c.tir.PrimFunc)}
    missing = [n for n, f in kernels.items() if f.attrs is None or RULE_ATTR not in f.attrs]
    assert kernels and not missing, missing
    # Each kernel by the rules of its own target (a unit's kernels carry theirs where it is
    # not the build's), both units' rules in a plan with two kinds.
    own = {"llvm": ("cpu.", "x86.", "arm.", "llvm.", "script."),
           "cuda": ("gpu.", "dlight.gpu.", "tvm.", "script.")}
    kinds = set()
    for n, f in kernels.items():
        kind = (f.attrs.get("target") or target).kind.name
        kinds.add(kind)
        assert str(f.attrs[RULE_ATTR]).startswith(own[kind]), (n, kind, f.attrs[RULE_ATTR])
    if plan is not None:
        assert kinds == {t["kind"] for t in plan.targets}


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None,
                    reason="needs the aarch64 cross linker")
def test_spec_estimate_plan_builds_an_orin_artifact(tmp_path, cli):
    """`tune --units orin-nx` (in-process: ``cli``) prints a spec-estimate plan; `compile
    --plan` of it builds an aarch64 + CUDA sm_87 artifact for the board, whose manifest says
    the plan is an estimate."""
    rc, _, err = cli("tune", "--units", "orin-nx", "-o", tmp_path / "t")
    assert rc == 0, err
    written = json.loads((tmp_path / "t" / "plan.json").read_text())
    assert written["source"] == "spec-estimate" and written["shared_memory"]
    assert written["contention"]["enabled"]
    plan = load_plan(str(tmp_path / "t" / "plan.json"), "aarch64", "sm_87")
    assert plan.source == "spec-estimate" and plan.shared_memory
    weights = (TINY, random_weights(TINY, seed=3), byte_tokenizer_spec(TINY.vocab_size), "t")
    compile_model(CompileOptions(model="tiny", target="aarch64", cuda_arch="sm_87", plan=plan,
                                 max_context=64), str(tmp_path / "a"), quiet=True,
                  weights=weights)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["plan_source"] == "spec-estimate"
    arch = {u["name"]: u["target"].get("arch") for u in manifest["units"]}
    assert arch == {"orin-nx-cpu": None, "orin-nx-gpu": "sm_87"}
    lib = (tmp_path / "a" / "lib.so").read_bytes()
    assert lib[:4] == b"\x7fELF" and int.from_bytes(lib[18:20], "little") == 0xB7  # aarch64
    assert b"__global__" in lib  # the GPU share's CUDA source, compiled where it loads


def test_gpu_hosted_plan_compiles_without_a_gpu(tmp_path):
    """`compile --target cuda --plan` of a GPU-hosted plan: unsplit ops and the KV cache on
    the GPU (unit 0), the CPU share's kernels compiled for the CPU in the same library."""
    weights = (TINY, random_weights(TINY, seed=3), byte_tokenizer_spec(TINY.vocab_size), "t")
    compile_model(CompileOptions(model="tiny", target="cuda", plan=GPU_HOSTED, max_context=64),
                  str(tmp_path / "g"), quiet=True, weights=weights)
    manifest = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert [u["device"] for u in manifest["units"]] == ["cuda", "cpu"]
    assert manifest["kv_unit"] == 0 and manifest["target_spec"]["kind"] == "cuda"
    assert manifest["param_units"]["layers_0_wqkv__u1"] == 1
    lib = (tmp_path / "g" / "lib.so").read_bytes()
    assert b"__global__" in lib and b"rope_kv" in lib  # GPU kernels, the GPU's RoPE
    assert b"linear_n32_k64__llvm" in lib  # the CPU share, its own CPU kernel


def test_cuda_artifact_captures_cuda_graphs(tmp_path):
    """`compile --target cuda` replays each verify step and each static prompt chunk as one
    CUDA graph from the first layer to the final norm, the same graph for every cache length: the kernels read the
    length on the device and the copied tree inputs, the caches are fixed (one pair per
    artifact, manifest ``fixed_cache``). Only the kernels that read the call's arguments
    (the copy, the embedding) or write its outputs (final norm, LM head, argmax) launch on
    their own. `--no-cuda-graph` launches every kernel and reads the length from the call."""
    from hetcomp.codegen.build import launch_counts

    weights = (TINY, random_weights(TINY, seed=3), byte_tokenizer_spec(TINY.vocab_size), "t")
    compile_model(CompileOptions(model="tiny", target="cuda", dtype="float16", max_context=64,
                                 verify_widths=(4,)), str(tmp_path / "g"), quiet=True,
                  weights=weights)
    manifest = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert manifest["cuda_graph"] is True and manifest["fixed_cache"] is True
    # Costed on the GPU datasheet (hopper-gpu for sm_90), the hand-written kernels too: their
    # GPU versions keep AnnotateCost's attribute.
    script = [k for k in manifest["kernels"] if (k["rule"] or "").startswith("script.")]
    assert {k["name"] for k in script} >= {"stage_tree", "tree_attention"}
    assert "rope_kv" not in {k["name"] for k in script}  # RoPE inside tree_attention
    assert all(k["predicted_us"] for k in script), script
    launches = manifest["launches"]
    assert set(launches) == {"prefill_w64", "verify_w1", "verify_w4"}
    for name in ("verify_w1", "verify_w4"):
        assert launches[name]["graphs"] == 1 and launches[name]["launches"] == 6, launches
    # A prompt chunk too, plus the gather of its last prompt row (outside: it reads `rows`).
    assert (launches["prefill_w64"]["graphs"], launches["prefill_w64"]["launches"]) == (1, 7)
    assert b"vm.builtin.cuda_graph.run_or_capture" in (tmp_path / "g" / "lib.so").read_bytes()
    compile_model(CompileOptions(model="tiny", target="cuda", dtype="float16", max_context=64,
                                 cuda_graph=False), str(tmp_path / "n"), quiet=True,
                  weights=weights)
    manifest = json.loads((tmp_path / "n" / "manifest.json").read_text())
    assert manifest["cuda_graph"] is False and manifest["fixed_cache"] is False

    # Four layers, the same six launches: one graph holds every layer.
    cfg = dataclasses.replace(TINY, num_layers=4)
    mod = build_module(cfg, "float16", 0, static_widths=(1, 4), kv_dtype="float16",
                       device_len=True, prefill_chunk=64)
    target = c.Target(target_dict("cuda"))
    with target:
        mod = scheduling_pipeline(target)(mod)
    without = launch_counts(mod, False, ("verify_w1", "verify_w4"))
    with_graphs = launch_counts(mod, True, ("verify_w1", "verify_w4"))
    for name in without:
        assert without[name]["graphs"] == 0
        assert without[name]["launches"] == without[name]["kernels"]
        assert with_graphs[name]["kernels"] == without[name]["kernels"]  # the same kernels
        assert (with_graphs[name]["launches"], with_graphs[name]["graphs"]) == (6, 1)
    # No capture is keyed by a symbolic value (the cache length): one graph for every length.
    with c.transform.PassContext(config={CUDA_GRAPH_OPTION: True}):
        low = vm_lowering_pipeline()(mod)
    run = c.Op.get("relax.call_builtin_with_ctx")
    keyed = []

    def visit(e):
        if isinstance(e, c.relax.Call) and e.op.same_as(run) and str(
                e.args[0].global_symbol) == "vm.builtin.cuda_graph.run_or_capture":
            keyed.append(len(e.args[1].fields) > 3)  # (func, args, index[, shape key])

    c.relax.analysis.post_order_visit(low["verify_w4"].body, visit)
    assert keyed == [False]
    keyed.clear()  # nor by a chunk's row count: one prefill graph for every prompt tail
    c.relax.analysis.post_order_visit(low["prefill_w64"].body, visit)
    assert keyed == [False]
    # The Medusa draft: its inputs copied, the heads replay as one graph; the LM head, the
    # top-k and the next tree's tokens write the call's outputs.
    drafted = build_module(cfg, "float16", 2, static_widths=(1,), kv_dtype="float16",
                           device_len=True)
    with target:
        drafted = scheduling_pipeline(target)(drafted)
    draft = launch_counts(drafted, True, ("medusa",))["medusa"]
    # Six kernels: the copy, the heads stacked in one linear, their activation (these two
    # are the graph), LM head, top-k, tree tokens; one linear for every head, no concat.
    assert (draft["launches"], draft["graphs"], draft["kernels"]) == (5, 1, 6)
    # Without device_len (the CPU build's module) the layers' cache kernels stay outside.
    plain = build_module(cfg, "float16", 0, static_widths=(1,), kv_dtype="float16")
    with target:
        plain = scheduling_pipeline(target)(plain)
    assert launch_counts(plain, True, ("verify_w1",))["verify_w1"]["launches"] > 4 * 2


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit)")
@pytest.mark.parametrize("arch", ["sm_87", "sm_90"])
@pytest.mark.parametrize("dtype", ["float16", "q4_1"])
def test_cuda_kernels_compile_for_orin_and_hopper(tmp_path, arch, dtype):
    """Every GPU kernel of a model (float16 or q4_1 blocks, fused linears, CUDA graphs, W = 1
    and 4, the Medusa draft) compiles with nvcc for Jetson Orin (sm_87) and H100/H200
    (sm_90): what a GPU host does when it loads the artifact, done here without one."""
    import subprocess

    from hetcomp.codegen.build import build, cuda_source

    mod = build_module(TINY, dtype, 2, static_widths=(1, 4), kv_dtype="float16",
                       medusa_root=True, draft_dtype="float16")
    src = cuda_source(build(mod, target_dict("cuda", arch), cuda_graph=True))
    assert src.count("__global__") > 20
    (tmp_path / "k.cu").write_text(src)
    out = subprocess.run(["nvcc", "--fatbin", "-O3", f"-arch={arch}", "-o",
                          str(tmp_path / "k.fatbin"), str(tmp_path / "k.cu")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "k.fatbin").stat().st_size > 0


def test_cuda_source_is_compiled_for_the_loading_artifact_s_gpu(tmp_path, monkeypatch,
                                                                 tiny_artifact):
    """The runtime compiles a library's CUDA source while loading it, through one process-
    wide callback: each artifact is loaded under its own architecture (sm_87 here, a
    Jetson's GPU unit as its manifest names it), and the next load is not compiled for it."""
    from hetcomp.errors import HetcompError
    from hetcomp.runtime import load_artifact
    from hetcomp.testing import edit_manifest

    art = tmp_path / "orin"
    shutil.copytree(tiny_artifact[0], art)
    edit_manifest(str(art), lambda m: m.update(units=[{
        "name": "orin-nx-gpu", "device": "cuda", "device_id": 0,
        "target": {"kind": "cuda", "arch": "sm_87"}}]))
    monkeypatch.delenv("HETCOMP_CUDA_ARCH", raising=False)
    seen = []

    def load_module(path):  # no GPU here: note the architecture the source would get
        seen.append(_tvm.loading_cuda_arch())
        raise RuntimeError("no CUDA driver")

    monkeypatch.setattr(_tvm, "device", lambda kind, index=0: _tvm.cpu())
    monkeypatch.setattr(_tvm, "load_module", load_module)
    with pytest.raises(HetcompError, match="cannot load artifact library"):
        load_artifact(str(art), verify=False)
    assert seen == ["sm_87"] and _tvm.loading_cuda_arch() == "sm_90"
    monkeypatch.setenv("HETCOMP_CUDA_ARCH", "sm_89")  # an explicit choice still wins
    with _tvm.cuda_arch("sm_87"):
        assert _tvm.loading_cuda_arch() == "sm_89"


def _tiny_gguf(tmp_path):
    from hetcomp.testing.gguf_writer import write_gguf

    path = tmp_path / "tiny.gguf"
    write_gguf(path, TINY, random_weights(TINY, seed=0), byte_tokenizer_spec(TINY.vocab_size))
    return path


def test_bare_plan_builds_for_the_flags_target(tmp_path, cli):
    """A bare HeteroPlan's units get the targets of --target (its own, which named no CPU,
    were built instead: x86 objects linked for aarch64, a manifest without x86-64-v3)."""
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"units": ["cpu", "cpu:1"], "ratios": {"default": 0.5},
                                "targets": [{"kind": "llvm"}, {"kind": "llvm"}]}))
    rc, _, err = cli("compile", "--model", _tiny_gguf(tmp_path), "--max-context", 64, "--plan",
                     plan, "--target", "x86-64-v3", "--quiet", "-o", tmp_path / "a")
    assert rc == 0, err
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    v3 = target_dict("x86-64-v3")
    assert manifest["target_spec"] == v3
    assert [u["target"] for u in manifest["units"]] == [v3, v3]


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None,
                    reason="needs the aarch64 cross linker")
@pytest.mark.parametrize("units, flags, arch", [
    ("orin-nx", ("--target", "aarch64"), {None}),  # a tiny model plans the CPU alone
    ("orin-nx-gpu", ("--target", "aarch64", "--cuda-arch", "sm_87"), {"sm_87"})])
def test_one_unit_orin_plans_compile_as_their_refusals_say(tmp_path, cli, units, flags, arch):
    """`tune --units orin-nx` of a tiny model plans the board's CPU alone, and `tune --units
    orin-nx-gpu` its GPU alone: each compiles with the flags compile's refusal names (they
    asked for --cuda-arch with a CPU plan, then refused it, and --target cuda for a GPU
    plan, then asked for --target aarch64); the GPU plan's every kernel on the GPU, driven
    by the board's CPU."""
    gguf = _tiny_gguf(tmp_path)
    rc, _, err = cli("tune", "--model", gguf, "--units", units, "-o", tmp_path / "t")
    assert rc == 0, err
    plan = tmp_path / "t" / "plan.json"
    assert len(json.loads(plan.read_text())["units"]) == 1
    rc, _, err = cli("compile", "--model", gguf, "--max-context", 64, "--plan", plan, "-o",
                     tmp_path / "a")
    assert rc == 2 and f"compile it with {' '.join(flags)}" in err, err
    rc, _, err = cli("compile", "--model", gguf, "--max-context", 64, "--plan", plan, *flags,
                     "--quiet", "-o", tmp_path / "a")
    assert rc == 0, err
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert {u.get("target", manifest["target_spec"]).get("arch")
            for u in manifest["units"][:1]} == arch
    assert manifest["plan_source"] == "spec-estimate"
    if arch == {"sm_87"}:
        assert {k["unit"] for k in manifest["kernels"]} == {"orin-nx-gpu"}
    lib = (tmp_path / "a" / "lib.so").read_bytes()
    assert int.from_bytes(lib[18:20], "little") == 0xB7  # aarch64


def test_arch_specific_cuda_arch_builds_as_its_base(tmp_path):
    """--cuda-arch sm_90a (H100's arch-specific features) is planned and scheduled as sm_90:
    the same roofline, default width and tensor-core kernels (it had no roofline, so W = 1,
    and no tensor cores); nvcc still gets sm_90a."""
    import numpy as np

    from hetcomp.driver.compile import target_roofline
    from hetcomp.speculative.medusa import MedusaHeads
    from hetcomp.testing import compile_tiny_cuda

    assert target_roofline("cuda", "sm_90a") == target_roofline("cuda", "sm_90")
    assert target_roofline("cuda", "sm_100a") is None
    rng = np.random.default_rng(0)
    e = TINY.hidden_size
    MedusaHeads(rng.normal(size=(2, e, e)).astype(np.float32) * 0.01,
                np.zeros((2, e), np.float32), np.tile(np.linspace(0.5, 0.05, 10), (2, 1)),
                {}).save(str(tmp_path / "h.npz"))
    built = {arch: compile_tiny_cuda(str(tmp_path / arch), cuda_arch=arch,
                                     heads=str(tmp_path / "h.npz"))
             for arch in ("sm_90", "sm_90a")}
    base, specific = built["sm_90"], built["sm_90a"]
    assert specific["target_spec"]["arch"] == "sm_90a"
    assert "hopper-gpu" in specific["default_width_source"]
    assert specific["default_width"] == base["default_width"]
    rules = {a: sorted((k["function"], k["name"], k["rule"]) for k in m["kernels"])
             for a, m in built.items()}
    assert rules["sm_90a"] == rules["sm_90"]
    assert any(r == "gpu.TensorCoreLinear" for _, _, r in rules["sm_90a"])


def test_compile_options_refuse_a_plan_for_another_cpu_or_gpu():
    """A HeteroPlan given through the API is checked against the target it is linked for
    (x86 units built and then linked with the aarch64 linker failed after the whole build;
    an invalid GPU architecture failed in TVM as a traceback)."""
    from hetcomp.errors import HetcompError

    with pytest.raises(HetcompError, match="runs on x86_64, but --target aarch64 links for"):
        CompileOptions(model="tiny", target="aarch64", plan=dataclasses.replace(
            TWO_CPUS, targets=(target_dict("x86-64-v3"),) * 2))
    bad_gpu = dataclasses.replace(CPU_HOSTED, targets=(HOST, {"kind": "cuda", "arch": "sm_zz"}))
    with pytest.raises(HetcompError, match="'sm_zz' is not an NVIDIA GPU architecture"):
        CompileOptions(model="tiny", plan=bad_gpu)
    CompileOptions(model="tiny", plan=CPU_HOSTED)  # this machine's CPU driving a GPU
    CompileOptions(model="tiny", target="cuda", plan=GPU_HOSTED)
