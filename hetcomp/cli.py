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
                          max_context=args.max_context)
    compile_model(opts, args.output, quiet=args.quiet)
    return 0


def _prompt_ids(art, args) -> list[int]:
    if args.prompt_ids is not None:
        return _parse_ids(args.prompt_ids)
    return art.tokenizer.encode(args.prompt, chat=args.chat)


def cmd_generate(args) -> int:
    from .runtime import generate, load_artifact

    art = load_artifact(args.artifact)
    ids = _prompt_ids(art, args)
    res = generate(art, ids, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps(res.to_json()))
    else:
        print(res.text)
        print(f"[{len(res.ids)} tokens, prefill {res.prefill_s * 1e3:.0f} ms, "
              f"decode {res.decode_tokens_per_s:.1f} tokens/s]", file=sys.stderr)
    return 0


BENCH_PROMPT = "Write a short story about a robot who learns to paint."


def cmd_bench(args) -> int:
    from .profile.bandwidth import measure_read_bandwidth
    from .runtime import generate, load_artifact

    art = load_artifact(args.artifact)
    ids = art.tokenizer.encode(BENCH_PROMPT, chat=True)
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
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"{k:28s} {v:.4g}" if isinstance(v, float) else f"{k:28s} {v}")
    return 0


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
    c.add_argument("--target", default="host")
    c.add_argument("--dtype", default="float32", help="weight dtype: float32 | float16")
    c.add_argument("--max-context", type=int, default=2048, help="KV cache capacity (tokens)")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_compile)

    g = sub.add_parser("generate", help="greedy generation from an artifact")
    g.add_argument("artifact")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt-ids")
    g.add_argument("--chat", action="store_true", help="render the model's chat template")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="decode speed, bandwidth and roofline fraction")
    b.add_argument("artifact")
    b.add_argument("--runs", type=int, default=5)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)

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
