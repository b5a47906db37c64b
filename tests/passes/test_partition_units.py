"""Plans hosted on either unit, attention split both ways, the KV cache where the dense part
runs: numerics on two CPU virtual devices against the unpartitioned model."""

import dataclasses
import json

import pytest

from hetcomp import _tvm
from hetcomp.driver.compile import CompileOptions, compile_model
from hetcomp.frontend.llama import build_module
from hetcomp.hardware import target_dict
from hetcomp.passes import PartitionHetero
from hetcomp.plan import HeteroPlan
from hetcomp.runtime import generate, load_artifact
from hetcomp.testing import TINY, assert_matches_reference

c = _tvm.compiler()
HOST = target_dict("host")
# A second LLVM target: kernels of a unit whose target differs from the host unit's carry
# their own target, as a CPU share does in a GPU-hosted plan (the host is then the GPU).
OTHER = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}


@pytest.mark.parametrize("targets", [(HOST, OTHER), (OTHER, HOST)], ids=["host-first",
                                                                           "host-second"])
@pytest.mark.parametrize("dense,sparse", [(1, 0), (0, 1)])
def test_plan_on_either_host_matches(tmp_path, tiny_loaded, tiny_reference, targets, dense,
                                     sparse):
    plan = HeteroPlan(targets=targets, ratios=(("default", 0.37), ("down", 1.0),
                                               ("lm_head", 0.5)),
                      dense_attention=dense, sparse_attention=sparse)
    compile_model(CompileOptions(model="tiny", plan=plan), str(tmp_path / "a"), quiet=True,
                  weights=tiny_loaded)
    art = load_artifact(str(tmp_path / "a"))
    assert art.manifest["kv_unit"] == dense and art.kv_device == art.devices[dense]
    assert [str(d) for d in art.devices] == ["cpu:0", "cpu:1"]
    session = assert_matches_reference(art, tiny_reference, [5, 17, 99, 3])
    assert session.k_cache.device == art.devices[dense]


def _cache_copies(func) -> int:
    """``R.to_vdevice`` calls that move a cache-shaped (4-D) tensor."""
    n = 0
    for block in func.body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, c.relax.Call) and v.op.same_as(c.Op.get("relax.to_vdevice")) \
                    and len(v.args[0].ty.shape) == 4:
                n += 1
    return n


@pytest.mark.parametrize("unit", [0, 1])
def test_kv_cache_never_crosses_to_the_dense_unit(unit):
    """The cache parameters, the in-place K/V write and commit live on the dense unit: with
    attention on one unit, no cache-sized copy remains (the old placement copied the whole
    cache to unit 1 in every layer of every step)."""
    plan = HeteroPlan(targets=(HOST, HOST), ratios=(("default", 0.5),),
                      dense_attention=unit, sparse_attention=unit)
    mod = PartitionHetero(plan)(build_module(TINY))
    for name in ("verify", "prefill", "commit"):
        assert _cache_copies(mod[name]) == 0, name
    vd = next(p for p in mod["verify"].params if p.name == "k_cache").ty.vdevice
    assert (vd is None) == (unit == 0)
    if unit == 1:
        assert int(vd.vdevice_id) == 1 and int(mod["commit"].params[0].ty.vdevice.vdevice_id) == 1


def _crossings(func) -> list[tuple]:
    """The shapes (ints, or None for a symbolic dim) of the tensors ``func`` copies between
    units with ``R.to_vdevice``."""
    return [tuple(int(d) if isinstance(d, c.tir.IntImm) else None for d in v.args[0].ty.shape)
            for block in func.body.blocks for b in block.bindings
            if isinstance(v := b.value, c.relax.Call)
            and v.op.same_as(c.Op.get("relax.to_vdevice"))]


@pytest.mark.parametrize("dense,sparse", [(0, 1), (1, 0)])
def test_only_tree_sized_values_cross_in_split_attention(dense, sparse):
    """Attention split across units, the cache with the dense part: what crosses is the tree's
    q/k/v, its CSR and the [w, H, D + 1] partials (and the linear layers' column pieces),
    never a tensor with a cache-sized dimension. (The sparse kernel once read tree V from
    the V cache, which then went to the sparse unit in every layer of every step.)"""
    cfg = dataclasses.replace(TINY, max_context=200)  # a size no other tensor has
    plan = HeteroPlan(targets=(HOST, HOST), ratios=(("default", 0.5),),
                      dense_attention=dense, sparse_attention=sparse)
    mod = PartitionHetero(plan)(build_module(cfg, static_widths=(4,)))
    hq, g, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    for name in ("verify", "verify_w4", "prefill", "commit"):
        shapes = _crossings(mod[name])
        assert all(len(s) <= 3 and cfg.max_context not in s for s in shapes), (name, shapes)
    # The sparse part's inputs went to its unit, the partials came back to the host.
    w4 = set(_crossings(mod["verify_w4"]))
    assert {(hq, 4, d), (g, 4, d), (4, hq, d + 1)} <= w4
    assert ((5,) in w4) == bool(sparse)  # row_ptr crosses to unit 1 only for the sparse part


def _placed_calls(func) -> list[tuple[str, int | None]]:
    """``(kernel, vdevice id or None)`` of each ``call_tir`` site, in order."""
    return [(v.args[0].name_hint, None if (vd := b.var.ty.vdevice) is None
             else int(vd.vdevice_id))
            for block in func.body.blocks for b in block.bindings
            if isinstance(v := b.value, c.relax.Call) and v.op.same_as(c.call_tir_op)]


def test_shared_memory_plan_copies_as_any_plan_and_runs(tmp_path, tiny_loaded,
                                                       tiny_reference):
    """Units sharing one DRAM still get copies: TVM gives each device its own buffers and a
    kernel refuses arguments from another device (the plan without copies compiled, then
    failed its first call with "Mismatched device_id"). The shared flag is the planner's
    (cheap copies), the module is the copying plan's, and it decodes as the unpartitioned
    model."""
    plans = [HeteroPlan(targets=(HOST, HOST), ratios=(("default", 0.5),), dense_attention=1,
                        sparse_attention=0, shared_memory=shared) for shared in (False, True)]
    copying, shared = (PartitionHetero(p)(build_module(TINY))["verify"] for p in plans)
    assert shared.script() == copying.script()
    calls = _placed_calls(shared)
    assert ("attention_dense", 1) in calls and "to_vdevice" in shared.script()
    compile_model(CompileOptions(model="tiny", plan=plans[1]), str(tmp_path / "a"), quiet=True,
                  weights=tiny_loaded)
    art = load_artifact(str(tmp_path / "a"))
    assert art.manifest["plan"]["shared_memory"]
    assert_matches_reference(art, tiny_reference, [5, 17, 99, 3])


def test_manifest_records_plan_source(tmp_path, tiny_loaded):
    plan = HeteroPlan(targets=(HOST, HOST), ratios=(("default", 0.5),), source="spec-estimate")
    compile_model(CompileOptions(model="tiny", plan=plan, max_context=64),
                  str(tmp_path / "a"), quiet=True, weights=tiny_loaded)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["plan_source"] == "spec-estimate" and manifest["kv_unit"] == 0


def test_partitioned_smollm2_generates_as_unpartitioned(tmp_path, smollm2_weights,
                                                        smollm2_artifact):
    """The real model split across two CPU devices, attention split (dense on unit 1, where
    the cache lives; tree part on the host): the same greedy tokens as unpartitioned. (TVM's
    static memory planning shared storage across devices here and failed at run time.)"""
    plan = HeteroPlan(targets=(HOST, HOST), ratios=(("default", 0.5), ("lm_head", 0.25)),
                      dense_attention=1, sparse_attention=0)
    compile_model(CompileOptions(model="smollm2", plan=plan, max_context=256),
                  str(tmp_path / "a"), quiet=True, weights=smollm2_weights)
    art = load_artifact(str(tmp_path / "a"), verify=False)
    prompt = [1, 2, 3, 4]
    ref = load_artifact(smollm2_artifact, verify=False)
    assert generate(art, prompt, 12, False).ids == generate(ref, prompt, 12, False).ids
