"""What the rule-aware attacks are given: the server's rule as ``(n, d) -> (d,)``.

The line-searched ALIE and IPM (:mod:`flwr_ext.attacks.adaptive`) probe the rule
the server actually runs. For flwr-ext's strategies that is the wrapper's own
pre-aggregation and rule, with the state a stateful rule holds at that moment
(read, never changed); for Flower's built-ins, the equivalent rule of
:mod:`flwr_ext.aggregation` (Bulyan: Multi-Krum selecting ``n - 2f`` then a
trimmed mean of ``f`` per side, its two stages); for ByzFL peers, their own
callable. Every row weighs the same (the attackers claim honest sizes).

When the server feeds that aggregate to an optimizer of its own (the inner
strategy is Flower's FedAvgM with a learning rate or momentum, or FedAdam,
FedYogi, FedAdagrad), :func:`target_server_step` gives the attacker that
optimizer too, with the state it holds this round (read, never changed), and
the line search compares candidates by the model step they cause
(:func:`flwr_ext.attacks.adaptive.line_search`).
"""

from __future__ import annotations

import numpy as np
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
    Strategy,
)
from flwr.serverapp.strategy import Krum as FlowerKrum
from flwr.serverapp.strategy import MultiKrum as FlowerMultiKrum
from flwr.serverapp.strategy.fedopt import FedOpt

from flwr_ext.aggregation import (
    CoordinateMedian,
    KrumRule,
    TrimmedMeanRule,
    WeightedMean,
)
from flwr_ext.attacks.adaptive import Aggregator, ServerStep
from flwr_ext.strategy import RobustAggregation

__all__ = ["target_aggregator", "target_server_step"]


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


def target_server_step(strategy: Strategy) -> ServerStep | None:
    """Return the model step the server's optimizer takes on an aggregate update.

    The optimizer is ``strategy`` itself (Flower's FedAdam ...) or the inner
    strategy of a flwr-ext wrapper. The returned function maps the aggregate
    update ``a`` (``(d,)``, model minus global model, float64) to the model step
    the server would take this round, reading the optimizer's state at call
    time (it changes every round) without changing it:

    - FedAvgM: ``lr * (a - momentum * m_prev)`` (``lr * a`` in the first round
      or without momentum), an affine map, so the line search picks what it
      picks on the aggregate;
    - FedAdam / FedYogi / FedAdagrad: ``eta * m / (sqrt(v) + tau)`` with
      ``m = beta_1 m_prev + (1 - beta_1) a`` and ``v`` updated by each one's
      rule (FedAdam's bias-corrected learning rate is a positive factor of the
      round, which changes no comparison, so ``eta`` stands for it).

    The flat vector follows the order of the optimizer's global-model keys,
    the order the model's records are written in. Returns None for a server
    without an optimizer of its own (FedAvg, and the rules alone).
    """
    inner = strategy.strategy if isinstance(strategy, RobustAggregation) else strategy
    if isinstance(inner, FedOpt):
        return lambda a: _fedopt_step(inner, np.asarray(a, dtype=np.float64))
    if isinstance(inner, FedAvgM) and inner.server_opt:
        return lambda a: _fedavgm_step(inner, np.asarray(a, dtype=np.float64))
    return None


def _flat(arrays: object, size: int) -> np.ndarray:
    """Concatenate a list or dict of arrays (the optimizer's state) to ``(size,)``."""
    values = arrays.values() if isinstance(arrays, dict) else arrays
    flat = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in values])
    if flat.shape != (size,):
        raise ValueError(f"optimizer state has {flat.size} values, the update {size}")
    return flat


def _fedavgm_step(inner: FedAvgM, a: np.ndarray) -> np.ndarray:
    lr = float(inner.server_learning_rate)
    if inner.server_momentum == 0.0 or inner.momentum_vector is None:
        return lr * a
    previous = _flat(inner.momentum_vector, a.size)
    return lr * (a - float(inner.server_momentum) * previous)


def _fedopt_step(inner: FedOpt, a: np.ndarray) -> np.ndarray:
    zeros = np.zeros_like(a)
    m_prev = _flat(inner.m_t, a.size) if inner.m_t else zeros
    v_prev = _flat(inner.v_t, a.size) if inner.v_t else zeros
    m = inner.beta_1 * m_prev + (1.0 - inner.beta_1) * a
    if isinstance(inner, FedYogi):
        v = v_prev - (1.0 - inner.beta_2) * a**2 * np.sign(v_prev - a**2)
    elif isinstance(inner, FedAdagrad):
        v = v_prev + a**2
    elif isinstance(inner, FedAdam):
        v = inner.beta_2 * v_prev + (1.0 - inner.beta_2) * a**2
    else:  # a FedOpt this benchmark does not know: no model of its step
        raise ValueError(f"no server-step model for {type(inner).__name__}")
    return inner.eta * m / (np.sqrt(v) + inner.tau)
