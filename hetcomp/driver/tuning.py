"""Entry points of ``hetcomp profile`` and ``hetcomp tune`` (the CLI wires them).

``profile``: measure each op class on each present unit into an SQLite profile (reused while
the units' fingerprints match). ``tune``: profile, fit one cost model per unit and op class,
and plan (W, tree, split ratios, attention placement) for maximum predicted tokens/s.

Unit names: ``cpu`` and ``cuda`` are measured; spec-only units (``orin-nx-cpu``,
``orin-nx-gpu``, or the board ``orin-nx`` for both; ``hopper-gpu``, the H100/H200 class) are
estimated from their datasheet figures and labelled ``spec-estimate``. One plan never mixes
the two.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np

from .. import _tvm
from .._tvm import compiler
from ..artifact_format import holds_format, output_dir
from ..codegen.build import schedule_module
from ..cost.roofline import dtype_bytes, linear_features, tensor_core_products
from ..cost.xgb import fit_unit
from ..data import packaged_file
from ..errors import HetcompError
from ..frontend import load_model
from ..frontend.models import MODELS, default_datastore, default_heads
from ..frontend.tokenizer import TokenizerInfo
from ..hardware import SPECS
from ..plan import PLAN_FORMAT
from ..planner import PlannerOptions, UnitModel, plan_unit_sets, plot_plans
from ..profile.db import ProfileDB
from ..profile.measure import (
    Probe,
    ProbeGroup,
    ProfileOptions,
    _Runner,
    linear_args,
    time_calls,
)
from ..profile.units import detect_unit
from ..schedules.tuning import (
    KernelTuneOptions,
    apply_database,
    database_dir,
    is_database,
    linear_kernels,
    tune_kernels,
    workload_key,
    write_accepted,
)
from ..speculative.datastore import REPLAY_CACHED, Datastore
from ..speculative.medusa import MedusaHeads
from .profiling import (
    _say,
    profile_command,
    profiled_digests,
    read_model_shape,
    split_unit_names,
    write_profile_plot,
)

# Used for tau(W) when no calibrated Medusa heads exist. ILLUSTRATIVE ONLY, not measured:
# P(rank-r candidate of head k is the base model's token), shaped like the top-k accuracies
# Medusa reports for small chat models (head 0 top-1 ~ 0.55, decaying with depth).
ILLUSTRATIVE_RANK_PROBS = np.array([
    [0.55, 0.12, 0.06, 0.04, 0.03, 0.02, 0.015, 0.012, 0.010, 0.008],
    [0.35, 0.10, 0.06, 0.04, 0.03, 0.02, 0.015, 0.012, 0.010, 0.008],
    [0.24, 0.08, 0.05, 0.03, 0.025, 0.02, 0.015, 0.012, 0.010, 0.008],
    [0.17, 0.06, 0.04, 0.03, 0.02, 0.015, 0.012, 0.010, 0.008, 0.006],
])
ILLUSTRATIVE_LABEL = "illustrative rank_probs (no calibrated Medusa heads; not measured)"
DEFAULT_HEADS = packaged_file(MODELS["smollm2"].heads)


def load_draft(heads: str | None = None, draft_dtype: str | None = None,
               model: str = "smollm2", widths=PlannerOptions.widths) -> dict:
    """What the planner needs to know of a Medusa draft: ``{"rank_probs", "ranks", "tau",
    "label", "options"}``, ``options`` being the :class:`~hetcomp.planner.PlannerOptions`
    draft fields (draft vocabulary, the draft's bytes per weight for ``draft_dtype``, root
    conditioning), ``tau`` the tokens a step at ``widths`` as `compile` would measure them
    (:func:`_replayed`; None where the heads' trees give it).

    ``heads`` (or the registered ``model``'s packaged heads when they exist, as compile
    speculates with them) is read with :meth:`MedusaHeads.load`; without heads,
    :data:`ILLUSTRATIVE_RANK_PROBS`, labelled, and a whole-vocabulary draft.
    """
    opts = {"draft_weight_bytes": dtype_bytes(draft_dtype) if draft_dtype else 0}
    path = heads or default_heads(model)
    if path is None:
        return {"rank_probs": ILLUSTRATIVE_RANK_PROBS, "ranks": None, "tau": None,
                "label": ILLUSTRATIVE_LABEL, "options": opts}
    h = MedusaHeads.load(path)
    opts.update(draft_vocab=0 if h.vocab is None else len(h.vocab), draft_root=h.u is not None)
    replayed = _replayed(h, model, widths)
    return {"rank_probs": np.asarray(h.rank_probs), "ranks": h.ranks,
            "tau": replayed and replayed.taus,
            "label": f"Medusa heads {path}" + (f"; tau {replayed.source}" if replayed else ""),
            "options": opts}


def _replayed(heads: MedusaHeads, model: str, widths):
    """Tokens a step at ``widths`` replayed over the heads' held-out recorded responses
    (:func:`~hetcomp.driver.calibrate.replayed_taus`, a ``ReplayedWidths``) as an artifact
    `compile` builds for ``model`` with these heads decodes them: its trees, its lookup
    nodes, and the datastore ``--datastore auto`` gives it. None where there is nothing to
    replay."""
    from .calibrate import replayed_taus, training_responses

    cfg, _, spec, _ = load_model(model)  # (the weights stay unread)
    found = training_responses(heads, cfg.vocab_size) if default_datastore(model) else None
    store = Datastore.from_sequences(found[0], cached=REPLAY_CACHED) if found else None
    return replayed_taus(heads, TokenizerInfo.from_spec(spec), cfg.vocab_size, widths, store)


def _pct(x: float | None) -> str:
    return f"{x:.1f}%" if x is not None else "n/a"


def measured_unit_models(db_path: str, model_key: str, digests: dict[str, str],
                         cost_dir: str | None = None):
    """Fit cost models on stored profiles; ``(UnitModel per unit, fitted models)``.

    ``digests`` maps unit name (host first) to the fingerprint digest of its profile, as
    :func:`profile_command` reports it (kernels may be edited after profiling; the profile
    that was measured is the one fitted).
    """

    models, fitted = [], {}
    with ProfileDB(db_path) as db:
        for name, digest in digests.items():
            rows = db.measurements(digest, model_key)
            if not rows:
                raise HetcompError(f"no profile {digest} of unit {name} for {model_key} in "
                                   f"{db_path}")
            # Launch probes are not a kernel class to model: they give the discrete unit's
            # per-op latency (below).
            ucm = fit_unit(name, [m for m in rows if m.features.op != "launch"])
            fitted[name] = ucm
            if cost_dir:
                os.makedirs(cost_dir, exist_ok=True)
                ucm.save(os.path.join(cost_dir, f"{name}.json"))
            info = db.unit_info(digest) or {}
            target = info.get("target") or {"kind": "llvm"}
            if target.get("kind") == "llvm":
                models.append(UnitModel(name, ucm, "measured", True, ucm.baseline.mem_bw_gbs))
            elif info.get("shared_memory"):  # an integrated GPU: the host's DRAM, contended
                sync_s, _ = link_costs(rows)
                models.append(UnitModel(name, ucm, "measured", True, ucm.baseline.mem_bw_gbs,
                                        sync_s + launch_latency(rows)))
            else:  # a discrete device: its own memory, reached over a link (also a GPU
                # profiled before units recorded their memory)
                sync_s, link_gbs = link_costs(rows)
                models.append(UnitModel(name, ucm, "measured", False, 0.0,
                                        sync_s + launch_latency(rows), link_gbs))
    return models, fitted


def link_costs(rows) -> tuple[float, float]:
    """Synchronisation seconds and link GB/s of a discrete unit, fitted (least squares,
    ``t = sync + bytes / bandwidth``) to its measured host round-trip copies."""
    pts = [(m.features.bytes, m.seconds) for m in rows
           if m.features.op == "copy" and not m.features.corun]
    if len(pts) < 2:
        raise HetcompError("a discrete unit's profile needs its host copies measured")
    x, y = np.array(pts).T
    slope, sync = np.polyfit(x, y, 1)
    return max(float(sync), 0.0), 1e-9 / max(float(slope), 1e-15)


def launch_latency(rows) -> float:
    """Seconds a kernel call costs on top of its pipelined time when the host waits for it
    (launch and completion latency): the "launch" probe timed with a synchronisation after
    each call minus the same probe back to back. 0 for profiles without launch probes."""
    times = {m.features.kind: m.seconds for m in rows
             if m.features.op == "launch" and not m.features.corun}
    if "synced" not in times or "batched" not in times:
        return 0.0
    return max(times["synced"] - times["batched"], 0.0)


def stored_digests(db_path: str, units, model_key: str) -> dict[str, str]:
    """``{unit: digest}`` of the newest complete profile of each unit in a database."""

    if not os.path.isfile(db_path):
        raise HetcompError(f"profile database not found: {db_path}")
    out = {}
    with ProfileDB(db_path) as db:
        for name in units:
            found = [d for d in db.digests(name) if db.complete_mode(d, model_key)]
            if not found:
                raise HetcompError(f"{db_path} holds no profile of unit {name!r} for {model_key}")
            out[name] = found[-1]
    return out


def spec_unit_models(names, dtype: str = "float32"):
    """Roofline ``UnitModel`` per spec unit (labelled ``spec-estimate``), for an artifact of
    weights ``dtype`` (a GPU's linears of 16-64 rows on its tensor cores where that build
    puts them: :func:`~hetcomp.cost.roofline.tensor_core_products`)."""
    return [UnitModel.from_spec(SPECS[n], tensor_core_products(dtype)) for n in names]


def tune_command(model: str = "smollm2", units=("cpu",), out_dir: str = "tune",
                 quick: bool = False, cache_len: int = 256, heads: str | None = None,
                 progress=None, profile: str | None = None,
                 draft_dtype: str | None = None, force: bool = False,
                 dtype: str = "float32") -> dict:
    """Profile, fit and plan; writes profile.sqlite and profile.png (or, with ``profile``,
    profile.png of that database's profiles), cost/<unit>.json, plan.json, plan.png.

    Spec-only units skip profiling and fitting (their plan is a ``spec-estimate``).
    ``profile``: an existing database (measured elsewhere) whose newest profile of each unit
    is fitted instead of profiling here. ``draft_dtype``: the Medusa draft's weight dtype
    the artifact will be compiled with (``compile --draft-dtype``; None: the model's).
    ``dtype``: the weight dtype of the artifact the plan is for (``compile --dtype``; a block
    format profiles its dequantizing kernels, and plan.json's ``model`` key names it).
    """

    say = progress or _say
    present, spec = split_unit_names(units)
    shape, key = read_model_shape(model, dtype)
    draft = load_draft(heads, draft_dtype, model)  # bad heads: refused before the profile
    with output_dir(out_dir, is_tune_dir, "tune folder", force) as tmp:
        old_db = os.path.join(out_dir, "profile.sqlite")
        if os.path.isfile(old_db):  # a replaced tune folder's profile is reused while it fits
            shutil.copy2(old_db, os.path.join(tmp, "profile.sqlite"))
        summary = _tune(tmp, shape, key, model, present, spec, quick, cache_len, draft,
                        progress, profile, say, dtype)
    summary["out_dir"] = os.path.abspath(out_dir)
    if "profile" in summary:  # (written in the temporary folder renamed to out_dir)
        summary["profile"]["plot"] = os.path.join(summary["out_dir"], "profile.png")
        if profile is None:
            summary["profile"]["db"] = os.path.join(summary["out_dir"], "profile.sqlite")
    return summary


def is_tune_dir(path: str) -> bool:
    """True when ``path`` is a folder `hetcomp tune` wrote (its plan.json)."""
    return holds_format(path, "plan.json", PLAN_FORMAT)


def _tune(out_dir, shape, key, model, present, spec, quick, cache_len, draft, progress,
          profile, say, dtype) -> dict:
    summary: dict = {"model": key}
    if present:
        if profile is not None:
            db, digests = profile, stored_digests(profile, present, key)
            summary["profile"] = {"db": os.path.abspath(db), "digests": digests,
                                  "plot": write_profile_plot(db, key, digests, os.path.join(
                                      out_dir, "profile.png"))}
        else:
            db = os.path.join(out_dir, "profile.sqlite")
            summary["profile"] = profile_command(model, present, db, quick, progress=progress,
                                                 dtype=dtype)
            digests = profiled_digests(summary["profile"])
        say("[tune] fitting cost models")
        unit_models, fitted = measured_unit_models(db, key, digests,
                                                   os.path.join(out_dir, "cost"))
        summary["fit"] = {n: [r.to_json() for r in m.reports] for n, m in fitted.items()}
        for n, m in fitted.items():
            for r in m.reports:
                say(f"[tune] {n} {r.op:12s} {r.samples:4d} samples, held-out MAPE "
                    f"{_pct(r.holdout_mape)} (alone {_pct(r.holdout_mape_alone)})")
    else:
        unit_models, fitted = spec_unit_models(spec, dtype), {}
    label = draft["label"]
    # The unit whose profile timed int8-dot linears builds alone on int8 activations; a
    # partitioned plan's units dequantize (PlannerOptions.int8_unit).
    int8_unit = next((n for n, m in fitted.items() if "linear_int8" in m.models), "")
    if int8_unit:
        say(f"[tune] {int8_unit} alone: int8-dot linears and exact attention; in a "
            "partitioned plan its linears dequantize")
    say(f"[tune] planning ({label})")
    # Any measured unit may host the unsplit ops (a GPU can run the whole model); the host
    # of spec-estimate sets stays the first unit named.
    options = PlannerOptions(cache_len=cache_len, int8_unit=int8_unit, **draft["options"])
    plans = plan_unit_sets(shape, unit_models, rank_probs=draft["rank_probs"],
                           tau=draft["tau"], options=options,
                           model=key, tau_source=label, any_host=bool(present),
                           ranks=draft["ranks"])
    best = plans[0]
    best.save(os.path.join(out_dir, "plan.json"))
    plot_plans(plans, os.path.join(out_dir, "plan.png"),
               f"{os.path.basename(model)}: predicted tokens/s ({best.source})")
    summary["plan"] = best.to_json()
    summary["alternatives"] = [{"units": list(p.units), "width": p.width,
                                "tokens_per_s": p.tokens_per_s} for p in plans[1:]]
    say(f"[tune] plan: units {'+'.join(best.units)}, W={best.width}, tau={best.tau:.2f}, "
        f"step {1e3 * best.step_s:.1f} ms, {best.tokens_per_s:.1f} tokens/s ({best.source})")
    return summary


ACCEPT_SPEEDUP = 1.05  # a tuned kernel must be this much faster than the rule to be used


def tune_kernels_command(model: str = "smollm2", db_root: str = "tuning",
                         widths=(1, 16, 64), kinds=None, trials: int = 32,
                         progress=None) -> dict:
    """MetaSchedule-tune the model's linear kernels on this CPU into ``db_root/<digest>``, then
    compare every tuned kernel with its hand-scheduled default in a fresh process (the
    tuning process keeps XGBoost's OpenMP threads and the tuner's workers, which distort
    timings on a small machine)."""

    say = progress or _say
    if os.path.lexists(db_root) and not os.path.isdir(db_root):
        raise HetcompError(f"{db_root} is a file: -o of `tune --kernels` is the folder of the "
                           "tuning databases (one per machine)")
    if kinds is not None:
        unknown = [k for k in kinds if k not in KernelTuneOptions.kinds] or (
            [] if kinds else ["(none)"])
        if unknown:
            raise HetcompError(f"unknown --kinds {unknown[0]} (use "
                               f"{', '.join(KernelTuneOptions.kinds)})")
    shape, _ = read_model_shape(model)
    kinds = tuple(kinds or KernelTuneOptions.kinds)
    kopts = KernelTuneOptions(kinds=kinds, widths=tuple(widths), trials_per_kernel=trials)
    unit = detect_unit("cpu")
    # The machine's database is tuned and judged in a copy that replaces it only at the end:
    # an interrupted run leaves the old one (or none), never records without their verdict
    # in accepted.json (compile would apply every record of such a database).
    final = database_dir(db_root, unit.fingerprint.digest)
    with output_dir(final, is_database, "tuning database", force=True) as path:
        if os.path.isdir(final):
            shutil.copytree(final, path, dirs_exist_ok=True)  # its records so far are kept
        records = tune_kernels(linear_kernels(shape, kopts), unit.target, path, trials, say)
        say("[tune kernels] timing tuned against default kernels")
        code = ("import json, sys; from hetcomp.driver.tuning import compare_tuned_kernels as f; "
                "print(json.dumps(f(*json.loads(sys.argv[1]))))")
        res = subprocess.run([sys.executable, "-c", code,
                              json.dumps([model, path, list(widths), list(kinds)])],
                             check=False, capture_output=True, text=True)
        if res.returncode != 0:
            raise HetcompError(f"timing the tuned kernels failed: {res.stderr.strip()[-300:]}")
        summary = json.loads(res.stdout.strip().splitlines()[-1])
        # Keep a record only where it beat the rule by more than the timing noise.
        kernels = linear_kernels(shape, kopts)
        keep = [r["kernel"] for r in summary["kernels"] if r["speedup"] > ACCEPT_SPEEDUP]
        write_accepted(path, [workload_key(kernels[k]) for k in keep])
    say(f"[tune kernels] database and MetaSchedule's logs in {os.path.abspath(final)}")
    summary.update({"db": os.path.abspath(final), "records": records,
                    "trials_per_kernel": trials, "accepted": keep})
    return summary


def compare_tuned_kernels(model: str, path: str, widths, kinds) -> dict:
    """Per linear kernel: time of the hand-scheduled default and of the tuned record in the
    database folder ``path`` (rotated weights, back-to-back calls, fastest of 9 interleaved
    rounds)."""

    shape, key = read_model_shape(model)
    kernels = linear_kernels(shape, KernelTuneOptions(kinds=tuple(kinds), widths=tuple(widths)))
    unit = detect_unit("cpu")
    c = compiler()
    target = c.Target(unit.target)
    mod = c.IRModule(kernels)
    tuned, count = apply_database(mod, target, path, accepted_only=False)
    # One library: the defaults get the rules when it is scheduled; tuned kernels are marked
    # scheduled already.
    both = {f"{gv.name_hint}__{label}": func.with_attr("global_symbol",
                                                       f"{gv.name_hint}__{label}")
            for label, m in (("default", mod), ("tuned", tuned))
            for gv, func in m.functions_items()}
    lib = c.compile(schedule_module(c.IRModule(both), target), target=target)
    popts = ProfileOptions(corun=False, min_time_s=0.02)
    groups = []
    for name in kernels:
        kind, w = name[len("linear_"):].rsplit("_w", 1)
        args = linear_args(shape, kind, shape.linear_dims(kind)[0], int(w), "float32",
                           popts.rotate_bytes)
        feat = linear_features(shape, kind, int(w))
        groups.append(ProbeGroup(name, tuple(Probe(f"{name}__{v}", feat, args)
                                             for v in ("default", "tuned"))))
    # Fastest of 9 interleaved rounds: on a small shared VM a stalled vCPU makes single
    # rounds of a multi-threaded kernel milliseconds slower; the minimum is the kernel.
    runner = _Runner(lib, _tvm.cpu())
    runner.fit_rotation(popts.rotate_bytes)
    table = []
    for g in groups:
        cache: dict = {}
        calls = [runner.setup(p, {}, cache) for p in g.probes]
        best = [min(x) for x in zip(*[[t for t, _ in time_calls(calls, popts.min_time_s, 1)]
                                      for _ in range(9)], strict=True)]
        table.append({"kernel": g.desc, "default_us": 1e6 * best[0], "tuned_us": 1e6 * best[1],
                      "speedup": best[0] / best[1]})
    geo = float(np.exp(np.mean([np.log(r["speedup"]) for r in table])))
    return {"db": os.path.abspath(path), "fingerprint": unit.fingerprint.to_json(),
            "kernels_with_records": count, "model": key, "kernels": table,
            "geomean_speedup": geo}
