"""The CUDA artifact's kernels on this CPU: greedy output against the CPU artifact's.

Before a device run, this checks the exact kernels ``hetcomp compile --target cuda`` builds
(GPU schedules, fused linears, ``tree_attention`` with RoPE and the cache write inside, the
fixed caches, the draft) on a real model without a GPU: every GPU thread runs serially on the
CPU (``hetcomp.testing.gpu.emulated_artifact``), through the same runtime as ``generate``.
It compiles the model twice (``--target cuda`` and ``--target host``, the same options),
then decodes each prompt greedily with both, sequentially and speculating at ``--width``
(with the model's packaged heads and the default n-gram lookup, as ``generate`` and the
device run draft; without heads, sequentially only),
and prints whether the token ids are identical and where they first differ.

``python benchmarks/cuda_emulated.py [--model smollm2] [--dtype float16] [--tokens 32]
[--width 16] [--prompts 3] [-o DIR]`` (DIR keeps the three artifacts; default: a temporary
folder).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from hetcomp.driver.benchmark import BENCH_PROMPTS
from hetcomp.driver.compile import CompileOptions, compile_model
from hetcomp.frontend import load_model
from hetcomp.frontend.models import default_heads
from hetcomp.quant_format import is_quant
from hetcomp.runtime import generate, load_artifact
from hetcomp.runtime.generate import auto_lookup
from hetcomp.testing.gpu import capture_scheduled, emulated_artifact


def build(model: str, dtype: str, width: int, out: str):
    """(emulated CUDA artifact, CPU artifact), compiled into ``out``."""
    weights = load_model(model, keep_quant=is_quant(dtype))
    paths, scheduled = {}, []
    for target in ("cuda", "host"):
        t0 = time.time()
        # (the CPU artifact with float activations, as the GPU's quantized kernels compute)
        opts = CompileOptions(model=model, dtype=dtype, target=target, widths=sorted({1, width}),
                              heads=default_heads(model), int8_dot=False)
        with capture_scheduled(scheduled if target == "cuda" else []):
            paths[target] = compile_model(opts, os.path.join(out, target), quiet=True,
                                          weights=weights)
        print(f"compiled {target} in {time.time() - t0:.0f} s", flush=True)
    t0 = time.time()
    emulated = emulated_artifact(paths["cuda"], scheduled[0], os.path.join(out, "emulated"))
    print(f"built the emulated library in {time.time() - t0:.0f} s", flush=True)
    return load_artifact(emulated), load_artifact(paths["host"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("-o", "--out")
    args = ap.parse_args()
    if args.out:
        compare(args, args.out)
    else:  # ~1.6 GB of artifacts a run: gone with the run (each run left its copy behind)
        with tempfile.TemporaryDirectory(prefix="hetcomp-emulated-") as out:
            compare(args, out)


def compare(args, out: str) -> None:
    """Build into ``out`` and decode the bench prompts with both artifacts."""
    emulated, cpu = build(args.model, args.dtype, args.width, out)
    same = True
    for prompt in BENCH_PROMPTS[:args.prompts]:
        ids = cpu.tokenizer.encode(prompt, chat=cpu.tokenizer.chat_template is not None)
        want = generate(cpu, ids, max_new_tokens=args.tokens, stop_at_eos=False).ids
        for width in (1, args.width) if emulated.trees else (1,):  # (a model without heads)
            t0 = time.time()
            res = generate(emulated, ids, max_new_tokens=args.tokens, stop_at_eos=False,
                           width=width, lookup=auto_lookup(width))
            diff = next((i for i, (a, b) in enumerate(zip(res.ids, want)) if a != b), None)
            same &= diff is None
            print(f"W={width:2d} {'identical' if diff is None else f'differs at {diff}'} "
                  f"({res.accepted_per_step:.2f} tokens a step, {time.time() - t0:.0f} s): "
                  f"{prompt[:40]!r}", flush=True)
    print("all identical" if same else "NOT identical")


if __name__ == "__main__":
    main()
