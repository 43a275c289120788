"""What the rule-aware attacks are given: the server's rule as ``(n, d) -> (d,)``.

The line-searched ALIE and IPM (:mod:`flwr_ext.attacks.adaptive`) probe the rule
the server actually runs. For flwr-ext's strategies that is the wrapper's own
pre-aggregation and rule, with the state a stateful rule holds at that moment
(read, never changed); for Flower's built-ins, the equivalent rule of
:mod:`flwr_ext.aggregation` (Bulyan: Multi-Krum selecting ``n - 2f`` then a
trimmed mean of ``f`` per side, its two stages); for ByzFL peers, their own
callable. Every row weighs the same (the attackers claim honest sizes).
"""

from __future__ import annotations

import numpy as np
from flwr.serverapp.strategy import (
    Bulyan,
    FedMedian,
    FedTrimmedAvg,
    Strategy,
)
from flwr.serverapp.strategy import Krum as FlowerKrum
from flwr.serverapp.strategy import MultiKrum as FlowerMultiKrum

from flwr_ext.aggregation import (
    CoordinateMedian,
    KrumRule,
    TrimmedMeanRule,
    WeightedMean,
)
from flwr_ext.attacks.adaptive import Aggregator
from flwr_ext.strategy import RobustAggregation

__all__ = ["target_aggregator"]


def _uniform(rows: np.ndarray) -> np.ndarray:
    return np.ones(rows.shape[0])


def target_aggregator(strategy: Strategy) -> Aggregator:
    """Return the rule ``strategy`` applies to a round's update matrix."""
    peer = getattr(strategy, "attack_target", None)
    if callable(peer):  # ByzFL rows (benchmarks/_byzfl.py)
        return peer
    if isinstance(strategy, RobustAggregation):
        return _ours(strategy)
    if isinstance(strategy, FedMedian):
        return lambda x: CoordinateMedian().aggregate(x, _uniform(x))
    if isinstance(strategy, FedTrimmedAvg):
        beta = float(strategy.beta)
        return lambda x: TrimmedMeanRule(beta).aggregate(x, _uniform(x))
    if isinstance(strategy, Bulyan):
        f = int(strategy.num_malicious_nodes)

        def bulyan(x: np.ndarray) -> np.ndarray:
            n = x.shape[0]
            chosen = KrumRule(f, num_selected=max(n - 2 * f, 1)).aggregate_detailed(
                x, _uniform(x)
            )
            kept = x[chosen.selected]
            beta = min(f / kept.shape[0], 0.49)
            return TrimmedMeanRule(beta).aggregate(kept, _uniform(kept))

        return bulyan
    if isinstance(strategy, FlowerKrum):  # a MultiKrum subclass: first
        f = int(strategy.num_malicious_nodes)
        return lambda x: KrumRule(f, num_selected=1).aggregate(x, _uniform(x))
    if isinstance(strategy, FlowerMultiKrum):
        f, m = int(strategy.num_malicious_nodes), strategy.num_nodes_to_select
        return lambda x: KrumRule(f, num_selected=m or None).aggregate(x, _uniform(x))
    return lambda x: WeightedMean().aggregate(x, _uniform(x))  # FedAvg, FedAdam


def _ours(strategy: RobustAggregation) -> Aggregator:
    def aggregate(x: np.ndarray) -> np.ndarray:
        rows = x.astype(np.float32)  # the wrapper's matrix for a float32 model
        weights = _uniform(rows)
        if strategy.pre_aggregation is not None:
            rows = strategy.pre_aggregation.transform(rows, weights)
        result, _ = strategy.rule.aggregate_stateful(rows, weights, strategy.rule_state)
        return result.value

    return aggregate
