"""Plans for block-quantized artifacts: the partition pass splits GGUF-block weights by column
panels (the planned model computes what the unplanned one does), the profiler measures the
quantized kernels the model runs, and `tune --dtype q4_1` writes a plan that `compile
--dtype q4_1 --plan` builds (and a float compile refuses)."""

import dataclasses
import json

import numpy as np
import pytest

from hetcomp.artifact_format import read_manifest
from hetcomp.codegen.targets import make_target
from hetcomp.cost.roofline import ModelShape, dtype_bytes
from hetcomp.driver.compile import CompileOptions, compile_model
from hetcomp.errors import HetcompError
from hetcomp.frontend.weights import random_weights
from hetcomp.hardware import target_dict
from hetcomp.plan import HeteroPlan, plan_choice
from hetcomp.quant_format import QuantMatrix
from hetcomp.runtime import load_artifact
from hetcomp.runtime.generate import generate
from hetcomp.schedules.int8_dot import has_int8_dot
from hetcomp.testing import (
    TINY,
    assert_one_line_error,
    byte_tokenizer_spec,
    depths,
    host_float_quant_linear_rule,
    host_quant_linear_rule,
    tree_mask,
)
from hetcomp.testing.gguf_writer import write_gguf

HOST = target_dict("host")


@pytest.fixture(scope="module")
def tiny_q4_1():
    """compile_model's ``weights=``: TINY with every matrix in q4_1 blocks (the embedding
    becomes q8_0 when packed, as a real file's)."""
    w = random_weights(TINY, seed=11, scale=0.2)
    wq = {n: QuantMatrix.quantize(a, "q4_1") if a.ndim == 2 else a for n, a in w.items()}
    return TINY, wq, byte_tokenizer_spec(TINY.vocab_size), __file__


@pytest.mark.parametrize("dense,sparse", [(1, 1), (0, 1)])
def test_quantized_plan_matches_unplanned(tmp_path, tiny_q4_1, dense, sparse):
    """Two CPU units: 37% of most layers' columns, all of ``down`` and half the q8_0 LM head
    on unit 1, attention parts placed by the plan. The slices are the file's blocks, panel
    by panel; logits of a prefill and a tree verify equal the unplanned artifact's (built
    ``--no-int8-dot``: a plan's units keep float activations, even on a CPU with VNNI), and
    so does greedy decoding."""
    plan = HeteroPlan(targets=(HOST, HOST), ratios=(("default", 0.37), ("down", 1.0),
                                                    ("lm_head", 0.5)),
                      dense_attention=dense, sparse_attention=sparse)
    for name, p in (("ref", None), ("plan", plan)):  # (the plan with int8_dot's default)
        compile_model(CompileOptions(model="tiny", dtype="q4_1", plan=p, max_context=64,
                                     int8_dot=p is not None), str(tmp_path / name),
                      quiet=True, weights=tiny_q4_1)
    m = read_manifest(str(tmp_path / "plan"))
    shapes = {p["name"]: (p["dtype"], p["shape"]) for p in m["params"]}
    # gate_up (192 columns, 6 panels): 2 panels on unit 1; down wholly there; embed 5 + 5.
    assert shapes["layers_0_w_gate_up__u0"] == ("uint8", [4, 2, 20, 32])
    assert shapes["layers_0_w_gate_up__u1"] == ("uint8", [2, 2, 20, 32])
    assert shapes["layers_1_w_down__u1"] == ("uint8", [2, 3, 20, 32])
    assert "layers_1_w_down__u0" not in shapes
    assert shapes["embed__u1"] == ("uint8", [5, 2, 34, 32])
    # Each unit's slices on this CPU's dequantizing linear: float activations (with int8
    # ones, split attention's float rounding would grow to a logit: int8_activations).
    assert {k["rule"] for k in m["kernels"] if k["name"].startswith("linear")} == {
        host_float_quant_linear_rule()}
    assert not m["exact_attention"]
    art, ref = load_artifact(str(tmp_path / "plan")), load_artifact(str(tmp_path / "ref"))
    prompt = [5, 17, 99, 3, 42]
    parents = [-1, 0, 0, 1]
    toks = np.array([10, 11, 12, 13])
    out = []
    for a in (art, ref):
        sess = a.new_session()
        nxt, hidden = sess.prefill(prompt)
        ids, _, logits = sess.verify(toks, depths(parents) + len(prompt), tree_mask(parents))
        out.append((nxt, hidden.numpy(), ids, logits.numpy()))
    assert out[0][0] == out[1][0]
    np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[0][2], out[1][2])
    np.testing.assert_allclose(out[0][3], out[1][3], rtol=1e-5, atol=1e-5)
    for p in ([5, 17, 99], [200, 3, 4, 5, 6]):
        seq = generate(ref, p, max_new_tokens=16, stop_at_eos=False).ids
        assert generate(art, p, max_new_tokens=16, stop_at_eos=False).ids == seq


def _tiny_q4_1_probes():
    """Quick profile options (W = 1, 4; one 32-token cache; no co-run) and the probe groups
    and kernels of TINY in q4_1 with a float16 cache."""
    from hetcomp.profile.measure import ProfileOptions, plan_probes

    shape = ModelShape.from_config(TINY, "q4_1", "float16")
    opts = dataclasses.replace(ProfileOptions.quick(), widths=(1, 4), cache_lens=(32,),
                               corun=False, rounds=1, min_time_s=0.001)
    return (opts, *plan_probes(shape, opts, "q4_1"))


def test_probes_are_the_models_quantized_kernels():
    """A q4_1 profile measures what a q4_1 model runs: q4_1 layer linears, the q8_0 LM head
    and embedding, a float16 KV cache; each linear probe is checked against numpy (gguf's
    dequantize; with int8-rounded inputs where the int8-dot kernel runs) before it is timed,
    and its features count the format's bytes."""
    from hetcomp.profile.measure import build_probe_library, measure_groups
    from hetcomp.profile.units import detect_unit

    opts, groups, kernels = _tiny_q4_1_probes()
    built = {name: build() for name, build in kernels.items()}
    qtypes = {name: str(f.attrs["hetcomp.qtype"]) for name, f in built.items()
              if "hetcomp.qtype" in f.attrs}
    linear = [p for g in groups for p in g.probes if p.features.op == "linear"]
    for p in linear:
        want = "q8_0" if p.features.kind == "lm_head" else "q4_1"
        assert qtypes[p.func] == want and p.args[1][0] == "quant" and p.args[1][2] == want
        n, k = p.features.n, p.features.k
        assert p.features.bytes == pytest.approx(
            n * k * dtype_bytes(want) + 4 * (p.features.w * k + p.features.w * n * (
                2 if p.features.kind in ("o", "down") else 1)))
    assert qtypes["embed_q8_0"] == "q8_0"
    assert str(built["attention_dense_w4"].params[1].dtype) == "float16"
    chosen = [g for g in groups if g.desc.startswith(("linear qkv", "linear lm_head", "embed"))]
    used = {p.func for g in chosen for p in g.probes}
    lib = build_probe_library("cpu", {"kind": "llvm"}, {k: kernels[k] for k in used},
                              progress=lambda s: None)
    rows = measure_groups(detect_unit("cpu"), lib, chosen, opts, progress=lambda s: None)
    assert len(rows) == sum(len(g.probes) for g in chosen) and all(r.seconds > 0 for r in rows)


def test_tune_q4_1_plan_compiles_q4_1_only(tmp_path, cli):
    """`tune --dtype q4_1 --quick` on a Q4_1 file profiles, fits and plans under a q4_1 model
    key; `compile --dtype q4_1 --plan` builds with its fitted cost models, as does `compile
    --plan` alone (the plan's dtype is the default); a float32 compile of that plan, an
    unknown --dtype and `tune --kernels --dtype q4_1` get one line, exit 2, nothing
    written. (The commands run in-process: ``cli``.)"""
    from hetcomp.driver.tuning import tune_command

    path = tmp_path / "tiny.gguf"
    write_gguf(path, TINY, random_weights(TINY, seed=7), byte_tokenizer_spec(TINY.vocab_size),
               qtype="Q4_1")
    lines = []
    summary = tune_command(str(path), ["cpu"], str(tmp_path / "t"), quick=True,
                           progress=lines.append, dtype="q4_1")
    assert ":q4_1:" in summary["model"] and any("linear lm_head" in ln for ln in lines)
    plan = str(tmp_path / "t" / "plan.json")
    assert plan_choice(plan)["dtype"] == "q4_1"
    # A CPU with int8 dot products: its profile timed the int8-dot kernels beside the
    # dequantizing ones, and its one-unit plan is costed on them (and on exact attention).
    int8 = has_int8_dot(make_target("host"))
    fitted = {r["op"] for r in summary["fit"]["cpu"]}
    assert {"linear", "linear_int8"} <= fitted if int8 else "linear_int8" not in fitted
    assert json.loads((tmp_path / "t" / "plan.json").read_text())["int8_linears"] == int8
    assert any("cpu alone: int8-dot linears" in ln for ln in lines) == int8
    rc, _, err = cli("compile", "--model", path, "--dtype", "q4_1", "--plan", plan,
                         "--max-context", 64, "--quiet", "-o", tmp_path / "a")
    assert rc == 0, err
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["dtype"] == "q4_1" and m["cost_models"]["cpu"].startswith("fitted")
    linear = [k for k in m["kernels"] if k["rule"] == host_quant_linear_rule()]
    assert linear and all(k["predicted_us"] > 0 for k in linear)
    if int8:  # costed as what they are: the same kernels dequantizing cost linear's model
        rc, _, err = cli("compile", "--model", path, "--dtype", "q4_1", "--plan", plan,
                         "--no-int8-dot", "--max-context", 64, "-o", tmp_path / "f")
        assert rc == 0, err  # (and says that the plan was costed on other kernels)
        assert "note: the plan's width was chosen for int8-dot linears" in err
        dq = {k["name"]: k["predicted_us"] for k in json.loads(
            (tmp_path / "f" / "manifest.json").read_text())["kernels"]}
        assert all(k["predicted_us"] != dq[k["name"]] for k in linear)
    rc, _, err = cli("compile", "--model", path, "--dtype", "float32", "--plan", plan,
                     "-o", tmp_path / "b")
    assert_one_line_error(rc, err, "tuned for --dtype q4_1")
    # without --dtype the build takes the plan's
    rc, _, err = cli("compile", "--model", path, "--plan", plan, "--max-context", 64,
                     "-o", tmp_path / "e")
    assert rc == 0, err
    assert "note: the plan" not in err  # it runs what the plan was costed on
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["dtype"] == "q4_1"
    rc, _, err = cli("tune", "--model", path, "--dtype", "q5_0", "-o", tmp_path / "c")
    assert_one_line_error(rc, err, "unsupported dtype")
    rc, _, err = cli("tune", "--kernels", "--dtype", "q4_1", "-o", tmp_path / "d")
    assert_one_line_error(rc, err, "float32 linear kernels only")
    assert not any((tmp_path / x).exists() for x in "bcd")
    with pytest.raises(HetcompError, match="tuned for --dtype q4_1"):
        CompileOptions(dtype="float16", plan_choice=plan_choice(plan))


def test_int8_probes_time_the_int8_dot_kernel_and_the_rest_dequantize():
    """On a CPU with int8 dot products a one-unit build runs the int8-dot kernel and a
    partitioned plan's units the dequantizing one, so a q4_1 profile times both: ``linear``
    (every ratio) is the dequantizing kernel, ``linear_int8`` (all the columns, int8-only
    groups) the int8-dot one, and the fused attention such a build verifies with at every
    width; a unit without them neither builds nor measures those. Each linear is checked
    against numpy on its own inputs (float, int8-rounded) before it is timed."""
    from hetcomp.profile.measure import (
        build_probe_library,
        int8_kernels,
        measure_groups,
        schedule_probes,
        unit_groups,
    )
    from hetcomp.profile.units import detect_unit
    from hetcomp.schedules.apply import RULE_ATTR
    from hetcomp.schedules.int8_dot import int8_dot_isa

    opts, groups, kernels = _tiny_q4_1_probes()
    int8 = [g for g in groups if g.int8_only]
    linears = [g for g in int8 if g.desc.startswith("linear_int8 ")]
    assert sorted(g.desc.split()[1] for g in linears) == sorted(opts.kinds)
    assert all(p.features.op == "linear_int8" and p.features.r == 1.0
               for g in linears for p in g.probes)
    # ... and the fused attention kernel at the widths other builds split (W = 4 here)
    (exact,) = [g for g in int8 if g not in linears]
    assert {(p.features.op, p.features.w, p.func) for p in exact.probes} == {
        ("attention", 4, "attention_w4")}
    assert not any(p.features.op == "linear_int8" for g in groups if not g.int8_only
                   for p in g.probes)
    assert unit_groups(groups, int8_dot=False) == [g for g in groups if not g.int8_only]
    chosen = [g for g in groups if g.desc.split()[0] in ("linear", "linear_int8")
              and g.desc.split()[1] in ("qkv", "lm_head")]
    used = {p.func: kernels[p.func] for g in chosen for p in g.probes}
    names = int8_kernels(chosen)
    assert names and names < set(used)
    # A CPU without the instructions: every linear dequantizes, the int8 ones are left out.
    plain = schedule_probes({"kind": "llvm"}, used, names)
    assert {gv.name_hint for gv, _ in plain.functions_items()} == set(used) - names
    isa = int8_dot_isa(make_target("host"))
    if isa is None:
        pytest.skip("this CPU has no int8 dot product (VNNI + VBMI, or NEON dotprod)")
    rules = {gv.name_hint: str(f.attrs[RULE_ATTR])
             for gv, f in schedule_probes(HOST, used, names).functions_items()}
    assert {rules[n] for n in names} == {isa.rule}
    assert {rules[n] for n in set(used) - names} == {host_float_quant_linear_rule()}
    lib = build_probe_library("cpu", HOST, used, progress=lambda s: None, int8=names)
    rows = measure_groups(detect_unit("cpu", target=HOST), lib, unit_groups(chosen, True),
                          opts, progress=lambda s: None)
    assert {r.features.op for r in rows} == {"linear", "linear_int8"}
    assert len(rows) == sum(len(g.probes) for g in chosen)
