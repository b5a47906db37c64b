"""pp512 and tg128 (llama-bench's two numbers) for hetcomp artifacts and llama.cpp GGUFs.

One interleaved run: every round times each decoder in turn, so a slow phase of a shared
machine lands on all of them alike; the best round is kept. The same 512 random token ids
for everyone; pp = prefill from an empty cache, tg = 128 tokens one at a time after one token
(decode only: each decoder's own step calls timed, sampling greedy). Linear-layer GFLOP/s of
pp512 and numpy's float32 GEMM rate measured in the same run say how close prefill comes to
the machine's GEMM. ``llama-cpp-python`` missing: llama.cpp is skipped and said so.

``python benchmarks/bench_pp_tg.py --artifact A32 A16 --gguf build/peers/smollm2-f32.gguf
build/peers/smollm2-f16.gguf [--rounds 3] [--out build/pp_tg.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

PROMPT, GEN = 512, 128


def _hetcomp(path: str):
    from hetcomp.runtime import generate, load_artifact

    art = load_artifact(path)

    def pp(ids):
        sess = art.new_session()
        t0 = time.perf_counter()
        sess.prefill(ids)
        return time.perf_counter() - t0

    def tg(ids):
        res = generate(art, ids[:1], max_new_tokens=GEN, stop_at_eos=False)
        return (len(res.ids) - 1) / res.decode_tokens_per_s

    return art.config, pp, tg


def _llama_cpp(path: str):
    from llama_cpp import Llama

    from bench_peers import llama_cpp_decode  # this folder: the one llama.cpp decode loop

    llm = Llama(model_path=path, n_threads=2, n_threads_batch=2, n_ctx=1024, n_batch=512,
                verbose=False)

    def pp(ids):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        return time.perf_counter() - t0

    def tg(ids):
        return llama_cpp_decode(llm, ids[:1], GEN)[1]

    return None, pp, tg


def numpy_gemm_gflops(seconds: float = 1.0) -> float:
    a = np.random.default_rng(0).random((512, 576), dtype=np.float32)
    b = np.random.default_rng(1).random((576, 1536), dtype=np.float32)
    a @ b
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return n * 2 * 512 * 576 * 1536 / (time.perf_counter() - t0) / 1e9


def linear_flops_per_token(cfg) -> float:
    """Multiply-adds of the decoder layers' linear kernels per token, x2 (the LM head runs
    for the last prompt row only)."""
    e, f = cfg.hidden_size, cfg.intermediate_size
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    return 2.0 * cfg.num_layers * e * (qkv + cfg.num_heads * cfg.head_dim + 3 * f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", nargs="*", default=[])
    ap.add_argument("--gguf", nargs="*", default=[])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="build/pp_tg.json")
    args = ap.parse_args()
    runners, cfg = {}, None
    for a in args.artifact:
        c, pp, tg = _hetcomp(a)
        cfg = cfg or c
        runners[f"hetcomp {os.path.basename(a.rstrip('/'))}"] = (pp, tg)
    for g in args.gguf:
        try:
            runners[f"llama.cpp {os.path.basename(g)}"] = _llama_cpp(g)[1:]
        except ImportError:
            print("llama-cpp-python not installed: llama.cpp skipped")
            break
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size if cfg else 49152,
                                            PROMPT).tolist()
    best = {k: [float("inf"), float("inf")] for k in runners}
    gemm = 0.0
    for r in range(args.rounds):
        gemm = max(gemm, numpy_gemm_gflops())
        for name, (pp, tg) in runners.items():
            pp(ids[:16])  # warm-up
            best[name][0] = min(best[name][0], pp(ids))
            best[name][1] = min(best[name][1], tg(ids))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    flops = linear_flops_per_token(cfg) if cfg else 0.0
    rows = [{"decoder": k, "pp512": PROMPT / p, "tg128": (GEN - 1) / t,
             "linear_gflops_pp512": PROMPT * flops / p / 1e9} for k, (p, t) in best.items()]
    report = {"numpy_gemm_gflops": gemm, "rounds": args.rounds, "rows": rows}
    print(f"numpy float32 GEMM 512x576x1536: {gemm:.0f} GFLOP/s")
    print("| decoder | pp512 tokens/s | tg128 tokens/s | linear GFLOP/s in pp512 |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['decoder']} | {row['pp512']:.0f} | {row['tg128']:.1f} | "
              f"{row['linear_gflops_pp512']:.0f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
