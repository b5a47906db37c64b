"""ARCA cost models: pure functions from kernel :class:`Features` to seconds.

:mod:`.roofline` is analytic (static flops/bytes, datasheet or measured ceilings);
:mod:`.xgb` fits per-unit, per-op-class XGBoost regressors on profiled measurements. Neither
imports TVM.
"""

from .roofline import (
                       FEATURE_NAMES,
                       LINEAR_KINDS,
                       OP_CLASSES,
                       Features,
                       ModelShape,
                       RooflineCost,
                       StepOp,
                       layer_attention,
                       model_step,
)

__all__ = ["FEATURE_NAMES", "LINEAR_KINDS", "OP_CLASSES", "Features", "ModelShape",
           "RooflineCost", "StepOp", "layer_attention", "model_step"]
