"""Flower strategy wrappers: robust aggregation (and, as they land, DP and HE).

All wrappers take a Flower strategy as their first argument and compose with
FedAvg, FedProx, FedAdam and friends; unsound compositions fail at construction
(:mod:`flwr_ext.strategy.composition`).
"""

from .composition import Role, check_composition
from .distributed_dp import DistributedDP
from .dp_fedavg import DPFedAvg
from .homomorphic import HomomorphicAggregation
from .robust import RobustAggregation
from .robust_strategies import (
    ROBUST_STRATEGIES,
    CenteredClipping,
    GeometricMedian,
    Krum,
    Median,
    MultiKrum,
    TrimmedMean,
)
from .round_report import ConfigurationError, NoModelError, RoundFailedError
from .threshold_homomorphic import ThresholdHomomorphicAggregation

__all__ = [
    "ROBUST_STRATEGIES",
    "CenteredClipping",
    "ConfigurationError",
    "DPFedAvg",
    "DistributedDP",
    "GeometricMedian",
    "HomomorphicAggregation",
    "Krum",
    "Median",
    "MultiKrum",
    "NoModelError",
    "RobustAggregation",
    "Role",
    "RoundFailedError",
    "ThresholdHomomorphicAggregation",
    "TrimmedMean",
    "check_composition",
]
