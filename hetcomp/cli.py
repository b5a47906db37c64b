"""The ``hetcomp`` command: compile, generate, bench, inspect.

User errors print one line on stderr and exit with code 2; set ``HETCOMP_DEBUG=1`` for tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from .errors import HetcompError


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise HetcompError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def cmd_compile(args) -> int:
    from .codegen.compile import CompileOptions, compile_model

    opts = CompileOptions(model=args.model, dtype=args.dtype, target=args.target,
                          max_context=args.max_context, heads=args.heads,
                          plan=_load_plan(args.plan, args.target) if args.plan else None,
                          separate_weights=args.separate_weights,
                          plan_prediction=_plan_prediction(args.plan) if args.plan else None,
                          tuning_db=args.tuning_db, draft_dtype=args.draft_dtype)
    compile_model(opts, args.output, quiet=args.quiet)
    return 0


def cmd_attach_weights(args) -> int:
    from .runtime.weights import attach_weights

    path = attach_weights(args.artifact, args.model, args.heads, quiet=args.quiet)
    if not args.quiet:
        print(f"weights attached and verified: {path}", file=sys.stderr)
    return 0


def _plan_prediction(path: str) -> dict | None:
    """The planner's predicted tau, step time and tokens/s per width in a plan.json."""
    try:
        with open(path) as fh:
            data = json.load(fh)
        return {str(c["width"]): {"tau": c["tau"], "step_s": c["step_s"],
                                  "tokens_per_s": c["tau"] / c["step_s"]}
                for c in data.get("candidates", [])}
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None


# Targets of units a plan may name (GPU arch: the H100/H200 class this project deploys to).
UNIT_TARGETS = {"cuda": {"kind": "cuda", "arch": "sm_90"}}


def _load_plan(path: str, host_target: str = "host"):
    """The HeteroPlan of a ``plan.json`` from `hetcomp tune`, or of a bare HeteroPlan JSON.

    A single-unit plan needs no partitioning (None). Spec-estimate plans describe hardware
    that is not here and cannot be compiled for.
    """
    from .codegen.targets import target_dict
    from .passes import HeteroPlan

    try:
        with open(path) as fh:
            data = json.load(fh)
        if data.get("format") != "hetcomp-plan/1":
            return HeteroPlan.from_json(data)
        if data.get("source") != "measured":
            raise HetcompError(f"plan {path} is a spec-estimate for hardware that is not here")
        units = list(data["units"])
        host = data.get("host", units[0])
        if host in UNIT_TARGETS:  # the plan runs the unsplit ops on a GPU
            raise HetcompError(
                f"plan {path} runs the model on {host}"
                + (f" with a {', '.join(u for u in units if u != host)} share: GPU-hosted "
                   "partitions are not compiled yet" if len(units) > 1 else
                   f": compile with --target {host} and no --plan"))
        if len(units) == 1:
            return None
        other = next(u for u in units if u != host)
        ratios = {kind: float(split.get(other, 0.0)) for kind, split in data["split"].items()}
        where = {u: i for i, u in enumerate((host, other))}
        return HeteroPlan(
            units=(host, other),
            targets=(target_dict(host_target), UNIT_TARGETS.get(other, target_dict(host_target))),
            ratios=tuple(sorted(ratios.items())),
            dense_attention=where.get(data["attention"].get("dense", host), 0),
            sparse_attention=where.get(data["attention"].get("sparse", host), 0))
    except HetcompError:
        raise
    except (OSError, ValueError, KeyError, TypeError, StopIteration) as e:
        raise HetcompError(f"cannot read plan {path}: {e}") from None


def _prompt_ids(art, args) -> list[int]:
    if args.prompt_ids is not None:
        return _parse_ids(args.prompt_ids)
    return art.tokenizer.encode(args.prompt, chat=args.chat)


def cmd_generate(args) -> int:
    from .runtime import generate, load_artifact

    art = load_artifact(args.artifact)
    ids = _prompt_ids(art, args)
    lookup = auto_lookup(args.width) if args.lookup is None else args.lookup
    res = generate(art, ids, max_new_tokens=args.max_new_tokens, width=args.width,
                   lookup=lookup)
    if args.json:
        print(json.dumps(res.to_json()))
    else:
        print(res.text)
        spec = (f", width {args.width}: {res.accepted_per_step:.2f} tokens per verify step"
                if args.width > 1 else "")
        print(f"[{len(res.ids)} tokens, prefill {res.prefill_s * 1e3:.0f} ms, "
              f"decode {res.decode_tokens_per_s:.1f} tokens/s{spec}]", file=sys.stderr)
    return 0


def auto_lookup(width: int) -> int:
    """Default n-gram draft tokens inside a width-W tree: half of it, at most 8. Measured with
    the packaged heads on 24 held-out prompts that `bench --prompts heldout` does not use
    (the 17th-40th), accepted tokens per step: W=2 1.36 -> 1.41 with one lookup token,
    W=4 1.65 -> 1.69 with two instead of one, W=8 1.86 -> 1.90 with four instead of two."""
    return min(8, width // 2)


BENCH_PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a refrigerator works, in simple terms.",
    "What should I pack for a weekend hiking trip?",
]


def bench_prompts(manifest: dict, which: str = "bench") -> list[str]:
    """The prompts `hetcomp bench` decodes: ``bench`` (:data:`BENCH_PROMPTS`) or ``heldout``
    (the first 8 held-out prompts of the calibration that made the heads of the artifact
    whose ``manifest`` is given)."""
    if which == "bench":
        return list(BENCH_PROMPTS)
    info = (manifest.get("speculative") or {}).get("heads_info")
    if not info or "corpus" not in info:
        raise HetcompError("--prompts heldout needs an artifact compiled with calibrated heads")
    from .speculative.calibrate import heldout_prompts

    return heldout_prompts(info)


def _bench_widths(art, widths, new_tokens: int, lookup: int | None,
                  prompts: list[str] = BENCH_PROMPTS, rounds: int = 1) -> list[dict]:
    """Per width: tokens/s over the prompts, accepted tokens per step, step time.

    Widths are interleaved: every prompt (in every round) runs at each width in turn, so a
    slow phase of a shared machine lands on all widths alike instead of on a few of them.
    """
    from .runtime import generate

    chat = art.tokenizer.chat_template is not None  # tiny test models have none
    encoded = [art.tokenizer.encode(p, chat=chat) for p in prompts]
    lookups = {w: auto_lookup(w) if lookup is None else lookup for w in widths}
    for w in widths:
        generate(art, encoded[0], max_new_tokens=8, stop_at_eos=False, width=w,
                 lookup=lookups[w])  # warm-up
    made = dict.fromkeys(widths, 0)
    secs = dict.fromkeys(widths, 0.0)
    steps = dict.fromkeys(widths, 0)
    times: dict = {w: [] for w in widths}
    for r in range(rounds):
        for ids in encoded:
            for w in widths:
                res = generate(art, ids, max_new_tokens=new_tokens, stop_at_eos=False,
                               width=w, step_times=times[w], lookup=lookups[w])
                made[w] += len(res.ids) - 1
                secs[w] += res.decode_s
                steps[w] += res.steps
        if rounds > 1:
            print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    rows = []
    for w in widths:
        tree = art.trees.get(w)
        rows.append({
            "width": w,
            "tokens_per_s": made[w] / secs[w],
            "accepted_per_step": made[w] / steps[w],
            "expected_accepted_per_step": tree.expected_accept_length if tree else 1.0,
            "step_ms": 1e3 * statistics.median(times[w]),
            "lookup": lookups[w],
        })
        print(f"  W={w:3d}  {rows[-1]['tokens_per_s']:6.1f} tokens/s  "
              f"{rows[-1]['accepted_per_step']:.2f} accepted/step  "
              f"{rows[-1]['step_ms']:.1f} ms/step", file=sys.stderr, flush=True)
    return rows


def plot_widths(rows, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = [r["width"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(ws, [r["tokens_per_s"] for r in rows], marker="o", color="C0", label="tokens/s")
    pred = [(r["width"], r["predicted_tokens_per_s"]) for r in rows if "predicted_tokens_per_s" in r]
    if pred:
        ax.plot(*zip(*pred, strict=True), marker="x", ls="--", color="C0",
                label="predicted (plan)")
        ax.legend(loc="lower left", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tree width W")
    ax.set_ylabel("decode tokens/s", color="C0")
    ax2 = ax.twinx()
    ax2.plot(ws, [r["accepted_per_step"] for r in rows], marker="s", color="C1",
             label="accepted/step (measured)")
    ax2.plot(ws, [r["expected_accepted_per_step"] for r in rows], ls="--", color="C1",
             label="accepted/step (expected)")
    ax2.set_ylabel("tokens per verify step", color="C1")
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cmd_bench(args) -> int:
    from .profile.bandwidth import measure_read_bandwidth
    from .runtime import generate, load_artifact

    if args.rounds < 1:
        raise HetcompError("--rounds must be at least 1")
    art = load_artifact(args.artifact)
    texts = bench_prompts(art.manifest, args.prompts)
    ids = art.tokenizer.encode(BENCH_PROMPTS[0], chat=art.tokenizer.chat_template is not None)
    generate(art, ids, max_new_tokens=8, stop_at_eos=False)  # warm-up
    runs = [generate(art, ids, max_new_tokens=args.new_tokens, stop_at_eos=False)
            for _ in range(args.runs)]
    tps = statistics.median(r.decode_tokens_per_s for r in runs)
    bw = measure_read_bandwidth()
    per_token = art.bytes_per_token()
    report = {
        "artifact": art.path,
        "dtype": art.dtype,
        "threads": int(os.environ.get("TVM_NUM_THREADS", "1")),
        "prompt_tokens": len(ids),
        "new_tokens": args.new_tokens,
        "runs": args.runs,
        "decode_tokens_per_s": tps,
        "decode_tokens_per_s_all": [r.decode_tokens_per_s for r in runs],
        "prefill_s": statistics.median(r.prefill_s for r in runs),
        "weight_bytes_per_token": per_token,
        "memory_bandwidth_gb_s": bw,
        "roofline_tokens_per_s": bw * 1e9 / per_token,
        "roofline_fraction": tps * per_token / (bw * 1e9),
    }
    widths = [int(w) for w in args.widths.split(",")] if args.widths else [1]
    bad = [w for w in widths if w != 1 and w not in art.trees]
    if bad:
        raise HetcompError(f"widths {bad} are not in this artifact (compile with --heads)")
    report["verify_steps"] = _verify_steps(art, widths)
    if args.kernels:
        report["kernels"] = _kernel_tables(art, widths, args.kernels)
    if args.widths:
        report["prompts"] = {"set": args.prompts, "count": len(texts)}
        rows = _bench_widths(art, widths, args.new_tokens, args.lookup, texts, args.rounds)
        report["rounds"] = args.rounds
        predicted = art.manifest.get("plan_prediction") or {}
        for r in rows:
            if str(r["width"]) in predicted:
                r["predicted_tokens_per_s"] = predicted[str(r["width"])]["tokens_per_s"]
        best = max(rows, key=lambda r: r["tokens_per_s"])
        base = next((r for r in rows if r["width"] == 1), rows[0])
        report["widths"] = rows
        report["best_width"] = best["width"]
        report["speedup_best_vs_w1"] = best["tokens_per_s"] / base["tokens_per_s"]
        plot = args.plot or os.path.join(art.path, "bench_widths.png")
        plot_widths(rows, plot, f"{art.manifest['model']} ({art.dtype}): speculative decoding")
        report["plot"] = plot
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            if k in ("widths", "verify_steps", "kernels"):
                continue
            print(f"{k:28s} {v:.4g}" if isinstance(v, float) else f"{k:28s} {v}")
        for t in report.get("kernels", []):
            print(f"verify W={t['width']}: {t['step_ms']:.2f} ms; slowest kernels (ms per step, "
                  "calls):")
            for k in t["top"]:
                print(f"  {k['name']:40s} {k['ms']:8.3f}  x{k['calls']}")
    return 0


def _breakdown_cache_len(art, widths) -> int:
    """The committed length the step breakdowns run after: 64, or less if the widest tree
    would not fit the context after it."""
    return max(1, min(64, art.config.max_context - max(widths) - 1))


def _kernel_tables(art, widths, top: int) -> list[dict]:
    """Per width: the ``top`` kernels (and VM builtins) by synchronised time in one verify
    step (hetcomp.runtime.unit_time.kernel_breakdown)."""
    from .runtime.unit_time import kernel_breakdown

    cache_len = _breakdown_cache_len(art, widths)
    out = []
    for w in sorted(set(widths)):
        b = kernel_breakdown(art, w, steps=5, cache_len=cache_len)
        out.append({"width": w, "step_ms": 1e3 * b["step_s"], "top": [
            {"name": k, "ms": 1e3 * t, "calls": b["calls"][k]}
            for k, t in list(b["kernels"].items())[:top]]})
    return out


def _verify_steps(art, widths) -> list[dict]:
    """Per width: the verify step time and each unit's busy time (their sum is the step
    without overlap; see hetcomp.runtime.unit_time)."""
    from .runtime.unit_time import step_breakdown

    cache_len = _breakdown_cache_len(art, widths)
    out = []
    for w in sorted(set(widths)):
        b = step_breakdown(art, w, steps=5, cache_len=cache_len)
        out.append({"width": w, "step_ms": 1e3 * b["step_s"], "serial_ms": 1e3 * b["serial_s"],
                    "busy_ms": {u: 1e3 * t for u, t in b["busy_s"].items() if u != "host"}})
    return out


def cmd_calibrate(args) -> int:
    import tempfile

    from .codegen.compile import CompileOptions, compile_model
    from .frontend import load_model
    from .runtime import load_artifact
    from .speculative.calibrate import (TEACHER_CHUNK, CalibrateOptions, calibrate, load_cache,
                                        plot_statistics)

    opts = CalibrateOptions(corpus=args.corpus, num_heads=args.num_heads,
                            new_tokens=args.new_tokens, epochs=args.epochs, seed=args.seed,
                            max_prompts=args.max_prompts, cache=args.cache, soft=args.soft,
                            draft_vocab=args.draft_vocab, responses=args.responses,
                            recorded_only=args.recorded_only,
                            cosine=args.lr_schedule == "cosine")
    if args.reuse and args.cache:
        raise HetcompError("--reuse trains on saved data; --cache saves new data: pick one")
    data = load_cache(args.reuse) if args.reuse else None
    loaded = load_model(args.model)
    if data is not None:  # the saved data replaces the compiled model's run
        heads = calibrate(None, loaded[1]["embed"], opts, data=data)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            compile_model(CompileOptions(model=args.model, verify_widths=(TEACHER_CHUNK,)),
                          f"{tmp}/art", weights=loaded)
            art = load_artifact(f"{tmp}/art")
            heads = calibrate(art, loaded[1]["embed"], opts)
    out = args.output if args.output.endswith(".npz") else args.output + ".npz"
    heads.save(out)
    plot_statistics(heads, out[:-4] + ".png")
    tau = heads.info["tau"]
    print(json.dumps({"heads": out, "plot": out[:-4] + ".png",
                      "topk_accuracy_top1": [round(a[0], 4) for a in heads.info["topk_accuracy"]],
                      "tau": {k: round(v, 3) for k, v in tau.items()}}))
    return 0


def cmd_profile(args) -> int:
    from .profile.commands import profile_command

    if args.kit_out is None and args.output is None:
        raise HetcompError("profile needs -o DB (or --kit-out DIR to only build a kit)")
    units = _units(args.units) if args.units else ([] if args.kit else ["cpu"])
    summary = profile_command(args.model, units, args.output, quick=args.quick,
                              force=args.force, kit_out=args.kit_out, kit=args.kit,
                              target=args.target)
    print(json.dumps(summary, indent=1, default=str))
    return 0


def cmd_tune(args) -> int:
    from .profile.commands import tune_command, tune_kernels_command

    if args.kernels:
        widths = [int(w) for w in (args.widths or "1,16,64").split(",")]
        kinds = [k for k in args.kinds.split(",") if k] if args.kinds else None
        summary = tune_kernels_command(args.model, args.output, widths, kinds, args.trials)
        print(json.dumps(summary, indent=1, default=str))
        return 0

    summary = tune_command(args.model, _units(args.units), args.output, quick=args.quick,
                           cache_len=args.cache_len, heads=args.heads, profile=args.profile,
                           draft_dtype=args.draft_dtype)
    print(json.dumps(summary, indent=1, default=str))
    return 0


def _units(text: str) -> list[str]:
    units = [u.strip() for u in text.split(",") if u.strip()]
    if not units:
        raise HetcompError("--units needs at least one unit (e.g. cpu or cpu,cuda)")
    return units


def cmd_inspect(args) -> int:
    from .runtime.artifact import _read_manifest

    manifest = _read_manifest(args.artifact)
    if args.json:
        print(json.dumps(manifest, indent=1, sort_keys=True))
        return 0
    show = {k: v for k, v in manifest.items() if k not in ("params", "tokenizer", "files")}
    print(json.dumps(show, indent=1, sort_keys=True))
    print(f"params: {len(manifest['params'])} tensors, "
          f"{manifest['files']['params.bin']['bytes'] / 2**20:.1f} MiB")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hetcomp", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a model into an artifact folder")
    c.add_argument("--model", default="smollm2", help="smollm2 | FILE.gguf | HF_DIR")
    c.add_argument("--target", default="host",
                   help="host | x86-64-v3 (portable) | aarch64 (cross) | cuda (whole model on GPU)")
    c.add_argument("--dtype", default="float32", help="weight dtype: float32 | float16")
    c.add_argument("--draft-dtype", help="dtype of the Medusa draft's weights, its heads and LM "
                   "head (default: --dtype; float16 halves the bytes the draft reads each step, "
                   "output unchanged)")
    c.add_argument("--max-context", type=int, default=2048, help="KV cache capacity (tokens)")
    c.add_argument("--heads", help="Medusa heads (.npz) from `hetcomp calibrate`")
    c.add_argument("--plan", help="plan.json from `hetcomp tune`: partition across units")
    c.add_argument("--tuning-db", help="root of `hetcomp tune --kernels` databases: this "
                                       "machine's records replace hand-written schedules")
    c.add_argument("--separate-weights", action="store_true",
                   help="leave params.bin out; `hetcomp attach-weights` rebuilds it where it runs")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_compile)

    a = sub.add_parser("attach-weights", help="rebuild an artifact's params.bin from the model")
    a.add_argument("artifact")
    a.add_argument("--model", help="the model file it was compiled from (default: as recorded)")
    a.add_argument("--heads", help="the Medusa heads file (default: the packaged one)")
    a.add_argument("--quiet", action="store_true")
    a.set_defaults(func=cmd_attach_weights)

    g = sub.add_parser("generate", help="greedy generation from an artifact")
    g.add_argument("artifact")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt-ids")
    g.add_argument("--chat", action="store_true", help="render the model's chat template")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--width", type=int, default=1, help="token-tree width (1: no speculation)")
    g.add_argument("--lookup", type=int, default=None,
                   help="n-gram lookup draft tokens inside the tree (0: Medusa heads only; "
                        "default: half the width, at most 8)")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_generate)

    k = sub.add_parser("calibrate", help="train Medusa heads by self-distillation")
    k.add_argument("--model", default="smollm2")
    k.add_argument("--corpus", default="chat",
                   help="chat | mtbench | alpaca | FILE (one prompt per line)")
    k.add_argument("--num-heads", type=int, default=4)
    k.add_argument("--new-tokens", type=int, default=256)
    k.add_argument("--epochs", type=int, default=4)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--max-prompts", type=int, default=0)
    k.add_argument("--cache", help="also save the generated training data (.npz) here")
    k.add_argument("--reuse", metavar="CACHE",
                   help="train on data an earlier run saved with --cache (same --corpus, "
                        "--seed, --new-tokens, --responses) instead of running the model")
    k.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine",
                   help="learning rate over training: cosine decay to 0, or constant")
    k.add_argument("--soft", type=float, default=0.5,
                   help="weight of the model's own distribution in the targets (0: hard)")
    k.add_argument("--draft-vocab", type=int, default=8192,
                   help="tokens the draft may propose, most frequent first (0: all)")
    k.add_argument("--responses", help="recorded greedy responses (.jsonl[.gz] of prompt, ids): "
                   "replayed instead of generated")
    k.add_argument("--recorded-only", action="store_true",
                   help="with --responses: use only the prompts that have one")
    k.add_argument("-o", "--output", required=True)
    k.set_defaults(func=cmd_calibrate)

    b = sub.add_parser("bench", help="decode speed, bandwidth and roofline fraction")
    b.add_argument("artifact")
    b.add_argument("--runs", type=int, default=5)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--prompts", choices=("bench", "heldout"), default="bench",
                   help="with --widths: the 3 bench prompts, or 8 prompts held out from the "
                        "heads' calibration (unseen in training)")
    b.add_argument("--widths", help="comma-separated tree widths, e.g. 1,2,4,8,16,32,64")
    b.add_argument("--rounds", type=int, default=1,
                   help="with --widths: passes over the prompts (widths interleaved)")
    b.add_argument("--plot", help="PNG of tokens/s and accepted length against W")
    b.add_argument("--lookup", type=int, default=None,
                   help="n-gram lookup draft tokens inside the tree (default: width // 2, <= 8)")
    b.add_argument("--kernels", type=int, default=0, metavar="N",
                   help="also list the N slowest kernels of a verify step per width")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)

    pr = sub.add_parser("profile", help="measure every op class on each unit (ARCA)")
    pr.add_argument("--model", default="smollm2")
    pr.add_argument("--units", help="cpu[,cuda] (default: cpu; with --kit: the kit's units)")
    pr.add_argument("--quick", action="store_true", help="few shapes (smoke test)")
    pr.add_argument("--force", action="store_true", help="re-measure even if a profile fits")
    pr.add_argument("--kit-out", help="only compile the probe kernels into a kit folder, to "
                                      "measure where the units are")
    pr.add_argument("--target", default="host",
                    help="with --kit-out: the CPU target (x86-64-v3 for another x86 host)")
    pr.add_argument("--kit", help="measure a kit built elsewhere (needs the TVM runtime only)")
    pr.add_argument("-o", "--output", help="SQLite profile database")
    pr.set_defaults(func=cmd_profile)

    t = sub.add_parser("tune", help="profile + fit cost models + plan (plan.json, plan.png)")
    t.add_argument("--model", default="smollm2")
    t.add_argument("--units", default="cpu")
    t.add_argument("--heads", help="Medusa heads for tau(W) (default: the packaged ones)")
    t.add_argument("--cache-len", type=int, default=256)
    t.add_argument("--draft-dtype", choices=("float32", "float16"),
                   help="the draft's weight dtype the artifact is compiled with "
                        "(compile --draft-dtype; default: the model's)")
    t.add_argument("--quick", action="store_true")
    t.add_argument("--profile", help="plan from this profile database (measured elsewhere, "
                                     "e.g. with --kit) instead of profiling here")
    t.add_argument("--kernels", action="store_true",
                   help="MetaSchedule-tune the linear kernels into a database per machine "
                        "fingerprint under -o (for compile --tuning-db)")
    t.add_argument("--widths", help="with --kernels: rows W to tune (default 1,16,64)")
    t.add_argument("--kinds", help="with --kernels: linear kinds (default all five)")
    t.add_argument("--trials", type=int, default=32, help="with --kernels: trials per kernel")
    t.add_argument("-o", "--output", required=True, help="output folder")
    t.set_defaults(func=cmd_tune)

    i = sub.add_parser("inspect", help="print an artifact's manifest")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "chat", False) and args.prompt is None:
        print("hetcomp: error: --chat needs --prompt", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except HetcompError as e:
        print(f"hetcomp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a bug, not bad input: still one line unless debugging
        if os.environ.get("HETCOMP_DEBUG"):
            raise
        print(f"hetcomp: internal error: {type(e).__name__}: {e} (HETCOMP_DEBUG=1 for details)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
