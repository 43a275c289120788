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
- Every iterate is ``c + alpha @ (X - c)``, so distances come from the ``(n, n)``
  Gram matrix of the centred rows (see :mod:`.distances`): the ``(n, d)`` matrix
  is read once for the Gram matrix and once for the result.
"""

from __future__ import annotations

import numpy as np

from .base import AggregationRule, check_fraction, check_int
from .distances import centred_gram, combine, median_and_centred_gram

__all__ = ["CenteredClippingRule", "centered_clipping"]


def centered_clipping(
    updates: np.ndarray,
    weights: np.ndarray,
    *,
    tau: float | None = None,
    iterations: int = 3,
    centre: np.ndarray | None = None,
) -> np.ndarray:
    """Run centered clipping on validated inputs; return float64 ``(d,)``.

    ``centre`` is the starting point (default: the coordinate-wise median).
    """
    if centre is None:
        centre, gram = median_and_centred_gram(updates, weights)
    else:
        centre = np.asarray(centre, dtype=np.float64)
        gram = centred_gram(updates, centre)
    if not np.isfinite(gram).all():
        return _centered_clipping_direct(updates, weights, tau, iterations, centre)
    sq = np.diag(gram)
    alpha = np.zeros(len(weights))  # v = centre + alpha @ (X - centre)
    for _ in range(iterations):
        g_alpha = gram @ alpha
        norms = np.sqrt(np.maximum(sq - 2.0 * g_alpha + alpha @ g_alpha, 0.0))
        scale = _clip_scale(norms, tau)
        # v <- v + sum_i w_i s_i (x_i - v), written on the coefficients.
        moved = weights * scale
        alpha = alpha * (1.0 - moved.sum()) + moved
    return combine(alpha, updates, centre)


def _clip_scale(norms: np.ndarray, tau: float | None) -> np.ndarray:
    """Per-row factor that shortens ``x_i - v`` to at most the radius."""
    radius = float(np.median(norms)) if tau is None else tau
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(norms > radius, radius / norms, 1.0)


def _centered_clipping_direct(
    updates: np.ndarray,
    weights: np.ndarray,
    tau: float | None,
    iterations: int,
    v: np.ndarray,
) -> np.ndarray:
    """Centered clipping on the full matrix, for rows whose Gram overflows."""
    x = np.asarray(updates, dtype=np.float64)
    for _ in range(iterations):
        diff = x - v
        with np.errstate(over="ignore"):  # an overflowing norm is inf: clipped
            scale = _clip_scale(np.linalg.norm(diff, axis=1), tau)
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
