"""Plans as data: what the partitioning pass applies, and ``plan.json`` as `hetcomp tune` writes it.

Ground floor: no TVM and no logic beyond validation. The planner (:mod:`hetcomp.planner`)
decides; :class:`~hetcomp.passes.PartitionHetero` applies.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

from .artifact_format import MEDUSA_TOPK
from .decoder import LINEAR_KINDS
from .errors import HetcompError
from .hardware import (
    COMPILE_TARGETS,
    CUDA_ARCH_SPECS,
    DEFAULT_CUDA_ARCH,
    MEASURED,
    SPEC_BOARD_TARGETS,
    SPEC_BOARDS,
    SPEC_ESTIMATE,
    SPECS,
    base_cuda_arch,
    check_cuda_arch,
    host_part,
    target_dict,
)

PLAN_FORMAT = "hetcomp-plan/1"


@dataclasses.dataclass(frozen=True)
class HeteroPlan:
    """What PartitionHetero applies (decided by the planner; it holds no logic).

    ``ratios`` maps a linear kind (qkv, o, gate_up, down, lm_head, or ``default`` for layers of
    unknown kind) to the fraction of output columns placed on ``units[1]``; the rest stays on
    ``units[0]``, the host, which runs every op that is not split (a CPU or a GPU).
    ``dense_attention`` and ``sparse_attention`` are unit indices; the KV cache lives on the
    dense part's unit. ``shared_memory``: the units share DRAM, so a value crossing costs a
    copy within it, not a transfer over a link (the planner's costs; the artifact still
    copies: TVM gives each device its own buffers). ``source`` is ``spec-estimate`` for a plan of hardware known only by its
    datasheet (it compiles, for that hardware; its predictions are estimates).
    """

    units: tuple[str, ...] = ("cpu", "cpu:1")
    targets: tuple[dict, ...] = ({"kind": "llvm"}, {"kind": "llvm"})
    ratios: tuple[tuple[str, float], ...] = (("default", 0.5),)
    dense_attention: int = 0
    sparse_attention: int = 0
    shared_memory: bool = False
    source: str = MEASURED

    def __post_init__(self):
        if len(self.units) != 2 or len(self.targets) != 2:
            raise ValueError("HeteroPlan places work on exactly two units")
        for kind, r in self.ratios:
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"ratio for {kind} must lie in [0, 1], got {r}")
        if {self.dense_attention, self.sparse_attention} - {0, 1}:
            raise ValueError("attention parts must be placed on unit 0 or 1")
        if self.source not in (MEASURED, SPEC_ESTIMATE):
            raise ValueError(f"source must be {MEASURED!r} or {SPEC_ESTIMATE!r}")

    @property
    def kv_unit(self) -> int:
        """The unit whose memory holds the KV cache: the one running the dense part."""
        return self.dense_attention

    def ratio(self, kind: str | None) -> float:
        table = dict(self.ratios)
        return table.get(kind, table.get("default", 0.0))

    def to_json(self) -> dict:
        return {"units": list(self.units), "targets": [dict(t) for t in self.targets],
                "ratios": dict(self.ratios), "dense_attention": self.dense_attention,
                "sparse_attention": self.sparse_attention, "shared_memory": self.shared_memory,
                "source": self.source}

    @classmethod
    def from_json(cls, d: dict) -> HeteroPlan:
        units = tuple(_unit_names(d["units"]))
        targets = tuple(dict(t) for t in d["targets"])
        for unit, target in zip(units, targets):  # (a length mismatch: __post_init__)
            kind = target.get("kind")
            if kind not in ("llvm", "cuda") or (kind == "cuda") != _is_gpu(unit.split(":")[0]):
                raise ValueError(f"unit {unit!r} cannot run a target of kind {kind!r}")
        ratios = d["ratios"]
        for kind in ratios:
            _check_kind(kind)
        return cls(units=units, targets=targets,
                   ratios=tuple(sorted((k, _number(v)) for k, v in ratios.items())),
                   dense_attention=_index(d.get("dense_attention", 0)),
                   sparse_attention=_index(d.get("sparse_attention", 0)),
                   shared_memory=_flag(d.get("shared_memory", False)),
                   source=str(d.get("source", MEASURED)))


# Checks of values read from JSON (a ValueError or TypeError is one line: `load_plan`).
_UNIT_NAME = re.compile(r"(cpu|cuda)(:\d+)?")


def _unit_names(units) -> list[str]:
    if not isinstance(units, list) or not units or not all(isinstance(u, str) for u in units):
        raise ValueError(f"units must be a non-empty list of names, not {units!r}")
    for u in units:
        if not (_UNIT_NAME.fullmatch(u) or u in SPECS):
            raise ValueError(f"unknown unit {u!r} (cpu, cuda, or a spec unit: "
                             f"{', '.join(SPECS)})")
    if len(set(units)) != len(units):
        raise ValueError(f"a unit is listed twice: {units}")
    if len(units) > 2:  # what the partition pass splits: a host and one other unit
        raise ValueError(f"a plan places work on at most two units, not {units}")
    return units


def _check_kind(kind: str) -> None:
    if kind not in (*LINEAR_KINDS, "default"):
        raise ValueError(f"unknown linear kind {kind!r} (known: {', '.join(LINEAR_KINDS)}, "
                         "default)")


def _number(x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"expected a number, not {x!r}")
    return float(x)


def _index(x) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"expected a unit index, not {x!r}")
    return x


def _flag(x) -> bool:
    if not isinstance(x, bool):
        raise TypeError(f"shared_memory must be true or false, not {x!r}")
    return x


def _is_gpu(unit: str) -> bool:
    spec = SPECS.get(unit)
    return unit == "cuda" or (spec is not None and spec.kind == "gpu")


def unit_target(unit: str, host: bool, host_target: str = "host",
                cuda_arch: str = DEFAULT_CUDA_ARCH) -> dict:
    """The target of a plan's unit: GPUs (``cuda``, a spec GPU such as ``orin-nx-gpu``) are
    CUDA of ``cuda_arch``, with the CPU side of ``host_target`` driving them when they host
    the plan; CPUs are the LLVM part of ``host_target`` (``--target cuda``: portable x86)."""
    cpu = host_part(target_dict(host_target, cuda_arch))
    if not _is_gpu(unit):
        return cpu
    return {"kind": "cuda", "arch": cuda_arch, **({"host": cpu} if host else {})}


def _read_json(path: str):
    try:
        with open(path, "rb") as fh:
            return json.loads(fh.read().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise HetcompError(f"cannot read plan {path}: {str(e).splitlines()[0]}") from None


def load_plan(path: str, host_target: str = "host",
              cuda_arch: str = DEFAULT_CUDA_ARCH) -> HeteroPlan | None:
    """The HeteroPlan of a ``plan.json`` from `hetcomp tune`, or of a bare HeteroPlan JSON.

    A single-unit plan needs no partitioning (None): a CPU's builds for that CPU, a GPU's
    (``--target cuda``) is the whole-model GPU build. The plan's host unit (CPU or GPU) is
    unit 0. ``host_target`` names the CPU side (``host``, ``aarch64``, ``x86-64-v3``,
    or ``cuda`` for a portable x86 host) and ``cuda_arch`` the GPU's architecture: every
    unit's target comes from them (a bare plan's ``targets``, optional, must agree with
    them); a spec-estimate plan compiles for the board it describes and says so in
    ``source``. A plan these flags cannot build is refused with the flags that can.
    """
    data = _read_json(path)
    try:
        return _plan(data, path, host_target, cuda_arch)
    except HetcompError:
        raise
    except _READ_ERRORS as e:
        raise HetcompError(f"cannot read plan {path}: {type(e).__name__}: {e}") from None


def plan_flags(path: str) -> tuple[dict, HeteroPlan | None] | None:
    """The `compile` flags that build a plan, ``{"target": "aarch64", "cuda_arch": "sm_87"}``
    (``cuda_arch`` None without a GPU unit), with the plan they build (None: one CPU, no
    partitioning): the first of :data:`COMPILE_TARGETS` (and GPU architecture) that
    :func:`load_plan` accepts; None where none does."""
    found = _compile_flags(_read_json(path), path)
    if found is None:
        return None
    target, arch, gpu, plan = found
    return {"target": target, "cuda_arch": arch if gpu else None}, plan


_READ_ERRORS = (ValueError, KeyError, TypeError, AttributeError, StopIteration)


def _compile_flags(data, path: str) -> tuple[str, str, bool, HeteroPlan | None] | None:
    """``(--target, --cuda-arch, whether it has a GPU unit, the plan they build)`` of the
    first flags that build the plan ``data``."""
    archs = [DEFAULT_CUDA_ARCH, *(arch for _, arch in SPEC_BOARD_TARGETS.values())]
    if isinstance(data, dict) and isinstance(data.get("targets"), list):  # a bare plan's own
        archs += [t["arch"] for t in data["targets"] if isinstance(t, dict)
                  and isinstance(t.get("arch"), str) and _is_arch(t["arch"])]
    for target in COMPILE_TARGETS:
        for arch in dict.fromkeys(archs):
            try:
                plan = _plan(data, path, target, arch, advise=False)
            except (HetcompError, *_READ_ERRORS):
                continue
            gpu = plan is not None and any(t["kind"] == "cuda" for t in plan.targets)
            return target, arch, gpu or target == "cuda", plan
    return None


def _is_arch(arch: str) -> bool:
    try:
        return bool(check_cuda_arch(arch))
    except HetcompError:
        return False


def _flags_text(target: str, arch: str, gpu: bool) -> str:
    return f"--target {target}" + (f" --cuda-arch {arch}" if gpu else "")


def _agrees(written, derived) -> bool:
    """Whether every field a bare plan names for a unit's target is the one the flags give
    (``{"kind": "llvm"}`` agrees with any CPU target)."""
    if isinstance(written, dict):
        return isinstance(derived, dict) and all(
            k in derived and _agrees(v, derived[k]) for k, v in written.items())
    return written == derived


def _check_flags(path: str, units, host_target: str, cuda_arch: str) -> None:
    """Refusals that depend on the flags: a spec board's units compile for that board only,
    and ``--target cuda`` puts the model on a GPU, so a plan must place work on one."""
    for board, members in SPEC_BOARDS.items():
        used = set(units) & set(members)
        want_target, want_arch = SPEC_BOARD_TARGETS[board]
        gpu = any(_is_gpu(u) for u in used)
        if used and (host_target != want_target or (gpu and cuda_arch != want_arch)):
            raise HetcompError(f"plan {path} is a spec-estimate for the {board} board: compile "
                               f"it with {_flags_text(want_target, want_arch, gpu)}")
    if host_target == "cuda" and not any(_is_gpu(u) for u in units):
        raise HetcompError(f"plan {path} runs the model on {' and '.join(units)} alone: "
                           "compile it with --target host, not --target cuda")


def _plan(data, path: str, host_target: str, cuda_arch: str,
          advise: bool = True) -> HeteroPlan | None:
    if not isinstance(data, dict):
        raise TypeError("not a JSON object")
    if data.get("format") != PLAN_FORMAT:
        return _bare_plan(data, path, host_target, cuda_arch, advise)
    source = str(data.get("source"))
    if source not in (MEASURED, SPEC_ESTIMATE):
        raise ValueError(f"unknown plan source {source!r}")
    units = _unit_names(data["units"])
    host = data.get("host", units[0])
    if host not in units:
        raise ValueError(f"host {host!r} is not one of the plan's units {units}")
    _check_flags(path, units, host_target, cuda_arch)
    if len(units) == 1 and not _is_gpu(host):
        return None
    board = next((m for m in SPEC_BOARDS.values() if host in m), None)
    if len(units) == 1 and board is None:
        # One GPU runs every kernel: the whole-model GPU build (graphs, fused linears) at the
        # plan's width and tree; a datasheet GPU's plan is for its architecture.
        arch = next((a for a, s in CUDA_ARCH_SPECS.items() if s == host), None)
        if host_target != "cuda" or (host in SPECS and base_cuda_arch(cuda_arch) != arch):
            raise HetcompError(f"plan {path} runs the model on {host} alone: compile it with "
                               f"{_flags_text('cuda', arch or cuda_arch, host in SPECS)}")
        return None
    # A board's GPU alone runs every kernel; the board's CPU drives it, with no share.
    other = (next(u for u in units if u != host) if len(units) > 1
             else next(u for u in board if not _is_gpu(u)))
    ratios = {}
    for kind, split in data["split"].items():
        _check_kind(kind)
        if not isinstance(split, dict) or not split or set(split) - set(units):
            raise ValueError(f"split of {kind} must give shares of the units {units}, "
                             f"not {split!r}")
        shares = {u: _number(v) for u, v in split.items()}
        if set(shares) == set(units) and abs(sum(shares.values()) - 1.0) > 1e-6:
            raise ValueError(f"the shares of {kind} sum to {sum(shares.values())}, not 1")
        ratios[kind] = shares.get(other, 0.0)
    where = {u: i for i, u in enumerate((host, other)) if u in units}
    attention = data["attention"]
    if not isinstance(attention, dict) or set(attention) - {"dense", "sparse"} or any(
            v not in where for v in attention.values()):
        raise ValueError(f"attention must place dense and sparse on the units {units}, "
                         f"not {attention!r}")
    shared = data.get("shared_memory")
    if shared is None:  # plans written before the field: spec boards share DRAM
        shared = all(u in SPECS and SPECS[u].shared_memory for u in units)
    return HeteroPlan(
        units=(host, other),
        targets=(unit_target(host, True, host_target, cuda_arch),
                 unit_target(other, False, host_target, cuda_arch)),
        ratios=tuple(sorted(ratios.items())),
        dense_attention=where[attention.get("dense", host)],
        sparse_attention=where[attention.get("sparse", host)],
        shared_memory=_flag(shared), source=source)


def _bare_plan(data: dict, path: str, host_target: str, cuda_arch: str,
               advise: bool) -> HeteroPlan:
    """A bare HeteroPlan: its units' targets are the flags' (``targets`` may leave them out;
    where it names them, a target other than the flags build is refused, not ignored)."""
    units = _unit_names(data["units"])
    kinds = [{"kind": "cuda" if _is_gpu(u) else "llvm"} for u in units]
    plan = HeteroPlan.from_json({**data, "targets": data.get("targets", kinds)})
    _check_flags(path, plan.units, host_target, cuda_arch)
    derived = tuple(unit_target(u, i == 0, host_target, cuda_arch)
                    for i, u in enumerate(plan.units))
    for unit, written, want in zip(plan.units, plan.targets, derived):
        if not _agrees(written, want):
            gpu = any(_is_gpu(u) for u in plan.units)
            found = _compile_flags(data, path) if advise else None
            fix = (f"compile it with {_flags_text(*found[:3])}" if found else
                   "no --target builds it (leave \"targets\" out to build for --target)")
            raise HetcompError(f"plan {path} gives unit {unit!r} the target "
                               f"{json.dumps(written)}, not the "
                               f"{json.dumps(want)} of {_flags_text(host_target, cuda_arch, gpu)}"
                               f": {fix}")
    return dataclasses.replace(plan, targets=derived)


def plan_prediction(path: str) -> dict | None:
    """The planner's predicted tau, step time and tokens/s per width in a plan.json (None for a
    bare HeteroPlan or a plan without candidates)."""
    data = _read_json(path)
    try:
        return {str(c["width"]): {"tau": float(c["tau"]), "step_s": float(c["step_s"]),
                                  "tokens_per_s": float(c["tau"]) / float(c["step_s"])}
                for c in data.get("candidates", [])} or None
    except (ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError):
        return None


def _check_tree(tree, width: int) -> None:
    """A plan's tree as :meth:`~hetcomp.speculative.tree.Tree.to_json` writes it, of
    ``width`` nodes: the root first, each other node's parent before it, its rank one of a
    head's candidates."""
    parents, ranks, probs = tree["parents"], tree["ranks"], tree["probs"]
    if not all(isinstance(x, list) and len(x) == width for x in (parents, ranks, probs)):
        raise ValueError(f"the tree's parents, ranks and probs must list its {width} nodes")
    for i, (p, r) in enumerate(zip(parents, ranks)):
        ok = (p == r == -1) if i == 0 else (isinstance(p, int) and 0 <= p < i
                                            and isinstance(r, int) and 0 <= r < MEDUSA_TOPK)
        if not ok:
            raise ValueError(f"tree node {i} has parent {p!r} and rank {r!r}")
    for x in probs:
        _number(x)


def plan_choice(path: str) -> dict | None:
    """What a ``plan.json`` of `hetcomp tune` decided beyond the partition: ``{"width",
    "tree", "source", "units", "cost_dir", "model", "dtype", "shape_digest",
    "int8_linears"}`` (``tree``: the tree's JSON or None; ``cost_dir``: the fitted cost models
    `tune` wrote beside it, or None; ``model``, ``dtype``, ``shape_digest``: the parts of its
    model key ``name:dtype:digest``, or None; ``int8_linears``: whether it was costed on
    int8-dot linears, None for a plan that does not say); None for a bare HeteroPlan."""
    data = _read_json(path)
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
        return None
    try:
        width = data["width"]
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive integer, not {width!r}")
        if data.get("tree") is not None:
            _check_tree(data["tree"], width)
        cost_dir = os.path.join(os.path.dirname(os.path.abspath(path)), "cost")
        key = str(data.get("model", "")).rsplit(":", 2)
        return {"width": width, "tree": data.get("tree"), "source": str(data["source"]),
                "units": [str(u) for u in data["units"]],
                "cost_dir": cost_dir if os.path.isdir(cost_dir) else None,
                "model": key[0] if len(key) == 3 else None,
                "dtype": key[1] if len(key) == 3 else None,
                "shape_digest": key[2] if len(key) == 3 else None,
                "int8_linears": (None if data.get("int8_linears") is None
                                 else bool(data["int8_linears"]))}
    except (ValueError, KeyError, TypeError) as e:
        raise HetcompError(f"cannot read plan {path}: {type(e).__name__}: {e}") from None
