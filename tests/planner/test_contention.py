"""Contention changes plans where units share memory, and plan.json says by how much and why."""

import json

import pytest

from hetcomp.cost.roofline import ModelShape, layer_attention
from hetcomp.errors import HetcompError
from hetcomp.hardware import ORIN_NX_CPU, ORIN_NX_GPU
from hetcomp.planner import Plan, PlannerOptions, UnitModel, plan

SMOL = ModelShape(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, head_dim=64,
                  vocab=49152)
TAU = {1: 1.0, 4: 1.8, 16: 2.4}


def _plan(units, contention):
    return plan(SMOL, units, tau=TAU,
                options=PlannerOptions(widths=tuple(TAU), contention=contention))


def test_spec_board_plan_changes_with_shared_bandwidth():
    """The Orin's CPU and GPU share 65 GB/s (the faster one's streaming rate): planned
    alone, the CPU takes about half of every linear; planned under the shared bandwidth, it
    takes far less."""
    units = [UnitModel.from_spec(ORIN_NX_GPU), UnitModel.from_spec(ORIN_NX_CPU)]
    on, off = _plan(units, True), _plan(units, False)
    cpu_share = {k: dict(s)["orin-nx-cpu"] for k, s in on.split}
    cpu_alone = {k: dict(s)["orin-nx-cpu"] for k, s in off.split}
    assert cpu_share != cpu_alone and cpu_share["gate_up"] < cpu_alone["gate_up"]
    assert on.tokens_per_s < off.tokens_per_s  # sharing the bandwidth costs time
    report = on.to_json()["contention"]
    assert report["enabled"] and on.shared_memory
    gpu = report["units"]["orin-nx-gpu"]
    assert gpu["slowdown"] > 1.0 and "shared bandwidth: 65 GB/s" in gpu["source"]
    assert {u["slowdown"] for u in off.contention["units"].values()} == {1.0}
    assert Plan.from_json(json.loads(json.dumps(on.to_json()))).contention == report


def _measured(name, alone_s_per_byte, corun_factor, shared=True):
    def cost(f):
        return f.bytes * alone_s_per_byte * (corun_factor if f.corun else 1.0) + 2e-6

    return UnitModel(name, cost, shared_memory=shared, link_gbs=0 if shared else 16.0)


def test_measured_co_run_slowdown_changes_the_split():
    """Two CPU clusters on one memory: the second slows 3x under co-run load (as its
    co-run profile says), so it gets fewer columns than when planned alone."""
    units = [_measured("cpu", 1e-10, 1.2), _measured("cpu:1", 1e-10, 3.0)]
    on, off = _plan(units, True), _plan(units, False)
    share_on = dict(dict(on.split)["gate_up"])["cpu:1"]
    share_off = dict(dict(off.split)["gate_up"])["cpu:1"]
    assert share_on < share_off
    u = on.contention["units"]["cpu:1"]
    assert u["slowdown"] == pytest.approx(3.0, rel=0.05) and u["source"] == \
        "measured co-run profile"


def test_units_on_their_own_memory_pay_no_co_run_slowdown():
    units = [_measured("cpu", 1e-10, 3.0), _measured("cuda", 1e-11, 3.0, shared=False)]
    on, off = _plan(units, True), _plan(units, False)
    assert on.split == off.split and not on.shared_memory
    assert on.contention["units"]["cuda"]["slowdown"] == 1.0
    assert "do not share memory" in on.contention["units"]["cuda"]["source"]


def test_measured_and_spec_units_are_refused_in_one_line():
    from hetcomp.driver.profiling import split_unit_names

    with pytest.raises(HetcompError, match="use --units orin-nx for the board"):
        split_unit_names(["cpu", "orin-nx"])
    assert split_unit_names(["orin-nx"]) == ([], ["orin-nx-cpu", "orin-nx-gpu"])


def test_split_attention_moves_only_tree_sized_bytes():
    """The cache stays with the dense part: across a 16 GB/s link, the dense unit gets the
    qkv rows and returns its [w, H, D + 1] partial (+ the tree's q/k/v for a host sparse
    part); the sparse unit gets q/k_tree/v_tree and returns its partial. No cache bytes."""
    from hetcomp.planner import _StepModel

    def free(_features):
        return 0.0

    units = [UnitModel("cpu", free), UnitModel("cuda", free, shared_memory=False, link_gbs=16.0)]
    model = _StepModel(SMOL, units, ratio_steps=4)
    w = 16
    q_kv, part = 4 * w * SMOL.qkv_size, 4 * w * SMOL.heads * (SMOL.head_dim + 1)
    for cache_len in (0, 1024):  # independent of the cache length
        parts = layer_attention(SMOL, w, cache_len)
        assert model.attention_time(parts, "cuda", "cpu") == pytest.approx(
            (2 * q_kv + part) / 16e9)
        assert model.attention_time(parts, "cpu", "cuda") == pytest.approx(
            (q_kv + part) / 16e9)


def _profile_db(path, gpu_shared):
    """A profile database as `hetcomp profile` stores it for a cpu and a cuda unit: linear
    probes alone and co-running (the GPU slows 2x beside the load, the CPU 1.2x), the GPU's
    round-trip copies and launch probes; the cuda unit's record says whether it works in
    the host's DRAM (``Unit.shared_memory``, the CUDA driver's "integrated")."""
    from hetcomp.cost.roofline import LINEAR_KINDS, Features, copy_features, linear_features
    from hetcomp.profile.db import Measurement, ProfileDB
    from hetcomp.profile.units import Fingerprint, Unit

    digests = {}
    with ProfileDB(str(path)) as db:
        for name, target, gbs, corun in (("cpu", {"kind": "llvm"}, 20e9, 1.2),
                                         ("cuda", {"kind": "cuda", "arch": "sm_87"}, 60e9, 2.0)):
            rows = [Measurement(name, f.with_corun(c), (f.bytes / gbs + 5e-6) * (corun if c
                                                                                else 1.0))
                    for kind in LINEAR_KINDS for w in (1, 4, 16) for r in (0.25, 0.5, 1.0)
                    for f in [linear_features(SMOL, kind, w, r)] for c in (False, True)]
            if name == "cuda":
                rows += [Measurement(name, copy_features(w, n), 2e-5 + 8.0 * w * n / 50e9)
                         for w in (1, 16) for n in (576, 49152)]
                rows += [Measurement(name, Features("launch", k, 1, 1, 0, 1.0, 0, False, 0, 4),
                                     t) for k, t in (("batched", 4e-6), ("synced", 1.2e-5))]
            fp = Fingerprint(unit=name, cpu_model="Orin", cores=8, threads=8,
                             gpu="Orin / 540" if name == "cuda" else "", tvm_version="0.27",
                             target=json.dumps(target, sort_keys=True), kernel_hash="k")
            unit = Unit(name, target, f"{name}:0", fp,
                        shared_memory=gpu_shared if name == "cuda" else True)
            db.store(unit.to_json(), fp.digest, "m", "full", rows)
            digests[name] = fp.digest
    return digests


@pytest.mark.parametrize("gpu_shared", [True, False])
def test_a_measured_integrated_gpu_is_planned_on_the_hosts_memory(tmp_path, gpu_shared):
    """A GPU profiled on a board where it works in the host's DRAM (a Jetson's) is planned as
    sharing it: its measured co-run slowdown counts and a crossing pays its synchronisation
    but no link. Every measured GPU used to be planned as discrete, so contention never
    changed a measured board's plan. A discrete GPU (or one profiled before units recorded
    their memory) stays on its link, its co-run profile unused."""
    from hetcomp.driver.tuning import measured_unit_models

    db = tmp_path / "p.sqlite"
    units, _ = measured_unit_models(str(db), "m", _profile_db(db, gpu_shared))
    gpu = {u.name: u for u in units}["cuda"]
    assert gpu.shared_memory == gpu_shared
    # sync: the copies' fitted intercept (20 us) and the launch latency (8 us)
    assert gpu.sync_s == pytest.approx(2.8e-5, rel=0.05)
    assert (gpu.link_gbs == 0) == gpu_shared and (gpu.mem_bw_gbs > 0) == gpu_shared
    on, off = _plan(units, True), _plan(units, False)
    report = on.contention["units"]["cuda"]
    if gpu_shared:
        assert on.shared_memory and on.split != off.split
        assert report["slowdown"] == pytest.approx(2.0, rel=0.05)  # as its profile measured
        assert report["source"].startswith("measured co-run profile")
    else:
        assert not on.shared_memory and on.split == off.split and report["slowdown"] == 1.0
