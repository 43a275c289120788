"""Weighted mean: FedAvg's rule, the baseline every robust rule is measured against."""

from __future__ import annotations

import numpy as np

from .base import AggregationRule, check_updates

__all__ = ["WeightedMean", "weighted_mean"]


def weighted_mean(updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Return ``sum_i w_i x_i / sum_i w_i`` in float64, shape ``(n_params,)``.

    Not robust: one row can move it arbitrarily far.
    """
    updates, weights = check_updates(updates, weights)
    return _weighted_mean(updates, weights)


def _weighted_mean(updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean of validated rows with weights that sum to 1 (float64 accumulation)."""
    if np.all(weights == weights[0]):
        return updates.mean(axis=0, dtype=np.float64)
    out = np.zeros(updates.shape[1])
    for row, w in zip(updates, weights, strict=True):
        if w:
            out += w * row  # row-at-a-time: float64 result without a full copy
    return out


class WeightedMean(AggregationRule):
    """FedAvg's weighted mean (breakdown point 0)."""

    name = "mean"

    def _aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return _weighted_mean(updates, weights)
