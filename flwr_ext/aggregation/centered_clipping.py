"""Centered clipping (Karimireddy, He and Jaggi, ICML 2021).

Starting from a centre ``v``, repeat ``L`` times::

    v <- v + sum_i w_i * clip_tau(x_i - v)

where ``clip_tau`` scales a vector down to norm ``tau`` if it is longer. Each
Byzantine row can move ``v`` by at most ``w_i * tau`` per iteration.

Choices made here (and why):

- The centre starts at the coordinate-wise median, a robust point inside the honest
  range (the paper uses the previous round's momentum, which a stateless rule
  cannot hold; with server momentum off the two coincide in spirit).
- ``tau=None`` (default) sets the radius each iteration to the median distance of
  the rows to the current centre, so at least half the rows pass unclipped and the
  radius scales with the honest spread; a fixed ``tau`` is also accepted.
"""

from __future__ import annotations

import numpy as np

from .base import AggregationRule, check_fraction, check_int
from .median import _coordinate_median

__all__ = ["CenteredClippingRule", "centered_clipping"]


def centered_clipping(
    updates: np.ndarray,
    weights: np.ndarray,
    *,
    tau: float | None = None,
    iterations: int = 3,
    centre: np.ndarray | None = None,
) -> np.ndarray:
    """Run centered clipping on validated inputs; return float64 ``(d,)``."""
    x = np.asarray(updates, dtype=np.float64)
    v = _coordinate_median(updates, weights) if centre is None else centre.copy()
    for _ in range(iterations):
        diff = x - v
        norms = np.linalg.norm(diff, axis=1)
        radius = float(np.median(norms)) if tau is None else tau
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(norms > radius, radius / norms, 1.0)
        v = v + (weights * scale) @ diff
    return v


class CenteredClippingRule(AggregationRule):
    """Centered clipping.

    Parameters
    ----------
    tau : float or None (default: None)
        Clipping radius (L2, same units as the updates), > 0. ``None`` adapts it
        to the median distance to the centre in every iteration.
    iterations : int (default: 3)
        ``L``, clipping iterations per round (the paper uses 1-3).
    """

    name = "centered-clipping"

    def __init__(self, tau: float | None = None, iterations: int = 3) -> None:
        if tau is not None:
            tau = check_fraction("tau", tau, 0.0, float("inf"))
            if tau == 0.0:
                raise ValueError("tau must be > 0 (or None to adapt it), got 0.0")
        self.tau = tau
        self.iterations = check_int("iterations", iterations, 1)

    def _params(self) -> dict[str, object]:
        return {"tau": self.tau, "iterations": self.iterations}

    def _aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return centered_clipping(
            updates, weights, tau=self.tau, iterations=self.iterations
        )
