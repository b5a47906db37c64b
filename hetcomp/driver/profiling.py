"""``hetcomp profile``: measure each op class on each present unit into an SQLite profile
(reused while the units' fingerprints match), or build a profile kit to measure elsewhere.

Measuring a kit (``--kit``) runs with a runtime-only TVM, so this module imports no
compiler room at the top (building a kit imports it inside :func:`~hetcomp.profile.measure.
build_kit`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys

from ..artifact_format import (
    PLOT_METADATA,
    check_output,
    check_output_file,
    is_plot,
    output_file,
)
from ..cost.roofline import ModelShape
from ..errors import HetcompError
from ..frontend import resolve_model
from ..frontend.gguf_loader import open_gguf, read_config
from ..frontend.hf_loader import read_hf_config
from ..frontend.weights import WEIGHT_DTYPES, check_quantizable
from ..hardware import DEFAULT_CUDA_ARCH, SPEC_BOARDS, SPECS, check_cuda_arch
from ..profile.db import ProfileDB, is_sqlite
from ..profile.measure import (
    Kit,
    ProfileOptions,
    build_kit,
    kit_units,
    load_kit_libraries,
    profile_kit,
    profile_unit,
)
from ..profile.units import detect_unit
from ..quant_format import cache_dtype


def read_model_shape(model: str, dtype: str = "float32"):
    """``(ModelShape, database key)`` from a model's metadata (weights are not loaded), for
    weights in ``dtype`` and the KV cache `compile` gives them (:func:`~hetcomp.quant_format.
    cache_dtype`); the key names the dtype (``smollm2:q4_1:<digest>``)."""
    if dtype not in WEIGHT_DTYPES:
        raise HetcompError(f"unsupported dtype {dtype!r} (use {' | '.join(WEIGHT_DTYPES)})")
    path = resolve_model(model)
    if os.path.isdir(path):

        cfg = read_hf_config(path)
    else:

        cfg = read_config(open_gguf(path))
    check_quantizable(cfg, dtype)
    shape = ModelShape.from_config(cfg, dtype, cache_dtype(dtype))
    digest = hashlib.sha256(json.dumps(shape.to_json(), sort_keys=True).encode()).hexdigest()
    return shape, f"{os.path.basename(model)}:{dtype}:{digest[:8]}"


def split_unit_names(units) -> tuple[list[str], list[str]]:
    """``(present units, spec units)``; board names expand to their units."""
    present, spec = [], []
    for name in units:
        for n in SPEC_BOARDS.get(name, (name,)):
            (spec if n in SPECS else present).append(n)
    if present and spec:
        # This machine's units and a board known by its datasheet share no memory and no
        # machine: a plan across them could not run anywhere. The board has its own CPU.
        boards = [b for b, members in SPEC_BOARDS.items() if set(members) & set(spec)]
        raise HetcompError(
            f"cannot plan this machine's {', '.join(present)} together with spec units "
            f"({', '.join(spec)}): they are different machines; use --units "
            f"{','.join(boards) or ','.join(spec)} for the board (a spec estimate, its own "
            "CPU included) or --units cpu[,cuda] for this machine")
    if not present and not spec:
        raise HetcompError("no units given")
    return present, spec


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def profile_command(model: str = "smollm2", units=("cpu",), out: str = "profile.sqlite",
                    quick: bool = False, force: bool = False, progress=None,
                    kit_out: str | None = None, kit: str | None = None,
                    target: str | None = None, dtype: str = "float32",
                    cuda_arch: str | None = None) -> dict:
    """Profile every op class of ``model`` on each present unit into the SQLite file ``out``.

    ``kit_out``: only compile the probe kernels into a profile kit (CPU code for the named
    ``target``, default ``host``; a cuda unit's probes are CUDA driven by that CPU) to measure
    elsewhere; ``kit``: measure such a kit here (TVM runtime only).
    ``dtype``: the weight dtype whose kernels are measured (a block format: its dequantizing
    linear kernels; the profile is stored under a model key naming it). ``cuda_arch``: the
    GPU architecture a cuda unit's probes are compiled for (default: this machine's GPU's,
    else sm_90; a kit's GPU is chosen when it is built).
    Returns a summary: per unit its fingerprint digest, measurement count and whether the
    stored profile was reused.
    """

    if kit is not None and kit_out is not None:
        raise HetcompError("--kit measures a kit, --kit-out builds one: pick one")
    if target is not None and kit_out is None:
        # Measuring here compiles for this CPU, and a kit's target was chosen when it was built.
        raise HetcompError("--target names the CPU a kit is built for: use it with --kit-out "
                           "(profiling here measures this machine's own target)")
    # With --kit and no units: the kit's own (Kit.open refuses a folder that is no kit).
    opened = Kit.open(kit) if kit is not None else None
    present, spec = split_unit_names(units or (list(opened.meta["units"]) if opened else []))
    if spec:
        raise HetcompError(f"spec-only units cannot be profiled: {', '.join(spec)}")
    if cuda_arch is not None:
        if opened is not None:
            raise HetcompError("--cuda-arch: a kit's probes were compiled for its GPU when it "
                               "was built (profile --kit-out ... --cuda-arch)")
        if "cuda" not in present:
            raise HetcompError("--cuda-arch is the GPU of a cuda unit: add cuda to --units")
        check_cuda_arch(cuda_arch)
    opts = ProfileOptions.quick() if quick else ProfileOptions()
    if kit_out is not None:
        shape, key = read_model_shape(model, dtype)
        arch = cuda_arch or DEFAULT_CUDA_ARCH
        path = build_kit(kit_out, present, shape, key, opts, wdtype=dtype,
                         cpu_target=target or "host", progress=progress, force=force,
                         cuda_arch=arch)
        return {"kit": path, "model": key, "mode": opts.mode, "units": list(present),
                **({"cuda_arch": arch} if "cuda" in present else {})}
    # Everything that can be refused is, before the database is made or measured into: it
    # gathers profiles run after run (a profile database there is added to, nothing else),
    # and the plot beside it replaces only a plot of ours.
    check_output_file(out, is_sqlite, "profile database")
    check_output(profile_plot_path(out), is_plot, "hetcomp plot", force=True)
    if opened is None:
        shape, key = read_model_shape(model, dtype)
    found = (kit_units(opened, present) if opened is not None
             else {name: detect_unit(name, cuda_arch=cuda_arch) for name in present})
    libs = load_kit_libraries(opened, found) if opened is not None else None
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with _database(out) as db:
        if opened is not None:
            measured = profile_kit(opened, db, present, force, progress, found=found,
                                   libs=libs)
            summary = {"db": os.path.abspath(out), "model": opened.meta["model"],
                       "mode": opened.meta["options"].get("mode", "full"), "units": measured}
        else:
            summary = {"db": os.path.abspath(out), "model": key, "mode": opts.mode,
                       "units": {}}
            for name in present:
                unit = found[name]
                res = profile_unit(unit, shape, db, key, opts, wdtype=dtype, force=force,
                                   progress=progress)
                summary["units"][name] = {"fingerprint": unit.fingerprint.to_json(),
                                          "measurements": len(res.rows), "reused": res.reused,
                                          "mode": res.mode}
        summary["plot"] = write_profile_plot(db, summary["model"], profiled_digests(summary),
                                             profile_plot_path(out))
    return summary


def profiled_digests(summary: dict) -> dict[str, str]:
    """``{unit: fingerprint digest}`` from a :func:`profile_command` summary."""
    return {n: u["fingerprint"]["digest"] for n, u in summary["units"].items()}


def profile_plot_path(db_path: str) -> str:
    """Where ``hetcomp profile -o DB`` draws the profiles it measured or reused: DB's name
    with ``.png``."""
    return os.path.splitext(os.path.abspath(db_path))[0] + ".png"


def write_profile_plot(db: ProfileDB | str, model_key: str, digests: dict[str, str],
                       path: str) -> str:
    """Plot the stored profiles ``digests`` (``{unit: fingerprint digest}``) of ``model_key``
    into ``path`` (:func:`plot_profile`); returns ``path``."""
    with contextlib.ExitStack() as stack:
        if isinstance(db, str):
            db = stack.enter_context(ProfileDB(db))
        rows = {unit: db.measurements(digest, model_key) for unit, digest in digests.items()}
    with output_file(path, is_plot, "hetcomp plot") as tmp:
        plot_profile(rows, tmp, model_key)
    return path


# Op classes whose kinds name their kernels well enough alone (``silu_mul``, ``qk_norm``).
_KIND_NAMES_OP = ("linear", "elementwise", "rope", "rms_norm")


def plot_profile(rows_by_unit: dict, path: str, model_key: str) -> None:
    """PNG: each unit's kernel time per call against the tree width W, alone (solid) and
    beside the co-run load (dashed): the linear kinds over all their columns (left), the
    other op classes (right; attention against the longest cache measured). Round-trip
    copies and launch probes are not per-width kernels and are left out."""
    import matplotlib  # lazy: plotting is optional and slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = list(rows_by_unit)
    fig, axes = plt.subplots(len(units), 2, figsize=(12, 4 * len(units)), squeeze=False)
    for row, unit in zip(axes, units, strict=True):
        series: dict = {}
        for m in rows_by_unit[unit]:
            f = m.features
            if f.op in ("copy", "launch"):
                continue
            series.setdefault((f.op, f.kind), []).append(m)
        drawn = [0, 0]  # series on each axis: colours, then markers, cycle
        for (op, kind), ms in sorted(series.items()):
            # one shape per width: all the columns, the longest cache
            r = max(m.features.r for m in ms)
            cl = max(m.features.cache_len for m in ms)
            side = 0 if op.startswith("linear") else 1
            n, drawn[side] = drawn[side], drawn[side] + 1
            label = (op if kind in op else kind if op in _KIND_NAMES_OP
                     else f"{op} ({kind})")
            for corun, style in ((False, "-"), (True, "--")):
                pts = sorted((m.features.w, 1e3 * m.seconds) for m in ms
                             if m.features.corun == corun and m.features.r == r
                             and m.features.cache_len == cl)
                if pts:
                    row[side].plot(*zip(*pts, strict=True), style, color=f"C{n % 10}",
                                   marker=None if corun else "os^"[n // 10 % 3],
                                   label=None if corun else label)
        for ax, what in zip(row, ("linear layers (all columns)", "other op classes"),
                            strict=True):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tree width W (rows)")
            ax.set_ylabel("ms per call")
            ax.set_title(f"{unit}: {what}", fontsize=10)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"{model_key}: alone (solid), beside the co-run load (dashed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata=PLOT_METADATA)
    plt.close(fig)


@contextlib.contextmanager
def _database(path: str):
    """The profile database at ``path``, opened; one this run created is removed again
    when the run fails (or is stopped) before it stored any profile: nothing is left behind."""
    created = not os.path.lexists(path)
    db = ProfileDB(path)
    try:
        yield db
    except BaseException:
        empty = not db.digests()
        db.close()
        if created and empty:
            for p in (path, path + "-journal"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(p)
        raise
    db.close()
