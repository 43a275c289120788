"""Flower strategy wrappers: robust aggregation, differential privacy, CKKS.

All wrappers take a Flower strategy as their first argument and compose with
FedAvg, FedProx, FedAdam and friends; unsound compositions fail at construction
(:mod:`flwr_ext.strategy.composition`).

- :mod:`.robust` and :mod:`.robust_strategies` - :class:`RobustAggregation` and the
  named rules (:data:`ROBUST_STRATEGIES`: Krum, Multi-Krum, trimmed mean, median,
  geometric median, centered clipping).
- :mod:`.dp_fedavg` - :class:`DPFedAvg`, central user-level DP.
- :mod:`.distributed_dp` - :class:`DistributedDP`, clients add the noise (with CKKS).
- :mod:`.homomorphic` - :class:`HomomorphicAggregation`, the server adds ciphertexts.
- :mod:`.threshold_homomorphic` - :class:`ThresholdHomomorphicAggregation`, the
  same under a multiparty key (every site holds a share).
- :mod:`.composition` - :class:`Role` and :func:`check_composition`.
- :mod:`.round_report` - a round or run that trains nothing fails loudly
  (:class:`ConfigurationError`, :class:`NoModelError`).

Names are resolved on first use (PEP 562), so ``from flwr_ext.strategy import
TrimmedMean`` imports neither torch, Opacus nor TenSEAL; ``DPFedAvg`` and
``DistributedDP`` import Opacus's accountants when first used.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
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

_EXPORTS = {
    "ROBUST_STRATEGIES": "robust_strategies",
    "CenteredClipping": "robust_strategies",
    "ConfigurationError": "round_report",
    "DPFedAvg": "dp_fedavg",
    "DistributedDP": "distributed_dp",
    "GeometricMedian": "robust_strategies",
    "HomomorphicAggregation": "homomorphic",
    "Krum": "robust_strategies",
    "Median": "robust_strategies",
    "MultiKrum": "robust_strategies",
    "NoModelError": "round_report",
    "RobustAggregation": "robust",
    "Role": "composition",
    "RoundFailedError": "round_report",
    "ThresholdHomomorphicAggregation": "threshold_homomorphic",
    "TrimmedMean": "robust_strategies",
    "check_composition": "composition",
}
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
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
