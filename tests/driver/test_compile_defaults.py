"""What `hetcomp compile` decides without being told: the packaged heads, the width (decode
steps timed here for host builds, the planner on the target's roofline for others), and the
kernel table `inspect` shows."""

import json
import pathlib

import pytest

from hetcomp.testing import edit_manifest, host_linear_rule, run_cli


@pytest.fixture(scope="module")
def default_artifact(smollm2_medusa_artifact):
    # `hetcomp compile --model smollm2 --max-context 512` (conftest; shared with
    # tests/frontend/test_real_model.py, which speculates with it).
    return smollm2_medusa_artifact


def test_compile_smollm2_speculates_at_the_measured_width(default_artifact, cli):
    """A host build times its decode step at every width where it runs and speculates at the
    width with the most tokens a second, its accepted tokens a step (tau) replayed over the
    heads' held-out recorded responses as `generate` decodes by default (the lookup and the
    datastore; tests/frontend/test_real_model.py checks the replay against decoding), the
    trees' own expectation recorded beside it; the roofline planner's choice too."""
    from hetcomp.driver.calibrate import heldout_sequences
    from hetcomp.frontend.models import default_heads
    from hetcomp.runtime import load_artifact
    from hetcomp.runtime.generate import auto_lookup
    from hetcomp.speculative.acceptance import best_lookup, replay_acceptance
    from hetcomp.speculative.medusa import MedusaHeads
    from hetcomp.speculative.tree import build_tree

    m = json.loads((default_artifact / "manifest.json").read_text())
    assert m["speculative"]["heads_file"]["name"] == "smollm2-medusa.npz"
    measured = m["width_measurement"]
    widths = [str(w) for w in m["widths"]]
    # every width timed; the second pass only those that might beat the best
    # (planner.may_beat_best; which ones depends on this machine's steps)
    assert sorted(measured["step_ms"], key=int) == widths
    assert all(t > 0 for t in measured["step_ms"].values())
    assert set(measured["timed_once"]) <= set(map(int, widths))
    assert measured["tau_source"] == m["lookup_source"] == (
        "replayed: 153 held-out recorded responses, the lookup nodes that accept the most "
        "and the datastore")
    heads = MedusaHeads.load(default_heads("smollm2"))
    art = load_artifact(str(default_artifact))
    seqs = heldout_sequences(heads, art.tokenizer, art.config.vocab_size)
    def replayed(w, lookup):
        return replay_acceptance(seqs, heads.ranks, art.tree, w, lookup, art.datastore)

    # each width's lookup nodes: auto_lookup's unless another accepts 1% more at 64 and 128
    # tokens and over the whole responses; for SmolLM2 none does (more lookup nodes pay
    # only late in long answers)
    assert m["lookup"] == {w: best_lookup(int(w), auto_lookup(int(w)),
                                          lambda n, w=int(w): replayed(w, n))[0]
                           for w in widths[1:]}
    assert m["lookup"] == {w: auto_lookup(int(w)) for w in widths[1:]}
    for w in widths:  # tau replayed, the trees' beside it, rate = tau / step
        tree = build_tree(heads.rank_probs, int(w), heads.ranks).expected_accept_length
        assert measured["tree_tau"][w] == pytest.approx(tree, abs=1e-4)
        tau = replayed(int(w), m["lookup"].get(w, 0)).tokens_per_step
        assert measured["tau"][w] == pytest.approx(tau, abs=1e-4)
        assert measured["tokens_per_s"][w] == pytest.approx(  # (recorded to 2 decimals)
            1e3 * tau / measured["step_ms"][w], rel=1e-3, abs=0.005)
    # the lookup and the datastore add to what the trees expect at every width
    assert all(measured["tau"][w] > measured["tree_tau"][w] + 0.1 for w in widths[1:])
    rate = measured["tokens_per_s"]
    assert m["default_width"] == int(max(widths, key=lambda w: (rate[w], -int(w))))
    assert m["default_width_source"].startswith("measured here: ")
    assert measured["roofline_source"].startswith("planner on the roofline of cpu")
    assert measured["roofline_source"].endswith("tokens a step (replayed)")
    rc, out, err = run_cli("generate", default_artifact, "--prompt", "hi", "--chat",
                           "--max-new-tokens", 24, "--json")
    assert rc == 0, err
    spec = json.loads(out)
    assert spec["width"] == m["default_width"]
    assert spec["lookup"] == m["lookup"][str(spec["width"])]  # the artifact's choice
    rc, out, err = cli("generate", default_artifact, "--prompt", "hi", "--chat",
                       "--max-new-tokens", 24, "--json", "--width", 4)
    assert rc == 0, err
    assert json.loads(out)["ids"] == spec["ids"]  # lossless
    assert json.loads(out)["steps"] < len(spec["ids"]) - 1


@pytest.mark.parametrize("fastest", [1, 4])
def test_the_steps_timed_here_choose_the_width(tmp_path, monkeypatch, fastest):
    """What the timing returns decides: with W = ``fastest``'s step ten times cheaper than
    the others', compile speculates at it (W = 1: not at all), and generate follows. The real
    timing runs first, on the complete artifact in its temporary folder; an explicit
    ``--width`` or a cross build times nothing."""
    from hetcomp.driver import compile as compile_driver
    from hetcomp.frontend.weights import random_weights
    from hetcomp.runtime import load_artifact
    from hetcomp.runtime.unit_time import decode_step_seconds
    from hetcomp.testing import TINY, byte_tokenizer_spec, compile_with_random_heads
    from hetcomp.testing.gguf_writer import write_gguf

    calls, asked = [], []

    def timed(art, prompt, widths, *args, worth_timing, **kwargs):
        def script(w, medians):  # W = 8 never timed, W = 2 in the first pass only
            asked.append((w, sorted(medians)))
            return w != 8 and not (w == 2 and 2 in medians)

        real = decode_step_seconds(art, prompt, widths, *args, worth_timing=script, **kwargs)
        calls.append((art.path, list(widths), real))
        # compile's rule: a width is timed once, again only while it may beat the best
        assert worth_timing(8, {1: 1.0, 4: 1e3}) and not worth_timing(4, {1: 1.0, 4: 1e3})
        return {w: 1.0 if w == fastest else 10.0 for w in widths}

    monkeypatch.setattr(compile_driver, "decode_step_seconds", timed)
    model = tmp_path / "tiny.gguf"
    write_gguf(model, TINY, random_weights(TINY, seed=5), byte_tokenizer_spec(TINY.vocab_size))
    art = load_artifact(compile_with_random_heads(tmp_path, str(model), TINY, (2, 4, 8)))
    (folder, widths, real), = calls
    assert widths == [1, 2, 4, 8] and folder != art.path  # timed before the rename
    assert set(real) == {1, 2, 4} and all(t > 0 for t in real.values())
    assert asked == [(1, []), (2, [1]), (4, [1, 2]), (8, [1, 2, 4]),  # pass 1
                     (1, [1, 2, 4]), (2, [1, 2, 4]), (4, [1, 2, 4])]  # pass 2: no W = 8
    m = art.manifest
    assert m["default_width"] == fastest and m["default_width_source"].startswith(
        "measured here: 1000.0 ms a step at W=" + str(fastest))
    assert m["width_measurement"]["step_ms"] == {
        str(w): 1e3 if w == fastest else 1e4 for w in widths}
    # random heads have no recorded responses to replay: tau is their trees'
    assert m["width_measurement"]["tau_source"] == "the heads' trees (held-out statistics)"
    assert m["width_measurement"]["tau"] == m["width_measurement"]["tree_tau"]
    assert m["lookup"] is None  # (generate drafts auto_lookup's nodes)
    # an artifact that records a width's lookup nodes drafts them unless told
    edit_manifest(art.path, lambda m: m.update(lookup={"4": 3}))
    for extra, nodes in (((), 3), (("--lookup", 1), 1)):
        rc, out, err = run_cli("generate", art.path, "--prompt-ids", "1,2,3", "--width", 4,
                               "--max-new-tokens", 6, "--json", *extra)
        assert rc == 0, err
        assert json.loads(out)["lookup"] == nodes
    edit_manifest(art.path, lambda m: m.update(lookup=None))
    rc, out, err = run_cli("generate", art.path, "--prompt-ids", "1,2,3", "--width", 4,
                           "--max-new-tokens", 6, "--json")
    assert json.loads(out)["lookup"] == 2  # auto_lookup(4)
    rc, out, err = run_cli("generate", art.path, "--prompt-ids", "1,2,3",
                           "--max-new-tokens", 6, "--json")
    assert rc == 0, err
    assert json.loads(out)["width"] == fastest
    calls.clear()
    for options in ({"default_width": 2}, {"target": "aarch64"}):
        out = tmp_path / f"no-timing-{len(calls)}-{next(iter(options.values()))}"
        out.mkdir()
        manifest = json.loads((pathlib.Path(compile_with_random_heads(
            out, str(model), TINY, (2, 4), **options)) / "manifest.json").read_text())
        assert "width_measurement" not in manifest and not calls, options


def test_inspect_lists_every_kernel_with_its_rule_and_prediction(default_artifact, cli):
    rc, out, err = cli("inspect", default_artifact, "--json")
    assert rc == 0, err
    kernels = json.loads(out)["kernels"]
    w16 = [k for k in kernels if k["function"] == "verify_w16"]
    assert {k["rule"] for k in w16} >= {host_linear_rule(), "cpu.Attention", "cpu.Rowwise"}
    # `hetcomp compile` puts the tensorized sparse tree-attention kernel in every wide verify
    # (the x86 rule on this host) beside the dense part and the merge.
    assert ("sparse_tree_attention", "x86.SparseTreeAttention") in {
        (k["name"], k["rule"]) for k in w16}
    assert {"attention_dense_w16", "attention_merge_w16"} <= {k["name"] for k in w16}
    assert set(k) == {"function", "name", "unit", "rule", "predicted_us", "calls"} \
        if (k := w16[0]) else False
    linear = [k for k in w16 if k["rule"] == host_linear_rule()]
    assert sum(k["calls"] for k in linear) == 4 * 30 + 1  # qkv, o, gate_up, down; lm_head
    # Predicted per call, width-specialised kernels at their own rows: W=16 costs more than
    # W=1 for the same linear layer.
    cost = {(k["function"], k["name"].removesuffix("_w16").removesuffix("_w1")): k["predicted_us"]
            for k in kernels if k["function"] in ("verify_w1", "verify_w16")}
    gate_up = [n for f, n in cost if f == "verify_w16" and n.startswith("linear_n3072")]
    assert gate_up and cost[("verify_w16", gate_up[0])] > cost[("verify_w1", gate_up[0])] > 0
    rc, out, _ = cli("inspect", default_artifact)
    assert rc == 0 and "verify_w16" in out and "cpu.Attention" in out


def test_no_heads_builds_no_speculation(tmp_path, cli):
    rc, _, err = cli("compile", "--model", "smollm2", "--no-heads", "--max-context", 64,
                     "--quiet", "-o", tmp_path / "A")
    assert rc == 0, err
    m = json.loads((tmp_path / "A" / "manifest.json").read_text())
    assert m["speculative"] is None and m["widths"] == [1] and m["default_width"] == 1


def test_cuda_build_speculates_at_the_width_its_gpu_datasheet_plans():
    """`compile --target cuda` picks its default width with the planner on the datasheet
    roofline of `--cuda-arch` (H100/H200 class for sm_90, Orin NX's GPU for sm_87), costing
    the CUDA-graph step (one attention kernel a layer): a GPU reads the weights once for W
    tree nodes, so it speculates. The tokens a step are those replayed over the heads'
    held-out recorded responses (compile passes them), which favour a wider tree than the
    trees' own expectation. The linears of 16-64 rows are costed on the tensor cores the
    build runs them on: on the H100's datasheet that makes W = 64 pay (W = 32 with them on
    the CUDA cores, `--no-tensor-cores`). An architecture without a spec keeps W = 1."""
    import dataclasses

    from hetcomp.driver.compile import CompileOptions, _datastore, _default_width, _replayed
    from hetcomp.frontend import resolve_model
    from hetcomp.frontend.gguf_loader import open_gguf, read_config, read_tokenizer_spec
    from hetcomp.frontend.models import default_heads
    from hetcomp.frontend.tokenizer import TokenizerInfo
    from hetcomp.speculative.medusa import MedusaHeads

    reader = open_gguf(resolve_model("smollm2"))
    cfg, tok = read_config(reader), TokenizerInfo.from_spec(read_tokenizer_spec(reader))
    heads = MedusaHeads.load(default_heads("smollm2"))
    opts = CompileOptions(model="smollm2", target="cuda", dtype="float16")
    replayed = _replayed(heads, tok, cfg.vocab_size, opts.widths,
                         _datastore(opts, heads, cfg.vocab_size))
    assert replayed.source == ("replayed: 153 held-out recorded responses, the lookup nodes "
                               "that accept the most and the datastore")
    for arch, spec in (("sm_90", "hopper-gpu"), ("sm_87", "orin-nx-gpu")):
        opts = CompileOptions(model="smollm2", target="cuda", cuda_arch=arch, dtype="float16")
        width, source = _default_width(opts, cfg, heads, "float16", device_len=True,
                                       replayed=replayed)
        assert width > 1 and width in opts.widths, (arch, width, source)
        assert source.startswith(f"planner on the roofline of {spec}"), source
        assert source.endswith(f", {replayed.taus[width]:.2f} tokens a step (replayed)"), source
        trees, source = _default_width(opts, cfg, heads, "float16", device_len=True)
        assert source.endswith("tokens a step (the heads' trees)") and 1 < trees < width
        cores, _ = _default_width(dataclasses.replace(opts, tensor_cores=False), cfg, heads,
                                  "float16", device_len=True, replayed=replayed)
        assert (width, cores) == ((64, 32) if arch == "sm_90" else (width, width)), arch
    opts = CompileOptions(model="smollm2", target="cuda", cuda_arch="sm_80", dtype="float16")
    width, source = _default_width(opts, cfg, heads, "float16", device_len=True)
    assert width == 1 and "--cuda-arch sm_80: pass --width" in source


def test_weight_dtype_defaults_to_the_plans_then_the_targets(cli, tmp_path):
    """Without --dtype a build takes the dtype its plan was tuned for (the plan's model key),
    else float16 for --target cuda (the tensor-core rule takes float16 linears only, and a
    float32 GPU step reads twice the bytes), else float32; a --dtype given wins. The CLI
    leaves the choice to CompileOptions (its --no-int8-dot check reads the resolved one)."""
    from hetcomp.driver.compile import CompileOptions

    assert CompileOptions().dtype == "float32"
    assert CompileOptions(target="x86-64-v3").dtype == "float32"
    assert CompileOptions(target="cuda").dtype == "float16"
    assert CompileOptions(target="cuda", dtype="float32").dtype == "float32"
    assert CompileOptions(plan_choice={"dtype": "q4_1"}).dtype == "q4_1"
    assert CompileOptions(target="cuda", plan_choice={"dtype": "float32"}).dtype == "float32"
    assert CompileOptions(plan_choice={"dtype": None}).dtype == "float32"  # a bare key
    rc, _, err = cli("compile", "--target", "cuda", "--no-int8-dot", "-o", tmp_path / "x")
    assert rc == 2 and err.strip().endswith("this build's are float16"), err
    rc, _, err = cli("compile", "--no-int8-dot", "-o", tmp_path / "x")
    assert rc == 2 and err.strip().endswith("this build's are float32"), err
    assert not (tmp_path / "x").exists()


def test_planner_costs_the_cuda_graph_step_when_told():
    """PlannerOptions(device_len=True): the candidates are the graph build's steps (its one
    attention kernel a layer, not the dense + sparse + merge split above W = 2)."""
    from hetcomp.cost.roofline import ModelShape
    from hetcomp.hardware import HOPPER_GPU
    from hetcomp.planner import PlannerOptions, UnitModel, plan
    from hetcomp.testing import TINY

    shape, unit = ModelShape.from_config(TINY, "float16", "float16"), UnitModel.from_spec(
        HOPPER_GPU)
    tau = {w: 1.0 + 0.1 * w for w in (1, 4, 16)}
    split, graph = (plan(shape, [unit], tau=tau, options=PlannerOptions(
        widths=(1, 4, 16), device_len=dl)) for dl in (False, True))
    steps = {c.width: dict(c.breakdown) for c in split.candidates}
    graph_steps = {c.width: dict(c.breakdown) for c in graph.candidates}
    for w in (4, 16):
        assert graph_steps[w]["attention"] != steps[w]["attention"]
        assert graph_steps[w]["stage_tree"] > 0 and "stage_tree" not in steps[w]
