"""Attention time of one split verify step: per layer ``rope_kv`` + dense part + sparse part +
merge, the kernels ``verify_w{W}`` calls, each scheduled by the host's rules, times the layers.

SmolLM2-135M's shape (9 query heads, 3 KV heads, head_dim 64, 30 layers, a 2048-slot cache
holding ``--cache-len`` committed tokens), Medusa trees as in ``bench_sparse_attention.py``.
Each kernel is timed alone, best of ``--repeat`` runs of ``--min-repeat-ms`` (this machine is
shared; interference only adds time).

    python benchmarks/bench_verify_attention.py [--widths 16 64] [--threads 1]

Measured (znver5, 1 thread, cache 256; the 2-core machine under a load average of 4-6 from
other jobs: per kernel the best of 6 runs of --repeat 7 and 25, so only large differences
count), us per layer / ms per 30-layer step:

    sparse part reading tree V from the V cache (before v_tree):
      W=16  rope 11.9  dense 117.5  sparse  5.2  merge 1.2  layer 135.8  step  4.07
      W=64  rope 65.9  dense 474.2  sparse 19.3  merge 4.6  layer 564.0  step 16.92
    sparse part reading rope_kv's v_tree:
      W=16  rope 12.9  dense 115.3  sparse  4.0  merge 1.2  layer 133.4  step  4.00
      W=64  rope 47.9  dense 460.1  sparse 20.9  merge 4.5  layer 533.4  step 16.00
"""

from __future__ import annotations

import argparse
import os
import sys

H, G, D, LAYERS, CONTEXT = 9, 3, 64, 30, 2048


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--cache-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--min-repeat-ms", type=int, default=30)
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's pool starts

    import numpy as np

    from hetcomp import _tvm
    from hetcomp.codegen.cross import apply_rules
    from hetcomp.hardware import host_cpu_name, target_dict
    from hetcomp.kernels import ops, script_ops
    from hetcomp.kernels import sparse_attention as sa
    from hetcomp.schedules.llvm import llvm_rules

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_sparse_attention import medusa_parents

    c = _tvm.compiler()
    host = target_dict("host")
    dev = _tvm.cpu()
    rng = np.random.default_rng(0)
    n = args.cache_len
    kc = _tvm.tensor(rng.standard_normal((LAYERS, G, D, CONTEXT), dtype="float32"))
    vc = _tvm.tensor(rng.standard_normal((LAYERS, G, CONTEXT, D), dtype="float32"))
    layer = LAYERS // 2

    def build(func):
        func = func if func.attrs.get(c.IS_SCHEDULED) else apply_rules(func, llvm_rules(), host)
        return c.compile(c.IRModule({"main": func}), target=c.Target(host)).mod

    def zeros(*shape):
        return _tvm.tensor(np.zeros(shape, "float32"))

    def best_us(mod, call):
        timer = mod.time_evaluator("main", dev, number=1, repeat=args.repeat,
                                   min_repeat_ms=args.min_repeat_ms)
        return timer(*call).min * 1e6

    print(f"split verify attention, H={H} G={G} D={D} x {LAYERS} layers, cache {n} of "
          f"{CONTEXT}, {host_cpu_name()}, {args.threads} thread(s); best of {args.repeat}, us")
    print(f"{'W':>3} {'rope':>8} {'dense':>8} {'sparse':>8} {'merge':>8} {'layer':>8} "
          f"{'step ms':>8}")
    for w in args.widths:
        row_ptr, col_idx = (_tvm.tensor(a) for a in sa.csr_from_parents(medusa_parents(w)))
        qkv = _tvm.tensor(rng.standard_normal((w, (H + 2 * G) * D), dtype="float32"))
        cs = _tvm.tensor(rng.standard_normal((w, D), dtype="float32"))
        q, k_tree, v_tree = zeros(H, w, D), zeros(G, w, D), zeros(G, w, D)
        dense, sparse = zeros(w, H, D + 1), zeros(w, H, D + 1)
        rope = build(script_ops.rope_kv(H, G, D, LAYERS, CONTEXT).with_attr("global_symbol",
                                                                            "main"))
        t = {"rope": best_us(rope, [qkv, cs, kc, vc, layer, n, q, k_tree, v_tree])}
        mod = build(ops.attention(H, G, D, LAYERS, CONTEXT, rows=w, part="dense"))
        t["dense"] = best_us(mod, [q, kc, vc, layer, n, dense])
        mod = build(sa.sparse_tree_attention(H, G, D))
        t["sparse"] = best_us(mod, [q, k_tree, v_tree, row_ptr, col_idx, sparse])
        mod = build(ops.attention_merge(H, D, rows=w))
        t["merge"] = best_us(mod, [dense, sparse, zeros(w, H, D)])
        per_layer = sum(t.values())
        print(f"{w:>3} {t['rope']:>8.1f} {t['dense']:>8.1f} {t['sparse']:>8.1f} "
              f"{t['merge']:>8.1f} {per_layer:>8.1f} {per_layer * LAYERS / 1e3:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
