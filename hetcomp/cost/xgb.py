"""XGBoost cost models: per unit and op class, fitted on profiled measurements.

Each model predicts ``log(t / t_roofline)``, the measured time's ratio to the roofline of the
unit's *achieved* ceilings (the best flop rate and byte rate seen in its profile). Trees are
piecewise constant, so learning the correction factor rather than the time lets predictions
follow the roofline's scaling outside the measured grid (another cache length, a split ratio
between grid points). Features: :data:`~hetcomp.cost.roofline.FEATURE_NAMES` (flops, bytes,
W, N, K, r, co-run flag, cache length).

A fitted :class:`UnitCostModel` is a pure function ``Features -> seconds`` (deterministic,
no TVM), serialisable to JSON (boosters embedded as XGBoost JSON, or UBJ in base64).
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Sequence

import numpy as np

from ..hardware import MEASURED, DeviceSpec
from .roofline import FEATURE_NAMES, Features, RooflineCost

FORMAT = "hetcomp-cost/1"
DEFAULT_PARAMS = {"objective": "reg:squarederror", "max_depth": 5, "eta": 0.1,
                  "min_child_weight": 1.0, "lambda": 1.0, "nthread": 1, "seed": 0}
DEFAULT_ROUNDS = 300


def mape(pred, true) -> float:
    """Mean absolute percentage error, in percent."""
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    return float(100.0 * np.mean(np.abs(pred - true) / true))


@dataclasses.dataclass(frozen=True)
class FitReport:
    """How well one op class's model fits, in percent MAPE.

    ``holdout_mape`` is k-fold cross-validated: every sample is predicted by a model that
    did not see it (None below 5 samples). ``holdout_mape_alone`` restricts it to samples
    measured alone (co-run timings are noisier).
    """

    unit: str
    op: str
    samples: int
    folds: int
    holdout_mape: float | None
    holdout_mape_alone: float | None
    train_mape: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class OpCostModel:
    """One unit's model for one op class: ``predict(features) -> seconds``."""

    def __init__(self, op: str, booster, baseline: DeviceSpec, report: FitReport):
        self.op, self.booster, self.baseline, self.report = op, booster, baseline, report
        self._roof = RooflineCost(baseline)
        self._cache: dict[Features, float] = {}

    def predict_many(self, feats: Sequence[Features]) -> np.ndarray:
        x = np.array([f.vector() for f in feats], dtype=np.float64)
        roof = np.array([self._roof(f) for f in feats])
        return roof * np.exp(self.booster.inplace_predict(x))

    def predict(self, feat: Features) -> float:
        """Seconds for one call of the kernel ``feat`` describes."""
        t = self._cache.get(feat)
        if t is None:
            t = self._cache[feat] = float(self.predict_many([feat])[0])
        return t

    __call__ = predict

    def to_json(self, raw_format: str = "json") -> dict:
        raw = bytes(self.booster.save_raw(raw_format))
        body = json.loads(raw) if raw_format == "json" else base64.b64encode(raw).decode()
        return {"op": self.op, "features": list(FEATURE_NAMES), "baseline": self.baseline.to_json(),
                "report": self.report.to_json(), "raw_format": raw_format, "booster": body}

    @classmethod
    def from_json(cls, d: dict) -> OpCostModel:
        import xgboost as xgb

        if d.get("raw_format", "json") == "json":
            raw = bytearray(json.dumps(d["booster"]).encode())
        else:
            raw = bytearray(base64.b64decode(d["booster"]))
        booster = xgb.Booster()
        booster.load_model(raw)
        return cls(d["op"], booster, DeviceSpec(**d["baseline"]), FitReport(**d["report"]))


#: The op class an unmeasured one is costed as: the int8-dot linear of a one-unit CPU build
#: (``hetcomp.profile.measure.LINEAR_OPS``) is the plain linear kernel where a unit has none.
FALLBACK_OPS = {"linear_int8": "linear"}


class UnitCostModel:
    """The cost function of one unit: per-op-class XGBoost models, roofline fallback.

    ``source`` is ``"measured"`` for models fitted on profiles; calling it with the features
    of an op class that was not measured falls back to the class it specialises
    (:data:`FALLBACK_OPS`: ``linear_int8`` on a unit that has no int8 kernels runs the
    ``linear`` one), then to the roofline of ``baseline``.
    """

    def __init__(self, unit: str, baseline: DeviceSpec, models: dict[str, OpCostModel],
                 source: str = MEASURED):
        self.unit, self.baseline, self.models, self.source = unit, baseline, models, source
        self._roof = RooflineCost(baseline)

    def __call__(self, feat: Features) -> float:
        model = self.models.get(feat.op) or self.models.get(FALLBACK_OPS.get(feat.op, ""))
        return model(feat) if model is not None else self._roof(feat)

    predict = __call__

    @property
    def reports(self) -> list[FitReport]:
        return [m.report for m in self.models.values()]

    def to_json(self, raw_format: str = "json") -> dict:
        return {"format": FORMAT, "unit": self.unit, "source": self.source,
                "baseline": self.baseline.to_json(),
                "models": {op: m.to_json(raw_format) for op, m in self.models.items()}}

    @classmethod
    def from_json(cls, d: dict) -> UnitCostModel:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a hetcomp cost model (format {d.get('format')!r})")
        models = {op: OpCostModel.from_json(m) for op, m in d["models"].items()}
        return cls(d["unit"], DeviceSpec(**d["baseline"]), models, d["source"])

    def save(self, path: str, raw_format: str = "json") -> None:
        with open(path, "w") as fh:
            json.dump(self.to_json(raw_format), fh)

    @classmethod
    def load(cls, path: str) -> UnitCostModel:
        with open(path) as fh:
            return cls.from_json(json.load(fh))


def achieved_ceilings(unit: str, rows, kind: str = "cpu") -> DeviceSpec:
    """A :class:`DeviceSpec` from a profile's best achieved flop and byte rates (alone).

    ``launch_s`` is half the fastest call (a conservative fixed cost). Labelled in ``notes``:
    these are measured ceilings, not datasheet figures.
    """
    alone = [m for m in rows if not m.features.corun and m.seconds > 0]
    if not alone:
        raise ValueError(f"no measurements of unit {unit!r}")
    gflops = max(m.features.flops / m.seconds for m in alone) / 1e9
    gbs = max(m.features.bytes / m.seconds for m in alone) / 1e9
    launch = 0.5 * min(m.seconds for m in alone)
    return DeviceSpec(name=unit, kind=kind, peak_gflops=max(gflops, 1e-3),
                      mem_bw_gbs=max(gbs, 1e-3), launch_s=launch,
                      notes="achieved ceilings of the measured profile")


def fit_op(unit: str, op: str, rows, baseline: DeviceSpec, folds: int = 5, seed: int = 0,
           rounds: int = DEFAULT_ROUNDS, params: dict | None = None) -> OpCostModel:
    """Fit one op class: cross-validated held-out MAPE, then the model on every sample.

    Parameters
    ----------
    rows : sequence of Measurement
        The op class's measurements (features and seconds).
    folds : int
        Folds of the held-out estimate (at most one per sample; none below 5 samples).
    """
    import xgboost as xgb

    feats = [m.features for m in rows]
    t = np.array([m.seconds for m in rows])
    roof = np.array([RooflineCost(baseline)(f) for f in feats])
    x = np.array([f.vector() for f in feats], dtype=np.float64)
    y = np.log(t / roof)
    alone = np.array([not f.corun for f in feats])
    prm = {**DEFAULT_PARAMS, **(params or {}), "seed": seed}

    def train(idx):
        dm = xgb.DMatrix(x[idx], label=y[idx], feature_names=list(FEATURE_NAMES))
        return xgb.train(prm, dm, num_boost_round=rounds)

    n = len(rows)
    k = min(folds, n) if n >= 5 else 0
    held = held_alone = None
    if k:
        pred = np.empty(n)
        fold_of = np.random.default_rng(seed).permutation(n) % k
        for f in range(k):
            test = fold_of == f
            pred[test] = roof[test] * np.exp(train(~test).inplace_predict(x[test]))
        held = mape(pred, t)
        held_alone = mape(pred[alone], t[alone]) if alone.any() else None
    booster = train(np.arange(n))
    report = FitReport(unit, op, n, k, held, held_alone,
                       mape(roof * np.exp(booster.inplace_predict(x)), t))
    return OpCostModel(op, booster, baseline, report)


def fit_unit(unit: str, rows, folds: int = 5, seed: int = 0,
             rounds: int = DEFAULT_ROUNDS) -> UnitCostModel:
    """Fit one model per op class found in a unit's measurements."""
    rows = [m for m in rows if m.unit == unit]
    baseline = achieved_ceilings(unit, rows)
    by_op: dict[str, list] = {}
    for m in rows:
        by_op.setdefault(m.features.op, []).append(m)
    models = {op: fit_op(unit, op, ms, baseline, folds, seed, rounds)
              for op, ms in sorted(by_op.items())}
    return UnitCostModel(unit, baseline, models, MEASURED)
