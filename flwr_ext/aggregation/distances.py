"""Pairwise squared Euclidean distances that stay accurate for near-equal rows.

The textbook Gram-matrix form ``|x|^2 + |y|^2 - 2 x.y`` loses all precision when
rows are nearly identical (catastrophic cancellation): in float32 two models that
differ by 1e-4 relative can come out at distance 0 or negative, which is what makes
Flower's Krum pick arbitrarily among similar clients. Here the rows are first
centred on their coordinate-wise *median* and the Gram matrix is formed in float64,
so the error is relative to the spread of the honest rows, not to the norm of the
model. The centre must be robust: centring on the mean would let one row with
values near 1e20 shift every honest row by 1e20/n and drown their mutual distances
in rounding error (an attacker could then steer Krum's choice).
"""

from __future__ import annotations

import numpy as np

from .median import _coordinate_median

__all__ = ["pairwise_squared_distances"]


def pairwise_squared_distances(updates: np.ndarray) -> np.ndarray:
    """Return the ``(n, n)`` matrix of squared distances between rows.

    Parameters
    ----------
    updates : np.ndarray
        Shape ``(n, d)``, finite. Not modified.

    Returns
    -------
    np.ndarray
        Symmetric, float64, zero diagonal, entries >= 0 (``inf`` where a distance
        overflows float64, which only happens for rows with values beyond ~1e150).
    """
    updates = np.asarray(updates)
    n = updates.shape[0]
    centre = _coordinate_median(updates, np.full(n, 1.0 / n))
    centred = updates.astype(np.float64)
    centred -= centre
    with np.errstate(over="ignore", invalid="ignore"):
        gram = centred @ centred.T
        sq_norms = np.diag(gram).copy()
        dist = sq_norms[:, None] + sq_norms[None, :] - 2.0 * gram
    if not np.isfinite(dist).all():
        # Overflow: recompute pair by pair in a scaled space where it cannot
        # overflow, then scale back (inf where the true value exceeds float64).
        scale = np.abs(centred).max()
        scaled = centred / scale
        n = scaled.shape[0]
        dist = np.zeros((n, n))
        for i in range(n):
            diff = scaled[i + 1 :] - scaled[i]
            dist[i, i + 1 :] = np.einsum("ij,ij->i", diff, diff)
        dist = dist + dist.T
        with np.errstate(over="ignore"):
            dist = dist * scale * scale
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return dist
