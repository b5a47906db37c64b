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
    DEFAULT_CUDA_ARCH,
    MEASURED,
    SPEC_BOARD_TARGETS,
    SPEC_BOARDS,
    SPEC_ESTIMATE,
    SPECS,
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
    except (OSError, ValueError) as e:
        raise HetcompError(f"cannot read plan {path}: {str(e).splitlines()[0]}") from None


def load_plan(path: str, host_target: str = "host",
              cuda_arch: str = DEFAULT_CUDA_ARCH) -> HeteroPlan | None:
    """The HeteroPlan of a ``plan.json`` from `hetcomp tune`, or of a bare HeteroPlan JSON.

    A single-unit plan needs no partitioning (None). The plan's host unit (CPU or GPU) is
    unit 0. ``host_target`` names the CPU side (``host``, ``aarch64``, ``x86-64-v3``, or
    ``cuda`` for a portable x86 host) and ``cuda_arch`` the GPU's architecture; a
    spec-estimate plan compiles (for the board it describes) and says so in ``source``.
    """
    data = _read_json(path)
    try:
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        if data.get("format") != PLAN_FORMAT:
            return HeteroPlan.from_json(data)
        source = str(data.get("source"))
        if source not in (MEASURED, SPEC_ESTIMATE):
            raise ValueError(f"unknown plan source {source!r}")
        units = _unit_names(data["units"])
        host = data.get("host", units[0])
        if host not in units:
            raise ValueError(f"host {host!r} is not one of the plan's units {units}")
        for board, members in SPEC_BOARDS.items():  # a spec plan compiles for its board only
            want = SPEC_BOARD_TARGETS[board]
            if set(units) & set(members) and (host_target, cuda_arch) != want:
                raise HetcompError(f"plan {path} is a spec-estimate for the {board} board: "
                                   f"compile it with --target {want[0]} --cuda-arch {want[1]}")
        if len(units) == 1:
            if _is_gpu(host):
                raise HetcompError(f"plan {path} runs the model on {host} alone: compile with "
                                   "--target cuda and no --plan")
            return None
        other = next(u for u in units if u != host)
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
        where = {u: i for i, u in enumerate((host, other))}
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
    except HetcompError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, StopIteration) as e:
        raise HetcompError(f"cannot read plan {path}: {type(e).__name__}: {e}") from None


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
    "tree", "source", "units", "cost_dir", "dtype"}`` (``tree``: the tree's JSON or None;
    ``cost_dir``: the fitted cost models `tune` wrote beside it, or None; ``dtype``: the
    weight dtype it was planned for, from its model key ``name:dtype:digest``, or None);
    None for a bare HeteroPlan."""
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
                "dtype": key[1] if len(key) == 3 else None}
    except (ValueError, KeyError, TypeError) as e:
        raise HetcompError(f"cannot read plan {path}: {type(e).__name__}: {e}") from None
