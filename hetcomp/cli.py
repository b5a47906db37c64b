"""The ``hetcomp`` command: it parses arguments and calls :mod:`hetcomp.driver`.

User errors print one line on stderr and exit with code 2; set ``HETCOMP_DEBUG=1`` for tracebacks.
Each command imports its workflow when it runs: ``generate``, ``chat``, ``inspect`` and
``attach-weights`` must work with a runtime-only TVM, which cannot import the compiler.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from .errors import HetcompError
from .hardware import DEFAULT_CUDA_ARCH


# Argument types: a bad number is one line and exit 2, like every other bad input.
def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _id_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated token ids, got {text!r}") from None


_POSITIVE, _NON_NEGATIVE = _int_at_least(1), _int_at_least(0)


def _fraction(text: str) -> float:
    """A number in [0, 1] (``nan`` and ``inf`` are floats too, and train NaN heads)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # (False for nan)
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


_fraction.__name__ = "number in [0, 1]"


def _units(text: str) -> list[str]:
    units = [u.strip() for u in text.split(",") if u.strip()]
    if not units:
        raise HetcompError("--units needs at least one unit (e.g. cpu or cpu,cuda)")
    return units


def cmd_compile(args) -> int:
    from .driver.compile import CompileOptions, compile_model
    from .frontend.models import default_heads
    from .plan import load_plan, plan_choice, plan_prediction
    from .quant_format import is_quant

    if args.heads and args.no_heads:
        raise HetcompError("--heads and --no-heads contradict each other")
    heads = None if args.no_heads else (args.heads or default_heads(args.model))
    arch = DEFAULT_CUDA_ARCH if args.cuda_arch is None else args.cuda_arch
    plan = load_plan(args.plan, args.target, arch) if args.plan else None
    gpu = args.target == "cuda" or (
        plan is not None and any(t["kind"] == "cuda" for t in plan.targets))
    if args.cuda_arch is not None and not gpu:
        raise HetcompError("--cuda-arch is the GPU of --target cuda or of a --plan's cuda "
                           "unit: this build has none")
    if args.no_tensor_cores and not gpu:
        raise HetcompError("--no-tensor-cores is for the linears of --target cuda or of a "
                           "--plan's cuda unit: this build has none")
    if args.draft_dtype is not None and heads is None:
        raise HetcompError("--draft-dtype is the Medusa draft's weight dtype: this build has no "
                           "heads (--no-heads, or a model without packaged heads)")
    for flag, given in (("--no-cuda-graph", args.no_cuda_graph), ("--no-fuse", args.no_fuse)):
        if given and (args.target != "cuda" or plan is not None):
            # A partitioned build neither captures graphs nor fuses linears.
            raise HetcompError(f"{flag} is for a whole-model GPU build (--target cuda without "
                               "--plan): this build has none")
    opts = CompileOptions(model=args.model, dtype=args.dtype, target=args.target,
                          max_context=args.max_context, heads=heads, plan=plan,
                          datastore=args.datastore,
                          cuda_arch=arch,
                          separate_weights=args.separate_weights,
                          plan_prediction=plan_prediction(args.plan) if args.plan else None,
                          tuning_db=args.tuning_db, draft_dtype=args.draft_dtype,
                          kv_dtype=args.kv_dtype, default_width=args.width,
                          cuda_graph=not args.no_cuda_graph, fuse_linears=False if args.no_fuse else None,
                          tensor_cores=not args.no_tensor_cores,
                          int8_dot=not args.no_int8_dot,
                          plan_choice=plan_choice(args.plan) if args.plan else None)
    if args.no_int8_dot and not is_quant(opts.dtype):
        raise HetcompError("--no-int8-dot is for the linears of a block-quantized model "
                           f"(--dtype q4_0, q4_1 or q8_0): this build's are {opts.dtype}")
    compile_model(opts, args.output, quiet=args.quiet, force=args.force)
    return 0


def cmd_attach_weights(args) -> int:
    from .runtime.weights import attach_weights

    path = attach_weights(args.artifact, args.model, args.heads, quiet=args.quiet)
    if not args.quiet:
        print(f"weights attached and verified: {path}", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    from .driver.text import generate
    from .runtime import load_artifact
    from .runtime.unit_time import peak_rss_mb

    if args.chat and args.prompt is None:
        raise HetcompError("--chat needs --prompt")
    art = load_artifact(args.artifact, verify=not args.no_verify)
    gen = generate(art, args.prompt_ids if args.prompt_ids is not None else args.prompt,
                   chat=args.chat, max_new_tokens=args.max_new_tokens, width=args.width,
                   lookup=args.lookup)
    if args.json:
        for _ in gen:
            pass
        res = gen.result
        print(json.dumps({**res.to_json(), "width": gen.generation.width,
                          "lookup": gen.generation.lookup, "peak_rss_mb": peak_rss_mb()}))
        return 0
    for piece in gen:  # the text as each verify step accepts it
        print(piece, end="", flush=True)
    print()
    res, width = gen.result, gen.generation.width
    spec = (f", width {width}: {res.accepted_per_step:.2f} tokens per verify step"
            if width > 1 and res.steps else "")  # (no step: prefill's token was all)
    print(f"[{len(res.ids)} tokens, prefill {res.prefill_s * 1e3:.0f} ms, "
          f"decode {res.decode_tokens_per_s:.1f} tokens/s{spec}]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from .driver.text import Chat

    chat = Chat(args.artifact, max_new_tokens=args.max_new_tokens, width=args.width,
                lookup=args.lookup, system=args.system)
    interactive = sys.stdin.isatty()
    turn = 0
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        turn += 1
        for piece in chat.send(text):
            print(piece, end="", flush=True)
        print(flush=True)
        res = chat.last
        n = chat.last_dropped
        dropped = (f"dropped the {'oldest exchange' if n == 1 else f'{n} oldest exchanges'} "
                   "to fit the context, " if n else "")
        print(f"[turn {turn}: {dropped}prefilled {chat.last_prefilled} tokens, {len(res.ids)} new, "
              f"{res.decode_tokens_per_s:.1f} tokens/s, width {chat.width}]", file=sys.stderr,
              flush=True)
    return 0


def cmd_bench(args) -> int:
    from .driver.benchmark import bench

    report = bench(args.artifact, widths=args.widths, runs=args.runs,
                   new_tokens=args.new_tokens, prompts=args.prompts, rounds=args.rounds,
                   lookup=args.lookup, kernels=args.kernels, plot=args.plot,
                   verify=not args.no_verify, datastore=not args.no_datastore)
    if args.json:
        print(json.dumps(report))
        return 0
    for k, v in report.items():
        if k in ("widths", "verify_steps", "kernels"):
            continue
        print(f"{k:28s} {v:.4g}" if isinstance(v, float) else f"{k:28s} {v}")
    for t in report.get("kernels", []):
        print(f"verify W={t['width']}: {t['step_ms']:.2f} ms; slowest kernels (ms per step, "
              f"calls; the timer's own {t['timer_us']:.1f} us a call taken off):")
        for k in t["top"]:
            print(f"  {k['name']:40s} {k['ms']:8.3f}  x{k['calls']}")
    return 0


def cmd_calibrate(args) -> int:
    from .driver.calibrate import CalibrateOptions, calibrate_model

    opts = CalibrateOptions(corpus=args.corpus, num_heads=args.num_heads,
                            new_tokens=args.new_tokens, epochs=args.epochs, seed=args.seed,
                            max_prompts=args.max_prompts, cache=args.cache, soft=args.soft,
                            draft_vocab=args.draft_vocab, responses=args.responses,
                            recorded_only=args.recorded_only, dtype=args.dtype,
                            cosine=args.lr_schedule == "cosine")
    summary = calibrate_model(args.model, opts, args.output, reuse=args.reuse, force=args.force)
    print(json.dumps(summary))
    return 0


def cmd_profile(args) -> int:
    from .driver.profiling import profile_command

    if args.kit_out is not None and args.output is not None:
        raise HetcompError("--kit-out only builds a kit (measure it with --kit KIT -o DB): "
                           "leave out -o")
    if args.kit_out is None and args.output is None:
        raise HetcompError("profile needs -o DB (or --kit-out DIR to only build a kit)")
    units = _units(args.units) if args.units else ([] if args.kit else ["cpu"])
    summary = profile_command(args.model, units, args.output, quick=args.quick,
                              force=args.force, kit_out=args.kit_out, kit=args.kit,
                              target=args.target, dtype=args.dtype,
                              cuda_arch=args.cuda_arch)
    print(json.dumps(summary, indent=1, default=str))
    return 0


def cmd_tune(args) -> int:
    from .driver.tuning import tune_command, tune_kernels_command

    if args.kernels:
        if args.dtype != "float32":
            raise HetcompError("tune --kernels tunes the float32 linear kernels only (no "
                               f"--dtype {args.dtype})")
        kinds = [k for k in args.kinds.split(",") if k] if args.kinds is not None else None
        summary = tune_kernels_command(args.model, args.output, args.widths or [1, 16, 64],
                                       kinds, args.trials)
    else:
        summary = tune_command(args.model, _units(args.units), args.output, quick=args.quick,
                               cache_len=args.cache_len, heads=args.heads,
                               profile=args.profile, draft_dtype=args.draft_dtype,
                               force=args.force, dtype=args.dtype)
    print(json.dumps(summary, indent=1, default=str))
    return 0


def cmd_quality(args) -> int:
    from .driver.quality import quality

    report = quality(args.artifact, args.reference, args.texts, verify=not args.no_verify)
    if args.json:
        print(json.dumps(report))
        return 0
    for k, v in report.items():
        print(f"{k:22s} {v:.6g}" if isinstance(v, float) else f"{k:22s} {v}")
    return 0


def cmd_inspect(args) -> int:
    from .driver.inspect import inspect_path

    info = inspect_path(args.path)
    if args.json or info["kind"] != "artifact":
        print(json.dumps(info, indent=1, sort_keys=True))
        return 0
    show = {k: v for k, v in info.items()
             if k not in ("params", "tokenizer", "files", "kernels", "param_recipes", "memory",
                          "workspace_bytes")}
    print(json.dumps(show, indent=1, sort_keys=True))
    print(f"params: {len(info['params'])} tensors, "
          f"{info['files']['params.bin']['bytes'] / 2**20:.1f} MiB")
    mem = info.get("memory")
    if mem:
        print("memory: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in mem.items()))
    kernels = info.get("kernels") or []
    if kernels:
        print(f"\n{'function':12s} {'kernel':34s} {'unit':6s} {'rule':26s} "
              f"{'predicted us':>12s} {'calls':>5s}")
    for k in kernels:
        pred = f"{k['predicted_us']:.1f}" if k.get("predicted_us") is not None else "-"
        print(f"{k['function']:12s} {k['name']:34s} {k['unit']:6s} {k['rule'] or '(none)':26s} "
              f"{pred:>12s} {k['calls']:5d}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (no usage block) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hetcomp", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a model into an artifact folder")
    c.add_argument("--model", default="smollm2",
                   help="smollm2 | qwen2.5-coder-0.5b | qwen2.5-coder-1.5b | gemma3-270m | "
                        "FILE.gguf | HF_DIR")
    c.add_argument("--target", default="host",
                   help="host | x86-64-v3 (portable) | aarch64 (cross) | aarch64-dotprod (cross, "
                        "Armv8.2 int8 dot products: quantized linears on sdot) | cuda (whole "
                        "model on GPU)")
    c.add_argument("--dtype",
                   help="weight dtype: float32 | float16 | q4_0 | q4_1 | q8_0 (GGUF blocks: a "
                        "file's tensors in that format are kept bit for bit, others converted; "
                        "the embedding / LM head is q8_0; default: the --plan's, else float16 "
                        "for --target cuda, else float32)")
    c.add_argument("--draft-dtype", help="dtype of the Medusa draft's weights, its heads and LM "
                   "head (default: --dtype, float16 for q4_0/q4_1/q8_0; float16 halves the bytes "
                   "the draft reads each step, output unchanged)")
    c.add_argument("--kv-dtype", help="KV cache element type: float32 | float16 (default: "
                   "--dtype, float16 for q4_0/q4_1/q8_0; float16 halves the cache, attention "
                   "accumulates in float32)")
    c.add_argument("--max-context", type=_int_at_least(16),
                   help="KV cache capacity in tokens, at most the model's trained context "
                   "(default: the trained context, at most 2048)")
    c.add_argument("--heads", help="Medusa heads (.npz) from `hetcomp calibrate` (default for "
                   "a registered model: its packaged heads, if any)")
    c.add_argument("--no-heads", action="store_true",
                   help="compile without Medusa heads (no speculation)")
    c.add_argument("--datastore", default="auto",
                   help="what the lookup draft also searches: the model's own responses to "
                        "other prompts. auto (default): the responses the heads trained on "
                        "(kept in the heads by calibrate, or packaged); none; or a responses "
                        "file (JSON lines with prompt and ids)")
    c.add_argument("--plan", help="plan.json from `hetcomp tune`: partition across units")
    c.add_argument("--cuda-arch",
                   help=f"GPU architecture of cuda units (default {DEFAULT_CUDA_ARCH}; "
                        "Jetson Orin: sm_87)")
    c.add_argument("--no-cuda-graph", action="store_true",
                   help="--target cuda: launch every kernel on its own (default: capture each "
                        "function's static-shape kernel regions as CUDA graphs)")
    c.add_argument("--no-fuse", action="store_true",
                   help="--target cuda: run each RMSNorm and gated activation as its own "
                        "kernel (default: inside the linear's kernel beside it)")
    c.add_argument("--no-tensor-cores", action="store_true",
                   help="--target cuda: every linear on the CUDA cores (default: float16 "
                        "and block-quantized linears of 16-64 rows on tensor cores, sm_70 "
                        "and later)")
    c.add_argument("--no-int8-dot", action="store_true",
                   help="quantized --dtype: dequantize the weights into float32 FMAs on every "
                        "CPU (default: where the target has AVX-512 VNNI or NEON dotprod, int8 "
                        "activations and integer dot products, as llama.cpp; a --plan's units "
                        "always dequantize)")
    c.add_argument("--tuning-db", help="root of `hetcomp tune --kernels` databases: this "
                                       "machine's records replace hand-written schedules")
    c.add_argument("--separate-weights", action="store_true",
                   help="leave params.bin out; `hetcomp attach-weights` rebuilds it where it runs")
    c.add_argument("--width", type=_POSITIVE, help="the tree width `generate` and `chat` "
                   "speculate at by default (default: the plan's, else the planner's choice "
                   "on the target's roofline)")
    c.add_argument("-o", "--output", required=True,
                   help="artifact folder: absent, empty, or (with --force) an artifact")
    c.add_argument("--force", action="store_true", help="replace an existing artifact at -o")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_compile)

    a = sub.add_parser("attach-weights", help="rebuild an artifact's params.bin from the model")
    a.add_argument("artifact")
    a.add_argument("--model", help="the model file it was compiled from (default: the name compile "
                   "recorded: a registered model, or a file name looked up in the current folder)")
    a.add_argument("--heads", help="the Medusa heads file (default: the packaged file of "
                                   "the name compile read, else the file it read, where either "
                                   "still holds the same bytes)")
    a.add_argument("--quiet", action="store_true")
    a.set_defaults(func=cmd_attach_weights)

    g = sub.add_parser("generate", help="greedy generation from an artifact")
    g.add_argument("artifact")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt-ids", type=_id_list)
    g.add_argument("--chat", action="store_true", help="render the model's chat template")
    g.add_argument("--max-new-tokens", type=_POSITIVE, default=64)
    g.add_argument("--width", type=_POSITIVE, help="token-tree width (1: no speculation; "
                   "default: the width the artifact was compiled for, else 1)")
    g.add_argument("--no-verify", action="store_true",
                   help="skip checking params.bin against its SHA-256 when loading")
    g.add_argument("--lookup", type=_NON_NEGATIVE, default=None,
                   help="n-gram lookup draft nodes inside the tree, several earlier "
                        "occurrences' continuations merged (0: Medusa heads only; default: "
                        "the artifact's choice for the width, else half the width up to 8, "
                        "then 3/4 of it, at most 32)")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_generate)

    k = sub.add_parser("calibrate", help="train Medusa heads by self-distillation")
    k.add_argument("--model", default="smollm2")
    k.add_argument("--corpus", default="chat",
                   help="chat | mtbench | alpaca | humaneval | coder | FILE (one prompt "
                        "per line)")
    k.add_argument("--num-heads", type=_POSITIVE, default=4)
    k.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="weights of the model that replays the responses (float16: half the "
                        "bytes a step reads, half the memory)")
    k.add_argument("--new-tokens", type=_POSITIVE, default=256)
    k.add_argument("--epochs", type=_POSITIVE, default=4)
    k.add_argument("--seed", type=_NON_NEGATIVE, default=0)
    k.add_argument("--max-prompts", type=_NON_NEGATIVE, default=0)
    k.add_argument("--cache", help="also save the generated training data (.npz) here")
    k.add_argument("--reuse", metavar="CACHE",
                   help="train on data an earlier run saved with --cache (same --corpus, "
                        "--seed, --new-tokens, --responses) instead of running the model")
    k.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine",
                   help="learning rate over training: cosine decay to 0, or constant")
    k.add_argument("--soft", type=_fraction, default=0.5,
                   help="weight of the model's own distribution in the targets (0: hard)")
    k.add_argument("--draft-vocab", type=_NON_NEGATIVE, default=8192,
                   help="tokens the draft may propose, most frequent first (0: all)")
    k.add_argument("--responses", help="recorded greedy responses (.jsonl[.gz] of prompt, ids): "
                   "replayed instead of generated")
    k.add_argument("--recorded-only", action="store_true",
                   help="with --responses: use only the prompts that have one")
    k.add_argument("-o", "--output", required=True, help="heads file (.npz)")
    k.add_argument("--force", action="store_true", help="replace an existing heads file at -o")
    k.set_defaults(func=cmd_calibrate)

    b = sub.add_parser("bench", help="decode speed, bandwidth and roofline fraction")
    b.add_argument("artifact")
    b.add_argument("--runs", type=_POSITIVE, default=5)
    b.add_argument("--new-tokens", type=_int_at_least(2), default=64,
                   help="tokens per generation, the prefill's first one not timed (>= 2)")
    b.add_argument("--prompts", choices=("bench", "heldout"), default="bench",
                   help="with --widths: the 3 bench prompts, or 8 prompts held out from the "
                        "heads' calibration (unseen in training)")
    b.add_argument("--widths", type=_int_list,
                   help="comma-separated tree widths, e.g. 1,2,4,8,16,32,64")
    b.add_argument("--rounds", type=_POSITIVE, default=1,
                   help="with --widths: passes over the prompts (widths interleaved)")
    b.add_argument("--plot", help="PNG of tokens/s and accepted length against W")
    b.add_argument("--lookup", type=_NON_NEGATIVE, default=None,
                   help="n-gram lookup draft nodes inside the tree (default: the "
                        "artifact's choice for each width, else half the width up to 8, then "
                        "3/4 of it, at most 32)")
    b.add_argument("--no-datastore", action="store_true",
                   help="the lookup draft searches the context only, not the artifact's "
                        "datastore (the model's responses to other prompts)")
    b.add_argument("--kernels", type=_NON_NEGATIVE, default=0, metavar="N",
                   help="also list the N slowest kernels of a verify step per width")
    b.add_argument("--no-verify", action="store_true",
                   help="skip checking params.bin against its SHA-256 when loading")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)

    q = sub.add_parser("quality", help="perplexity on a fixed text set under teacher forcing; "
                       "with --reference, next-token agreement and KL against another artifact")
    q.add_argument("artifact")
    q.add_argument("--reference", help="the artifact to compare with (e.g. the float32 compile "
                   "of the same model)")
    q.add_argument("--texts", type=_POSITIVE, default=32, help="MT-bench prompts to score")
    q.add_argument("--no-verify", action="store_true",
                   help="skip checking params.bin against its SHA-256 when loading")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_quality)

    pr = sub.add_parser("profile", help="measure every op class on each unit (ARCA)")
    pr.add_argument("--model", default="smollm2")
    pr.add_argument("--units", help="cpu[,cuda] (default: cpu; with --kit: the kit's units)")
    pr.add_argument("--quick", action="store_true", help="few shapes (smoke test)")
    pr.add_argument("--force", action="store_true", help="re-measure even if a profile fits; "
                    "with --kit-out, replace an existing kit")
    pr.add_argument("--kit-out", help="only compile the probe kernels into a kit folder, to "
                                      "measure where the units are")
    pr.add_argument("--target", help="with --kit-out: the CPU that measures the kit, host | "
                    "x86-64-v3 (another x86 host) | x86-64 | aarch64 | aarch64-dotprod "
                    "(default: host; a cuda unit's probes are CUDA driven by it)")
    pr.add_argument("--cuda-arch", help="the GPU a cuda unit's probes are compiled for, "
                    "sm_87 (Jetson Orin) | sm_90 (H100/H200) | ... (default: this machine's "
                    "GPU's; with --kit-out: sm_90)")
    pr.add_argument("--kit", help="measure a kit built elsewhere (needs the TVM runtime only)")
    pr.add_argument("--dtype", default="float32",
                    help="weight dtype whose kernels to measure: float32 | float16 | q4_0 | "
                         "q4_1 | q8_0 (as compile --dtype)")
    pr.add_argument("-o", "--output", help="SQLite profile database (added to; the profiles "
                                           "measured or reused are drawn beside it, DB.png)")
    pr.set_defaults(func=cmd_profile)

    t = sub.add_parser("tune", help="profile + fit cost models + plan (plan.json, plan.png)")
    t.add_argument("--model", default="smollm2")
    t.add_argument("--units", default="cpu")
    t.add_argument("--heads", help="Medusa heads for tau(W) (default: the model's packaged ones)")
    t.add_argument("--cache-len", type=_POSITIVE, default=256)
    t.add_argument("--dtype", default="float32",
                   help="weight dtype of the artifact to plan for (compile --dtype): float32 | "
                        "float16 | q4_0 | q4_1 | q8_0")
    t.add_argument("--draft-dtype", choices=("float32", "float16"),
                   help="the draft's weight dtype the artifact is compiled with "
                        "(compile --draft-dtype; default: the model's)")
    t.add_argument("--quick", action="store_true")
    t.add_argument("--profile", help="plan from this profile database (measured elsewhere, "
                                     "e.g. with --kit) instead of profiling here")
    t.add_argument("--kernels", action="store_true",
                   help="MetaSchedule-tune the linear kernels into a database per machine "
                        "fingerprint under -o (for compile --tuning-db)")
    t.add_argument("--widths", type=_int_list,
                   help="with --kernels: rows W to tune (default 1,16,64)")
    t.add_argument("--kinds", help="with --kernels: linear kinds (default all five)")
    t.add_argument("--trials", type=_POSITIVE, default=32,
                   help="with --kernels: trials per kernel")
    t.add_argument("-o", "--output", required=True, help="output folder")
    t.add_argument("--force", action="store_true", help="replace an existing tune folder at -o")
    t.set_defaults(func=cmd_tune)

    ch = sub.add_parser("chat", help="a multi-turn conversation (one line a turn, from stdin); "
                        "the KV cache is kept across turns")
    ch.add_argument("artifact")
    ch.add_argument("--max-new-tokens", type=_POSITIVE, default=256, help="per reply")
    ch.add_argument("--width", type=_POSITIVE,
                    help="token-tree width (default: the artifact's compiled width)")
    ch.add_argument("--lookup", type=_NON_NEGATIVE, default=None)
    ch.add_argument("--system", help="a system prompt")
    ch.set_defaults(func=cmd_chat)

    i = sub.add_parser("inspect", help="what an artifact, model (GGUF / HF folder), heads file, "
                       "plan or profile kit holds, checked as the workflows read it")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)
    return p


#: The signals that ended the running command. TVM's FFI turns an exception raised inside a
#: Python function it calls (a pass, a schedule rule) into RuntimeError, so a Ctrl-C or
#: `kill` during a compile pass reaches ``main`` as one; this says what it was.
_RECEIVED: list[int] = []


def _terminated(signum, frame):
    # `kill` or `timeout` unwinds like Ctrl-C: the temporary output folders are removed
    # (Python's default for SIGTERM exits without running any cleanup).
    _RECEIVED.append(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    _RECEIVED.clear()
    previous = ({s: signal.signal(s, _terminated) for s in (signal.SIGTERM, signal.SIGINT)}
                if main_thread else {})
    try:
        return args.func(args)
    except HetcompError as e:
        print(f"hetcomp: error: {e}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as e:  # stdin (chat) or a text file that is not UTF-8
        print(f"hetcomp: error: the input is not UTF-8 ({e.reason}: byte "
              f"0x{e.object[e.start:e.start + 1].hex()} at offset {e.start})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `hetcomp generate ... | head`: the reader left; end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (exit's flush)
        return 128 + signal.SIGPIPE
    except Exception as e:  # a bug, not bad input: still one line unless debugging
        if _RECEIVED:  # a signal that came back through TVM's FFI (see _RECEIVED)
            return 128 + _RECEIVED[0]
        if os.environ.get("HETCOMP_DEBUG"):
            raise
        print(f"hetcomp: internal error: {type(e).__name__}: {e} (HETCOMP_DEBUG=1 for details)",
              file=sys.stderr)
        return 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
