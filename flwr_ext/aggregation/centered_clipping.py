"""Centered clipping (Karimireddy, He and Jaggi, ICML 2021).

Starting from a centre ``v``, repeat ``L`` times::

    v <- v + sum_i w_i * clip_tau(x_i - v)

where ``clip_tau`` scales a vector down to norm ``tau`` if it is longer. Each
Byzantine row can move ``v`` by at most ``w_i * tau`` per iteration.

Choices made here (and why):

- ``centre="median"`` (stateless) starts at the coordinate-wise median, a robust
  point inside the honest range. ``centre="previous"`` is the paper's version: the
  centre is the previous round's aggregate (with client momentum, the server's
  running estimate of the momentum), so an attacker must pull it away round after
  round, at most ``tau`` per iteration each time, while the honest clients pull it
  back. The rule holds no state: :meth:`CenteredClippingRule.aggregate_stateful`
  takes the previous aggregate and returns the new one, and the strategy wrapper
  keeps it across rounds (and exports it with the run). The first round, or a
  state that does not fit the model, starts from the median.
- ``tau=None`` (default) sets the radius each iteration to the median distance of
  the rows to the current centre, so at least half the rows pass unclipped and the
  radius scales with the honest spread; a fixed ``tau`` is also accepted.
- Every iterate is ``c + alpha @ (X - c)``, so distances come from the ``(n, n)``
  Gram matrix of the centred rows (see :mod:`.distances`): the ``(n, d)`` matrix
  is read once for the Gram matrix and once for the result.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from .base import (
    AggregationResult,
    AggregationRule,
    check_fraction,
    check_int,
    check_updates,
)
from .distances import centred_gram, combine, median_and_centred_gram

__all__ = ["CenteredClippingRule", "centered_clipping"]


def centered_clipping(
    updates: np.ndarray,
    weights: np.ndarray,
    *,
    tau: float | None = None,
    iterations: int = 3,
    centre: np.ndarray | None = None,
    radius_quantile: float = 0.5,
) -> np.ndarray:
    """Run centered clipping on validated inputs; return float64 ``(d,)``.

    ``centre`` is the starting point (default: the coordinate-wise median).
    With ``tau=None`` the radius of each iteration is the ``radius_quantile``
    quantile of the rows' distances to the current centre (0.5: the median).
    """
    if centre is None:
        centre, gram = median_and_centred_gram(updates, weights)
    else:
        centre = np.asarray(centre, dtype=np.float64)
        gram = centred_gram(updates, centre)
    if not np.isfinite(gram).all():
        return _centered_clipping_direct(
            updates, weights, tau, iterations, centre, radius_quantile
        )
    sq = np.diag(gram)
    alpha = np.zeros(len(weights))  # v = centre + alpha @ (X - centre)
    for _ in range(iterations):
        g_alpha = gram @ alpha
        norms = np.sqrt(np.maximum(sq - 2.0 * g_alpha + alpha @ g_alpha, 0.0))
        scale = _clip_scale(norms, tau, radius_quantile)
        # v <- v + sum_i w_i s_i (x_i - v), written on the coefficients.
        moved = weights * scale
        alpha = alpha * (1.0 - moved.sum()) + moved
    return combine(alpha, updates, centre)


def _clip_scale(
    norms: np.ndarray, tau: float | None, quantile: float = 0.5
) -> np.ndarray:
    """Per-row factor that shortens ``x_i - v`` to at most the radius."""
    if tau is not None:
        radius = tau
    elif quantile == 0.5:
        radius = float(np.median(norms))
    else:
        radius = float(np.quantile(norms, quantile))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(norms > radius, radius / norms, 1.0)


def _centered_clipping_direct(
    updates: np.ndarray,
    weights: np.ndarray,
    tau: float | None,
    iterations: int,
    v: np.ndarray,
    radius_quantile: float = 0.5,
) -> np.ndarray:
    """Centered clipping on the full matrix, for rows whose Gram overflows."""
    x = np.asarray(updates, dtype=np.float64)
    for _ in range(iterations):
        diff = x - v
        with np.errstate(over="ignore"):  # an overflowing norm is inf: clipped
            scale = _clip_scale(np.linalg.norm(diff, axis=1), tau, radius_quantile)
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
    centre : {"median", "previous"} (default: "median")
        Where the iteration starts: the round's coordinate-wise median
        (stateless), or the previous round's aggregate, kept by the caller
        (Karimireddy et al.; see the module docstring).
    radius_quantile : float in (0, 1] (default: 0.5)
        With ``tau=None``, the radius is this quantile of the rows' distances
        to the current centre: 0.5 lets half the rows through unclipped; a
        smaller value clips more rows (a tighter bound on what ``f`` rows can
        move, and slower honest progress per round).
    """

    name = "centered-clipping"

    def __init__(
        self,
        tau: float | None = None,
        iterations: int = 3,
        centre: Literal["median", "previous"] = "median",
        radius_quantile: float = 0.5,
    ) -> None:
        if tau is not None:
            tau = check_fraction("tau", tau, 0.0, float("inf"))
            if tau == 0.0:
                raise ValueError("tau must be > 0 (or None to adapt it), got 0.0")
        if centre not in ("median", "previous"):
            raise ValueError(f"centre must be 'median' or 'previous', got {centre!r}")
        self.tau = tau
        self.iterations = check_int("iterations", iterations, 1)
        self.centre: Literal["median", "previous"] = centre
        self.radius_quantile = check_fraction(
            "radius_quantile", radius_quantile, 0.0, 1.0, high_inclusive=True
        )
        if self.radius_quantile == 0.0:
            raise ValueError("radius_quantile must be > 0, got 0.0")

    def _params(self) -> dict[str, object]:
        params: dict[str, object] = {"tau": self.tau, "iterations": self.iterations}
        if self.centre != "median":
            params["centre"] = self.centre
        if self.radius_quantile != 0.5:
            params["radius_quantile"] = self.radius_quantile
        return params

    def aggregate_stateful(
        self,
        updates: np.ndarray,
        weights: np.ndarray,
        state: np.ndarray | None,
        *,
        overwrite_updates: bool = False,
        check_finite: bool = True,
    ) -> tuple[AggregationResult, np.ndarray | None]:
        """Clip around ``state`` (the previous aggregate); return the new one.

        With ``centre="median"`` this is :meth:`aggregate_detailed` and no state.
        A ``state`` that is not a finite float vector of the updates' width is
        ignored (the median is used, as in the first round).
        """
        if self.centre == "median":
            return super().aggregate_stateful(
                updates,
                weights,
                state,
                overwrite_updates=overwrite_updates,
                check_finite=check_finite,
            )
        updates, weights = check_updates(
            updates, weights, self.min_clients(), check_finite=check_finite
        )
        centre = None
        if (
            isinstance(state, np.ndarray)
            and state.shape == (updates.shape[1],)
            and state.dtype.kind == "f"
            and np.isfinite(state).all()
        ):
            centre = state
        value = centered_clipping(
            updates,
            weights,
            tau=self.tau,
            iterations=self.iterations,
            centre=centre,
            radius_quantile=self.radius_quantile,
        )
        result = AggregationResult(value, np.ones(updates.shape[0], dtype=bool))
        return result, value.copy()

    def _aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return centered_clipping(
            updates,
            weights,
            tau=self.tau,
            iterations=self.iterations,
            radius_quantile=self.radius_quantile,
        )
