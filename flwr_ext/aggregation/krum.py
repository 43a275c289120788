"""Krum and Multi-Krum (Blanchard et al., 2017; El Mhamdi et al., 2018).

Each client is scored by the sum of squared distances to its ``n - f - 2`` nearest
other clients; Krum returns the lowest-scoring update, Multi-Krum the (weighted)
mean of the ``m`` lowest-scoring ones. The guarantee needs ``n > 2f + 2``.
Distances come from :func:`~flwr_ext.aggregation.distances.pairwise_squared_distances`
(median-centred float64 Gram matrix), which stays exact for near-identical models.
"""

from __future__ import annotations

import numpy as np

from .base import AggregationResult, AggregationRule, check_int, check_updates
from .distances import combine, pairwise_squared_distances

__all__ = ["KrumRule", "krum_scores"]


def krum_scores(updates: np.ndarray, num_byzantine: int) -> np.ndarray:
    """Krum score of every row: sum of squared distances to its ``n-f-2`` nearest.

    Parameters
    ----------
    updates : np.ndarray
        Shape ``(n, d)`` with ``n > 2 * num_byzantine + 2``.
    num_byzantine : int
        ``f``, the number of Byzantine rows tolerated.

    Returns
    -------
    np.ndarray
        Shape ``(n,)``, float64; lower is more central.
    """
    n = updates.shape[0]
    num_neighbours = n - num_byzantine - 2
    if num_neighbours < 1:
        raise ValueError(
            f"Krum needs n > 2f + 2 (n={n}, f={num_byzantine}): too few clients"
        )
    dist = pairwise_squared_distances(updates)
    np.fill_diagonal(dist, np.inf)  # a row is not its own neighbour
    nearest = np.partition(dist, num_neighbours - 1, axis=1)[:, :num_neighbours]
    return nearest.sum(axis=1)


class KrumRule(AggregationRule):
    """Krum (``num_selected=1``) or Multi-Krum (``num_selected > 1``).

    Parameters
    ----------
    num_byzantine : int
        ``f``, the number of Byzantine clients to tolerate (>= 0). A round needs
        at least ``2f + 3`` valid replies.
    num_selected : int or None (default: 1)
        ``m``, how many of the lowest-scoring updates to average. ``None`` selects
        ``n - f`` (the usual Multi-Krum choice).
    """

    def __init__(self, num_byzantine: int, num_selected: int | None = 1) -> None:
        self.num_byzantine = check_int("num_byzantine", num_byzantine, 0)
        self.num_selected = (
            None if num_selected is None else check_int("num_selected", num_selected, 1)
        )
        self.name = "krum" if self.num_selected == 1 else "multi-krum"

    def _params(self) -> dict[str, object]:
        return {"num_byzantine": self.num_byzantine, "num_selected": self.num_selected}

    def excluding_faulty(self, num_excluded: int) -> KrumRule:
        """Krum tolerating ``f - num_excluded`` (never below 0) Byzantine rows."""
        if num_excluded <= 0 or self.num_byzantine == 0:
            return self
        return KrumRule(max(0, self.num_byzantine - num_excluded), self.num_selected)

    def min_clients(self) -> int:
        """``2f + 3``: Krum's guarantee needs ``n > 2f + 2``."""
        return max(2 * self.num_byzantine + 3, self.num_selected or 1)

    def aggregate_detailed(
        self,
        updates: np.ndarray,
        weights: np.ndarray,
        *,
        overwrite_updates: bool = False,
        check_finite: bool = True,
    ) -> AggregationResult:
        """Aggregate, also returning the mask of the selected rows.

        ``updates`` is only read (``overwrite_updates`` changes nothing).
        """
        updates, weights = check_updates(
            updates, weights, self.min_clients(), check_finite=check_finite
        )
        n = updates.shape[0]
        m = n - self.num_byzantine if self.num_selected is None else self.num_selected
        scores = krum_scores(updates, self.num_byzantine)
        chosen = np.argsort(scores, kind="stable")[:m]
        selected = np.zeros(n, dtype=bool)
        selected[chosen] = True
        sub_w = np.where(selected, weights, 0.0)
        total = sub_w.sum()
        sub_w = selected / m if total == 0 else sub_w / total
        # A weighted sum over the selected rows, without copying them out.
        return AggregationResult(combine(sub_w, updates), selected)

    def _aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return self.aggregate_detailed(updates, weights).value
