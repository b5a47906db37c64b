"""Plans as data: what the partitioning pass applies, and ``plan.json`` as `hetcomp tune` writes it.

Ground floor: no TVM and no logic beyond validation. The planner (:mod:`hetcomp.planner`)
decides; :class:`~hetcomp.passes.PartitionHetero` applies.
"""

from __future__ import annotations

import dataclasses
import json
import os

from .errors import HetcompError
from .hardware import DEFAULT_CUDA_ARCH, target_dict

PLAN_FORMAT = "hetcomp-plan/1"


@dataclasses.dataclass(frozen=True)
class HeteroPlan:
    """What PartitionHetero applies (decided by the planner; it holds no logic).

    ``ratios`` maps a linear kind (qkv, o, gate_up, down, lm_head, or ``default`` for layers of
    unknown kind) to the fraction of output columns placed on ``units[1]``; the rest stays on
    ``units[0]``, the host. ``dense_attention`` and ``sparse_attention`` are unit indices.
    """

    units: tuple[str, ...] = ("cpu", "cpu:1")
    targets: tuple[dict, ...] = ({"kind": "llvm"}, {"kind": "llvm"})
    ratios: tuple[tuple[str, float], ...] = (("default", 0.5),)
    dense_attention: int = 0
    sparse_attention: int = 0
    shared_memory: bool = False

    def __post_init__(self):
        if len(self.units) != 2 or len(self.targets) != 2:
            raise ValueError("HeteroPlan places work on exactly two units")
        for kind, r in self.ratios:
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"ratio for {kind} must lie in [0, 1], got {r}")
        if {self.dense_attention, self.sparse_attention} - {0, 1}:
            raise ValueError("attention parts must be placed on unit 0 or 1")

    def ratio(self, kind: str | None) -> float:
        table = dict(self.ratios)
        return table.get(kind, table.get("default", 0.0))

    def to_json(self) -> dict:
        return {"units": list(self.units), "targets": [dict(t) for t in self.targets],
                "ratios": dict(self.ratios), "dense_attention": self.dense_attention,
                "sparse_attention": self.sparse_attention, "shared_memory": self.shared_memory}

    @classmethod
    def from_json(cls, d: dict) -> HeteroPlan:
        return cls(units=tuple(d["units"]), targets=tuple(dict(t) for t in d["targets"]),
                   ratios=tuple(sorted(d["ratios"].items())),
                   dense_attention=int(d.get("dense_attention", 0)),
                   sparse_attention=int(d.get("sparse_attention", 0)),
                   shared_memory=bool(d.get("shared_memory", False)))


# Targets of the non-CPU units a plan may name.
UNIT_TARGETS = {"cuda": {"kind": "cuda", "arch": DEFAULT_CUDA_ARCH}}


def _read_json(path: str):
    try:
        with open(path, "rb") as fh:
            return json.loads(fh.read().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise HetcompError(f"cannot read plan {path}: {str(e).splitlines()[0]}") from None


def load_plan(path: str, host_target: str = "host") -> HeteroPlan | None:
    """The HeteroPlan of a ``plan.json`` from `hetcomp tune`, or of a bare HeteroPlan JSON.

    A single-unit plan needs no partitioning (None). Spec-estimate plans describe hardware
    that is not here and cannot be compiled for.
    """
    data = _read_json(path)
    try:
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        if data.get("format") != PLAN_FORMAT:
            return HeteroPlan.from_json(data)
        if data.get("source") != "measured":
            raise HetcompError(f"plan {path} is a spec-estimate for hardware that is not here")
        units = [str(u) for u in data["units"]]
        host = data.get("host", units[0])
        if host in UNIT_TARGETS:  # the plan runs the unsplit ops on a GPU
            raise HetcompError(
                f"plan {path} runs the model on {host}"
                + (f" with a {', '.join(u for u in units if u != host)} share: GPU-hosted "
                   "partitions are not compiled yet" if len(units) > 1 else
                   f": compile with --target {host} and no --plan"))
        if len(units) == 1:
            return None
        other = next(u for u in units if u != host)
        ratios = {kind: float(split.get(other, 0.0)) for kind, split in data["split"].items()}
        where = {u: i for i, u in enumerate((host, other))}
        return HeteroPlan(
            units=(host, other),
            targets=(target_dict(host_target), UNIT_TARGETS.get(other, target_dict(host_target))),
            ratios=tuple(sorted(ratios.items())),
            dense_attention=where.get(data["attention"].get("dense", host), 0),
            sparse_attention=where.get(data["attention"].get("sparse", host), 0))
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
    "tree", "source", "units", "cost_dir"}`` (``tree``: the tree's JSON or None;
    ``cost_dir``: the fitted cost models `tune` wrote beside it, or None); None for a bare
    HeteroPlan."""
    data = _read_json(path)
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
        return None
    try:
        width = int(data["width"])
        if width < 1:
            raise ValueError(f"width {width}")
        cost_dir = os.path.join(os.path.dirname(os.path.abspath(path)), "cost")
        return {"width": width, "tree": data.get("tree"), "source": str(data["source"]),
                "units": [str(u) for u in data["units"]],
                "cost_dir": cost_dir if os.path.isdir(cost_dir) else None}
    except (ValueError, KeyError, TypeError) as e:
        raise HetcompError(f"cannot read plan {path}: {type(e).__name__}: {e}") from None
