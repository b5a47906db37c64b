"""MetaSchedule tuning of the model's linear kernels, kept in a database per unit fingerprint.

The hand-written rules (:mod:`hetcomp.schedules.cpu`) are the untuned default. ``hetcomp tune
--kernels`` searches schedules for the width-specialised linear kernels with MetaSchedule (its
XGBoost cost model and evolutionary search) and stores the records in a JSON database under
``DB_ROOT/<fingerprint digest>/``; the digest covers the CPU model, core and thread counts, the
TVM version, the target and the hash of hetcomp's kernel sources, so ``hetcomp compile
--tuning-db DB_ROOT`` applies records on the machine (and code) they were tuned on and finds
none anywhere else. Kernels without a record keep the hand-written schedule.

Workloads are matched structurally on the kernel with its symbol normalised to ``main``, so
a kernel tuned on its own matches the same kernel inside the model. A record replaces the
hand-written schedule only if it was measured faster (``accepted.json``): a short search can
lose to a good rule, and the rule stays then.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys

from .._tvm import compiler
from ..hardware import cpu_threads
from ..kernels import ops
from ..kernels.ops import OP_KIND

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
# Structural hashes of the kernels whose tuned record beat the hand-written schedule when
# they were timed side by side (`hetcomp tune --kernels` writes it); only those are applied.
ACCEPTED_FILE = "accepted.json"
TUNED_ATTR = "hetcomp.tuned"


def database_dir(root: str, digest: str) -> str:
    """Where the tuning records of the unit with fingerprint ``digest`` live under ``root``."""
    return os.path.join(root, digest)


def open_database(path: str):
    """The MetaSchedule JSON database in ``path`` (created if missing)."""
    ms = compiler().meta_schedule
    os.makedirs(path, exist_ok=True)
    return ms.database.JSONDatabase(os.path.join(path, WORKLOAD_FILE),
                                    os.path.join(path, RECORD_FILE), allow_missing=True)


def _workload(func):
    return compiler().IRModule({"main": func.with_attr("global_symbol", "main")})


def tunable(func) -> bool:
    """Kernels this module tunes: the linear layers with a static width."""
    c = compiler()
    if not isinstance(func, c.tir.PrimFunc) or func.attrs is None:
        return False
    if str(func.attrs.get(OP_KIND, "")) != "linear":
        return False
    return isinstance(func.params[0].shape[0], c.tir.IntImm)  # a buffer param (0.27)


def workload_key(func) -> str:
    """Structural hash of a kernel as a tuning workload (symbol normalised)."""
    return str(compiler().structural_hash(_workload(func)))


def is_database(path: str) -> bool:
    """Whether ``path`` is a tuning database folder (for ``output_dir``)."""
    return any(os.path.isfile(os.path.join(path, f)) for f in (WORKLOAD_FILE, RECORD_FILE))


def write_accepted(path: str, keys) -> None:
    with open(os.path.join(path, ACCEPTED_FILE), "w") as fh:
        json.dump(sorted(keys), fh)


def apply_database(mod, target, path: str | None, accepted_only: bool = True
                   ) -> tuple[object, int]:
    """``mod`` with every kernel that has a record in the database at ``path`` replaced by its
    best tuned schedule (marked scheduled, so the rules leave it); returns (module, count).

    ``accepted_only``: only kernels listed in ``accepted.json`` (measured faster than the
    rule), when the database has that file."""
    if path is None or not os.path.isfile(os.path.join(path, RECORD_FILE)):
        return mod, 0
    c = compiler()
    ms = c.meta_schedule
    db = open_database(path)
    accepted = None
    if accepted_only and os.path.isfile(os.path.join(path, ACCEPTED_FILE)):
        with open(os.path.join(path, ACCEPTED_FILE)) as fh:
            accepted = set(json.load(fh))
    out = c.IRModule(dict(mod.functions_items()), attrs=mod.attrs, global_infos=mod.global_infos)
    count = 0
    for gv, func in mod.functions_items():
        if not tunable(func):
            continue
        if accepted is not None and workload_key(func) not in accepted:
            continue
        sch = ms.tir_integration.compile_tir(db, _workload(func), target)
        if sch is None:
            continue
        tuned = sch.mod["main"]
        for key, value in func.attrs.items():
            tuned = tuned.with_attr(key, value)
        out[gv] = tuned.with_attr("tirx.is_scheduled", True).with_attr(TUNED_ATTR, True)
        count += 1
    return out, count


@dataclasses.dataclass(frozen=True)
class KernelTuneOptions:
    """Which linear kernels to tune and how hard."""

    kinds: tuple[str, ...] = ("qkv", "o", "gate_up", "down", "lm_head")
    widths: tuple[int, ...] = (1, 16, 64)
    trials_per_kernel: int = 32
    wdtype: str = "float32"


def linear_kernels(shape, opts: KernelTuneOptions) -> dict[str, object]:
    """The width-specialised linear kernels of the model, by symbol."""
    out = {}
    for kind in opts.kinds:
        n, k, residual = shape.linear_dims(kind)
        for w in opts.widths:
            name = f"linear_{kind}_w{w}"
            out[name] = ops.linear(n, k, opts.wdtype, residual, rows=w).with_attr(
                "global_symbol", name)
    return out


def tune_kernels(kernels: dict[str, object], target, db_path: str, trials_per_kernel: int,
                 progress=None) -> int:
    """Tune ``kernels`` (one MetaSchedule task each, one search over all of them) into the
    database at ``db_path``; returns the number of tuning records stored."""
    c = compiler()
    ms = c.meta_schedule
    say = progress or (lambda m: print(m, file=sys.stderr, flush=True))
    cores = cpu_threads()
    tgt = c.Target(dict(target, **{"num-cores": cores}))
    db = open_database(db_path)
    # Every task's workload is its kernel named "main", as apply_database queries it.
    mod = c.IRModule({name: f.with_attr("global_symbol", "main") for name, f in kernels.items()})
    say(f"[tune kernels] {len(kernels)} kernels x {trials_per_kernel} trials (MetaSchedule, "
        "XGBoost cost model)")
    ms_log = logging.getLogger("tvm.s_tir.meta_schedule")
    ms_log.setLevel(logging.WARNING)
    # MetaSchedule's default build imports tvm.s_tir.tensor_intrin in every builder worker
    # (~29 s here, 100 s on a loaded machine; a fresh pool per batch of trials); our build
    # skips it. The 180 s timeout stays for a loaded machine.
    builder = ms.builder.LocalBuilder(f_build=_build_function(), timeout_sec=180)
    # MetaSchedule's logging setup lists its logger's handlers by name and fails on an unnamed
    # one (pytest's capture handler, a user's own), so a second tuning in a process failed:
    # those are set aside while it tunes.
    unnamed = [h for h in ms_log.handlers if h.get_name() is None]
    for h in unnamed:
        ms_log.removeHandler(h)
    try:
        with c.cpu_tensor_intrinsics():  # (a CPU kernel uses no other target's)
            ms.tune_tir(mod, tgt, os.path.join(db_path, "work"),
                        max_trials_global=trials_per_kernel * len(kernels),
                        max_trials_per_task=trials_per_kernel,
                        num_trials_per_iter=min(16, trials_per_kernel), database=db,
                        num_tuning_cores=cores, builder=builder)
    finally:
        for h in unnamed:
            ms_log.addHandler(h)
    return len(db.get_all_tuning_records())


def _build_function():
    """MetaSchedule's ``default_build`` without its ``import tvm.s_tir.tensor_intrin``: a
    tuned schedule's tensor intrinsics (none in the linear kernels) are inlined already.
    Made inside a function so that cloudpickle sends it to the builder workers by value (a
    worker then imports tvm only, not hetcomp)."""

    def build(mod, target, _params):
        from tvm.driver import build as tvm_build
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
        return tvm_build(mod, target=target)

    return build
