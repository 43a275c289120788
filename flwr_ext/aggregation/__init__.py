"""Aggregation rules: pure numpy over an ``(n_clients, n_params)`` update matrix.

Every rule follows :class:`AggregationRule`:
``rule.aggregate(updates (n, d), weights (n,)) -> (d,)``; none modifies its inputs.
Flower-facing wrappers live in :mod:`flwr_ext.strategy`.
"""

from .arc import AdaptiveRobustClipping, adaptive_robust_clipping
from .base import AggregationResult, AggregationRule, PreAggregation, check_updates
from .bucketing import Bucketing, bucketing
from .centered_clipping import CenteredClippingRule, centered_clipping
from .distances import pairwise_squared_distances
from .geometric_median import GeometricMedianRule, geometric_median
from .krum import KrumRule, krum_scores
from .mean import WeightedMean, weighted_mean
from .median import CoordinateMedian, coordinate_median
from .nnm import NearestNeighborMixing, nearest_neighbor_mixing
from .norm_equalization import MedianNormEqualization, median_norm_equalization
from .pipeline import PreAggregationChain
from .trimmed_mean import TrimmedMeanRule, trimmed_mean

__all__ = [
    "AdaptiveRobustClipping",
    "AggregationResult",
    "AggregationRule",
    "Bucketing",
    "CenteredClippingRule",
    "CoordinateMedian",
    "GeometricMedianRule",
    "KrumRule",
    "MedianNormEqualization",
    "NearestNeighborMixing",
    "PreAggregation",
    "PreAggregationChain",
    "TrimmedMeanRule",
    "WeightedMean",
    "adaptive_robust_clipping",
    "bucketing",
    "centered_clipping",
    "check_updates",
    "coordinate_median",
    "geometric_median",
    "krum_scores",
    "median_norm_equalization",
    "nearest_neighbor_mixing",
    "pairwise_squared_distances",
    "trimmed_mean",
    "weighted_mean",
]
