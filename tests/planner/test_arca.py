"""ARCA: units, profile database, cost models and the planner (synthetic known optima)."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hetcomp.artifact_format import is_plot
from hetcomp.cost.roofline import (
    LINEAR_KINDS,
    DraftShape,
    Features,
    ModelShape,
    RooflineCost,
    attention_features,
    copy_features,
    draft_step,
    linear_features,
    model_step,
    split_columns,
    tensor_core_products,
)
from hetcomp.cost.xgb import UnitCostModel, fit_unit, mape
from hetcomp.decoder import SPLIT_ATTENTION, estimated_tree_nnz
from hetcomp.hardware import (
    HOPPER_GPU,
    MEASURED,
    ORIN_NX_CPU,
    ORIN_NX_GPU,
    SPEC_ESTIMATE,
    DeviceSpec,
)
from hetcomp.plan import plan_prediction
from hetcomp.planner import (
    Plan,
    PlannerOptions,
    UnitModel,
    best_width,
    may_beat_best,
    plan,
    plan_unit_sets,
    plot_plans,
    predict_step_time,
)
from hetcomp.profile.db import Measurement, ProfileDB
from hetcomp.profile.units import Fingerprint, Unit, kernel_source_hash
from hetcomp.testing import assert_one_line_error, host_linear_rule, lacking_cpu_feature

# Block-friendly shapes: every linear's N is a multiple of 32, so ratios k/8 are exact.
SHAPE = ModelShape(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, head_dim=64,
                   vocab=1024, max_context=512)


def _const(t):
    return lambda feat: t


# ---- static features and roofline -----------------------------------------------------------

def test_split_columns_whole_blocks():
    assert split_columns(960, 1.0) == 960
    assert split_columns(960, 0.0) == 0
    assert split_columns(960, 1 / 8) % 32 == 0
    assert split_columns(960, 1e-6) == 32  # at least one block when r > 0


def test_roofline_memory_and_compute_bound():
    spec = DeviceSpec("u", "cpu", peak_gflops=100.0, mem_bw_gbs=10.0, launch_s=1e-6)
    mem = Features("linear", flops=1e6, bytes=1e8)
    comp = Features("linear", flops=1e12, bytes=1e3)
    assert RooflineCost(spec)(mem) == pytest.approx(1e8 / 10e9 + 1e-6)
    assert RooflineCost(spec)(comp) == pytest.approx(1e12 / 100e9 + 1e-6)


def test_roofline_puts_wide_gpu_linears_on_tensor_cores():
    """A cuda build runs its linears of 16-64 rows (multiples of 16) on tensor cores:
    ``RooflineCost(spec, products)`` costs their flops at the spec's tensor rate over the
    products a multiply-add takes there (2 with float16 weights: x's hi and lo terms; 4
    block-quantized: W's too); other widths, other ops, a spec without tensor cores and a
    build without them (products 0: float32 weights, --no-tensor-cores) at the CUDA cores'
    peak."""
    spec = DeviceSpec("g", "gpu", peak_gflops=100.0, mem_bw_gbs=1e6, launch_s=0.0,
                      tensor_gflops=1000.0)

    def linear(w):
        return Features("linear", w=w, flops=1e12, bytes=1.0)

    cuda_cores = 1e12 / 100e9
    for w in (16, 32, 48, 64):
        assert RooflineCost(spec, 2)(linear(w)) == pytest.approx(2e12 / 1000e9)
        assert RooflineCost(spec, 4)(linear(w)) == pytest.approx(4e12 / 1000e9)
    for w in (1, 8, 24, 128):
        assert RooflineCost(spec, 2)(linear(w)) == pytest.approx(cuda_cores)
    assert RooflineCost(spec)(linear(16)) == pytest.approx(cuda_cores)
    assert RooflineCost(spec, 2)(Features("attention", w=16, flops=1e12, bytes=1.0)) == (
        pytest.approx(cuda_cores))
    no_tc = dataclasses.replace(spec, tensor_gflops=0.0)
    assert RooflineCost(no_tc, 2)(linear(16)) == pytest.approx(cuda_cores)
    assert [tensor_core_products(d) for d in ("float16", "q4_1", "q8_0", "float32")] == [
        2, 4, 4, 0]
    assert tensor_core_products("float16", tensor_cores=False) == 0
    assert HOPPER_GPU.tensor_gflops > HOPPER_GPU.peak_gflops and ORIN_NX_GPU.tensor_gflops > 0


def test_tensor_cores_make_a_wide_gpu_step_cost_about_what_a_narrow_one_does():
    """SmolLM2 on the H100's datasheet, the CUDA-graph step: with its wide linears on the
    CUDA cores a W = 64 step was costed 1.5x W = 1's and the planner stopped at W = 8 (q4_1)
    or 16 (float16); on tensor cores, as the build runs them, W = 64 costs within 1.25x of
    W = 1 and the planner goes wider."""
    from hetcomp.driver.profiling import read_model_shape
    from hetcomp.frontend.models import default_heads
    from hetcomp.speculative.medusa import MedusaHeads

    heads = MedusaHeads.load(default_heads("smollm2"))
    for dtype in ("float16", "q4_1"):
        shape, _ = read_model_shape("smollm2", dtype)
        plans = {}
        for products in (0, tensor_core_products(dtype)):
            plans[products] = plan(
                shape, [UnitModel.from_spec(HOPPER_GPU, products)],
                rank_probs=heads.rank_probs, ranks=heads.ranks,
                options=PlannerOptions(widths=(1, 2, 4, 8, 16, 32, 64), cache_len=256,
                                       draft_vocab=len(heads.vocab), draft_weight_bytes=2,
                                       draft_root=heads.u is not None, device_len=True,
                                       fused_linears=True))
        cores, tensor = plans[0], plans[tensor_core_products(dtype)]
        step = {p: {c.width: c.step_s for c in plans[p].candidates} for p in plans}
        assert step[0][64] > 1.5 * step[0][1], dtype
        assert step[tensor_core_products(dtype)][64] < 1.25 * step[0][1], dtype
        assert tensor.width > cores.width, dtype


def test_model_step_attention_kernels_per_width():
    ops_ = {op.name: op for op in model_step(SHAPE, 4, 100, nnz=9)}
    assert ops_["rms_norm"].count == 2 * SHAPE.layers + 1
    assert ops_["lm_head"].count == 1 and ops_["qkv"].count == SHAPE.layers
    assert ops_["qkv"].features.n == (4 + 2 * 2) * 64
    # W = 4 splits attention: dense part over the cache, sparse part over the tree's mask
    # non-zeros, merge; all placed together.
    assert "attention" not in ops_
    assert ops_["attention_dense"].features.n == 100
    assert ops_["attention_sparse"].features.n == 9
    assert {ops_[k].split for k in SPLIT_ATTENTION} == {"attention"}
    fused = {op.name: op for op in model_step(SHAPE, 1, 100)}
    assert fused["attention"].features.n == 101  # cache + the one tree key
    assert not set(SPLIT_ATTENTION) & set(fused)
    # A build whose linears take int8 activations: the fused kernel at every width.
    exact = {op.name: op for op in model_step(SHAPE, 16, 100, exact_attention=True)}
    assert exact["attention"].features.n == 116 and not set(SPLIT_ATTENTION) & set(exact)
    heads = np.tile(np.linspace(0.6, 0.05, 10), (3, 1))
    # the planner costs what the build runs: a unit whose fused kernel is slow per row
    slow_fused = UnitModel("cpu", lambda f: 1e-3 * f.w if f.op == "attention" else 1e-6)
    for flag in (False, True):
        p = plan(SHAPE, [slow_fused], rank_probs=heads,
                 options=PlannerOptions(widths=(1, 16), exact_attention=flag))
        assert p.width == (1 if flag else 16), flag
    # The CUDA-graph build: one attention kernel at W = 4 too, its own op class, the input
    # copy; the planner costs that kernel (a unit slow at it makes the step slower).
    dev = {op.name: op for op in model_step(SHAPE, 4, 100, device_len=True)}
    assert dev["tree_attention"].features.op == "tree_attention"
    assert dev["tree_attention"].features.n == 104 and dev["tree_attention"].split == "attention"
    assert "stage_tree" in dev and not set(SPLIT_ATTENTION) & set(dev)
    unit = UnitModel("gpu", _const(1e-6))
    slow = UnitModel("gpu", lambda f: 1.0 if f.op == "tree_attention" else 1e-6)
    base = predict_step_time([unit], 4, 100, shape=SHAPE, device_len=True)
    assert predict_step_time([slow], 4, 100, shape=SHAPE, device_len=True) > (
        base + SHAPE.layers * 0.99)
    assert predict_step_time([slow], 4, 100, shape=SHAPE) < 1e-3  # not in the CPU build


# ---- units and specs ------------------------------------------------------------------------

def test_orin_specs_are_estimates():
    assert ORIN_NX_GPU.peak_gflops == pytest.approx(1024 * 2 * 0.918, rel=0.01)
    assert ORIN_NX_GPU.shared_memory and ORIN_NX_CPU.shared_memory
    for spec in (ORIN_NX_CPU, ORIN_NX_GPU):
        assert UnitModel.from_spec(spec).source == SPEC_ESTIMATE
        assert "not measured" in spec.notes
    with pytest.raises(ValueError):
        DeviceSpec("pcie-gpu", "gpu", 1000.0, 500.0, shared_memory=False)  # needs link_gbs


def test_kernel_hash_changes_with_source(tmp_path):
    """A profile is stale when the kernels, their schedules or anything they import changes
    (the packing block in quant_format.py decides every linear probe); other sources do not
    count."""
    root = tmp_path / "pkg"
    (root / "schedules").mkdir(parents=True)
    (root / "schedules" / "cpu.py").write_text("from ..quant_format import pack_block\n")
    (root / "quant_format.py").write_text("from .errors import E\nB = 32\n")
    (root / "errors.py").write_text("E = 1\n")
    (root / "frontend").mkdir()
    (root / "frontend" / "ops.py").write_text("B = 1\n")
    hashes = [kernel_source_hash(str(root))]
    assert hashes[0] == kernel_source_hash(str(root))
    (root / "frontend" / "ops.py").write_text("B = 2\n")  # not imported by the kernels
    assert kernel_source_hash(str(root)) == hashes[0]
    for path, text in (("schedules/cpu.py", "from ..quant_format import pack_block as p\n"),
                       ("quant_format.py", "from .errors import E\nB = 16\n"),
                       ("errors.py", "E = 2\n")):  # imported, and imported by what is
        (root / path).write_text(text)
        hashes.append(kernel_source_hash(str(root)))
    assert len(set(hashes)) == 4


def _fingerprint(kernel_hash="k0", tvm="0.27.0.post1"):
    return Fingerprint(unit="cpu", cpu_model="Test CPU", cores=2, threads=2, gpu="",
                       tvm_version=tvm, target='{"kind": "llvm"}', kernel_hash=kernel_hash)


# ---- profile database ----------------------------------------------------------------------

def _rows(unit="cpu"):
    return [Measurement(unit, linear_features(SHAPE, "qkv", w, r, corun), 1e-4 * w * r + 1e-5)
            for w in (1, 4) for r in (0.5, 1.0) for corun in (False, True)]


def test_db_round_trip(tmp_path):
    fp = _fingerprint()
    unit = Unit("cpu", {"kind": "llvm"}, "cpu:0", fp)
    rows = _rows()
    path = str(tmp_path / "p.sqlite")
    with ProfileDB(path) as db:
        assert not db.is_complete(fp.digest, "m", "quick")
        db.store(unit.to_json(), fp.digest, "m", "quick", rows)
    with ProfileDB(path) as db:  # reopened: persisted
        assert db.is_complete(fp.digest, "m", "quick")
        assert not db.is_complete(fp.digest, "m", "full")  # quick does not satisfy full
        assert db.measurements(fp.digest, "m") == rows
        assert db.measurements(fp.digest, "m", op="attention") == []
        assert db.unit_info(fp.digest)["fingerprint"]["digest"] == fp.digest
        assert db.digests("cpu") == [fp.digest]
        db.drop(fp.digest)
        assert db.measurements(fp.digest, "m") == [] and db.digests() == []


def test_db_fingerprint_invalidation(tmp_path):
    from hetcomp.profile.measure import ProfileOptions, profile_unit

    fp = _fingerprint()
    unit = Unit("cpu", {"kind": "llvm"}, "cpu:0", fp)
    with ProfileDB(str(tmp_path / "p.sqlite")) as db:
        db.store(unit.to_json(), fp.digest, "m", "full", _rows())
        # Same fingerprint: reused without measuring (a full profile satisfies quick).
        res = profile_unit(unit, SHAPE, db, "m", ProfileOptions.quick(), progress=lambda s: None)
        assert res.reused and res.mode == "full" and res.rows == _rows()
        # An edited kernel, another TVM or another model: the stored profile does not apply.
        for other in (_fingerprint(kernel_hash="k1"), _fingerprint(tvm="0.28.0")):
            assert other.digest != fp.digest
            assert not db.is_complete(other.digest, "m", "quick")
        assert not db.is_complete(fp.digest, "other-model", "quick")


def test_db_refuses_estimates(tmp_path):
    fp = _fingerprint()
    est = [Measurement("cpu", linear_features(SHAPE, "o", 1), 1e-4, source=SPEC_ESTIMATE)]
    with ProfileDB(str(tmp_path / "p.sqlite")) as db, pytest.raises(ValueError):
        db.store({"name": "cpu"}, fp.digest, "m", "full", est)


# ---- cost models ---------------------------------------------------------------------------

def _synthetic_profile(seed=0):
    """A memory-bound unit: 20 GB/s, 30 GFLOP/s, 5 us launch, 1.6x slower co-running."""
    rng = np.random.default_rng(seed)
    rows = []
    for kind in LINEAR_KINDS:
        for w in (1, 2, 4, 8, 16, 32, 64):
            for r in (0.25, 0.5, 0.75, 1.0):
                for corun in (False, True):
                    f = linear_features(SHAPE, kind, w, r, corun)
                    t = (max(f.bytes / 20e9, f.flops / 30e9) + 5e-6) * (1.6 if corun else 1.0)
                    rows.append(Measurement("cpu", f, t * rng.uniform(0.98, 1.02)))
    for cl in (0, 64, 256):
        for w in (1, 4, 16, 64):
            f = attention_features(SHAPE, w, cl)
            rows.append(Measurement("cpu", f, f.bytes / 10e9 + f.flops / 20e9 + 3e-6))
    return rows


def test_xgb_fit_heldout_error_small(tmp_path):
    rows = _synthetic_profile()
    model = fit_unit("cpu", rows)
    reports = {r.op: r for r in model.reports}
    assert reports["linear"].folds == 5
    assert reports["linear"].holdout_mape < 8.0 and reports["linear"].holdout_mape_alone < 8.0
    assert reports["attention"].holdout_mape < 15.0
    # Between grid points it stays close to the measured law.
    f = linear_features(SHAPE, "gate_up", 24, 0.625, True)
    truth = (max(f.bytes / 20e9, f.flops / 30e9) + 5e-6) * 1.6
    assert abs(model(f) - truth) / truth < 0.25
    # An int8-dot linear on a unit that has none (never measured) costs its linear kernel.
    assert model(dataclasses.replace(f, op="linear_int8")) == model(f)
    # Serialisable (JSON and UBJ boosters): identical predictions after a round trip.
    feats = [m.features for m in rows[::7]]
    for raw in ("json", "ubj"):
        path = str(tmp_path / f"cpu-{raw}.json")
        model.save(path, raw)
        loaded = UnitCostModel.load(path)
        assert [loaded(f) for f in feats] == pytest.approx([model(f) for f in feats], rel=1e-6)
        assert loaded.source == MEASURED


def test_mape():
    assert mape([110, 90], [100, 100]) == pytest.approx(10.0)


# ---- planner -------------------------------------------------------------------------------

def _linear_unit(name, per_column_s, attention=None, other=1e-6, **kw):
    """Linear time proportional to the output columns; everything else ``other`` seconds."""
    def cost(feat):
        if feat.op == "linear":
            return per_column_s * feat.n
        if feat.op in ("attention", *SPLIT_ATTENTION[:2]) and attention is not None:
            return attention(feat)
        return other
    return UnitModel(name, cost, **kw)


def test_split_ratio_analytic_optimum():
    # max(a * r * N, b * (1 - r) * N) is smallest at r = b / (a + b) = 0.75 on unit A.
    a, b = _linear_unit("A", 1e-6), _linear_unit("B", 3e-6)
    opts = PlannerOptions(widths=(1,), ratio_steps=32)
    p = plan(SHAPE, [a, b], tau={1: 1.0}, options=opts)
    for kind in LINEAR_KINDS:
        assert p.split_ratio(kind) == {"A": pytest.approx(0.75), "B": pytest.approx(0.25)}
    lm = dict(p.candidates[0].breakdown)["lm_head"]
    assert lm == pytest.approx(0.75 * SHAPE.vocab * 1e-6)


def test_one_unit_int8_plan_costs_int8_linears_and_a_partitioned_one_dequantizes():
    """A CPU whose one-unit build runs quantized linears on int8 activations
    (``int8_unit``): planned alone, its linears cost ``linear_int8`` and its attention the
    fused kernel at every width; with another unit, every unit's linears cost ``linear``
    (the dequantizing kernel a partitioned plan runs) and attention is split. The plan
    records it, and costing the plan again (``predict_step_time``) gives its step."""
    asked = []

    def cost(name, int8_s, plain_s):
        def f(feat):
            asked.append((name, feat.op))
            if feat.op in ("linear", "linear_int8"):
                return feat.n * (int8_s if feat.op == "linear_int8" else plain_s)
            return 1e-6
        return f

    cpu = UnitModel("cpu", cost("cpu", 1e-7, 2e-7))
    gpu = UnitModel("gpu", cost("gpu", 1e-7, 1e-7))
    opts = PlannerOptions(widths=(1, 16), int8_unit="cpu")
    alone = plan(SHAPE, [cpu], tau={1: 1.0, 16: 2.0}, options=opts)
    assert alone.int8_linears
    ops = {op for _, op in asked}
    assert "linear_int8" in ops and "linear" not in ops
    assert "attention" in ops and not set(SPLIT_ATTENTION) & ops  # exact: fused at W = 16
    # the linears at the int8 kernel's cost: half the dequantizing one's
    plain = plan(SHAPE, [cpu], tau={1: 1.0, 16: 2.0}, options=PlannerOptions(widths=(1, 16)))
    assert not plain.int8_linears
    int8_s, plain_s = (dict(p.choice(1).breakdown) for p in (alone, plain))
    assert [int8_s[k] for k in LINEAR_KINDS] == pytest.approx(
        [plain_s[k] / 2 for k in LINEAR_KINDS])
    asked.clear()
    both = plan(SHAPE, [cpu, gpu], tau={1: 1.0, 16: 2.0}, options=opts)
    assert not both.int8_linears
    assert {op for u, op in asked if op.startswith("linear")} == {"linear"}
    assert {u for u, op in asked if op == "linear"} == {"cpu", "gpu"}
    again = Plan.from_json(json.loads(json.dumps(alone.to_json())))
    assert again.int8_linears
    assert predict_step_time(again, alone.width, alone.cache_len, shape=SHAPE,
                             units=[cpu]) == pytest.approx(alone.step_s)


def test_sync_cost_keeps_small_ops_on_host():
    # With a 1 ms synchronisation, moving columns to B never pays for these tiny layers.
    a = _linear_unit("A", 1e-9)
    b = _linear_unit("B", 1e-10, sync_s=1e-3)
    p = plan(SHAPE, [a, b], tau={1: 1.0}, options=PlannerOptions(widths=(1,)))
    assert all(p.split_ratio(k) == {"A": 1.0, "B": 0.0} for k in LINEAR_KINDS)


def test_shared_bandwidth_bounds_split():
    # Two units on one 10 GB/s DRAM: a split op cannot beat its summed bytes / 10 GB/s.
    spec = DeviceSpec("s", "cpu", peak_gflops=1e6, mem_bw_gbs=10.0, launch_s=0.0)
    u1 = UnitModel("A", RooflineCost(spec), SPEC_ESTIMATE, True, 10.0)
    u2 = UnitModel("B", RooflineCost(spec), SPEC_ESTIMATE, True, 10.0)
    t_two = predict_step_time([u1, u2], 1, 0, shape=SHAPE)
    t_one = predict_step_time([u1], 1, 0, shape=SHAPE)
    assert t_two == pytest.approx(t_one, rel=0.02)
    # Without the shared bound (separate memories) the split would halve the linear time.
    v1, v2 = (UnitModel(n, RooflineCost(spec), SPEC_ESTIMATE) for n in "AB")
    assert predict_step_time([v1, v2], 1, 0, shape=SHAPE) < 0.7 * t_one


def test_attention_placement_known_optimum():
    # B streams the cache twice as fast but pays 1 ms for any tree keys (the sparse part, or
    # the fused kernel); the best placement is dense part on B, sparse part on A.
    def att_a(f):
        return 1e-6 * f.n

    def att_b(f):
        return 0.5e-6 * f.n + (1e-3 if f.op != "attention_dense" else 0.0)

    a = _linear_unit("A", 1e-9, att_a)
    b = _linear_unit("B", 1e-9, att_b)
    p = plan(SHAPE, [a, b], tau={8: 2.0}, options=PlannerOptions(widths=(8,), cache_len=400))
    assert dict(p.attention) == {"dense": "B", "sparse": "A"}


def test_given_tau_replaces_the_trees_tau_not_the_trees():
    """tau(W) given beside the rank statistics (what a decode with the lookup accepts) is the
    plans' tau; the trees are still built from the statistics, for the plan and the step's
    sparse tree part. Alone, tau builds no tree; neither is refused."""
    from hetcomp.planner import tau_table
    from hetcomp.speculative.tree import build_tree

    rp = np.tile(np.array([0.5, 0.2, 0.1, 0.05]), (3, 1))
    given = {1: 1.0, 4: 2.5, 8: 3.0}
    taus, trees = tau_table((1, 4, 8), rp, given)
    assert taus == given and trees[8] == build_tree(rp, 8)
    assert tau_table((1, 4), tau=given) == ({1: 1.0, 4: 2.5}, {})
    with pytest.raises(ValueError, match="give rank_probs or tau"):
        tau_table((1,))
    a = _linear_unit("A", 1e-6)
    p = plan(SHAPE, [a], rp, given, PlannerOptions(widths=(1, 4, 8)))
    assert {c.width: c.tau for c in p.candidates} == given
    assert p.tree == build_tree(rp, p.width)
    q = plan(SHAPE, [a], rp, options=PlannerOptions(widths=(1, 4, 8)))  # the trees' tau
    assert [c.step_s for c in q.candidates] == [c.step_s for c in p.candidates]
    assert q.candidates[2].tau == pytest.approx(build_tree(rp, 8).expected_accept_length)


def test_any_host_finds_a_whole_model_gpu_plan():
    # B is 100x faster at everything but 1 ms away from A. With A as the only possible host
    # every unsplit op stays on A; letting any unit host finds B alone, with no split forced.
    a = UnitModel("A", lambda f: 1e-4)
    b = UnitModel("B", lambda f: 1e-6, shared_memory=False, sync_s=1e-3, link_gbs=10.0)
    opts = PlannerOptions(widths=(1, 4))
    fixed = plan_unit_sets(SHAPE, [a, b], tau={1: 1.0, 4: 1.5}, options=opts)
    assert all(p.host == "A" for p in fixed)
    best = plan_unit_sets(SHAPE, [a, b], tau={1: 1.0, 4: 1.5}, options=opts, any_host=True)[0]
    assert best.units == ("B",) and best.host == "B"
    assert best.tokens_per_s > 10 * fixed[0].tokens_per_s


def test_link_costs_fit_round_trips():
    from hetcomp.driver.tuning import link_costs

    rows = [Measurement("cuda", copy_features(w, n), 20e-6 + copy_features(w, n).bytes / 12e9)
            for w in (1, 16) for n in (576, 49152)]
    sync, gbs = link_costs(rows)
    assert sync == pytest.approx(20e-6, rel=1e-6) and gbs == pytest.approx(12.0, rel=1e-6)


def test_width_choice_known_tau_and_step():
    # Every kernel call costs base * (1 + W / 16), so T_step(W) = calls(W) * base * (1 + W /
    # 16); from W = 4 on, attention is three kernels a layer instead of one.
    base = 1e-4
    unit = UnitModel("cpu", lambda f: base * (1 + f.w / 16))
    tau = {1: 1.0, 2: 1.5, 4: 2.1, 8: 2.2, 16: 2.6}
    p = plan(SHAPE, [unit], tau=tau, options=PlannerOptions(widths=tuple(tau)))

    def step(w):
        return sum(op.count for op in model_step(SHAPE, w, 256)) * base * (1 + w / 16)

    best = max(tau, key=lambda w: tau[w] / step(w))
    assert best == 4 and p.width == 4
    assert p.step_s == pytest.approx(step(4))
    assert p.tokens_per_s == pytest.approx(2.1 / step(4))
    assert p.source == MEASURED and p.units == ("cpu",)
    assert all(p.split_ratio(k) == {"cpu": 1.0} for k in LINEAR_KINDS)
    assert dict(p.attention) == {"dense": "cpu", "sparse": "cpu"}
    assert predict_step_time(p, 4, 256, shape=SHAPE, units=[unit]) == pytest.approx(p.step_s)


def test_plan_with_trees_and_draft_cost(tmp_path):
    probs = np.array([[0.6, 0.2, 0.1], [0.4, 0.2, 0.1]])
    unit = UnitModel.from_spec(ORIN_NX_CPU)
    p = plan(SHAPE, [unit], rank_probs=probs, options=PlannerOptions(widths=(1, 2, 4)))
    assert p.source == SPEC_ESTIMATE and "not measured" in p.notes
    assert p.tree is not None and p.tree.width == p.width
    assert p.tau == pytest.approx(p.tree.expected_accept_length)
    # The draft (Medusa heads) call is costed for W > 1 only.
    c1, c2 = p.choice(1), p.choice(2)
    assert "medusa_lm_head" not in dict(c1.breakdown) and "medusa_lm_head" in dict(c2.breakdown)
    path = tmp_path / "plan.json"
    p.save(str(path))
    assert Plan.from_json(json.loads(path.read_text())) == p
    plots = plan_unit_sets(SHAPE, [unit, UnitModel.from_spec(ORIN_NX_GPU)], rank_probs=probs,
                           options=PlannerOptions(widths=(1, 2, 4)))
    assert [len(x.units) for x in plots] and plots[0].tokens_per_s >= plots[-1].tokens_per_s
    plot_plans(plots, str(tmp_path / "plan.png"))
    assert (tmp_path / "plan.png").stat().st_size > 1000


def test_draft_step_matches_compiled_draft():
    """The draft's kernels as ``llama._add_medusa`` emits them: the heads stacked into one
    linear of K x E columns, a pruned float16 LM head reads Vd x E x 2 bytes for K rows;
    root conditioning adds a second stacked linear."""
    full = {op.name: op for op in draft_step(SHAPE, DraftShape(3))}
    assert full["medusa"].count == 1 and "medusa_embed" not in full
    heads = full["medusa"].features
    assert (heads.n, heads.k) == (3 * SHAPE.hidden, SHAPE.hidden)
    assert heads.bytes == 3 * SHAPE.hidden ** 2 * SHAPE.weight_bytes + 4 * 4 * SHAPE.hidden
    assert full["medusa_act"].count == 1 and full["medusa_act"].features.w == 3
    assert full["medusa_lm_head"].features.n == SHAPE.vocab
    assert full["medusa_lm_head"].features.w == 3
    pruned = {op.name: op for op in draft_step(SHAPE, DraftShape(3, 256, 2, root=True))}
    assert pruned["medusa"].count == 2 and pruned["medusa_embed"].count == 1
    head = pruned["medusa_lm_head"].features
    assert head.n == 256 and head.r == pytest.approx(0.25)
    assert head.bytes == 256 * SHAPE.hidden * 2 + 4 * 3 * (SHAPE.hidden + 256)
    assert pruned["medusa_topk"].features.n == 256
    # The planner's draft term shrinks with the draft (a bytes-bound roofline unit).
    unit = UnitModel.from_spec(ORIN_NX_CPU)
    probs = np.array([[0.6, 0.2, 0.1]] * 3)
    big = plan(SHAPE, [unit], rank_probs=probs, options=PlannerOptions(widths=(2,)))
    small = plan(SHAPE, [unit], rank_probs=probs, options=PlannerOptions(
        widths=(2,), draft_vocab=256, draft_weight_bytes=2))
    b_big, b_small = dict(big.choice(2).breakdown), dict(small.choice(2).breakdown)
    assert b_small["medusa_lm_head"] < 0.5 * b_big["medusa_lm_head"]
    assert b_small["lm_head"] == pytest.approx(b_big["lm_head"])
    # With the heads' joint held-out ranks the planner builds the trees the compiler builds.
    from hetcomp.speculative.tree import build_tree

    ranks = np.array([[0, 0, 0], [0, 1, -1], [1, 0, 0], [0, 0, 2], [2, -1, -1]])
    joint = plan(SHAPE, [unit], rank_probs=probs, options=PlannerOptions(widths=(4,)),
                 ranks=ranks)
    assert joint.tree.to_json() == build_tree(probs, 4, ranks).to_json()
    assert joint.tau == pytest.approx(build_tree(probs, 4, ranks).expected_accept_length)


def test_plan_never_mixes_sources():
    measured = UnitModel("cpu", _const(1e-5))
    with pytest.raises(ValueError, match="mix"):
        plan(SHAPE, [measured, UnitModel.from_spec(ORIN_NX_GPU)], tau={1: 1.0},
             options=PlannerOptions(widths=(1,)))


def test_planner_imports_no_tvm():
    # The planner's import closure (the package, cost models, units, trees) must not reach
    # TVM, xgboost or matplotlib: the planner decides, it never compiles or measures.
    code = (
        "import sys\n"
        "import hetcomp.planner\n"
        "bad = [m for m in ('tvm', 'tvm_ffi', 'xgboost', 'matplotlib') if m in sys.modules]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# ---- the real harness (quick) ---------------------------------------------------------------

def test_quick_profile_fit_and_plan(tmp_path, cli):
    from hetcomp.driver.tuning import load_draft, profile_command, tune_command
    from hetcomp.errors import HetcompError
    from hetcomp.planner import tau_table

    try:
        from hetcomp.frontend import default_gguf_path

        default_gguf_path()
    except HetcompError as e:
        pytest.skip(str(e))
    lines = []
    out = tmp_path / "tune"
    summary = tune_command("smollm2", ["cpu"], str(out), quick=True, progress=lines.append)
    for f in ("profile.sqlite", "cost/cpu.json", "plan.json", "plan.png"):
        assert (out / f).is_file(), f
    assert is_plot(str(out / "profile.png")) and summary["profile"]["plot"] == str(
        out / "profile.png")  # (drawn in tune's temporary folder, reported where it is)
    assert not summary["profile"]["units"]["cpu"]["reused"]
    assert any("linear lm_head" in ln for ln in lines) and any("co-run" in ln for ln in lines)
    p = Plan.from_json(json.loads((out / "plan.json").read_text()))
    assert p.source == MEASURED and p.units == ("cpu",)
    # the width the planner's own predictions favour (ties: the narrower)
    pred = plan_prediction(str(out / "plan.json"))
    assert p.width == int(max(pred, key=lambda w: (pred[w]["tokens_per_s"], -int(w))))
    # tau: what a decode with the default lookup and datastore accepts, replayed over the
    # heads' held-out recorded responses as compile measures it; more than the trees' own
    assert p.tau_source.endswith("; tau replayed: 153 held-out recorded responses, the "
                                 "lookup nodes that accept the most and the datastore")
    draft = load_draft(model="smollm2")
    assert {str(c.width): c.tau for c in p.candidates} == pytest.approx(
        {str(w): t for w, t in draft["tau"].items()})
    trees = tau_table(tuple(draft["tau"]), draft["rank_probs"], ranks=draft["ranks"])[0]
    assert all(draft["tau"][w] > trees[w] + 0.1 for w in draft["tau"] if w > 1)
    assert UnitCostModel.load(str(out / "cost" / "cpu.json")).source == MEASURED
    # compile --plan: the plan's width and tree reach the artifact, and AnnotateCost costs every
    # kernel with the fitted models tune wrote beside the plan.
    rc, _, err = cli("compile", "--model", "smollm2", "--max-context", 512, "--plan",
                         out / "plan.json", "--quiet", "-o", tmp_path / "art")
    assert rc == 0, err
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert m["default_width"] == p.width and m["default_width_source"] == "plan"
    if p.width > 1:
        assert m["speculative"]["trees"][str(p.width)] == p.tree.to_json()
    assert m["cost_models"]["cpu"].startswith("fitted")
    linear = [k for k in m["kernels"] if k["rule"] == host_linear_rule()]
    assert linear and all(k["predicted_us"] > 0 for k in linear)
    again = profile_command("smollm2", ["cpu"], str(out / "profile.sqlite"), quick=True,
                            progress=lines.append)
    assert again["units"]["cpu"]["reused"]
    with pytest.raises(HetcompError, match="spec"):
        tune_command("smollm2", ["cpu", "orin-nx"], str(tmp_path / "mixed"), quick=True)


def test_profile_kit_built_here_measured_with_runtime_only(tmp_path):
    """A kit compiled here is measured by a runtime-only TVM (as on a GPU host) into a
    database that `tune --profile` plans from; the fingerprint records the kit's target."""
    from hetcomp.driver.tuning import profile_command, tune_command
    from hetcomp.errors import HetcompError

    try:
        from hetcomp.frontend import default_gguf_path

        default_gguf_path()
    except HetcompError as e:
        pytest.skip(str(e))
    kit = tmp_path / "kit"
    profile_command("smollm2", ["cpu", "cuda"], quick=True, kit_out=str(kit), target="x86-64-v3",
                    progress=lambda s: None)
    assert sorted(os.listdir(kit)) == ["cpu.so", "cuda.so", "kit.json"]
    db = tmp_path / "p.sqlite"
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    res = subprocess.run([sys.executable, "-m", "hetcomp", "profile", "--kit", str(kit),
                          "--units", "cpu", "-o", str(db)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)["units"]["cpu"]
    assert json.loads(info["fingerprint"]["target"])["mcpu"] == "x86-64-v3"
    assert info["measurements"] > 50
    with ProfileDB(str(db)) as stored:  # what tune reads to put the unit on the host's memory
        assert stored.unit_info(info["fingerprint"]["digest"])["shared_memory"] is True
    assert is_plot(str(tmp_path / "p.png")) and json.loads(res.stdout)["plot"] == str(
        tmp_path / "p.png")
    summary = tune_command("smollm2", ["cpu"], str(tmp_path / "tune"), profile=str(db),
                           progress=lambda s: None)
    assert is_plot(str(tmp_path / "tune" / "profile.png"))
    assert summary["plan"]["units"] == ["cpu"] and summary["plan"]["source"] == MEASURED
    # Without --units, the kit's own units (here cpu and cuda, which this machine lacks),
    # all found before the database is touched.
    res = subprocess.run([sys.executable, "-m", "hetcomp", "profile", "--kit", str(kit),
                          "-o", str(tmp_path / "all.sqlite")], capture_output=True, text=True,
                         env=env, timeout=600)
    if "cuda" not in res.stdout:  # (a GPU host measures both)
        assert_one_line_error(res.returncode, res.stderr, "unit 'cuda' is not present")
        assert not (tmp_path / "all.sqlite").exists()
    # A unit the kit was not built for is refused with one line.
    res = subprocess.run([sys.executable, "-m", "hetcomp", "profile", "--kit", str(kit),
                          "--units", "orin-nx-gpu", "-o", str(db)], capture_output=True,
                         text=True, env=env, timeout=600)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    # Each library records the extensions its code uses (the GPU's host code: x86-64-v3's);
    # a CPU that lacks one is refused before the library loads (it would die with SIGILL).
    meta = json.loads((kit / "kit.json").read_text())
    assert {"avx2", "fma"} <= set(meta["units"]["cpu"]["cpu"]["features"])
    assert meta["units"]["cuda"]["cpu"] == meta["units"]["cpu"]["cpu"]
    lacking = lacking_cpu_feature()
    if lacking is not None:
        meta["units"]["cpu"]["cpu"]["features"].append(lacking)
        (kit / "kit.json").write_text(json.dumps(meta))
        res = subprocess.run([sys.executable, "-m", "hetcomp", "profile", "--kit", str(kit),
                              "--units", "cpu", "-o", str(tmp_path / "q.sqlite"), "--force"],
                             capture_output=True, text=True, env=env, timeout=600)
        assert_one_line_error(res.returncode, res.stderr, f"lacks ({lacking})")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from hetcomp.frontend.weights import random_weights
    from hetcomp.testing import TINY, byte_tokenizer_spec
    from hetcomp.testing.gguf_writer import write_gguf

    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_gguf(path, TINY, random_weights(TINY, seed=0), byte_tokenizer_spec(TINY.vocab_size))
    return path


@pytest.fixture(scope="module")
def tiny_kit(tmp_path_factory, tiny_gguf):
    """A quick cpu + cuda kit of the tiny model for any x86 CPU (``--target x86-64-v3``)."""
    from hetcomp.driver.profiling import profile_command

    kit = tmp_path_factory.mktemp("kits") / "kit"
    profile_command(str(tiny_gguf), ["cpu", "cuda"], quick=True, kit_out=str(kit),
                    target="x86-64-v3", progress=lambda s: None)
    return kit


def test_profile_kit_for_aarch64_links_with_the_cross_linker(tmp_path, tiny_gguf, cli,
                                                             monkeypatch):
    """An aarch64 kit's libraries are aarch64 code linked by the cross linker (the host's
    linker refused them); without that linker it is one line before the work, and such a kit
    is refused here (another architecture) before a database is made."""
    import shutil

    kit, db = tmp_path / "kit", tmp_path / "db.sqlite"
    if shutil.which("aarch64-linux-gnu-gcc") is not None:
        rc, _, err = cli("profile", "--model", tiny_gguf, "--quick", "--units", "cpu,cuda",
                         "--kit-out", kit, "--target", "aarch64")
        assert rc == 0, err
        meta = json.loads((kit / "kit.json").read_text())
        for name in ("cpu", "cuda"):
            with open(kit / f"{name}.so", "rb") as fh:
                head = fh.read(20)
            assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183
            assert meta["units"][name]["cpu"]["arch"] == "aarch64"
        # the GPU's host code runs on the kit's CPU (a board's aarch64 cores)
        assert meta["units"]["cuda"]["target"]["host"] == meta["units"]["cpu"]["target"]
        rc, _, err = cli("profile", "--kit", kit, "-o", db)
        assert_one_line_error(rc, err, "built for aarch64")
        assert not db.exists()
    monkeypatch.setenv("PATH", str(tmp_path))  # no cross linker anywhere
    rc, _, err = cli("profile", "--model", tiny_gguf, "--quick", "--kit-out", tmp_path / "k2",
                     "--target", "aarch64")
    assert_one_line_error(rc, err, "cross linker aarch64-linux-gnu-gcc")
    assert set(os.listdir(tmp_path)) <= {"kit"}  # no k2, no temporary left behind


def test_profile_kit_target_names_its_cpu(tmp_path, tiny_gguf, tiny_kit, cli):
    """``--target`` names the kit's CPU: the cpu unit's probes are its LLVM code, a cuda
    unit's are CUDA driven by it; ``cuda`` names no CPU, and without --kit-out --target
    means nothing: each is one line, nothing written."""
    meta = json.loads((tiny_kit / "kit.json").read_text())
    cpu, gpu = meta["units"]["cpu"]["target"], meta["units"]["cuda"]["target"]
    assert cpu == {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"}
    assert gpu["kind"] == "cuda" and gpu["host"] == cpu
    rc, _, err = cli("profile", "--model", tiny_gguf, "--quick", "--kit-out", tmp_path / "k",
                     "--target", "cuda")
    assert_one_line_error(rc, err, "--target cuda is not a CPU target")
    rc, _, err = cli("profile", "--model", tiny_gguf, "--quick", "--target", "x86-64-v3",
                     "-o", tmp_path / "db.sqlite")
    assert_one_line_error(rc, err, "--target names the CPU a kit is built for")
    assert os.listdir(tmp_path) == []


def test_profile_kit_for_the_gpu_it_names(tmp_path, tiny_gguf, tiny_kit, cli, monkeypatch):
    """``--cuda-arch`` names the GPU a kit's cuda probes are for (sm_87 for an Orin board;
    default sm_90), and its CUDA source is compiled for that GPU where the kit loads; it
    needs a cuda unit and is the kit's own when one is measured: each refusal one line."""
    from hetcomp import _tvm
    from hetcomp.profile import measure

    kit = tmp_path / "orin"
    rc, out, err = cli("profile", "--model", tiny_gguf, "--quick", "--units", "cpu,cuda",
                       "--kit-out", kit, "--cuda-arch", "sm_87")
    assert rc == 0, err
    assert json.loads(out)["cuda_arch"] == "sm_87"
    meta = json.loads((kit / "kit.json").read_text())
    assert meta["units"]["cuda"]["target"]["arch"] == "sm_87"
    assert json.loads((tiny_kit / "kit.json").read_text())["units"]["cuda"]["target"][
        "arch"] == "sm_90"
    loading = {}
    monkeypatch.setattr(_tvm, "load_module",
                        lambda path: loading.setdefault(os.path.basename(path),
                                                        _tvm.loading_cuda_arch()))
    monkeypatch.delenv("HETCOMP_CUDA_ARCH", raising=False)
    measure.load_kit_libraries(measure.Kit.open(str(kit)), ["cpu", "cuda"])
    assert loading["cuda.so"] == "sm_87"
    for args, needle in (
            (("--units", "cpu", "--kit-out", tmp_path / "k1", "--cuda-arch", "sm_87"),
             "add cuda to --units"),
            (("--units", "cpu,cuda", "--kit-out", tmp_path / "k2", "--cuda-arch", "sm87"),
             "sm87"),
            (("--kit", kit, "-o", tmp_path / "db.sqlite", "--cuda-arch", "sm_90"),
             "compiled for its GPU when it was built")):
        rc, _, err = cli("profile", "--model", tiny_gguf, "--quick", *args)
        assert_one_line_error(rc, err, needle)
    assert sorted(os.listdir(tmp_path)) == ["orin"]


def test_a_cuda_unit_is_measured_for_its_own_gpu(monkeypatch):
    """Profiling a GPU here compiles its probes for the GPU's compute capability (an Orin's
    sm_87), unless told; with no capability reported, sm_90."""
    from hetcomp.profile import units

    monkeypatch.setattr(units, "gpu_info", lambda: "Orin / 540.4")
    for reported, arch in ((["8.7"], "sm_87"), (["9.0"], "sm_90"), ([], "sm_90"),
                           (["[N/A]"], "sm_90")):
        monkeypatch.setattr(units, "_smi", lambda fields, r=reported: r)
        assert units.detect_unit("cuda").target["arch"] == arch, reported
    assert units.detect_unit("cuda", cuda_arch="sm_90a").target["arch"] == "sm_90a"


def test_profile_kit_refused_before_the_database(tmp_path, tiny_kit, cli, monkeypatch):
    """Whatever refuses a kit (a library missing or that does not load, a library built
    for another unit, its cuda unit on a machine without one) does so before the database
    is made; a measurement that fails before storing anything removes the database it
    made, and never one that was there."""
    import shutil

    from hetcomp.driver.profiling import profile_command
    from hetcomp.errors import HetcompError
    from hetcomp.profile import measure

    db = tmp_path / "db.sqlite"

    def damaged(name, edit):
        kit = tmp_path / name
        shutil.copytree(tiny_kit, kit)
        edit(kit)
        return kit

    def retarget(kit):  # what `--target cuda` built: the cpu unit's probes as CUDA kernels
        meta = json.loads((kit / "kit.json").read_text())
        meta["units"]["cpu"]["target"] = meta["units"]["cuda"]["target"]
        (kit / "kit.json").write_text(json.dumps(meta))

    import hetcomp.driver.profiling as driver_profile

    # refused before: no database is even opened (then removed)
    monkeypatch.setattr(driver_profile, "ProfileDB", lambda path: pytest.fail("database made"))
    for kit, needle in ((damaged("noso", lambda k: (k / "cpu.so").unlink()), "lacks its cpu"),
                        (damaged("junk", lambda k: (k / "cpu.so").write_text("junk")),
                         "cannot load the cpu probe library"),
                        (damaged("cu", retarget), "built for cuda, not for the cpu unit")):
        rc, _, err = cli("profile", "--kit", kit, "--units", "cpu", "-o", db)
        assert_one_line_error(rc, err, needle)
        assert not db.exists(), needle
    if not shutil.which("nvidia-smi"):
        rc, _, err = cli("profile", "--kit", tiny_kit, "-o", db)
        assert_one_line_error(rc, err, "unit 'cuda' is not present")
        assert not db.exists()

    def fail(*args, **kwargs):
        raise HetcompError("a kernel differs from numpy")

    monkeypatch.undo()
    monkeypatch.setattr(measure, "measure_groups", fail)
    with pytest.raises(HetcompError, match="differs"):
        profile_command(kit=str(tiny_kit), units=["cpu"], out=str(db), progress=lambda s: None)
    assert not db.exists() and not os.path.exists(f"{db}-journal")
    ProfileDB(str(db)).close()  # a database that was there stays
    with pytest.raises(HetcompError, match="differs"):
        profile_command(kit=str(tiny_kit), units=["cpu"], out=str(db), progress=lambda s: None)
    assert db.exists()


def test_read_kit_checks_every_key(tmp_path, tiny_kit, cli):
    """A kit.json without a key its readers use, or with one of another type, is one line
    naming the key, from `inspect` and `profile --kit` alike (never a KeyError)."""
    from hetcomp.errors import HetcompError
    from hetcomp.profile.measure import KIT_FORMAT, read_kit

    bare = tmp_path / "bare"
    bare.mkdir()
    for body, key in (({}, "'model'"), ({"model": "m"}, "'units'")):
        (bare / "kit.json").write_text(json.dumps({"format": KIT_FORMAT, **body}))
        for args in (("inspect", bare), ("profile", "--kit", bare, "-o", tmp_path / "db")):
            rc, _, err = cli(*args)
            assert_one_line_error(rc, err, key)
    assert not (tmp_path / "db").exists()
    good = json.loads((tiny_kit / "kit.json").read_text())
    edits = {
        "'units.cpu.target'": lambda k: k["units"]["cpu"].pop("target"),
        "'units.cuda.library'": lambda k: k["units"]["cuda"].update(library="../cuda.so"),
        "'units.cpu.cpu'": lambda k: k["units"]["cpu"].update(cpu={"arch": "x86_64"}),
        "'units.cpu.int8_dot'": lambda k: k["units"]["cpu"].update(int8_dot="yes"),
        "'units'": lambda k: k.update(units=["cpu"]),
        "'options'": lambda k: k.pop("options"),
        "'options' ": lambda k: k["options"].update(mode="slow"),
        "'groups'": lambda k: k.update(groups={}),
        "'groups' ": lambda k: k["groups"][0].pop("probes"),
    }
    for key, edit in edits.items():
        meta = json.loads(json.dumps(good))
        edit(meta)
        (bare / "kit.json").write_text(json.dumps(meta))
        with pytest.raises(HetcompError, match=key.strip()):
            read_kit(str(bare))
    (bare / "kit.json").write_text(json.dumps(good))
    assert read_kit(str(bare)) == good


def test_time_calls_continues_the_rotation_across_probes():
    """Probes sharing rotated buffers never restart at copies another probe just streamed:
    the timed call indices count up across all probes and rounds."""
    from hetcomp.profile.measure import time_calls

    seen: list[tuple[int, int]] = []
    calls = [lambda i, j=j: seen.append((j, i)) for j in range(3)]
    result = time_calls(calls, min_time_s=0.0, rounds=4)
    timed = [i for _, i in seen if i >= 2]  # 0 and 1: each call's warm-up
    assert timed == sorted(timed) and len(set(timed)) == len(timed)
    assert [c for _, c in result] == [4, 4, 4]  # one call per batch here (min_time_s = 0)


def test_corun_load_dies_with_the_profiler():
    """A profiler killed while its co-run load streams must not leave the load running (an
    orphaned load silently halves every later measurement on the machine)."""
    code = ("import os, sys\n"
            "from hetcomp.profile.measure import CoRunLoad\n"
            "load = CoRunLoad().__enter__(); load.resume()\n"
            "print(load._proc.pid, flush=True); os._exit(0)\n")
    pid = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True).stdout)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().split(")")[-1].split()[0] == "Z":  # exited, not yet reaped
                return
        import time
        time.sleep(0.05)
    os.kill(pid, 9)
    raise AssertionError("the co-run load outlived its profiler")


def test_corun_layout_gives_the_load_a_core_the_pool_does_not_use():
    """The load stands for a GPU's or NPU's memory traffic, which takes no CPU core: it runs
    on a core the unit's pool does not use, or, where the pool uses every core, on its last
    thread's core with the slowdown timed one thread short."""
    from hetcomp.profile.measure import CoRunLayout, corun_layout

    assert corun_layout("cpu", 2, [0, 1]) == CoRunLayout(1, 1)  # this 2-core machine, CI
    assert corun_layout("cpu", 16, list(range(16))) == CoRunLayout(15, 15)
    assert corun_layout("cpu", 2, [0, 1, 2, 3]) == CoRunLayout(3, None)  # TVM_NUM_THREADS=2
    assert corun_layout("cpu", 2, [4, 5, 0, 1, 2, 3]) == CoRunLayout(3, None)  # 2 big cores
    assert corun_layout("cpu", 4, [0, 1]) == CoRunLayout(1, 1)  # more threads than cores
    assert corun_layout("cuda", 2, [0, 1]) == CoRunLayout(1, None)  # the GPU's own pool
    assert not corun_layout("cpu", 1, [0]).possible
    assert corun_layout("cpu", 2, [0, 1], allowed={0}) == CoRunLayout(None, 1)


def test_the_pool_core_order_is_where_tvm_binds_its_threads():
    """``cpu_pool_core_order`` restates TVM's binding: worker i of the pool is bound to
    order[i] (the calling thread, task 0, is not bound)."""
    from hetcomp import _tvm

    if os.environ.get("TVM_BIND_THREADS", "1") != "1" or (os.cpu_count() or 1) < 2:
        pytest.skip("TVM binds no thread here")
    pool, order = _tvm.cpu_pool_threads(), _tvm.cpu_pool_core_order()
    bound = set()
    for tid in os.listdir("/proc/self/task"):
        cores = os.sched_getaffinity(int(tid))
        if len(cores) == 1:
            bound |= cores
    assert bound == set(order[1:min(pool, len(order))])


def test_corun_slowdown_is_timed_beside_the_load_not_on_a_core_it_takes(monkeypatch):
    """Timed on the cores the load shares, a parallel CPU kernel waited for its thread on the
    load's core (co-run x2-x166 on a 2-core machine; x0.95-1.04 with the pool a thread short).
    Where the pool uses every core, the load is pinned to the last thread's core and the
    co-run row is the whole pool's alone time scaled by the slowdown timed one thread short;
    the pool is whole again after."""
    from hetcomp import _tvm
    from hetcomp.profile import measure
    from hetcomp.profile.units import detect_unit

    pool, order = _tvm.cpu_pool_threads(), _tvm.cpu_pool_core_order()
    if min(pool, len(order)) < 2:
        pytest.skip("one core: no co-run timing")
    monkeypatch.setattr(measure._tvm, "cpu_pool_core_order", lambda: order[:pool])
    tiny = ModelShape(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, head_dim=16,
                      vocab=320, max_context=128)
    opts = dataclasses.replace(measure.ProfileOptions.quick(), widths=(1,), cache_lens=(32,))
    groups, kernels = measure.plan_probes(tiny, opts)
    groups = [g for g in groups if g.desc.startswith("rms_norm")]
    lib = measure.build_probe_library("cpu", {"kind": "llvm"},
                                      {p.func: kernels[p.func] for p in groups[0].probes},
                                      progress=lambda s: None)
    seen, loads = [], []
    real_enter = measure.CoRunLoad.__enter__

    def enter(self):
        loads.append(real_enter(self))
        return loads[-1]

    def state(pid):
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0]

    def fake_time(calls, *a, **k):  # alone on the whole pool 1 s, a thread short 2 s, beside 3 s
        running = state(loads[0]._proc.pid) != "T"
        threads = _tvm.cpu_pool_threads()
        seen.append((threads, running, os.sched_getaffinity(loads[0]._proc.pid)))
        sec = 3.0 if running else 1.0 if threads == pool else 2.0
        return [(sec, 7)] * len(calls)

    monkeypatch.setattr(measure.CoRunLoad, "__enter__", enter)
    monkeypatch.setattr(measure, "time_calls", fake_time)
    lines = []
    rows = measure.measure_groups(detect_unit("cpu"), lib, groups, opts, progress=lines.append)
    load_core = {order[pool - 1]}
    assert seen == [(pool, False, load_core), (pool - 1, False, load_core),
                    (pool - 1, True, load_core)]
    n = len(groups[0].probes)
    assert sorted((m.features.corun, m.seconds) for m in rows) == \
        [(False, 1.0)] * n + [(True, 1.5)] * n
    assert _tvm.cpu_pool_threads() == pool
    assert f"co-run load on core {order[pool - 1]}" in lines[0]

def test_gpu_host_pays_its_link_for_a_cpu_share():
    """The crossing cost belongs to the discrete unit of the pair, whichever one hosts: a CPU
    share of a GPU-hosted layer is no cheaper to reach than a GPU share of a CPU-hosted one."""
    gpu = UnitModel("G", lambda f: 1e-6, shared_memory=False, sync_s=1e-3, link_gbs=10.0)
    cpu = UnitModel("C", lambda f: 1e-6)
    split = {k: (("G", 0.5), ("C", 0.5)) for k in LINEAR_KINDS}
    gpu_host = predict_step_time([gpu, cpu], 1, 0, shape=SHAPE, split=split)
    flipped = {k: (("C", 0.5), ("G", 0.5)) for k in LINEAR_KINDS}
    cpu_host = predict_step_time([cpu, gpu], 1, 0, shape=SHAPE, split=flipped)
    alone = predict_step_time([gpu], 1, 0, shape=SHAPE)
    n_linear = 4 * SHAPE.layers + 1
    assert gpu_host == pytest.approx(cpu_host, rel=1e-6)
    assert gpu_host > alone + n_linear * 1e-3  # every split layer pays the 1 ms crossing


def test_launch_probes_measure_the_synchronised_latency():
    """The profile times the smallest linear kernel back to back and synchronised after each
    call; a discrete unit's per-op sync cost adds the difference (never a fitted op class)."""
    from hetcomp.driver.tuning import launch_latency
    from hetcomp.profile.measure import LAUNCH_MODES, ProfileOptions, plan_probes

    groups, kernels = plan_probes(SHAPE, ProfileOptions.quick())
    (launch,) = [g for g in groups if g.desc == "launch"]
    assert [p.features.kind for p in launch.probes] == list(LAUNCH_MODES)
    assert len({p.func for p in launch.probes}) == 1 and launch.probes[0].func in kernels
    feats = launch.probes[0].features

    def row(kind, seconds, corun=False):
        return Measurement("gpu", dataclasses.replace(feats, kind=kind, corun=corun), seconds, 10)

    rows = [row("batched", 30e-6), row("synced", 58e-6), row("synced", 1.0, corun=True)]
    assert launch_latency(rows) == pytest.approx(28e-6)
    assert launch_latency(rows[:1]) == 0.0  # older profiles: no launch probes
    assert launch_latency([row("batched", 30e-6), row("synced", 20e-6)]) == 0.0


def test_attention_probes_measure_each_kernel_verify_runs():
    """The profile measures the attention kernels verify runs at each width: the fused kernel
    at the fused widths, dense part / sparse part / merge at the others, each its own op
    class (the sparse part over a real tree, its mask non-zeros in the features)."""
    from hetcomp.decoder import FUSED_WIDTHS
    from hetcomp.profile.measure import (
        ProfileOptions,
        build_probe_library,
        measure_groups,
        plan_probes,
        probe_tree,
    )
    from hetcomp.profile.units import detect_unit

    tiny = ModelShape(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, head_dim=16,
                      vocab=320, max_context=128)
    opts = dataclasses.replace(ProfileOptions.quick(), widths=(1, 8), cache_lens=(32,),
                               corun=False)
    groups, kernels = plan_probes(tiny, opts)
    # The CUDA-graph build's kernel at every width, measured on GPUs only (no CPU build runs
    # it): the CPU's rows below have none of it.
    (device,) = [g for g in groups if g.gpu_only]
    assert {p.func for p in device.probes} == {"tree_attention"}
    assert sorted(p.features.w for p in device.probes) == [1, 8]
    assert {p.features.op for p in device.probes} == {"tree_attention"}
    groups = [g for g in groups if g.desc.startswith("attention") or g.gpu_only]
    used = {p.func for g in groups for p in g.probes}
    lib = build_probe_library("cpu", {"kind": "llvm"}, {k: kernels[k] for k in used},
                              progress=lambda s: None)
    rows = measure_groups(detect_unit("cpu"), lib, groups, opts, progress=lambda s: None)
    by_class = {}
    for m in rows:
        by_class.setdefault(m.features.op, []).append(m)
        assert m.seconds > 0
    assert set(by_class) == {"attention", *SPLIT_ATTENTION}
    assert {m.features.w for m in by_class["attention"]} == set(FUSED_WIDTHS) & {1, 8}
    (sparse,) = by_class["attention_sparse"]
    # root, 4 children of the root (2 keys each), 3 grandchildren (3 each)
    assert sparse.features.w == 8 and sparse.features.n == probe_tree(8).mask().sum() == 18
    assert [m.features.cache_len for m in by_class["attention_dense"]] == [32]


def test_linear_probes_are_timed_after_the_blas_threads_park(monkeypatch):
    """A linear group's kernels are checked against numpy first; numpy's OpenBLAS threads
    then spin for ~0.1 s, and TVM's pool timed meanwhile shared the cores with them (on a
    2-core machine most quick profiles timed every linear at a scheduler tick, ~4 ms). The
    profiler waits ``BLAS_PARK_S`` between a linear group's check and its timing, and only
    there (the other groups have no numpy check)."""
    from hetcomp.profile import measure
    from hetcomp.profile.units import detect_unit

    tiny = ModelShape(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, head_dim=16,
                      vocab=320, max_context=128)
    opts = dataclasses.replace(measure.ProfileOptions.quick(), widths=(1,), cache_lens=(32,),
                               corun=False)
    groups, kernels = measure.plan_probes(tiny, opts)
    groups = [g for g in groups if g.desc.startswith(("linear o", "rms_norm"))]
    assert len(groups) == 3  # two linear shapes, one norm
    used = {p.func for g in groups for p in g.probes}
    lib = measure.build_probe_library("cpu", {"kind": "llvm"}, {k: kernels[k] for k in used},
                                      progress=lambda s: None)
    events = []
    real_check, real_time = measure._Runner.check_linear, measure.time_calls
    monkeypatch.setattr(measure._Runner, "check_linear", lambda self, *a: (
        events.append("check"), real_check(self, *a))[1])
    monkeypatch.setattr(measure.time, "sleep", lambda s: events.append(("sleep", s)))
    monkeypatch.setattr(measure, "time_calls", lambda *a, **k: (
        events.append("time"), real_time(*a, **k))[1])
    measure.measure_groups(detect_unit("cpu"), lib, groups, opts, progress=lambda s: None)
    linear = ["check", ("sleep", measure.BLAS_PARK_S), "time"]
    assert events == linear + linear + ["time"]  # (the norm: timed, no check, no wait)
    assert measure.BLAS_PARK_S >= 0.2


def test_no_probe_writes_past_a_short_context():
    """rope_kv writes its rows' K/V at positions n..n+w-1 of the probe caches: with a
    128-token context and W = 64 the fixed n = 100 wrote past them (a full profile of a
    tiny model died in free()). Every cache-writing probe stays inside the context."""
    from hetcomp.profile.measure import ProfileOptions, plan_probes

    tiny = ModelShape(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, head_dim=16,
                      vocab=320, max_context=80)
    opts = dataclasses.replace(ProfileOptions(), widths=(1, 16, 64, 128))
    groups, _ = plan_probes(tiny, opts)
    rope = [p for g in groups for p in g.probes if p.func == "rope_kv"]
    # (w, n): no 128-row tree in 80 positions; n = 100 where it fits, else the last rows
    assert sorted((p.features.w, *[a[1] for a in p.args if a[0] == "int"]) for p in rope) == [
        (1, 79), (16, 64), (64, 16)]


def test_gemma3_probes_measure_its_own_kernels():
    """A Gemma 3 shape's profile measures the kernels its verify adds (the per-head q/k norm,
    the residual norm) and its GeGLU activation, not SwiGLU."""
    from hetcomp.profile.measure import (
        ProfileOptions,
        build_probe_library,
        measure_groups,
        plan_probes,
    )
    from hetcomp.profile.units import detect_unit
    from hetcomp.testing import TINY_GEMMA3

    opts = dataclasses.replace(ProfileOptions.quick(), widths=(1,), corun=False)
    groups, kernels = plan_probes(ModelShape.from_config(TINY_GEMMA3), opts)
    groups = [g for g in groups if g.desc in ("qk_norm", "rms_norm_res", "silu_mul")]
    used = {p.func for g in groups for p in g.probes}
    assert used == {"qk_norm", "rms_norm_res", "gelu_mul"}
    lib = build_probe_library("cpu", {"kind": "llvm"}, {k: kernels[k] for k in used},
                              progress=lambda s: None)
    rows = measure_groups(detect_unit("cpu"), lib, groups, opts, progress=lambda s: None)
    assert {m.features.kind for m in rows} == {"qk_norm", "rms_norm", "gelu_mul"}
    assert all(m.seconds > 0 for m in rows)


def test_gemma3_gpu_attention_probe_is_its_kernel_with_the_q_k_norm():
    """A GPU profile of a Gemma 3 shape times the CUDA-graph build's tree_attention with the
    q/k norm inside (its two gammas in the probe's arguments): the probe runs here, its
    GPU-only group let onto the CPU, with the kernel's CPU form."""
    from hetcomp.profile.measure import (
        ProfileOptions,
        build_probe_library,
        measure_groups,
        plan_probes,
    )
    from hetcomp.profile.units import detect_unit
    from hetcomp.testing import TINY_GEMMA3

    opts = dataclasses.replace(ProfileOptions.quick(), widths=(1, 4), cache_lens=(32,),
                               corun=False)
    groups, kernels = plan_probes(ModelShape.from_config(TINY_GEMMA3), opts)
    (device,) = [dataclasses.replace(g, gpu_only=False) for g in groups if g.gpu_only]
    func = kernels["tree_attention"]()
    assert len(func.params) == 10  # qkv, cs, q_gamma, k_gamma, caches, mask, pos, layer, out
    lib = build_probe_library("cpu", {"kind": "llvm"}, {"tree_attention": kernels[
        "tree_attention"]}, progress=lambda s: None)
    rows = measure_groups(detect_unit("cpu"), lib, [device], opts, progress=lambda s: None)
    assert [m.features.w for m in rows] == [1, 4] and all(m.seconds > 0 for m in rows)


def test_kernel_features_cost_each_attention_kernel_as_its_class():
    """AnnotateCost's kernel descriptions map to the op class each attention kernel is
    profiled as (the dense part is an ``attention`` kernel with ``part = dense``)."""
    from hetcomp.cost.roofline import kernel_features

    def feat(kind, **kw):
        return kernel_features(SHAPE, {"op_kind": kind, "w": 8, "cache_len": 100, **kw})

    assert feat("attention").op == "attention" and feat("attention").n == 108
    assert feat("attention", part="dense").op == "attention_dense"
    assert feat("attention", part="dense").n == 100
    assert feat("sparse_tree_attention", nnz=17).n == 17
    assert feat("sparse_tree_attention").n == estimated_tree_nnz(8)
    assert feat("attention_merge").op == "attention_merge"
    assert feat("tree_attention").op == "tree_attention" and feat("tree_attention").n == 108


def test_best_width_trades_accepted_tokens_against_step_time():
    """tau(W) / T(W) decides, not the step alone nor tau alone; the narrower of equals."""
    taus = {1: 1.0, 2: 1.5, 4: 1.8}
    assert best_width(taus, {1: 1.0, 2: 1.4, 4: 1.9}) == 2  # 1.07 a second against 1.0
    assert best_width(taus, {1: 1.0, 2: 1.6, 4: 1.9}) == 1  # no speculation pays here
    assert best_width(taus, {1: 1.0, 2: 1.5, 4: 1.8}) == 1  # all equal: the narrowest
    assert best_width(taus, {2: 1.5, 4: 1.0}) == 4  # only the widths timed compete


def test_a_width_is_timed_again_while_it_may_beat_the_best():
    """may_beat_best: a width not timed yet may (however slow the narrower ones were: a busy
    spell on one must not rule out the rest); a timed one is timed again within the slack of
    the best rate. SmolLM2 float16 here (the replayed taus, ms a step): W = 2 and 4 again."""
    taus = {1: 1.0, 2: 1.4, 4: 2.04, 8: 2.45, 16: 3.07, 32: 3.4, 64: 3.77}
    steps = {1: 9.5, 2: 10.0, 4: 11.9, 8: 19.0, 16: 28.2, 32: 46.7, 64: 84.0}
    assert all(may_beat_best(w, taus, {}) for w in taus)
    assert may_beat_best(8, taus, {1: 9.5, 2: 40.0, 4: 11.9})  # not timed yet
    assert may_beat_best(4, taus, steps)  # the best itself: 171 tokens/s
    assert may_beat_best(2, taus, steps, slack=0.8) and not may_beat_best(2, taus, steps)  # 82%
    assert may_beat_best(8, taus, steps, slack=0.75)  # 129 tokens/s: 75%
    assert [w for w in taus if may_beat_best(w, taus, steps, slack=0.8)] == [2, 4]
    assert not any(may_beat_best(w, taus, steps) for w in (1, 8, 16, 32, 64))
