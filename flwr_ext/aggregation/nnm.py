"""Nearest-neighbour mixing (NNM; Allouah et al., AISTATS 2023).

A pre-aggregation step: every row is replaced by the mean of its ``n - f`` nearest
rows (itself included). Put in front of a robust rule it reduces the variance the
Byzantine rows can hide in, which is what makes coordinate-wise rules and the
geometric median hold up on non-IID data (Allouah et al. prove the composed rule
reaches the optimal robustness coefficient order).
"""

from __future__ import annotations

import numpy as np

from .base import PreAggregation, check_int, check_updates
from .distances import pairwise_squared_distances

__all__ = ["NearestNeighborMixing", "nearest_neighbor_mixing"]


def nearest_neighbor_mixing(updates: np.ndarray, num_byzantine: int) -> np.ndarray:
    """Return a new ``(n, d)`` matrix of mixed rows.

    Parameters
    ----------
    updates : np.ndarray
        Shape ``(n, d)``, finite, ``n > num_byzantine``. Not modified.
    num_byzantine : int
        ``f``; each row is averaged with its ``n - f`` nearest rows.

    Returns
    -------
    np.ndarray
        The mixed rows, in the input's float dtype (float64 for integer input),
        computed by one matrix product ``mixing @ updates``. For float32 updates
        each mean of ``k = n - f`` rows is accumulated in float32: a relative
        error of order ``k * 2**-24``, far below the spread of client updates,
        and it keeps the rule that follows on its fast float32 path (a float32
        sort is several times faster than a float64 one). One product rather
        than many small ones: with tiny inner dimensions a multithreaded BLAS
        pays a thread hand-off per call, which on a busy machine costs
        milliseconds each.
    """
    updates = np.asarray(updates)
    n = updates.shape[0]
    k = n - num_byzantine
    if k < 1:
        raise ValueError(f"NNM needs n > f (n={n}, f={num_byzantine})")
    dist = pairwise_squared_distances(updates)
    # Ties broken by index so the result does not depend on partition internals.
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    dtype = updates.dtype if updates.dtype.kind == "f" else np.dtype(np.float64)
    mixing = np.zeros((n, n), dtype=dtype)
    np.put_along_axis(mixing, order, 1.0 / k, axis=1)
    return mixing @ updates.astype(dtype, copy=False)


class NearestNeighborMixing(PreAggregation):
    """NNM pre-aggregation.

    Parameters
    ----------
    num_byzantine : int
        ``f``, the number of Byzantine clients to tolerate (>= 0).
    """

    name = "nnm"

    def __init__(self, num_byzantine: int) -> None:
        self.num_byzantine = check_int("num_byzantine", num_byzantine, 0)

    def _params(self) -> dict[str, object]:
        return {"num_byzantine": self.num_byzantine}

    def excluding_faulty(self, num_excluded: int) -> NearestNeighborMixing:
        """NNM tolerating ``f - num_excluded`` (never below 0) Byzantine rows."""
        if num_excluded <= 0 or self.num_byzantine == 0:
            return self
        return NearestNeighborMixing(max(0, self.num_byzantine - num_excluded))

    def min_clients(self) -> int:
        """``f + 1``."""
        return self.num_byzantine + 1

    def transform(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Mix rows with their nearest neighbours (weights are not used)."""
        updates, _ = check_updates(updates, weights, self.min_clients())
        return nearest_neighbor_mixing(updates, self.num_byzantine)
