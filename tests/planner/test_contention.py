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
