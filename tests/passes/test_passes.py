"""Relax passes: registered names, structural before/after, and numerics of partitioned models."""

import json

import numpy as np
import pytest
from tvm.script import ir as I
from tvm.script import relax as R

from hetcomp import _tvm
from hetcomp.driver.compile import CompileOptions, compile_model
from hetcomp.hardware import target_dict
from hetcomp.kernels import ops
from hetcomp.passes import (
    AnnotateCost,
    FuseLinearChains,
    OrderForOverlap,
    PartitionHetero,
    ScheduleUnits,
)
from hetcomp.passes.partition_hetero import plan_vdevices
from hetcomp.plan import HeteroPlan
from hetcomp.runtime import load_artifact
from hetcomp.testing import TINY, assert_matches_reference

c = _tvm.compiler()
relax, tt = c.relax, c.TensorType
HOST = target_dict("host")


@pytest.mark.parametrize("cls,args", [
    (PartitionHetero, (HeteroPlan(),)), (OrderForOverlap, ()),
    (AnnotateCost, (lambda u, op: 0.0, ("cpu",))), (ScheduleUnits, ({"kind": "llvm"},)),
    (FuseLinearChains, ())])
def test_pass_name_equals_class_name(cls, args):
    assert cls(*args).info.name == cls.__name__


def _linear_module(ratio_plan=None):
    """f(x[w, 64], W[2, 64, 32]) = linear(x, W) as our model emits it."""
    bb = relax.BlockBuilder()
    gv = bb.add_func(ops.linear(64, 64, "float32").with_attr("global_symbol", "linear_n64_k64"),
                     "linear_n64_k64")
    w = c.tir.Var("w", "int64")
    x = relax.Var("x", tt((w, 64), "float32"))
    weight = relax.Var("layers_0_wqkv", tt((2, 64, 32), "float32"))
    with bb.function("f", [x, weight]):
        with bb.dataflow():
            y = bb.emit_output(relax.call_tir(gv, [x, weight], tt((w, 64), "float32")))
        bb.emit_func_output(y)
    return bb.finalize()


def test_partition_linear_structure():
    plan = HeteroPlan(targets=(HOST, HOST), ratios=(("qkv", 0.5),))
    after = PartitionHetero(plan)(_linear_module())
    v0, v1 = plan_vdevices(plan)

    bb = relax.BlockBuilder()
    bb.add_func(ops.linear(64, 64, "float32").with_attr("global_symbol", "linear_n64_k64"),
                "linear_n64_k64")
    half = bb.add_func(ops.linear(32, 64, "float32").with_attr("global_symbol",
                                                                "linear_n32_k64"),
                       "linear_n32_k64")
    w = c.tir.Var("w", "int64")
    x = relax.Var("x", tt((w, 64), "float32"))
    w0 = relax.Var("layers_0_wqkv__u0", tt((1, 64, 32), "float32", v0))
    w1 = relax.Var("layers_0_wqkv__u1", tt((1, 64, 32), "float32", v1))
    split = json.dumps({"layers_0_wqkv__u0": ["layers_0_wqkv", 0, 1],
                        "layers_0_wqkv__u1": ["layers_0_wqkv", 1, 2]})
    with bb.function("f", [x, w0, w1], attrs={"hetcomp.param_split": split}):
        with bb.dataflow():
            y0 = bb.emit(relax.call_tir(half, [x, w0], tt((w, 32), "float32", v0)))
            x1 = bb.emit(relax.op.to_vdevice(x, v1))
            y1 = bb.emit(relax.call_tir(half, [x1, w1], tt((w, 32), "float32", v1)))
            y1 = bb.emit(relax.op.to_vdevice(y1, v0))
            y = bb.emit_output(relax.op.concat([y0, y1], axis=1))
        bb.emit_func_output(y)
    expected = bb.finalize()
    expected.update_global_info("vdevice", [v0, v1])
    c.assert_structural_equal(after, expected)


def test_partition_ratio_zero_keeps_the_graph():
    plan = HeteroPlan(targets=(HOST, HOST), ratios=(("default", 0.0),))
    before = _linear_module()
    after = PartitionHetero(plan)(before)
    c.assert_structural_equal(after["f"], before["f"])
    assert len(after.global_infos["vdevice"]) == 2


def test_partition_shared_memory_still_copies():
    """Units that share DRAM are still two devices to TVM: a crossing is a copy."""
    plan = HeteroPlan(targets=(HOST, HOST), ratios=(("default", 0.5),), shared_memory=True)
    text = PartitionHetero(plan)(_linear_module())["f"].script()
    assert "to_vdevice" in text and text.count("linear_n32_k64") == 2


@I.ir_module
class OverlapBefore:
    I.module_global_infos({"vdevice": [I.vdevice("llvm", 0), I.vdevice("cuda", 0)]})

    @R.function
    def main(x: R.Tensor((4, 4), "float32"), y: R.Tensor((4, 4), "float32", "cuda")):
        with R.dataflow():
            a = R.add(x, x)  # host work
            b = R.multiply(a, a)  # more host work
            g: R.Tensor((4, 4), "float32", "cuda") = R.add(y, y)  # GPU launch, independent
            h = R.to_vdevice(g, "llvm")  # first host use of a GPU result: the sync point
            out = R.add(b, h)
            R.output(out)
        return out


@I.ir_module
class OverlapExpected:
    I.module_global_infos({"vdevice": [I.vdevice("llvm", 0), I.vdevice("cuda", 0)]})

    @R.function
    def main(x: R.Tensor((4, 4), "float32"), y: R.Tensor((4, 4), "float32", "cuda")):
        with R.dataflow():
            g: R.Tensor((4, 4), "float32", "cuda") = R.add(y, y)
            a = R.add(x, x)
            b = R.multiply(a, a)
            h = R.to_vdevice(g, "llvm")
            out = R.add(b, h)
            R.output(out)
        return out


def test_order_for_overlap_structure():
    c.assert_structural_equal(OrderForOverlap()(OverlapBefore), OverlapExpected)


def test_order_for_overlap_keeps_inplace_readers_first():
    """A reader of a buffer that a later in-place call overwrites must stay before it."""
    from hetcomp.frontend.llama import build_module

    plan = HeteroPlan(targets=(HOST, HOST), ratios=(("default", 0.5),), dense_attention=1)
    mod = PartitionHetero(plan)(build_module(TINY))
    ordered = OrderForOverlap(async_units=(1,))(mod)
    names = [b.value.args[0].name_hint if isinstance(b.value, relax.Call) and b.value.op.same_as(
        c.call_tir_op) or (isinstance(b.value, relax.Call) and "inplace" in str(b.value.op))
        else None for b in ordered["verify"].body.blocks[0].bindings]
    seq = [n for n in names if n in ("rope_kv", "sparse_tree_attention", "attention_dense")]
    # Layer 0's attention parts both run before layer 1's rope_kv writes the cache.
    assert seq[:3] == ["rope_kv", "attention_dense", "sparse_tree_attention"] or \
        seq[:3] == ["rope_kv", "sparse_tree_attention", "attention_dense"]
    assert seq[3] == "rope_kv"


def test_annotate_cost():
    from hetcomp.frontend.llama import build_module

    def cost(unit, op):
        return {"cpu": 1e-6, "gpu": 5e-7}[unit] * op.get("n", 1) * op["w"]

    mod = AnnotateCost(cost, ("cpu", "gpu"), width=4)(build_module(TINY))
    k = json.loads(mod["linear_n128_k64"].attrs["hetcomp.cost"])
    assert k == pytest.approx({"cpu": 128 * 4e-6, "gpu": 128 * 2e-6})
    total = json.loads(mod["verify"].attrs["hetcomp.cost_total"])
    assert total["cpu"] > total["gpu"] > 0

    # The total is one kernel's cost per call site: call_tir and call_tir_inplace (rope_kv
    # writes the cache in place), counted here by walking verify's bindings.
    counted = AnnotateCost(lambda unit, op: {"cpu": 1.0, "gpu": 2.0}[unit], ("cpu", "gpu"))(
        build_module(TINY))
    kinds = {"relax.call_tir": 0, "relax.call_tir_inplace": 0}
    for block in counted["verify"].body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Call) and isinstance(v.op, c.Op) and v.op.name in kinds and \
                    ops.OP_KIND in counted[v.args[0].name_hint].attrs:
                kinds[v.op.name] += 1
    assert kinds["relax.call_tir"] > TINY.num_layers and kinds["relax.call_tir_inplace"] > 0
    sites = sum(kinds.values())
    assert json.loads(counted["verify"].attrs["hetcomp.cost_total"]) == {"cpu": sites,
                                                                        "gpu": 2 * sites}


@pytest.mark.parametrize("ratio,dense,sparse", [
    (0.0, 0, 0), (1.0, 1, 1), (0.5, 1, 0), (0.37, 0, 1)])
def test_partitioned_model_matches(tmp_path, tiny_loaded, tiny_reference, ratio, dense,
                                   sparse):
    plan = HeteroPlan(units=("cpu", "cpu:1"), targets=(HOST, HOST),
                      ratios=(("default", ratio), ("down", min(1.0, 2 * ratio))),
                      dense_attention=dense, sparse_attention=sparse)
    compile_model(CompileOptions(model="tiny", plan=plan), str(tmp_path / "a"), quiet=True,
                  weights=tiny_loaded)
    art = load_artifact(str(tmp_path / "a"))
    assert len(art.devices) == 2
    # Ratio 0 with both attention parts on unit 0 moves nothing (so it checks that an empty
    # share is dropped, not the partition's numerics); every other case puts work on unit 1.
    units = {k["unit"] for k in art.manifest["kernels"] if k["function"] == "verify"}
    assert units == ({"cpu"} if (ratio, dense, sparse) == (0.0, 0, 0) else {"cpu", "cpu:1"})
    for prompt in ([5, 17, 99, 3], [200, 1, 2]):
        assert_matches_reference(art, tiny_reference, prompt, new_tokens=16)


def test_partition_imported_torch_block():
    torch = pytest.importorskip("torch")
    from hetcomp.frontend import from_torch

    torch.manual_seed(1)
    # An MLP block as torch.export gives it: matmuls with constant weights (test files stand
    # alone, so not tests/frontend's Block).
    block = torch.nn.Sequential(torch.nn.LayerNorm(32), torch.nn.Linear(32, 128),
                                torch.nn.GELU(), torch.nn.Linear(128, 32)).eval()
    x = torch.randn(1, 8, 32)
    mod = c.relax.transform.FoldConstant()(from_torch(block, (x,)))
    plan = HeteroPlan(targets=(HOST, HOST), ratios=(("default", 0.4),))
    part = PartitionHetero(plan)(mod)
    assert "concat" in part["main"].script()
    part = c.relax.transform.RealizeVDevice()(part)
    part = c.relax.get_pipeline("zero")(part)
    ex = c.compile(part, target=c.Target(HOST))
    vm = _tvm.virtual_machine(ex, [_tvm.device("cpu", 0), _tvm.device("cpu", 1)])
    out = vm["main"](_tvm.tensor(x.numpy()))
    out = out.numpy() if hasattr(out, "numpy") else out[0].numpy()
    with torch.no_grad():
        expected = block(x).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ratios", [(("default", 0.5), ("lm_head", 1.0)), (("default", 1.0),)])
def test_cpu_cuda_artifact_compiles_without_a_gpu(tmp_path, tiny_loaded, ratios):
    # Ratio 1 moves whole kernels (the symbolic-width residual linear among them) to the GPU.
    plan = HeteroPlan(units=("cpu", "cuda"), targets=(HOST, {"kind": "cuda", "arch": "sm_90"}),
                      ratios=ratios, dense_attention=1)
    compile_model(CompileOptions(model="tiny", plan=plan), str(tmp_path / "a"), quiet=True,
                  weights=tiny_loaded)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert [u["device"] for u in manifest["units"]] == ["cpu", "cuda"]
    assert manifest["param_units"]["embed__u1"] == 1
    assert (tmp_path / "a" / "lib.so").stat().st_size > 0
    # Each kernel is scheduled by the rules of the unit the plan put it on.
    rows = manifest["kernels"]
    for k in rows:
        own = ("gpu.", "script.") if k["unit"] == "cuda" else ("cpu.", "x86.", "script.")
        assert k["rule"].startswith(own), k
    verify = {(k["name"].removesuffix("__cuda"), k["unit"]) for k in rows
              if k["function"] == "verify"}
    linears = {n for n, _ in verify if n.startswith("linear")}
    lm_head = f"linear_n{TINY.vocab_size}_k{TINY.hidden_size}"
    assert lm_head in linears and len(linears) >= 4
    # The plan's units: the dense attention on the GPU, the sparse part on the CPU, and every
    # linear on the GPU at ratio 1 (on both units at 0.5, bar the LM head's 1.0).
    assert ("attention_dense", "cuda") in verify and ("sparse_tree_attention", "cpu") in verify
    for name in linears:
        whole = dict(ratios)["default"] == 1.0 or name == lm_head
        assert {u for n, u in verify if n == name} == ({"cuda"} if whole else {"cpu", "cuda"}), \
            name


def test_gpu_only_artifact_compiles_without_a_gpu(tmp_path, tiny_loaded):
    """--target cuda: every kernel is a GPU kernel (CUDA source compiled where it loads)."""
    compile_model(CompileOptions(model="tiny", target="cuda"), str(tmp_path / "g"), quiet=True,
                  weights=tiny_loaded)
    manifest = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert manifest["units"] == [{"name": "cuda", "device": "cuda", "device_id": 0}]
    assert manifest["target_spec"]["host"]["mcpu"] == "x86-64-v3"
    lib = (tmp_path / "g" / "lib.so").read_bytes()
    for kernel in (b"linear_n", b"attention", b"rms_norm", b"argmax"):
        assert kernel in lib, kernel
    assert lib.count(b"__global__") > 10


def test_unit_busy_times_show_both_units(tmp_path, tiny_loaded):
    """The per-unit busy time of a partitioned step names both units and the copies."""
    from hetcomp.runtime import load_artifact
    from hetcomp.runtime.unit_time import step_breakdown

    plan = HeteroPlan(targets=(HOST, HOST), ratios=(("default", 0.5),), sparse_attention=1)
    compile_model(CompileOptions(model="tiny", plan=plan, max_context=64), str(tmp_path / "a"),
                  quiet=True, weights=tiny_loaded)
    art = load_artifact(str(tmp_path / "a"))
    b = step_breakdown(art, 1, steps=3, cache_len=8)
    assert {"cpu", "cpu:1", "copy"} <= set(b["busy_s"]) and b["step_s"] > 0
    assert b["serial_s"] == pytest.approx(b["busy_s"]["cpu"] + b["busy_s"]["cpu:1"]
                                          + b["busy_s"]["copy"])
    # Each unit is charged at least the kernels compile placed on it (the W = 1 step runs
    # verify_w1; VM builtins that touch a unit's tensors add to its count).
    placed = {}
    for k in art.manifest["kernels"]:
        if k["function"] == "verify_w1":
            placed[k["unit"]] = placed.get(k["unit"], 0) + k["calls"]
    assert placed["cpu:1"] > 0 and placed["cpu"] > 0
    for unit, calls in placed.items():
        assert b["calls"][unit] >= calls, (unit, b["calls"], placed)


def test_plan_json_to_hetero_plan(tmp_path):
    """compile --plan reads the planner's plan.json into the HeteroPlan the passes apply."""
    from hetcomp.errors import HetcompError
    from hetcomp.plan import load_plan

    plan = {"format": "hetcomp-plan/1", "units": ["cpu", "cuda"], "host": "cpu",
            "source": "measured", "width": 8,
            "split": {"qkv": {"cpu": 0.25, "cuda": 0.75}, "lm_head": {"cpu": 0.0, "cuda": 1.0}},
            "attention": {"dense": "cuda", "sparse": "cpu"}}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    hp = load_plan(str(path))
    assert hp.units == ("cpu", "cuda") and hp.targets[1]["kind"] == "cuda"
    assert hp.ratio("qkv") == 0.75 and hp.ratio("lm_head") == 1.0
    assert (hp.dense_attention, hp.sparse_attention) == (1, 0)
    path.write_text(json.dumps(dict(plan, units=["cpu"])))
    assert load_plan(str(path)) is None
    path.write_text(json.dumps(dict(plan, source="spec-estimate")))
    assert load_plan(str(path)).source == "spec-estimate"
    # A plan hosted on the GPU compiles with the GPU as unit 0, the CPU's share on unit 1.
    path.write_text(json.dumps(dict(plan, host="cuda")))
    hp = load_plan(str(path), "cuda", "sm_87")
    assert hp.units == ("cuda", "cpu") and hp.targets[0]["arch"] == "sm_87"
    assert hp.targets[0]["host"] == hp.targets[1] and hp.targets[1]["kind"] == "llvm"
    assert hp.ratio("qkv") == 0.25 and (hp.dense_attention, hp.sparse_attention) == (0, 1)
    # A plan on the GPU alone is the whole-model GPU build (no partition), for --target cuda.
    path.write_text(json.dumps(dict(plan, units=["cuda"], host="cuda")))
    with pytest.raises(HetcompError, match="runs the model on cuda alone: compile it with "
                                           "--target cuda"):
        load_plan(str(path))
    assert load_plan(str(path), "cuda") is None


def test_breakdowns_leave_no_instrument_behind(tiny_artifact, monkeypatch):
    """After the instrumented runs, VM calls reach no Python callback: a leftover no-op
    instrument cost every later step a Python call per kernel (and skewed `hetcomp bench`)."""
    from hetcomp import _tvm
    from hetcomp.runtime import load_artifact, unit_time

    calls = []
    wrap = _tvm.ffi_function

    def counting(fn):
        return wrap(lambda *a: (calls.append(1), fn(*a))[1])

    monkeypatch.setattr(unit_time._tvm, "ffi_function", counting)
    art = load_artifact(tiny_artifact[0])
    for breakdown in (unit_time.step_breakdown, unit_time.kernel_breakdown):
        b = breakdown(art, 1, steps=2, cache_len=4)
        assert b["step_s"] > 0 and calls
        kernels = b.get("kernels")
        assert kernels is None or any(k.startswith("attention") for k in kernels)
        calls.clear()
        unit_time._verify_step(art, 1, 4)()
        assert not calls


@pytest.mark.parametrize("dense,sparse", [(1, 0), (0, 1), (1, 1)])
def test_attention_parts_placed_by_plan(dense, sparse):
    """verify's dense part runs on plan.dense_attention's unit, its sparse part (the CSR
    kernel) on plan.sparse_attention's, their merge on the host."""
    plan = HeteroPlan(targets=(HOST, HOST), ratios=(("default", 0.5),),
                      dense_attention=dense, sparse_attention=sparse)
    from hetcomp.frontend.llama import build_module

    out = PartitionHetero(plan)(build_module(TINY))
    vdevs = list(out.global_infos["vdevice"])
    units = {}
    for b in out["verify"].body.blocks[0].bindings:
        v = b.value
        if isinstance(v, relax.Call) and v.op.same_as(c.call_tir_op):
            name = v.args[0].name_hint
            vd = getattr(b.var.ty, "vdevice", None)
            unit = 0 if vd is None else next(
                i for i, x in enumerate(vdevs) if c.same_vdevice(x, vd))
            units.setdefault(name, set()).add(unit)
    assert units["attention_dense"] == {dense}
    assert units["sparse_tree_attention"] == {sparse}
    assert units["attention_merge"] == {0}
