"""Back on the build machine: plan from the CUDA host's profile and compare with its runs.

    python report.py RESULTS_DIR [-o OUT_DIR]

RESULTS_DIR holds what run.py wrote on the CUDA host (profile.sqlite, results.json). Fits
the cost models on that profile (`hetcomp tune --profile`), lets the planner choose among
cpu, cuda and cpu+cuda (any unit may host the unsplit ops), and puts the predicted verify
step time of each measured artifact beside its measured one. Writes report.md, plan.json,
plan.png and steps.png (measured step, per-unit busy time, predicted) into OUT_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

KINDS = ("qkv", "o", "gate_up", "down", "lm_head")
# How bundle.py partitioned each artifact (units in host-first order; split per kind).
LAYOUTS = {
    "cpu": (("cpu",), None, (("dense", "cpu"), ("sparse", "cpu"))),
    "gpu": (("cuda",), None, (("dense", "cuda"), ("sparse", "cuda"))),
    "split-all": (("cpu", "cuda"), {k: (("cpu", 0.0), ("cuda", 1.0)) for k in KINDS},
                  (("dense", "cpu"), ("sparse", "cpu"))),
    "split-half": (("cpu", "cuda"), {k: (("cpu", 0.5), ("cuda", 0.5)) for k in KINDS},
                   (("dense", "cpu"), ("sparse", "cpu"))),
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("-o", "--out", default=None)
    args = ap.parse_args()
    out = args.out or args.results
    os.makedirs(out, exist_ok=True)

    from hetcomp.planner import predict_step_time
    from hetcomp.profile.commands import measured_unit_models, read_model_shape, stored_digests
    from hetcomp.profile.commands import tune_command

    db = os.path.join(args.results, "profile.sqlite")
    summary = tune_command("smollm2", ["cpu", "cuda"], out, cache_len=64, profile=db)
    shape, key = read_model_shape("smollm2")
    models, _ = measured_unit_models(db, key, stored_digests(db, ["cpu", "cuda"], key))
    by_name = {m.name: m for m in models}
    with open(os.path.join(args.results, "results.json")) as fh:
        res = json.load(fh)

    rows = []
    for name, r in res["artifacts"].items():
        units, split, attention = LAYOUTS[name]
        ums = [by_name[u] for u in units]
        for b in r["breakdown"]:
            w = b["width"]
            pred = predict_step_time(ums, w, 64, shape=shape, split=split, attention=attention)
            rows.append({"artifact": name, "width": w, "measured_ms": 1e3 * b["step_s"],
                         "predicted_ms": 1e3 * pred,
                         "busy_ms": {u: 1e3 * t for u, t in b["busy_s"].items() if u != "host"},
                         "serial_ms": 1e3 * b["serial_s"]})
    plan = summary["plan"]
    lines = [f"# CUDA host: {res['device']['gpu']}; CPU {res['device']['cpu']} "
             f"({res['device']['cores']} cores)", "",
             f"Planner's choice: units {'+'.join(plan['units'])} (host {plan['host']}), "
             f"W={plan['width']}, predicted {plan['tokens_per_s']:.1f} tokens/s, step "
             f"{1e3 * plan['step_s']:.2f} ms", "", "Alternatives (best W per unit set):", ""]
    lines += [f"- {'+'.join(a['units'])}: W={a['width']}, {a['tokens_per_s']:.1f} tokens/s"
              for a in summary["alternatives"]]
    lines += ["", "| artifact | W | measured step ms | predicted ms | error | busy ms per unit "
              "| serial sum ms | overlap saved |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        busy = ", ".join(f"{u} {t:.2f}" for u, t in sorted(r["busy_ms"].items()))
        err = (r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"]
        saved = 1 - r["measured_ms"] / r["serial_ms"] if r["serial_ms"] else 0.0
        lines.append(f"| {r['artifact']} | {r['width']} | {r['measured_ms']:.2f} | "
                     f"{r['predicted_ms']:.2f} | {100 * err:+.0f}% | {busy} | "
                     f"{r['serial_ms']:.2f} | {100 * saved:.0f}% |")
    lines += ["", "| artifact | W | tokens/s | accepted/step | identical to sequential | "
              "identical to first artifact |", "|---|---|---|---|---|---|"]
    for name, r in res["artifacts"].items():
        for w in (1, 4, 8):
            x = r[f"w{w}"]
            lines.append(f"| {name} | {w} | {x['tokens_per_s']:.1f} | "
                         f"{x['accepted_per_step']:.2f} | {x['identical_to_sequential']} | "
                         f"{r['identical_to_first_artifact']} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "report.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(out, "steps.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    _plot(rows, os.path.join(out, "steps.png"))
    print(text)
    return 0


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = [f"{r['artifact']}\nW={r['width']}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.3 for i in x], [r["measured_ms"] for r in rows], 0.2, label="measured step")
    ax.bar([i - 0.1 for i in x], [r["predicted_ms"] for r in rows], 0.2, label="predicted")
    bottom = [0.0] * len(rows)
    for unit in ("cpu", "cuda", "copy"):
        vals = [r["busy_ms"].get(unit, 0.0) for r in rows]
        ax.bar([i + 0.2 for i in x], vals, 0.35, bottom=bottom, label=f"busy: {unit}")
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("ms per verify step")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("CUDA host: step time, prediction, and per-unit busy time (serial sum)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
