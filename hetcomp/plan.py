"""Plans as data: what the partitioning pass applies, and ``plan.json`` as `hetcomp tune` writes it.

Ground floor: no TVM and no logic beyond validation. The planner (:mod:`hetcomp.planner`)
decides; :class:`~hetcomp.passes.PartitionHetero` applies.
"""

from __future__ import annotations

import dataclasses
import json
import os

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
    dense part's unit. ``shared_memory``: the units share DRAM, so values cross without
    copies. ``source`` is ``spec-estimate`` for a plan of hardware known only by its
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
        return cls(units=tuple(d["units"]), targets=tuple(dict(t) for t in d["targets"]),
                   ratios=tuple(sorted(d["ratios"].items())),
                   dense_attention=int(d.get("dense_attention", 0)),
                   sparse_attention=int(d.get("sparse_attention", 0)),
                   shared_memory=bool(d.get("shared_memory", False)),
                   source=str(d.get("source", MEASURED)))


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
        units = [str(u) for u in data["units"]]
        host = data.get("host", units[0])
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
        ratios = {kind: float(split.get(other, 0.0)) for kind, split in data["split"].items()}
        where = {u: i for i, u in enumerate((host, other))}
        shared = data.get("shared_memory")
        if shared is None:  # plans written before the field: spec boards share DRAM
            shared = all(u in SPECS and SPECS[u].shared_memory for u in units)
        return HeteroPlan(
            units=(host, other),
            targets=(unit_target(host, True, host_target, cuda_arch),
                     unit_target(other, False, host_target, cuda_arch)),
            ratios=tuple(sorted(ratios.items())),
            dense_attention=where.get(data["attention"].get("dense", host), 0),
            sparse_attention=where.get(data["attention"].get("sparse", host), 0),
            shared_memory=bool(shared), source=source)
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
        width = int(data["width"])
        if width < 1:
            raise ValueError(f"width {width}")
        cost_dir = os.path.join(os.path.dirname(os.path.abspath(path)), "cost")
        key = str(data.get("model", "")).rsplit(":", 2)
        return {"width": width, "tree": data.get("tree"), "source": str(data["source"]),
                "units": [str(u) for u in data["units"]],
                "cost_dir": cost_dir if os.path.isdir(cost_dir) else None,
                "dtype": key[1] if len(key) == 3 else None}
    except (ValueError, KeyError, TypeError) as e:
        raise HetcompError(f"cannot read plan {path}: {type(e).__name__}: {e}") from None
