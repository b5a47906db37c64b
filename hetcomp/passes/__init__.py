"""Relax passes, one per file; ``pipeline.hetcomp_pipeline`` composes them."""

from .annotate_cost import AnnotateCost
from .order_for_overlap import OrderForOverlap
from .partition_hetero import PartitionHetero
from .pipeline import hetcomp_pipeline

__all__ = ["AnnotateCost", "PartitionHetero", "OrderForOverlap", "hetcomp_pipeline"]
