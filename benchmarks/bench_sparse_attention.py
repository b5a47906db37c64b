"""Sparse tree attention vs dense masked attention vs the naive sparse kernel, on this machine.

All three compute the same (o, lse) for the W tree nodes of one verification step with
SmolLM2-135M's attention shape (9 query heads, 3 KV heads, head_dim 64, fp32), each with its
best schedule from the same TVM: the sparse and the dense kernel with the x86 tensor-intrinsic
rule (AVX-512 or AVX2 by the host CPU), the naive kernel as plain scalar CSR loops. Trees are
Medusa trees from ``hetcomp.speculative.tree.build_tree`` (a few deep chains, many shallow
siblings, depth <= 5) over synthetic per-head rank accuracies.

    python benchmarks/bench_sparse_attention.py [--plot PATH] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys

H, G, D = 9, 3, 64
WIDTHS = (8, 16, 32, 64)
GOALS = {"dense": 1.9, "naive": 3.5}  # required speedups of the sparse kernel at W = 64


def medusa_parents(w: int) -> list[int]:
    """A Medusa tree of ``w`` nodes: 5 heads whose top-1 accuracy falls from 0.6 to 0.25."""
    import numpy as np

    from hetcomp.speculative.tree import build_tree

    top1 = (0.6, 0.45, 0.35, 0.3, 0.25)
    decay = (0.45, 0.5, 0.55, 0.6, 0.6)
    rank_probs = np.array([[a * r**k for k in range(10)]
                           for a, r in zip(top1, decay, strict=True)])
    return list(build_tree(rank_probs, w).parents)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plot", default=os.path.join(os.path.dirname(__file__),
                                                   "sparse_attention.png"))
    ap.add_argument("--threads", type=int, default=1,
                    help="TVM threads (default 1: per-kernel speed, unaffected by other load)")
    ap.add_argument("--min-repeat-ms", type=int, default=50)
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's pool starts

    import numpy as np

    from hetcomp import _tvm
    from hetcomp.codegen.cross import apply_rules
    from hetcomp.hardware import host_cpu_name, target_dict
    from hetcomp.kernels import sparse_attention as sa
    from hetcomp.schedules.x86 import SparseTreeAttentionRule, x86_rules

    c = _tvm.compiler()
    host = target_dict("host")
    picked = SparseTreeAttentionRule().intrinsics(c.Target(host))
    if picked is None:
        print("this CPU has neither AVX-512 nor AVX2+FMA: the x86 rule does not apply")
        return 1
    funcs = {
        "sparse": apply_rules(sa.sparse_tree_attention(H, G, D), x86_rules(),
                              host),
        "dense": apply_rules(sa.dense_tree_attention(H, G, D), x86_rules(),
                             host),
        "naive": sa.naive_sparse_tree_attention(H, G, D),
    }
    mods = {k: c.compile(c.IRModule({"main": f}), target=c.Target(host)).mod
            for k, f in funcs.items()}
    dev = _tvm.cpu()
    rng = np.random.default_rng(0)
    rows = []
    for w in WIDTHS:
        row_ptr, col_idx = sa.csr_from_parents(medusa_parents(w))
        q = rng.standard_normal((H, w, D), dtype="float32")
        k = rng.standard_normal((G, w, D), dtype="float32")
        v = rng.standard_normal((G, w, D), dtype="float32")  # v_tree, as rope_kv returns it
        sa.check_inputs(q, k, v, row_ptr, col_idx)
        tree = {"sparse": (row_ptr, col_idx), "naive": (row_ptr, col_idx),
                "dense": (sa.mask_from_csr(row_ptr, col_idx),)}
        times, results = {}, {}
        for name, mod in mods.items():
            outs = [_tvm.tensor(np.zeros((w, H, D + 1), "float32"))]
            call = [_tvm.tensor(x) for x in (q, k, v, *tree[name])] + outs
            mod["main"](*call)
            results[name] = [o.numpy() for o in outs]
            timer = mod.time_evaluator("main", dev, number=1, repeat=7,
                                       min_repeat_ms=args.min_repeat_ms)
            # Best of the repeats: this machine is shared, and interference only adds time.
            times[name] = timer(*call).min * 1e6
        for name in ("dense", "naive"):  # the same numbers, or the timing means nothing
            for got, want in zip(results["sparse"], results[name], strict=True):
                np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        rows.append((w, len(col_idx), times))

    print(f"sparse tree attention, H={H} G={G} D={D} fp32, {host_cpu_name()} "
          f"({picked.lanes}-lane intrinsics), {args.threads} thread(s); best of 7, us")
    print(f"{'W':>3} {'nnz':>5} {'sparse':>9} {'dense':>9} {'naive':>9} "
          f"{'vs dense':>9} {'vs naive':>9}")
    for w, nnz, t in rows:
        print(f"{w:>3} {nnz:>5} {t['sparse']:>9.1f} {t['dense']:>9.1f} {t['naive']:>9.1f} "
              f"{t['dense'] / t['sparse']:>8.2f}x {t['naive'] / t['sparse']:>8.2f}x")
    last = rows[-1][2]
    ok = True
    for name, goal in GOALS.items():
        got = last[name] / last["sparse"]
        ok &= got >= goal
        print(f"W={rows[-1][0]}: {got:.2f}x over {name} (goal >= {goal}x): "
              f"{'met' if got >= goal else 'NOT met'}")
    _plot(rows, args.plot, f"{host_cpu_name()}, {args.threads} thread(s)")
    print(f"plot: {args.plot}")
    return 0 if ok else 1


def _plot(rows, path: str, where: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    widths = [w for w, _, _ in rows]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, style in (("sparse", "o-"), ("dense", "s--"), ("naive", "^:")):
        ax.plot(widths, [t[name] for _, _, t in rows], style, label=name)
    ax.set(yscale="log", xlabel="tree width W", ylabel="time, best of 7 (us)",
           title="tree attention, sparse part")
    ax.legend()
    for name, style in (("dense", "s--"), ("naive", "^:")):
        ax2.plot(widths, [t[name] / t["sparse"] for _, _, t in rows], style,
                 label=f"sparse vs {name}")
        ax2.axhline(GOALS[name], color="gray", linewidth=0.8)
    ax2.set(xlabel="tree width W", ylabel="speedup (x)", title=where)
    ax2.legend()
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xticks(widths, [str(w) for w in widths])
        a.xaxis.set_minor_locator(NullLocator())
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
