"""Geometric median by smoothed Weiszfeld iterations (RFA, Pillutla et al., 2022).

The geometric median minimises ``sum_i w_i * max(nu, |z - x_i|)`` (the smoothing
``nu`` keeps the iteration defined when ``z`` lands on a data point). It has
breakdown point 1/2 and, unlike coordinate-wise rules, is rotation invariant.

Every Weiszfeld iterate is the centre plus a combination of the centred rows,
``z = c + beta @ (X - c)``, so its distances to the rows follow from the ``(n, n)``
Gram matrix of the centred rows: ``|x_i - z|^2 = G_ii - 2 (G beta)_i +
beta^T G beta``. The ``(n, d)`` matrix is read twice (once for ``G``, once for the
result) however many iterations run; the iterations themselves cost ``O(n^2)``.
The centre ``c`` is the coordinate-wise median, which is also the starting point
(no huge first step, as a start at the mean would take with a 1e20 row).
"""

from __future__ import annotations

import numpy as np

from .base import AggregationRule, check_fraction, check_int
from .distances import combine, median_and_centred_gram

__all__ = ["GeometricMedianRule", "geometric_median"]


def geometric_median(
    updates: np.ndarray,
    weights: np.ndarray,
    *,
    max_iter: int = 100,
    tol: float = 1e-7,
    nu: float = 1e-8,
) -> tuple[np.ndarray, int]:
    """Smoothed Weiszfeld from the coordinate-wise median.

    Parameters
    ----------
    updates : np.ndarray
        Shape ``(n, d)``, validated.
    weights : np.ndarray
        Shape ``(n,)``, summing to 1.
    max_iter : int
        Iteration cap.
    tol : float
        Stop when an iteration moves the estimate by less than ``tol`` times the
        current objective (the weighted mean distance to the rows, i.e. the scale
        of the data).
    nu : float
        Smoothing: distances below ``nu`` count as ``nu``.

    Returns
    -------
    tuple[np.ndarray, int]
        The estimate (float64, ``(d,)``) and the number of iterations run.
    """
    # Robust start (no huge first step) and the Gram matrix, in one pass.
    centre, gram = median_and_centred_gram(updates, weights)
    if not np.isfinite(gram).all():
        return _geometric_median_direct(updates, weights, centre, max_iter, tol, nu)
    sq = np.diag(gram)
    beta = np.zeros(len(weights))  # z = centre + beta @ (X - centre)
    iterations = max_iter
    for iteration in range(1, max_iter + 1):
        g_beta = gram @ beta
        dist = np.sqrt(np.maximum(sq - 2.0 * g_beta + beta @ g_beta, 0.0))
        dist = np.maximum(nu, dist)
        new = weights / dist
        new /= new.sum()
        step_vec = new - beta
        step = float(np.sqrt(max(step_vec @ gram @ step_vec, 0.0)))
        beta = new
        if step <= tol * float(weights @ dist):
            iterations = iteration
            break
    return combine(beta, updates, centre), iterations


def _geometric_median_direct(
    updates: np.ndarray,
    weights: np.ndarray,
    z: np.ndarray,
    max_iter: int,
    tol: float,
    nu: float,
) -> tuple[np.ndarray, int]:
    """Weiszfeld on the full matrix, for rows so large their Gram overflows."""
    x = np.asarray(updates, dtype=np.float64)
    for iteration in range(1, max_iter + 1):
        with np.errstate(over="ignore"):  # an overflowing distance is inf: weight 0
            dist = np.maximum(nu, np.linalg.norm(x - z, axis=1))
        beta = weights / dist
        z_new = (beta / beta.sum()) @ x
        step = float(np.linalg.norm(z_new - z))
        z = z_new
        if step <= tol * float(weights @ dist):
            return z, iteration
    return z, max_iter


class GeometricMedianRule(AggregationRule):
    """Geometric median (RFA); breakdown point 1/2.

    Parameters
    ----------
    max_iter : int (default: 100)
        Cap on Weiszfeld iterations (RFA reports 3-10 suffice in practice).
    tol : float (default: 1e-7)
        Stop when a step is shorter than ``tol`` times the mean distance of the
        rows to the estimate.
    nu : float (default: 1e-8)
        Smoothing of the distances, > 0.
    """

    name = "geometric-median"

    def __init__(
        self, max_iter: int = 100, tol: float = 1e-7, nu: float = 1e-8
    ) -> None:
        self.max_iter = check_int("max_iter", max_iter, 1)
        self.tol = check_fraction("tol", tol, 0.0, 1.0)
        self.nu = check_fraction("nu", nu, 0.0, float("inf"))
        if self.nu == 0.0:
            raise ValueError("nu must be > 0, got 0.0")

    def _params(self) -> dict[str, object]:
        return {"max_iter": self.max_iter, "tol": self.tol, "nu": self.nu}

    def _aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        value, _ = geometric_median(
            updates, weights, max_iter=self.max_iter, tol=self.tol, nu=self.nu
        )
        return value
