"""benchmarks/cuda_host/run.py, the one script a lent GPU host runs (issue #19), runs end to
end here on a CPU bundle: a device minute lost to a Python error is not recovered."""

import hashlib
import importlib.util
import json
import os

import numpy as np
import pytest

from hetcomp.driver.benchmark import BENCH_PROMPTS
from hetcomp.driver.compile import CompileOptions, compile_model
from hetcomp.frontend.weights import random_weights
from hetcomp.runtime import load_artifact
from hetcomp.runtime import weights as weights_module
from hetcomp.speculative.medusa import MedusaHeads
from hetcomp.testing import TINY, byte_tokenizer_spec
from hetcomp.testing.gguf_writer import write_gguf

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "cuda_host", "run.py")
_spec = importlib.util.spec_from_file_location("cuda_host_run", _PATH)
run_py = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_py)


def test_run_measures_a_bundle(tmp_path, monkeypatch):
    """A bundle as bundle.py lays it out (artifact with separate weights, the GGUF in three
    parts in folders a, b, c, bundle.json): run() attaches the weights, decodes at every width, times the verify
    step at W = 1 .. 64 and writes results.json with the issue's ratios. The artifact is a
    fixed-cache build (as the GPU's), so sessions follow one another on one cache."""
    gguf = tmp_path / "m.gguf"
    write_gguf(gguf, TINY, random_weights(TINY, seed=2), byte_tokenizer_spec(TINY.vocab_size))
    e, rng = TINY.hidden_size, np.random.default_rng(0)
    MedusaHeads(w=(rng.standard_normal((2, e, e)) * 0.05).astype("float32"),
                b=np.zeros((2, e), "float32"),
                rank_probs=np.tile(np.linspace(0.5, 0.05, 10), (2, 1)), info={}
                ).save(str(tmp_path / "heads.npz"))
    bundle = tmp_path / "a"
    compile_model(CompileOptions(model=str(gguf), heads=str(tmp_path / "heads.npz"),
                                 widths=(1, 2, 4), max_context=TINY.max_context,
                                 separate_weights=True, device_len=True),
                  str(bundle / "art" / "gpu"), quiet=True)
    data = gguf.read_bytes()
    (bundle / "gguf.part0").write_bytes(data[:1000])
    for i, d in ((1, "b"), (2, "c")):
        (tmp_path / d).mkdir()
        (tmp_path / d / f"gguf.part{i}").write_bytes(data[1000 * i: 1000 * i + 1000]
                                                     if i == 1 else data[2000:])
    (bundle / "bundle.json").write_text(json.dumps(
        {"gguf_sha256": hashlib.sha256(data).hexdigest(), "gguf_parts": 3,
         "artifacts": ["gpu"]}))
    # run() attaches the weights as on the host, the heads found as packaged ones are (these
    # random heads are not in the package).
    packaged = weights_module.packaged_file
    monkeypatch.setattr(weights_module, "packaged_file", lambda name: str(
        tmp_path / "heads.npz") if name == "heads.npz" else packaged(name))
    assert not (bundle / "art" / "gpu" / "params.bin").exists()
    monkeypatch.setattr(run_py, "NEW_TOKENS", 6)
    monkeypatch.setattr(run_py, "GEN_WIDTHS", (1, 2, 4))
    monkeypatch.setattr(run_py, "_eager", lambda: {"tokens_per_s": 10.0})
    import gc

    import hetcomp.runtime

    real_generate, collector = hetcomp.runtime.generate, []

    def spy(art, ids, new_tokens, *args, **kwargs):  # is the cyclic collector paused?
        collector.append((new_tokens, gc.isenabled()))
        return real_generate(art, ids, new_tokens, *args, **kwargs)

    monkeypatch.setattr(hetcomp.runtime, "generate", spy)
    out = tmp_path / "out"
    out.mkdir()
    run_py.run(str(bundle), str(out), [])
    timed = [on for tokens, on in collector if tokens == 6]
    assert len(timed) == 3 * 3 and not any(timed) and gc.isenabled()  # prompts x widths

    assert (bundle / "art" / "gpu" / "params.bin").is_file()
    res = json.loads((out / "results.json").read_text())
    r = res["artifacts"]["gpu"]
    assert r["prompts"] == "bench" and len(r["ids_w1"]) == 3
    assert r["dtype"] == load_artifact(str(bundle / "art" / "gpu")).manifest["dtype"]
    assert all(len(ids) == 6 for ids in r["ids_w1"])
    for w in (1, 2, 4):  # greedy output identical with speculation
        assert r[f"w{w}"]["identical_to_sequential"], w
        assert r[f"w{w}"]["tokens_per_s"] > 0
    assert r["identical_to_first_artifact"] and res["reference"] == r["ids_w1"]
    assert set(r["step_s"]) == {"1", "4", "16", "64"} and min(r["step_s"].values()) > 0
    # report.py predicts every timed step: the step widths and the kernel breakdown's
    assert [b["width"] for b in r["breakdown"]] == [1, 2, 4, 8, 16, 64]
    assert [k["width"] for k in r["kernels"]] == [1, 2, 8]
    speed = {w: r[f"w{w}"]["tokens_per_s"] for w in (1, 2, 4)}
    best = max(speed, key=speed.get)
    assert r["speculative_speedup"] == {"width": best, "x": pytest.approx(speed[best] / speed[1])}
    split = {row["width"]: row for row in r["host_split"]}
    assert set(split) == {1, r["speculative_speedup"]["width"]}
    assert all(row["step_ms"] > 0 and row["vm_ms"] > 0 for row in split.values())
    assert "first_divergence" not in r
    assert r["w2"]["replayed_per_step"] is None  # (random heads: no recorded responses)

    # Output that differs says where and by how much: a run whose reference (the first
    # artifact's ids, kept in results.json) leaves this artifact's at prompt 1, position 3.
    art = load_artifact(str(bundle / "art" / "gpu"))
    prompts = [art.tokenizer.encode(p) for p in BENCH_PROMPTS]  # run()'s, without heads info
    own = r["ids_w1"]
    ref = [list(ids) for ids in own]
    ref[1][3] = (own[1][3] + 1) % TINY.vocab_size
    assert run_py.first_divergence(art, prompts, own, own) is None
    rerun = tmp_path / "rerun"
    rerun.mkdir()
    (rerun / "results.json").write_text(json.dumps(
        {"device": res["device"], "eager": res["eager"], "reference": ref, "artifacts": {}}))
    run_py.run(str(bundle), str(rerun), ["gpu"])
    again = json.loads((rerun / "results.json").read_text())["artifacts"]["gpu"]
    assert again["ids_w1"] == own and again["identical_to_first_artifact"] is False
    d = again["first_divergence"]
    assert (d["prompt"], d["position"]) == (1, 3)
    assert (d["token"], d["reference_token"]) == (own[1][3], ref[1][3])
    # this artifact's own choice is its argmax there: a positive margin, its top token
    assert d["top2"][0][0] == own[1][3] and d["margin"] > 0
    assert d["logits"][0] - d["logits"][1] == pytest.approx(d["margin"], abs=2e-5)


def test_another_weight_format_keeps_its_own_results(tmp_path, monkeypatch):
    """The bundle's q4_1 artifacts go to ``results-q4_1.json``: its own greedy reference (the
    first q4_1 artifact run, not the float16 ``gpu``'s ids) and a file report.py, which
    predicts the float16 profile's artifacts, is not handed. PyTorch eager is measured once:
    the second file takes the main file's. A bundle.json from before the formats were
    recorded keeps everything in results.json."""
    meta = {"artifacts": ["gpu", "cpu", "gpu-q4_1", "cpu-q4_1"],
            "dtypes": {"gpu": "float16", "cpu": "float16", "gpu-q4_1": "q4_1",
                       "cpu-q4_1": "q4_1"}}
    out = str(tmp_path)
    assert [os.path.basename(run_py.results_path(out, meta, n)) for n in meta["artifacts"]] == [
        "results.json", "results.json", "results-q4_1.json", "results-q4_1.json"]
    assert os.path.basename(run_py.results_path(out, {"artifacts": ["gpu-q4_1"]},
                                                "gpu-q4_1")) == "results.json"
    calls = []
    monkeypatch.setattr(run_py, "_eager", lambda: calls.append(1) or {"tokens_per_s": 7.0})
    monkeypatch.setattr(run_py, "_device_info", lambda: {"gpu": "test"})
    main = run_py._results(run_py.results_path(out, meta, "gpu"), out)
    (tmp_path / "results.json").write_text(json.dumps(main))
    quant = run_py._results(run_py.results_path(out, meta, "gpu-q4_1"), out)
    assert main["eager"] == quant["eager"] == {"tokens_per_s": 7.0} and len(calls) == 1
    assert quant["artifacts"] == {} and "reference" not in quant


def test_report_lists_each_formats_measurements():
    """report.py's table of measured decoding, for results.json and (``--other``) the q4_1
    results: a row per artifact and width, and the W = 64 step against W = 1's."""
    spec = importlib.util.spec_from_file_location(
        "cuda_host_report", os.path.join(os.path.dirname(_PATH), "report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    runs = {"gpu-q4_1": {"w1": {"tokens_per_s": 400.0, "accepted_per_step": 1.0,
                                "identical_to_sequential": True},
                         "w64": {"tokens_per_s": 900.0, "accepted_per_step": 3.08,
                                 "identical_to_sequential": True},
                         "identical_to_first_artifact": True,
                         "step_s": {"1": 0.0025, "4": 0.0026, "64": 0.003}},
            "cpu-q4_1": {"w1": {"tokens_per_s": 140.0, "accepted_per_step": 1.0,
                                "identical_to_sequential": True},
                         "identical_to_first_artifact": False, "step_s": {"1": 0.007}}}
    lines = report.measured_table(runs)
    assert lines[2:5] == ["| gpu-q4_1 | 1 | 400.0 | 1.00 | True | True |",
                          "| gpu-q4_1 | 64 | 900.0 | 3.08 | True | True |",
                          "| cpu-q4_1 | 1 | 140.0 | 1.00 | True | False |"]
    assert lines[-1] == "- gpu-q4_1: verify step W=1 2.500 ms, W=64 3.000 ms (1.20x)"


def test_the_replay_predicts_what_the_run_accepts(smollm2_medusa_artifact):
    """run() puts beside each width's accepted tokens a step the replay's over the same
    held-out prompts and tokens: on this CPU they are equal (the draft proposes what
    calibration measured), EOS ignored as the run ignores it. Prompts that are not the
    heads' held-out ones, or tokens past a recorded response, have no replay."""
    from hetcomp.driver.benchmark import bench_prompts
    from hetcomp.runtime import generate
    from hetcomp.runtime.generate import auto_lookup

    art = load_artifact(str(smollm2_medusa_artifact))
    prompts = [art.tokenizer.encode(p, chat=True)
               for p in bench_prompts(art.manifest, "heldout")[:2]]
    widths, tokens = (1, 4, 16), 24
    lookup = {w: auto_lookup(w) for w in widths}
    replayed = run_py.replayed_acceptance(art, prompts, tokens, widths, lookup)
    for w in widths:
        measured = np.mean([generate(art, ids, tokens, stop_at_eos=False, width=w,
                                     lookup=lookup[w]).accepted_per_step for ids in prompts])
        assert replayed[w] == pytest.approx(measured, abs=1e-9), w
    assert replayed[16] > replayed[4] > replayed[1] == 1.0
    assert run_py.replayed_acceptance(art, prompts[1:], tokens, widths, lookup) is None
    assert run_py.replayed_acceptance(art, prompts, 300, widths, lookup) is None


def test_gemv_reference_reads_both_weight_layouts():
    """The kit checks each GPU linear against ``_linear_reference``: it must read our packed
    weight and dlight's ``[N, K]`` one as the kernels do (here: the CPU kernel of ours)."""
    from hetcomp import _tvm
    from hetcomp.kernels import ops
    from hetcomp.testing.gpu import kernel_library

    n, k, w = 64, 48, 3
    rng = np.random.default_rng(4)
    dense = rng.standard_normal((n, k)).astype("float16")
    x = rng.standard_normal((w, k)).astype("float32")
    res = rng.standard_normal((w, n)).astype("float32")
    packed = ops.pack_linear_weight(dense.astype("float32"), "float16")
    lib = kernel_library(ops.linear(n, k, "float16", True, rows=w), "host")
    y = _tvm.tensor(np.zeros((w, n), "float32"))
    lib["main"](_tvm.tensor(x), _tvm.tensor(packed), _tvm.tensor(res), y)
    for weight in (packed, dense):
        np.testing.assert_allclose(run_py._linear_reference(weight, x, res), y.numpy(),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
def test_gemv_random_blocks_have_a_models_scales(qtype):
    """The kit's random quantized weights: random quants (every nibble or byte value
    appears) under float16 scales (and q4_1 mins) of a model's size, finite and below 0.1,
    so that every variant computes finite outputs to compare (the tensor-core kernel holds
    each weight as float16 terms: a random half as scale would overflow them)."""
    from hetcomp.kernels import quant

    n, k = 64, 128
    blocks = run_py._random_blocks(np.random.default_rng(0),
                                   quant.quant_packed_shape(n, k, qtype), qtype)
    m = quant.unpack_quant_weight(blocks, qtype)
    scales = m.blocks[:, :, :quant.HEADER_BYTES[qtype]].copy().view("<f2")
    assert np.isfinite(scales).all() and 0 < np.abs(scales).max() < 0.1
    assert np.abs(scales).std() > 1e-3  # random, not one value
    dense = m.dequantize()
    assert np.isfinite(dense).all() and np.abs(dense).max() < 20
    quants = m.blocks[:, :, quant.HEADER_BYTES[qtype]:]
    assert len(np.unique(quants)) == 256


def test_chain_attention_reference_matches_the_tree_attention_kernel():
    """The kit checks the GPU tree_attention against ``_tree_rows`` and ``_chain_attention``:
    here against the kernel's CPU form, chain trees past a committed prefix, the caches it
    writes included."""
    from hetcomp import _tvm
    from hetcomp.kernels import script_ops
    from hetcomp.testing.gpu import kernel_library

    hq, g, d, nl, ctx = 4, 2, 16, 2, 96
    rng = np.random.default_rng(5)
    kc = rng.standard_normal((nl, g, d, ctx)).astype("float16")
    vc = rng.standard_normal((nl, g, ctx, d)).astype("float16")
    lib = kernel_library(script_ops.tree_attention(hq, g, d, nl, ctx, kv_dtype="float16"),
                         "host")
    for w, n in ((1, 0), (5, 37), (8, 80)):
        qkv = rng.standard_normal((w, (hq + 2 * g) * d)).astype("float32")
        cs = run_py._rope_table(np.arange(n, n + w), d)
        o, caches = _tvm.tensor(np.zeros((w, hq, d), "float32")), (_tvm.tensor(kc), _tvm.tensor(vc))
        lib["main"](_tvm.tensor(qkv), _tvm.tensor(cs), *caches,
                    _tvm.tensor(np.tril(np.ones((w, w), "int32"))),
                    _tvm.tensor(np.arange(n, n + w, dtype="int32")), 1, o)
        q, k_tree, v_tree = run_py._tree_rows(qkv, cs, hq, g, d)
        kc[1, :, :, n:n + w], vc[1, :, n:n + w] = k_tree.transpose(0, 2, 1), v_tree
        np.testing.assert_array_equal(caches[0].numpy(), kc)
        np.testing.assert_array_equal(caches[1].numpy(), vc)
        np.testing.assert_allclose(o.numpy(), run_py._chain_attention(q, kc[1], vc[1], n),
                                   rtol=1e-4, atol=1e-5)


def test_attention_timing_checks_what_each_variant_computes():
    """``run.py gemv``'s attention part, run here with the kernel's CPU form under a kit
    name: every width and cache length is checked (output and the keys it writes) before it
    is timed, the host's copy of the caches following the kernel's writes."""
    from hetcomp import _tvm
    from hetcomp.kernels import script_ops

    c, args = _tvm.compiler(), [4, 2, 16, 2, 96]
    name = "tree_attention_g8"
    lib = c.compile(c.IRModule({name: script_ops.tree_attention(*args, kv_dtype="float16")
                                .with_attr("global_symbol", name)}),
                    target=c.Target({"kind": "llvm"})).mod
    meta = {"attention": [{"name": "tree_attention_g8", "groups": 8, "fan_in": 8,
                           "args": args, "kv_dtype": "float16"}], "attention_cache": [0, 16]}
    out = run_py._attention(meta, lib, _tvm.cpu(), False)
    assert [(r["w"], r["cache"]) for r in out] == [(w, n) for w in run_py.STEP_WIDTHS
                                                   for n in (0, 16)]
    assert all(r["correct"] and r["us"] > 0 for r in out), out


def test_chains_check_and_compare_the_fused_kernels():
    """``run.py gemv``'s fused-chain part, run here with the kernels' CPU forms under the
    kit's names: every output (fused linear, RMSNorm, SiLU) matches its numpy reference, and
    each fused kernel is put beside the sum of the kernels it replaces."""
    from hetcomp import _tvm
    from hetcomp.kernels import ops, quant

    c = _tvm.compiler()
    n_qkv, n_gu, k, eps = 96, 192, 64, 1e-5
    recs = [{"name": "fused_f16_qkv_w2", "role": "fused", "kind": "qkv", "w": 2, "n": n_qkv,
             "k": k, "eps": eps, "activation": None, "rule": "cpu"},
            {"name": "fused_f16_gate_up_w2", "role": "fused", "kind": "gate_up", "w": 2,
             "n": n_gu, "k": k, "eps": eps, "activation": "silu", "rule": "cpu"},
            {"name": "fused_q41_gate_up_w2", "role": "fused", "kind": "gate_up",
             "dtype": "q4_1", "w": 2, "n": n_gu, "k": k, "eps": eps, "activation": "silu",
             "rule": "cpu"},
            {"name": "norm_w2", "role": "norm", "kind": "norm", "w": 2, "n": k, "k": 0,
             "eps": eps, "activation": None, "rule": "cpu"},
            {"name": "act_w2", "role": "act", "kind": "act", "w": 2, "n": n_gu, "k": 0,
             "eps": eps, "activation": "silu", "rule": "cpu"}]
    funcs = {"fused_f16_qkv_w2": ops.linear(n_qkv, k, "float16", rows=2, norm_eps=eps),
             "fused_f16_gate_up_w2": ops.linear(n_gu, k, "float16", rows=2, norm_eps=eps,
                                                activation="silu"),
             "fused_q41_gate_up_w2": quant.linear_quant(n_gu, k, "q4_1", rows=2, norm_eps=eps,
                                                        activation="silu"),
             "norm_w2": ops.rms_norm(k, eps, rows=2), "act_w2": ops.silu_mul(n_gu // 2, rows=2)}
    lib = c.compile(c.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()}),
                    target=c.Target({"kind": "llvm"}))
    linears = [{"variant": "splitk", "dtype": dtype, "kind": kind, "w": 2, "hot_us": us}
               for kind in ("qkv", "gate_up") for dtype, us in (("float16", 5.0), ("q4_1", 3.0))]
    out = run_py._chains({"chains": recs}, lib.mod, _tvm.cpu(), False, linears)
    assert [r["correct"] for r in out] == [True] * 5, [r.get("max_rel_err") for r in out]
    times = {r["name"]: r["us"] for r in out}
    fused = {(r["kind"], r.get("dtype")): r["replaced_us"] for r in out if r["role"] == "fused"}
    assert fused["qkv", "float16"] == times["norm_w2"] + 5.0
    assert fused["gate_up", "float16"] == times["norm_w2"] + 5.0 + times["act_w2"]
    assert fused["gate_up", "q4_1"] == times["norm_w2"] + 3.0 + times["act_w2"]


def test_summary_puts_the_fused_step_beside_the_unfused(capsys):
    """The last lines `run` prints: per artifact the issue's ratios, then the fused build's
    verify step over the unfused one's at each width."""
    def artifact(step_ms):
        return {"w1": {"tokens_per_s": 100.0, "identical_to_sequential": True},
                "w4": {"tokens_per_s": 180.0, "identical_to_sequential": True},
                "speculative_speedup": {"width": 4, "x": 1.8},
                "step_s": {str(w): step_ms * 1e-3 for w in (1, 4, 16, 64)},
                "identical_to_first_artifact": True}

    run_py._summary({"eager": {"tokens_per_s": 50.0},
                     "artifacts": {"gpu": artifact(0.6), "gpu-unfused": artifact(0.8)}})
    err = capsys.readouterr().err
    assert "gpu: sequential 100.0 tok/s = 2.00x eager" in err
    assert "gpu step / gpu-unfused step: W=1 0.75, W=4 0.75, W=16 0.75, W=64 0.75" in err
