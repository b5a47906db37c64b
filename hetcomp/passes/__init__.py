"""Relax passes, one per file; ``pipeline.lowering_pipeline`` composes them with TVM's."""

from .annotate_cost import AnnotateCost
from .fuse_linear_chains import FuseLinearChains
from .order_for_overlap import OrderForOverlap
from .partition_hetero import PartitionHetero
from .pipeline import hetcomp_pipeline, lowering_pipeline
from .schedule_units import ScheduleUnits

__all__ = ["AnnotateCost", "FuseLinearChains", "PartitionHetero", "OrderForOverlap",
           "ScheduleUnits", "hetcomp_pipeline", "lowering_pipeline"]
