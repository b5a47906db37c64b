"""Validate ARCA's step-time predictions against the compiled SmolLM2-135M on this machine.

For W in {1, 2, 4, 8, 16, 32, 64}: the planner's predicted ``verify`` time (XGBoost cost
models fitted on this machine's profile, CPU only) against the measured ``Session.verify``
time of the compiled model with that width's tree mask, after ``--cache-len`` committed
tokens. Prints the table and the mean absolute percentage error (goal: <= 20%), writes
``validation.png``, the CPU plan (``plan.json``, ``plan.png``) and, separately and labelled
as an estimate, a plan for a Jetson Orin NX-class board from its datasheet figures
(``plan-orin-nx.json``).

Usage::

    .venv/bin/python benchmarks/validate_planner.py [--out build/arca-validate] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from hetcomp.cost.xgb import mape
from hetcomp.driver.compile import CompileOptions, compile_model
from hetcomp.driver.tuning import (
    load_draft,
    measured_unit_models,
    profile_command,
    profiled_digests,
    read_model_shape,
    spec_unit_models,
)
from hetcomp.hardware import SPEC_BOARDS
from hetcomp.planner import PlannerOptions, plan_unit_sets, plot_plans, predict_step_time
from hetcomp.profile.units import detect_unit
from hetcomp.runtime.artifact import load_artifact
from hetcomp.speculative.tree import build_tree

WIDTHS = (1, 2, 4, 8, 16, 32, 64)


def measure_verify(art, widths, cache_len: int, rank_probs, repeats: int) -> dict[int, float]:
    """Median seconds of ``Session.verify`` per width, with that width's tree mask.

    Rounds visit every width in turn (as the profiler does), so a burst of load from another
    process lands on one round of many widths rather than on every round of one.
    """
    rng = np.random.default_rng(0)
    sess = art.new_session()
    sess.prefill(rng.integers(0, art.config.vocab_size, cache_len))
    calls = {}
    for w in widths:
        tree = build_tree(rank_probs, w)
        args = (rng.integers(0, art.config.vocab_size, w), tree.depths + sess.length,
                tree.mask(), tree.csr())
        sess.verify(*args)  # warm-up; verify leaves the committed length alone
        calls[w] = args
    times: dict[int, list[float]] = {w: [] for w in widths}
    for _ in range(repeats):
        for w in widths:
            t0 = time.perf_counter()
            sess.verify(*calls[w])
            times[w].append(time.perf_counter() - t0)
    out = {w: statistics.median(ts) for w, ts in times.items()}
    for w in widths:
        print(f"  measured W={w:2d}: {1e3 * out[w]:8.2f} ms", file=sys.stderr, flush=True)
    return out


def plot_validation(rows, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = [r["width"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(ws, [r["measured_ms"] for r in rows], marker="o", label="measured Session.verify")
    ax.plot(ws, [r["predicted_ms"] for r in rows], marker="s", ls="--",
            label="predicted (ARCA cost models)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tree width W")
    ax.set_ylabel("verify step time (ms)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="build/arca-validate")
    ap.add_argument("--artifact", help="an already compiled smollm2 artifact (else compiled)")
    ap.add_argument("--cache-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="quick profile (few shapes)")
    ap.add_argument("--heads", help="Medusa heads .npz for tau(W)")
    ap.add_argument("--draft-dtype", default="float16",
                    help="the draft LM head's dtype (as the artifact was compiled)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    load_before = os.getloadavg()[0]
    shape, key = read_model_shape("smollm2")
    draft = load_draft(args.heads, args.draft_dtype)
    rank_probs, tau_label = draft["rank_probs"], draft["label"]
    print(f"[validate] tau(W) from {tau_label}", file=sys.stderr)

    # 1. Profile (reused while the CPU, TVM and kernels are unchanged) and fit.
    db = os.path.join(args.out, "profile.sqlite")
    prof = profile_command("smollm2", ["cpu"], db, quick=args.quick)
    digests = profiled_digests(prof)
    units, fitted = measured_unit_models(db, key, digests, os.path.join(args.out, "cost"))
    for r in fitted["cpu"].reports:
        print(f"[validate] cost model cpu/{r.op:12s} {r.samples:4d} samples, held-out MAPE "
              f"{r.holdout_mape:5.1f}% (alone {r.holdout_mape_alone:5.1f}%)", file=sys.stderr)

    # 2. Compile the real model and time verify per width.
    with tempfile.TemporaryDirectory(prefix="hetcomp-validate-") as tmp:
        path = args.artifact or compile_model(CompileOptions(model="smollm2"),
                                              os.path.join(tmp, "art"))
        if detect_unit("cpu").fingerprint.digest != digests["cpu"]:
            print("[validate] WARNING: kernel sources changed since the profile was measured",
                  file=sys.stderr)
        art = load_artifact(path)
        measured = measure_verify(art, WIDTHS, args.cache_len, rank_probs, args.repeats)
        del art

    # 3. Predicted vs measured.
    rows = []
    for w in WIDTHS:
        pred = predict_step_time(units, w, args.cache_len, shape=shape)
        rows.append({"width": w, "predicted_ms": 1e3 * pred, "measured_ms": 1e3 * measured[w],
                     "error_pct": 100 * (pred - measured[w]) / measured[w]})
    err = mape([r["predicted_ms"] for r in rows], [r["measured_ms"] for r in rows])
    print(f"\nverify step time, SmolLM2-135M float32, cpu only, cache length {args.cache_len}")
    print(f"{'W':>3} {'predicted ms':>13} {'measured ms':>12} {'error':>8}")
    for r in rows:
        print(f"{r['width']:3d} {r['predicted_ms']:13.2f} {r['measured_ms']:12.2f} "
              f"{r['error_pct']:+7.1f}%")
    print(f"MAPE {err:.1f}% (goal <= 20%)")
    load_after = os.getloadavg()[0]
    print(f"1-min load average {load_before:.1f} before, {load_after:.1f} after, on "
          f"{os.cpu_count()} cores (other processes inflate and scatter both columns)")
    plot_validation(rows, os.path.join(args.out, "validation.png"),
                    f"SmolLM2-135M verify, cpu, L={args.cache_len}: MAPE {err:.1f}%")

    # 4. The CPU plan (measured) and the Orin NX-class estimate, kept apart.
    opts = PlannerOptions(widths=WIDTHS, cache_len=args.cache_len, **draft["options"])
    cpu_plans = plan_unit_sets(shape, units, rank_probs=rank_probs, options=opts, model=key,
                               tau_source=tau_label, ranks=draft["ranks"])
    cpu_plan = cpu_plans[0]
    cpu_plan.save(os.path.join(args.out, "plan.json"))
    plot_plans(cpu_plans, os.path.join(args.out, "plan.png"),
               "SmolLM2-135M on this CPU: predicted tokens/s (measured costs)")
    print(f"\ncpu plan (measured costs; tau from {tau_label}):")
    for c in cpu_plan.candidates:
        print(f"  W={c.width:2d}  tau {c.tau:.2f}  step {1e3 * c.step_s:7.2f} ms  "
              f"{c.tokens_per_s:6.1f} tokens/s")
    print(f"  chosen W = {cpu_plan.width} ({cpu_plan.tokens_per_s:.1f} tokens/s predicted)")

    orin = plan_unit_sets(shape, spec_unit_models(SPEC_BOARDS["orin-nx"]), rank_probs=rank_probs,
                          options=opts, model=key, tau_source=tau_label, ranks=draft["ranks"])
    orin[0].save(os.path.join(args.out, "plan-orin-nx.json"))
    plot_plans(orin, os.path.join(args.out, "plan-orin-nx.png"),
               "SmolLM2-135M, Jetson Orin NX-class board: SPEC ESTIMATE, not measured")
    best = orin[0]
    print("\nJetson Orin NX-class board: SPEC ESTIMATE from approximate datasheet figures")
    for p in orin:
        print(f"  {'+'.join(p.units):24s} W={p.width:2d}  {1e3 * p.step_s:6.2f} ms/step  "
              f"{p.tokens_per_s:6.1f} tokens/s  [{p.source}]")
    print(f"  split ratios (fraction of output columns): "
          f"{json.dumps({k: dict(s) for k, s in best.split})}")
    print(f"  attention: {dict(best.attention)}")

    with open(os.path.join(args.out, "validation.json"), "w") as fh:
        json.dump({"cache_len": args.cache_len, "rows": rows, "mape_pct": err,
                   "load_average": [load_before, load_after], "cpu_count": os.cpu_count(),
                   "tau_source": tau_label, "fit": [r.to_json() for r in fitted["cpu"].reports],
                   "cpu_plan": cpu_plan.to_json(), "orin_nx_estimate": best.to_json()},
                  fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
