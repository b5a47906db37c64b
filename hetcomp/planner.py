"""ARCA planner: choose the tree width, the tree, the linear split ratios and attention placement.

Given tau(W) (expected accepted tokens per verify step, from the token trees of
:mod:`hetcomp.speculative.tree`) and a cost function per processing unit, the planner picks
the plan that maximises predicted ``tokens/s = tau(W) / T_step(W)``.

Step-time model (one ``verify`` call, plus the Medusa draft call when W > 1):

- Ops run one after another (the Relax VM runs bindings in order); within a split op the
  units run at once, so an op takes the *maximum* of its units' times, each taken from the
  unit's co-run cost (measured under a concurrent load, so contention is in the numbers)
  when the units share memory, from its alone cost when one of them has its own.
- Units on shared DRAM cannot beat their shared bandwidth: a split op takes at least its
  units' summed bytes over the memory's bandwidth, taken as the larger of their own (the
  memory streams at least what its fastest unit streams alone).
- Any op touching a non-host unit pays a synchronisation, plus copies of the op's input and
  output over the link when the two do not share memory: the discrete unit's (a GPU host with
  a CPU share pays the GPU's link just as a CPU host with a GPU share does).
- Linear layers split by output columns (fractions in steps of ``1/ratio_steps``, whole pack
  blocks); each linear kind's split is chosen independently (op times add). Attention has a
  dense part (tree queries vs the committed cache) and a sparse part (tree vs tree under the
  mask, its cost set by the tree's ancestor count), each placed on a unit, and their
  log-sum-exp merge on the host: the kernels verify runs at that width
  (:func:`hetcomp.decoder.attention_kernels`), each costed by its own op-class model. The
  narrowest widths run the fused masked kernel instead, with the cache on the dense unit.
  Only tree-sized values cross: q/K/V rows in, each part's output with its log-sum-exp out.
- Everything else (norms, RoPE, SiLU, embedding, argmax) runs on the host unit.

Pure Python and numpy: this module imports nothing from TVM, directly or indirectly.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from .artifact_format import PLOT_METADATA, write_json
from .cost.roofline import (
    LINEAR_KINDS,
    DraftShape,
    Features,
    ModelShape,
    RooflineCost,
    StepOp,
    draft_step,
    linear_features,
    model_step,
    split_columns,
)
from .hardware import MEASURED, SPEC_ESTIMATE, DeviceSpec
from .plan import PLAN_FORMAT
from .speculative.tree import Tree, build_tree

_F32 = 4


@dataclasses.dataclass(frozen=True)
class UnitModel:
    """A processing unit as the planner sees it: a cost function and how it shares memory.

    Parameters
    ----------
    name : str
        Unit name (``cpu``, ``orin-nx-gpu``).
    cost : callable
        ``cost(features) -> seconds`` for one kernel call (a fitted
        :class:`~hetcomp.cost.xgb.UnitCostModel` or a :class:`~hetcomp.cost.RooflineCost`).
    source : str
        ``"measured"`` or ``"spec-estimate"``; one plan never mixes the two.
    shared_memory : bool
        Shares DRAM with the host (zero-copy concat; bandwidth shared).
    mem_bw_gbs : float
        DRAM bandwidth for the shared-bandwidth bound (0: no bound).
    sync_s : float
        One synchronisation with the host per op that uses this unit.
    link_gbs : float
        Link bandwidth for copies when memory is not shared.
    """

    name: str
    cost: Callable[[Features], float] = dataclasses.field(compare=False, repr=False)
    source: str = MEASURED
    shared_memory: bool = True
    mem_bw_gbs: float = 0.0
    sync_s: float = 0.0
    link_gbs: float = 0.0

    def __post_init__(self):
        if self.source not in (MEASURED, SPEC_ESTIMATE):
            raise ValueError(f"source must be {MEASURED!r} or {SPEC_ESTIMATE!r}")
        if not self.shared_memory and self.link_gbs <= 0:
            raise ValueError(f"unit {self.name}: no shared memory needs link_gbs > 0")

    @classmethod
    def from_spec(cls, spec: DeviceSpec, tensor_products: int = 0) -> UnitModel:
        """A spec-only unit: roofline costs (``tensor_products``: of its linears on tensor
        cores, :class:`~hetcomp.cost.roofline.RooflineCost`), always labelled
        ``spec-estimate``."""
        return cls(spec.name, RooflineCost(spec, tensor_products), SPEC_ESTIMATE,
                   spec.shared_memory, spec.mem_bw_gbs, spec.sync_s, spec.link_gbs)


@dataclasses.dataclass(frozen=True)
class PlannerOptions:
    """Search space of the planner.

    Parameters
    ----------
    widths : tuple of int
        Candidate tree widths W.
    cache_len : int
        Committed KV length the plan is optimised for.
    ratio_steps : int
        Split ratios are multiples of ``1 / ratio_steps``.
    draft_heads : int or None
        Medusa heads whose draft call is costed for W > 1 (None: the rows of ``rank_probs``;
        0: ignore the draft).
    draft_vocab, draft_weight_bytes, draft_root
        The draft's LM-head rows (0: the whole vocabulary), bytes per LM-head weight (0: the
        model's) and root conditioning; see :class:`~hetcomp.cost.roofline.DraftShape`.
    contention : bool
        Cost co-running units under shared-memory load (see below).
    device_len : bool
        Cost the step of the whole-model GPU build for CUDA graphs.
    fused_linears : bool
        Cost the step with its norms and activations inside the linears (a GPU build's).
    exact_attention : bool
        Cost the fused attention kernel at every width (a build whose linears take int8
        activations; :data:`hetcomp.decoder.FUSED_WIDTHS`).
    int8_unit : str
        The unit whose one-unit build runs quantized linears on int8 activations (a CPU with
        VNNI or sdot, quantized weights; its profile measured ``linear_int8``): planned
        alone, its linears cost ``linear_int8`` and its attention is exact (as above). A
        partitioned plan's units dequantize (``hetcomp.driver.compile.int8_activations``):
        their linears cost ``linear``.
    """

    widths: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    cache_len: int = 256
    ratio_steps: int = 32
    draft_heads: int | None = None
    draft_vocab: int = 0
    draft_weight_bytes: int = 0
    draft_root: bool = False
    # Cost units on one memory under co-run load (measured co-run profiles; for spec units
    # the board's shared bandwidth). False plans as if each unit ran alone (for comparison).
    contention: bool = True
    # The whole-model GPU build for CUDA graphs (its step: one attention kernel a layer and
    # the input copy; :func:`~hetcomp.cost.roofline.model_step`).
    device_len: bool = False
    # Norms and gated activations inside the linears' kernels (a whole-model GPU build's).
    fused_linears: bool = False
    # The fused masked attention kernel at every width (int8 activations).
    exact_attention: bool = False
    int8_unit: str = ""

    def draft(self, heads: int) -> DraftShape | None:
        """The draft call's shapes with ``heads`` heads (None when there is no draft)."""
        return (DraftShape(heads, self.draft_vocab, self.draft_weight_bytes, self.draft_root)
                if heads else None)

    def __post_init__(self):
        if not self.widths or min(self.widths) < 1:
            raise ValueError("widths must be positive")
        if self.ratio_steps < 1:
            raise ValueError("ratio_steps must be >= 1")


Split = tuple[tuple[str, float], ...]  # ((unit, fraction of output columns), ...)


@dataclasses.dataclass(frozen=True)
class WidthChoice:
    """The best plan at one width: predicted step time and the decisions behind it."""

    width: int
    tau: float
    step_s: float
    split: tuple[tuple[str, Split], ...]  # ((linear kind, split), ...)
    attention: tuple[tuple[str, str], ...]  # (("dense", unit), ("sparse", unit))
    breakdown: tuple[tuple[str, float], ...]  # ((op, seconds per step), ...)

    @property
    def tokens_per_s(self) -> float:
        return self.tau / self.step_s

    def to_json(self) -> dict:
        return {"width": self.width, "tau": self.tau, "step_s": self.step_s,
                "tokens_per_s": self.tokens_per_s,
                "split": {k: dict(s) for k, s in self.split},
                "attention": dict(self.attention), "breakdown_s": dict(self.breakdown)}

    @classmethod
    def from_json(cls, d: dict) -> WidthChoice:
        return cls(d["width"], d["tau"], d["step_s"],
                   tuple((k, tuple(s.items())) for k, s in d["split"].items()),
                   tuple(d["attention"].items()), tuple(d["breakdown_s"].items()))


@dataclasses.dataclass(frozen=True)
class Plan:
    """A heterogeneous decoding plan: W, the tree, split ratios and attention placement.

    ``source`` is ``"measured"`` when every unit's costs come from measured profiles and
    ``"spec-estimate"`` when they come from datasheet specs. ``candidates`` holds the best
    choice at every candidate width (the curve :func:`plot_plans` draws).
    """

    model: str
    units: tuple[str, ...]
    host: str
    source: str
    cache_len: int
    width: int
    tau: float
    step_s: float
    split: tuple[tuple[str, Split], ...]
    attention: tuple[tuple[str, str], ...]
    tree: Tree | None
    candidates: tuple[WidthChoice, ...]
    tau_source: str = ""
    notes: str = ""
    # Why the costs of units on one memory are what they are: ``{"enabled", "op", "units":
    # {unit: {"slowdown", "source"}}}`` (see :func:`contention_report`).
    contention: dict | None = None
    shared_memory: bool = False  # every unit shares DRAM with the host: no copies
    # Costed as a one-unit build on int8 activations (PlannerOptions.int8_unit): its linears
    # the int8-dot kernels, its attention the fused kernel at every width.
    int8_linears: bool = False

    @property
    def tokens_per_s(self) -> float:
        return self.tau / self.step_s

    def split_ratio(self, kind: str) -> dict[str, float]:
        """Fraction of ``kind``'s output columns on each unit."""
        return dict(dict(self.split)[kind])

    def choice(self, width: int) -> WidthChoice:
        for c in self.candidates:
            if c.width == width:
                return c
        raise KeyError(f"width {width} is not a candidate of this plan")

    def to_json(self) -> dict:
        return {
            "format": PLAN_FORMAT, "model": self.model, "units": list(self.units),
            "host": self.host, "source": self.source, "cache_len": self.cache_len,
            "width": self.width, "tau": self.tau, "step_s": self.step_s,
            "tokens_per_s": self.tokens_per_s, "split": {k: dict(s) for k, s in self.split},
            "attention": dict(self.attention),
            "tree": self.tree.to_json() if self.tree is not None else None,
            "candidates": [c.to_json() for c in self.candidates],
            "tau_source": self.tau_source, "notes": self.notes,
            "contention": self.contention, "shared_memory": self.shared_memory,
            "int8_linears": self.int8_linears,
        }

    @classmethod
    def from_json(cls, d: dict) -> Plan:
        return cls(d["model"], tuple(d["units"]), d["host"], d["source"], d["cache_len"],
                   d["width"], d["tau"], d["step_s"],
                   tuple((k, tuple(s.items())) for k, s in d["split"].items()),
                   tuple(d["attention"].items()),
                   Tree.from_json(d["tree"]) if d.get("tree") else None,
                   tuple(WidthChoice.from_json(c) for c in d["candidates"]),
                   d.get("tau_source", ""), d.get("notes", ""), d.get("contention"),
                   bool(d.get("shared_memory", False)), bool(d.get("int8_linears", False)))

    def save(self, path: str) -> None:
        write_json(path, self.to_json(), indent=1)


def _compositions(parts: int, steps: int) -> list[tuple[int, ...]]:
    """Every way to write ``steps`` as an ordered sum of ``parts`` non-negative integers."""
    if parts == 1:
        return [(steps,)]
    return [(i, *rest) for i in range(steps + 1) for rest in _compositions(parts - 1, steps - i)]


def _host_first(split: Split) -> list[float]:
    # Among equally fast splits, prefer the one keeping the most columns on the host.
    return [-frac for _, frac in split]


class _StepModel:
    """Costs ops and whole steps for one set of units (the host is the first unit)."""

    def __init__(self, shape: ModelShape, units: Sequence[UnitModel], ratio_steps: int,
                 contention: bool = True, int8_linears: bool = False):
        if not units:
            raise ValueError("the planner needs at least one unit")
        sources = {u.source for u in units}
        if len(sources) > 1:
            raise ValueError("a plan cannot mix measured units with spec estimates "
                             f"({', '.join(f'{u.name}: {u.source}' for u in units)})")
        self.shape, self.units, self.host = shape, tuple(units), units[0]
        self.source = sources.pop()
        self.contention = contention
        if int8_linears and len(units) > 1:
            raise ValueError("only a one-unit plan runs its linears on int8 activations")
        # The op class of the linears' kernels (hetcomp.profile.measure.LINEAR_OPS).
        self.linear_op = "linear_int8" if int8_linears else "linear"
        self.fractions = [tuple(c / ratio_steps for c in comp)
                          for comp in _compositions(len(units), ratio_steps)]
        self._split_cache: dict[tuple[str, int], tuple[float, Split]] = {}

    # ---- one op -----------------------------------------------------------------------------

    def _sync(self, unit: UnitModel, in_bytes: float, out_bytes: float) -> float:
        """Cost of an op part on ``unit`` crossing to and from the host. The link is the
        discrete one of the pair: a CPU share of a GPU-hosted op crosses the GPU's PCIe link
        just as a GPU share of a CPU-hosted one does."""
        if unit is self.host:
            return 0.0
        far = self.host if unit.shared_memory and not self.host.shared_memory else unit
        t = far.sync_s
        if not far.shared_memory:
            t += (in_bytes + out_bytes) / (far.link_gbs * 1e9)
        return t

    def _together(self, parts: list[tuple[UnitModel, Features]]) -> float:
        """Time of op parts running at once on different units (co-run costs)."""
        if len(parts) == 1:
            unit, feat = parts[0]
            return unit.cost(feat)
        return max(self.corun_times(parts).values())

    def corun_times(self, parts: list[tuple[UnitModel, Features]]) -> dict[str, float]:
        """Each part's time while all of them run at once. Units contend only for a memory
        they share (a discrete GPU's share runs in its own memory): each pays its measured
        co-run cost, and together they cannot stream faster than the memory's bandwidth
        (at least the largest unit ``mem_bw_gbs``: a spec board's figure, a measured unit's
        achieved rate). The smaller one bounded a measured board's GPU share by what its CPU
        streams (a 60 GB/s GPU beside a 20 GB/s CPU co-ran 5.6x slower)."""
        contend = self.contention and len(parts) > 1 and all(u.shared_memory for u, _ in parts)
        times = {u.name: u.cost(f.with_corun(contend)) for u, f in parts}
        shared = [(u, f) for u, f in parts if u.shared_memory and u.mem_bw_gbs > 0]
        if contend and len(shared) > 1:
            bw = max(u.mem_bw_gbs for u, _ in shared) * 1e9
            floor = sum(f.bytes for _, f in shared) / bw
            times = {n: max(t, floor) for n, t in times.items()}
        return times

    def columns(self, kind: str, split: Split) -> Split:
        """The split as realised: each unit's fraction rounded to whole pack blocks."""
        full = self.shape.linear_dims(kind)[0]
        bounds, done = [0], 0.0
        for _, frac in split:
            done += frac
            bounds.append(split_columns(full, min(done, 1.0)))
        bounds[-1] = full
        return tuple((name, (hi - lo) / full)
                     for (name, _), lo, hi in zip(split, bounds[:-1], bounds[1:], strict=True))

    def linear_features(self, kind: str, w: int, frac: float = 1.0) -> Features:
        """A linear's features as this unit set runs its kernel (:attr:`linear_op`)."""
        return dataclasses.replace(linear_features(self.shape, kind, w, frac), op=self.linear_op)

    def linear_time(self, kind: str, w: int, split: Split) -> float:
        full, k, _ = self.shape.linear_dims(kind)
        by_name = {u.name: u for u in self.units}
        parts, sync = [], 0.0
        for name, frac in self.columns(kind, split):
            if frac > 0:
                unit = by_name[name]
                parts.append((unit, self.linear_features(kind, w, frac)))
                sync = max(sync, self._sync(unit, _F32 * w * k, _F32 * w * frac * full))
        return self._together(parts) + sync

    def best_split(self, kind: str, w: int) -> tuple[float, Split]:
        key = (kind, w)
        if key not in self._split_cache:
            names = [u.name for u in self.units]
            splits = {self.columns(kind, tuple(zip(names, fr, strict=True)))
                      for fr in self.fractions}
            self._split_cache[key] = min(((self.linear_time(kind, w, s), s)
                                          for s in sorted(splits, key=_host_first)),
                                         key=lambda x: x[0])
        return self._split_cache[key]

    def attention_time(self, parts: Mapping[str, Features], dense: str, sparse: str) -> float:
        """One layer's attention with the dense part (and the KV cache) on unit ``dense`` and
        the sparse part on ``sparse``; ``parts``: the layer's attention kernels
        (:func:`~hetcomp.cost.roofline.layer_attention`)."""
        by_name = {u.name: u for u in self.units}
        ud, us = by_name[dense], by_name[sparse]
        feat = next(iter(parts.values()))
        w, h, d = feat.w, self.shape.heads, self.shape.head_dim
        q_kv = _F32 * w * self.shape.qkv_size
        fused = parts.get("attention") or parts.get("tree_attention")
        if fused is not None:  # the fused kernel runs with the cache
            return ud.cost(fused) + self._sync(ud, q_kv, _F32 * w * h * d)
        fd, fs = parts["attention_dense"], parts["attention_sparse"]
        partial = _F32 * w * h * (d + 1)  # a part's output with its log-sum-exp
        merge = self.host.cost(parts["attention_merge"])
        if ud is us:
            return ud.cost(fd) + ud.cost(fs) + merge + self._sync(ud, q_kv, 2 * partial)
        # Only tree-sized values cross (the cache stays with the dense part): the dense unit
        # gets the qkv rows for RoPE and the K/V write and returns its partial, plus the
        # tree's q/k/v when the sparse part runs elsewhere; the sparse unit gets q/k/v and
        # returns its partial (the CSR, 4 * (w + 1 + nnz) bytes, is left out).
        sync = max(self._sync(ud, q_kv, partial + q_kv), self._sync(us, q_kv, partial))
        return self._together([(ud, fd), (us, fs)]) + merge + sync

    def best_attention(self, parts: Mapping[str, Features]
                       ) -> tuple[float, tuple[tuple[str, str], ...]]:
        names = [u.name for u in self.units]
        return min(((self.attention_time(parts, d, s), (("dense", d), ("sparse", s)))
                    for d, s in itertools.product(names, names)), key=lambda x: x[0])

    # ---- one step ---------------------------------------------------------------------------

    def step(self, w: int, cache_len: int, draft: DraftShape | None = None,
             split: Mapping[str, Split] | None = None,
             attention: tuple[tuple[str, str], ...] | None = None,
             nnz: int | None = None, device_len: bool = False,
             fused_linears: bool = False, exact_attention: bool = False) -> WidthChoice:
        """Best (or, with ``split``/``attention`` given, fixed) choices at width ``w``;
        ``nnz``: the tree's ancestor-mask non-zeros (None: an estimate); ``device_len``,
        ``fused_linears``, ``exact_attention``: the build's step
        (:func:`~hetcomp.cost.roofline.model_step`)."""
        ops: list[StepOp] = model_step(self.shape, w, cache_len, nnz, device_len,
                                       fused_linears, exact_attention)
        if w > 1 and draft is not None:
            ops += draft_step(self.shape, draft)
        # The attention kernels are placed and costed together, as one "attention" op.
        attn = {op.name: op.features for op in ops if op.split == "attention"}
        layers = next(op.count for op in ops if op.split == "attention")
        ops = [op for op in ops if op.split != "attention"]
        chosen: dict[str, Split] = dict(split or {})
        placed = attention or self.best_attention(attn)[1]
        pl = dict(placed)
        t = self.attention_time(attn, pl["dense"], pl["sparse"])
        breakdown, total = {"attention": layers * t}, layers * t
        for op in ops:
            if op.split in LINEAR_KINDS:
                rows = op.features.w
                if op.split not in chosen:
                    chosen[op.split] = self.best_split(op.split, rows)[1]
                t = self.linear_time(op.split, rows, chosen[op.split])
            else:
                t = self.host.cost(op.features)
            breakdown[op.name] = breakdown.get(op.name, 0.0) + op.count * t
            total += op.count * t
        return WidthChoice(w, 1.0, total, tuple(sorted(chosen.items())), tuple(placed),
                           tuple(breakdown.items()))


def tau_table(widths: Sequence[int], rank_probs=None, tau: Mapping[int, float] | None = None,
              ranks=None) -> tuple[dict[int, float], dict[int, Tree]]:
    """tau(W) per width and the Medusa trees: with ``rank_probs`` the trees are built (from the
    joint held-out ``ranks`` when given, as the compiler does) and tau is theirs, unless
    ``tau`` gives it (what a decode with the lookup accepts,
    :func:`~hetcomp.speculative.acceptance.replay_acceptance`); ``tau`` alone: no trees."""
    if rank_probs is None and tau is None:
        raise ValueError("give rank_probs or tau")
    if tau is not None:
        missing = [w for w in widths if w not in tau]
        if missing:
            raise ValueError(f"tau is missing widths {missing}")
    trees = ({w: build_tree(np.asarray(rank_probs), w, ranks) for w in widths}
             if rank_probs is not None else {})
    if tau is not None:
        return {w: float(tau[w]) for w in widths}, trees
    return {w: t.expected_accept_length for w, t in trees.items()}, trees


def best_width(taus: Mapping[int, float], step_s: Mapping[int, float]) -> int:
    """The width of ``step_s`` with the most accepted tokens a second, ``tau(W) / T(W)``
    (the narrower of equals): how measured step times choose a width."""
    return max(step_s, key=lambda w: (taus[w] / step_s[w], -w))


# How close to the best measured rate a timed width must be to be timed again.
WIDTH_SLACK = 0.85


def may_beat_best(w: int, taus: Mapping[int, float], step_s: Mapping[int, float],
                  slack: float = WIDTH_SLACK) -> bool:
    """Whether timing width ``w`` again could change :func:`best_width`'s choice among the
    widths ``step_s`` timed so far: a width not timed yet may, a timed one while its tokens
    a second are within ``slack`` of the best's. A shared machine only slows a step down,
    so a width far below the best stays below it; the slack covers a width slowed in its
    first pass. (A bound for widths not timed yet, the slowest narrower step's time, saved
    more but let one busy spell on a narrow width rule out every wider one.)"""
    if w not in step_s:
        return True
    best = max(taus[v] / t for v, t in step_s.items())
    return taus[w] / step_s[w] >= slack * best


def plan(shape: ModelShape, units: Sequence[UnitModel], rank_probs=None,
         tau: Mapping[int, float] | None = None, options: PlannerOptions = PlannerOptions(),
         model: str = "", tau_source: str = "", ranks=None) -> Plan:
    """The plan maximising predicted ``tau(W) / T_step(W)`` over the options' widths.

    Parameters
    ----------
    shape : ModelShape
        The decoder's shapes.
    units : sequence of UnitModel
        Units to use; the first is the host (runs every unsplit op). All measured, or all
        spec estimates.
    rank_probs : array ``[heads, top]``, optional
        Medusa acceptance statistics: trees are built per width and tau read from them.
    tau : mapping, optional
        tau(W) given directly: alone, no tree in the plan; with ``rank_probs``, in place of
        the trees' (:func:`tau_table`). One of the two at least.
    ranks : array ``[rows, heads]``, optional
        The heads' held-out ranks: trees from their joint statistics (as compiled).
    """
    taus, trees = tau_table(options.widths, rank_probs, tau, ranks)
    draft = options.draft_heads
    if draft is None:
        draft = int(np.asarray(rank_probs).shape[0]) if rank_probs is not None else 0
    int8 = bool(options.int8_unit) and [u.name for u in units] == [options.int8_unit]
    sm = _StepModel(shape, units, options.ratio_steps, options.contention, int8)
    cands = []
    for w in options.widths:
        nnz = int(trees[w].mask().sum()) if w in trees else None
        c = sm.step(w, options.cache_len, options.draft(draft), nnz=nnz,
                    device_len=options.device_len, fused_linears=options.fused_linears,
                    exact_attention=options.exact_attention or int8)
        cands.append(dataclasses.replace(c, tau=taus[w]))
    best = max(cands, key=lambda c: (c.tokens_per_s, -c.width))
    notes = ("estimate from datasheet specs (roofline), not measured"
             if sm.source == SPEC_ESTIMATE else "predicted from measured profiles")
    return Plan(model=model, units=tuple(u.name for u in units), host=units[0].name,
                source=sm.source, cache_len=options.cache_len, width=best.width, tau=best.tau,
                step_s=best.step_s, split=best.split, attention=best.attention,
                tree=trees.get(best.width), candidates=tuple(cands), tau_source=tau_source,
                notes=notes, contention=contention_report(sm, best.width),
                shared_memory=all(u.shared_memory for u in units), int8_linears=int8)


def contention_report(sm: _StepModel, w: int, kind: str = "gate_up") -> dict:
    """The co-run slowdown each unit's costs carry, and where it comes from, shown on one
    op: ``kind`` at width ``w`` with its columns shared equally by the units."""
    units = sm.units
    frac = 1.0 / len(units)
    parts = [(u, sm.linear_features(kind, w, frac)) for u in units]
    together = sm.corun_times(parts)
    shared = len(units) > 1 and all(u.shared_memory for u in units)
    out = {}
    for u, feat in parts:
        if len(units) == 1:
            source = "alone (one unit)"
        elif not sm.contention:
            source = "off (planned as if each unit ran alone)"
        elif not shared:
            source = "none: the units do not share memory"
        elif u.source == SPEC_ESTIMATE:
            source = (f"shared bandwidth: {max(x.mem_bw_gbs for x in units):g} GB/s of the "
                      "board (spec)")
        else:
            source = "measured co-run profile" + (
                " + shared-bandwidth bound" if u.mem_bw_gbs > 0 else "")
        out[u.name] = {"slowdown": together[u.name] / u.cost(feat), "source": source}
    return {"enabled": sm.contention, "op": f"{kind}, W={w}, columns split equally",
            "units": out}


def plan_unit_sets(shape: ModelShape, units: Sequence[UnitModel], rank_probs=None,
                   tau: Mapping[int, float] | None = None,
                   options: PlannerOptions = PlannerOptions(), model: str = "",
                   tau_source: str = "", any_host: bool = False, ranks=None) -> list[Plan]:
    """One plan per unit subset that contains the host (``units[0]``), best first.

    ``any_host``: every unit may be the host (run the unsplit ops), e.g. a GPU that runs the
    whole model with the CPU taking a share, or alone.
    """
    hosts = units if any_host else units[:1]
    plans = []
    for host in hosts:
        rest = [u for u in units if u is not host]
        plans += [plan(shape, [host, *sub], rank_probs, tau, options, model, tau_source, ranks)
                  for r in range(len(rest) + 1) for sub in itertools.combinations(rest, r)]
    return sorted(plans, key=lambda p: -p.tokens_per_s)


def predict_step_time(plan_or_units: Plan | Sequence[UnitModel], w: int, cache_len: int, *,
                      shape: ModelShape, units: Sequence[UnitModel] | None = None,
                      draft: DraftShape | None = None, ratio_steps: int = 32,
                      split: Mapping[str, Split] | None = None,
                      attention: tuple[tuple[str, str], ...] | None = None,
                      nnz: int | None = None, device_len: bool = False,
                      fused_linears: bool = False) -> float:
    """Predicted seconds of one ``verify`` call of ``w`` tree nodes after ``cache_len`` tokens.

    With a :class:`Plan`, its decisions at width ``w`` (or its chosen ones, if ``w`` is not a
    candidate) are costed with ``units`` (the plan's units, in order; a plan costed on int8
    activations, :attr:`Plan.int8_linears`, is again). With a sequence of
    units, the best split and placement for ``w`` are found first. ``draft`` adds the Medusa
    draft call (at ``w > 1``). With a sequence of units, ``split`` (per linear kind) and
    ``attention`` fix those decisions instead (a partition compiled by hand). ``nnz``: the
    tree's ancestor-mask non-zeros (None: the plan's tree at its width, else an estimate).
    ``device_len``: a whole-model build for CUDA graphs (its one attention kernel);
    ``fused_linears``: its norms and activations inside the linears.
    """
    if isinstance(plan_or_units, Plan):
        p = plan_or_units
        if units is None:
            raise ValueError("costing a Plan needs its units' cost models (units=...)")
        names = tuple(u.name for u in units)
        if names != p.units:
            raise ValueError(f"plan units {p.units} != given units {names}")
        try:
            c = p.choice(w)
            split, attention = dict(c.split), c.attention
        except KeyError:
            split, attention = dict(p.split), p.attention
        if nnz is None and p.tree is not None and p.tree.width == w:
            nnz = int(p.tree.mask().sum())
        return _StepModel(shape, units, ratio_steps, int8_linears=p.int8_linears).step(
            w, cache_len, draft, split, attention, nnz, device_len, fused_linears,
            exact_attention=p.int8_linears).step_s
    return _StepModel(shape, list(plan_or_units), ratio_steps).step(
        w, cache_len, draft, split, attention, nnz, device_len, fused_linears).step_s


def plot_plans(plans: Sequence[Plan], path: str, title: str = "") -> None:
    """PNG: predicted tokens/s against W, one line per plan (unit set), chosen W marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, p in enumerate(plans):
        ws = [c.width for c in p.candidates]
        label = f"{'+'.join(p.units)} ({p.source}): W={p.width}, {p.tokens_per_s:.1f} tok/s"
        ax.plot(ws, [c.tokens_per_s for c in p.candidates], marker="o", color=f"C{i}",
                label=label)
        ax.plot([p.width], [p.tokens_per_s], marker="*", markersize=14, color=f"C{i}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tree width W")
    ax.set_ylabel("predicted tokens/s  (tau(W) / T_step)")
    ax.set_title(title or f"ARCA plan: {plans[0].model if plans else ''}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata=PLOT_METADATA)
    plt.close(fig)
