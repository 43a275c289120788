"""Coordinate-wise trimmed mean (Yin et al., 2018).

For every coordinate, drop the ``k = floor(beta * n)`` largest and ``k`` smallest
values and average the rest. It tolerates up to ``k`` arbitrary rows per side.
"""

from __future__ import annotations

import math

import numpy as np

from .base import AggregationRule, check_fraction

__all__ = ["TrimmedMeanRule", "trimmed_mean"]


def num_trimmed(beta: float, n: int) -> int:
    """Rows dropped from *each* side for ``n`` clients: ``floor(beta * n)``."""
    return math.floor(beta * n + 1e-9)


def trimmed_mean(updates: np.ndarray, weights: np.ndarray, beta: float) -> np.ndarray:
    """Return the coordinate-wise ``beta``-trimmed (weighted) mean, float64.

    Parameters
    ----------
    updates : np.ndarray
        Shape ``(n, d)``.
    weights : np.ndarray
        Shape ``(n,)``. The values kept in each coordinate are averaged with the
        weights of the rows they came from; trimming itself is by count.
    beta : float
        Fraction trimmed from each side, in ``[0, 0.5)``.
    """
    rule = TrimmedMeanRule(beta)
    return rule.aggregate(updates, weights)


class TrimmedMeanRule(AggregationRule):
    """Coordinate-wise trimmed mean.

    Parameters
    ----------
    beta : float (default: 0.2)
        Fraction of clients trimmed from *each* end of every coordinate,
        in ``[0, 0.5)``. Tolerates ``floor(beta * n)`` Byzantine clients.
    """

    name = "trimmed-mean"

    def __init__(self, beta: float = 0.2) -> None:
        self.beta = check_fraction("beta", beta, 0.0, 0.5)

    def _params(self) -> dict[str, object]:
        return {"beta": self.beta}

    def min_clients(self) -> int:
        """Smallest ``n`` that keeps at least one value after trimming."""
        n = 1
        while n - 2 * num_trimmed(self.beta, n) < 1:
            n += 1
        return n

    def _aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return self._trimmed(updates, weights, overwrite=False)

    def _aggregate_overwriting(
        self, updates: np.ndarray, weights: np.ndarray
    ) -> np.ndarray:
        return self._trimmed(updates, weights, overwrite=True)

    def _trimmed(
        self, updates: np.ndarray, weights: np.ndarray, overwrite: bool
    ) -> np.ndarray:
        n = updates.shape[0]
        k = num_trimmed(self.beta, n)
        if np.all(weights == weights[0]):
            if k and overwrite:
                updates.sort(axis=0)  # the caller's scratch buffer: no copy
                ordered = updates
            else:
                ordered = np.sort(updates, axis=0) if k else updates
            return ordered[k : n - k].mean(axis=0, dtype=np.float64)
        order = np.argsort(updates, axis=0)[k : n - k]
        kept = np.take_along_axis(updates, order, axis=0)
        kept_w = weights[order]
        total = kept_w.sum(axis=0)
        value = np.einsum("ij,ij->j", kept_w, kept.astype(np.float64)) / np.where(
            total > 0, total, 1.0
        )
        unweighted = total == 0  # every kept row weighs 0: plain mean of the kept
        if unweighted.any():
            value[unweighted] = kept[:, unweighted].mean(axis=0, dtype=np.float64)
        return value
