"""Back on the build machine: plan from the CUDA host's profile and compare with its runs.

    python report.py RESULTS.json [RESULTS.json ...] --profiles DB [DB ...] -o OUT_DIR
                     [--other RESULTS-q4_1.json]

The results and profiles are what run.py wrote on the CUDA host (one or several calls;
profiles of the units measured separately are merged into OUT_DIR/profile.sqlite). Fits
the cost models on that profile (`hetcomp tune --profile`, into OUT_DIR/tune: plan.json,
plan.png), lets the planner choose among cpu, cuda and cpu+cuda (any unit may host the
unsplit ops), and puts the predicted verify step time of each measured artifact beside its
measured one. Writes report.md, steps.json and steps.png (measured step, per-unit busy time,
predicted) into OUT_DIR; ``--other``: another weight format's runs (the bundle's q4_1 pair),
measured only. With the cpu profiled alone (`make device-kit`'s rehearsal) it plans
for the cpu and predicts the cpu artifacts.
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
    "gpu-nograph": (("cuda",), None, (("dense", "cuda"), ("sparse", "cuda"))),
    "gpu-unfused": (("cuda",), None, (("dense", "cuda"), ("sparse", "cuda"))),
    "gpu-notc": (("cuda",), None, (("dense", "cuda"), ("sparse", "cuda"))),
    "split-all": (("cpu", "cuda"), {k: (("cpu", 0.0), ("cuda", 1.0)) for k in KINDS},
                  (("dense", "cpu"), ("sparse", "cpu"))),
    "split-half": (("cpu", "cuda"), {k: (("cpu", 0.5), ("cuda", 0.5)) for k in KINDS},
                   (("dense", "cpu"), ("sparse", "cpu"))),
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    ap.add_argument("--profiles", nargs="+", required=True)
    ap.add_argument("--other", nargs="*", default=[],
                    help="results of another weight format (run.py's results-DTYPE.json): "
                         "measured only, against their own reference")
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args()
    out = args.out
    os.makedirs(out, exist_ok=True)
    from hetcomp.profile.db import ProfileDB

    db = os.path.join(out, "profile.sqlite")
    with ProfileDB(db) as dst:
        for path in args.profiles:
            with ProfileDB(path) as src:
                dst.merge_from(src)

    from hetcomp.driver.tuning import (
        measured_unit_models,
        read_model_shape,
        stored_digests,
        tune_command,
    )
    from hetcomp.planner import predict_step_time

    res: dict = {"artifacts": {}}
    for path in args.results:
        with open(path) as fh:
            part = json.load(fh)
        res["device"] = part["device"]
        res["artifacts"].update(part["artifacts"])
        res.setdefault("reference", part.get("reference"))
    # The artifacts' weight dtype, which the bundle's profile probes share (runs from before
    # run.py recorded it were float32).
    dtypes = {r.get("dtype") or "float32" for r in res["artifacts"].values()}
    if len(dtypes) != 1:
        raise SystemExit(f"report.py: artifacts of several dtypes {sorted(dtypes)}")
    dtype = dtypes.pop()
    shape, key = read_model_shape("smollm2", dtype)
    # The units profiled (both on the GPU host; the cpu alone in make device-kit's rehearsal).
    units = [u for u in ("cpu", "cuda") if _profiled(db, u, key)]
    if not units:
        raise SystemExit(f"report.py: {db} holds no profile for {key}")
    # (tune writes a folder of its own kind: plan.json, plan.png, cost models)
    summary = tune_command("smollm2", units, os.path.join(out, "tune"), cache_len=64,
                           profile=db, dtype=dtype, force=True)
    models, _ = measured_unit_models(db, key, stored_digests(db, units, key))
    by_name = {m.name: m for m in models}
    for r in res["artifacts"].values():  # runs from separate calls: compare ids directly
        if "ids_w1" in r:
            r["identical_to_first_artifact"] = r["ids_w1"] == res["reference"]

    rows = []
    for name, r in res["artifacts"].items():
        layout_units, split, attention = LAYOUTS.get(name) or _layout(r)
        if not set(layout_units) <= set(by_name):
            continue  # (a unit not profiled: nothing to predict it from)
        ums = [by_name[u] for u in layout_units]
        for b in r["breakdown"]:
            w = b["width"]
            # A fixed-cache build (CUDA graphs) runs its own attention kernel at every width.
            pred = predict_step_time(ums, w, 64, shape=shape, split=split, attention=attention,
                                     device_len=bool(r.get("fixed_cache")),
                                     fused_linears=bool(r.get("fused_linears")))
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
        # Overlap only means something where two units worked (copies are not a unit).
        two = len([u for u, t in r["busy_ms"].items() if u != "copy" and t > 0.05]) > 1
        saved = (f"{100 * (1 - r['measured_ms'] / r['serial_ms']):.0f}%" if two else "-")
        lines.append(f"| {r['artifact']} | {r['width']} | {r['measured_ms']:.2f} | "
                     f"{r['predicted_ms']:.2f} | {100 * err:+.0f}% | {busy} | "
                     f"{r['serial_ms']:.2f} | {saved} |")
    lines += [""] + measured_table(res["artifacts"])
    others = {}
    for path in args.other:
        with open(path) as fh:
            part = json.load(fh)
        dtype = {r.get("dtype") for r in part["artifacts"].values()}
        lines += ["", f"Weight format {', '.join(sorted(map(str, dtype)))} "
                  f"({os.path.basename(path)}; measured only, identity against its first "
                  "artifact):", ""] + measured_table(part["artifacts"])
        others.update(part["artifacts"])
    # Where output differed (run.py's first_divergence): a near-tie or a wrong kernel.
    every = {**res["artifacts"], **others}
    diverged = [(f"{name} against the first artifact", r["first_divergence"])
                for name, r in every.items() if r.get("first_divergence")]
    diverged += [(f"{name} at W={k[1:]} against W=1", r[k]["first_divergence"])
                 for name, r in every.items() for k in r
                 if k[0] == "w" and k[1:].isdigit() and r[k].get("first_divergence")]
    if diverged:
        lines += ["", ("First divergences (this artifact's logits of its token and the "
                       "other's, on the same context):"), ""]
        lines += [f"- {what}: {json.dumps(d)}" for what, d in diverged]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "report.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(out, "steps.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    _plot(rows, os.path.join(out, "steps.png"))
    print(text)
    return 0


def measured_table(artifacts: dict) -> list[str]:
    """Markdown rows per artifact and decoded width: tokens/s, accepted tokens a step, greedy
    identity (with speculation, against the first artifact), then each artifact's verify
    step at W = 64 against W = 1 (issue #19: a W = 64 step should cost little more)."""
    lines = [("| artifact | W | tokens/s | accepted/step | identical to sequential | "
              "identical to first artifact |"), "|---|---|---|---|---|---|"]
    for name, r in artifacts.items():
        for w in sorted(int(k[1:]) for k in r if k[1:].isdigit() and k[0] == "w"):
            x = r[f"w{w}"]
            lines.append(f"| {name} | {w} | {x['tokens_per_s']:.1f} | "
                         f"{x['accepted_per_step']:.2f} | {x['identical_to_sequential']} | "
                         f"{r['identical_to_first_artifact']} |")
    steps = [(name, r["step_s"]) for name, r in artifacts.items()
             if {"1", "64"} <= set(r.get("step_s", {}))]
    if steps:
        lines += [""] + [f"- {name}: verify step W=1 {1e3 * s['1']:.3f} ms, W=64 "
                         f"{1e3 * s['64']:.3f} ms ({s['64'] / s['1']:.2f}x)"
                         for name, s in steps]
    return lines


def _profiled(db_path: str, unit: str, key: str) -> bool:
    from hetcomp.profile.db import ProfileDB

    with ProfileDB(db_path) as db:
        return any(db.complete_mode(d, key) for d in db.digests(unit))


def _layout(r):
    """Units, split and attention placement of an artifact compiled from a plan.json."""
    plan = r["plan"]
    units = tuple(plan["units"])
    split = {k: ((units[0], 1.0 - f), (units[1], f)) for k, f in plan["ratios"].items()}
    place = {"dense": units[plan["dense_attention"]], "sparse": units[plan["sparse_attention"]]}
    return units, split, tuple(sorted(place.items()))


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
    ax.legend(fontsize=8)
    ax.set_title("CUDA host: step time, prediction, and per-unit busy time (serial sum)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
