"""Gram matrices and pairwise distances that stay accurate for near-equal rows.

The textbook Gram-matrix form ``|x|^2 + |y|^2 - 2 x.y`` loses all precision when
rows are nearly identical (catastrophic cancellation): in float32 two models that
differ by 1e-4 relative can come out at distance 0 or negative, which is what makes
Flower's Krum pick arbitrarily among similar clients. Here rows are first centred
on a point inside the honest cloud and the Gram matrix is accumulated in float64,
so the error is relative to the spread of the honest rows, not to the norm of the
model.

The centre must be robust: centring on the mean would let one row with values near
1e20 shift every honest row by 1e20/n and drown their mutual distances in rounding
error (an attacker could then steer Krum). :func:`pairwise_squared_distances`
centres on the row of median norm: fewer than half of the rows are Byzantine, so
that row's norm is at most the largest honest norm, and when it is honest (always,
if every row is) the centred rows are as small as the honest spread. Rules that need
a robust *point* anyway (geometric median, centered clipping) centre on the
coordinate-wise median instead.

Precision. Geometric median and centered clipping iterate on their Gram matrix and
form their result from it, so it is computed in float64. Krum and NNM only *rank*
distances: for float32 updates their Gram matrix is computed block by block in
float32 (each block's product accumulated in float64), which is twice as fast and
leaves a relative error of about 1e-6 on the distances, against 1e-16 in float64
and against *everything* for Flower's uncentred float32 form on near-equal models.
If that Gram matrix overflows float32 (rows beyond ~1e19), it is redone in float64.

Everything here streams over column blocks: one pass over the ``(n, d)`` update
matrix (kept in its own dtype, usually float32) builds the ``(n, n)`` Gram matrix,
and iterative rules then work on that small matrix, touching the big one once more
only to form their result (:func:`combine`). No ``(n, d)`` float64 copy is made.
"""

from __future__ import annotations

import numpy as np

from .median import _coordinate_median

__all__ = [
    "BLOCK_COLUMNS",
    "centred_gram",
    "median_and_centred_gram",
    "combine",
    "distances_from_gram",
    "pairwise_squared_distances",
]

#: Columns per block: an ``(n, 4096)`` float64 block of 20-100 rows fits in cache.
BLOCK_COLUMNS = 4096


def centred_gram(
    updates: np.ndarray, centre: np.ndarray, dtype: type = np.float64
) -> np.ndarray:
    """Return ``(X - centre) (X - centre)^T``, shape ``(n, n)``, as float64.

    Parameters
    ----------
    updates : np.ndarray
        ``X``, shape ``(n, d)``, any float dtype. Not modified, not copied whole.
    centre : np.ndarray
        Shape ``(d,)``.
    dtype : numpy dtype (default: float64)
        Precision of each column block's product (accumulated over blocks in
        float64). float32 halves the time and suits ranking distances only.

    Returns
    -------
    np.ndarray
        Symmetric, float64; entries may be ``inf`` or NaN if they overflow (rows
        with values beyond ~1e150 in float64, ~1e19 in float32).
    """
    n, d = updates.shape
    gram = np.zeros((n, n))
    centre = np.asarray(centre, dtype=dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, d, BLOCK_COLUMNS):
            stop = min(start + BLOCK_COLUMNS, d)
            block: np.ndarray = updates[:, start:stop].astype(dtype)
            block -= centre[start:stop]
            gram += block @ block.T
    return gram


def median_and_centred_gram(
    updates: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Coordinate-wise median ``c`` and the Gram matrix of ``X - c``, in one pass.

    With uniform weights each column block is sorted (a small copy that stays in
    cache), its median taken, and its centred rows added to the Gram matrix:
    ``X`` is read once and never copied whole. Weighted medians take the two-pass
    route.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        The median (float64, ``(d,)``) and the Gram matrix (float64, ``(n, n)``).
    """
    n, d = updates.shape
    if not np.all(weights == weights[0]):
        centre = _coordinate_median(updates, weights)
        return centre, centred_gram(updates, centre)
    lo, hi = (n - 1) // 2, n // 2
    centre = np.empty(d)
    gram = np.zeros((n, n))
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, d, BLOCK_COLUMNS):
            stop = min(start + BLOCK_COLUMNS, d)
            block = updates[:, start:stop]
            ordered = np.sort(block, axis=0)
            middle = 0.5 * (ordered[lo].astype(np.float64) + ordered[hi])
            centre[start:stop] = middle
            centred = block.astype(np.float64)
            centred -= middle
            gram += centred @ centred.T
    return centre, gram


def combine(
    coefficients: np.ndarray,
    updates: np.ndarray,
    centre: np.ndarray | None = None,
) -> np.ndarray:
    """Return ``centre + coefficients @ (X - centre)`` in float64, shape ``(d,)``.

    With ``centre=None`` this is ``coefficients @ X``; coefficients that sum to 1
    give a weighted mean. Accumulated per column block in float64, so a float32
    ``X`` is never copied to float64 as a whole.
    """
    n, d = updates.shape
    coefficients = np.asarray(coefficients, dtype=np.float64)
    rest = 1.0 - float(coefficients.sum())
    rows = np.flatnonzero(coefficients)
    if len(rows) == 1:  # Krum: one row, no pass over the others
        out = coefficients[rows[0]] * updates[rows[0]].astype(np.float64)
    else:
        if 0 < len(rows) <= n // 2:  # few rows: read only those
            updates, coefficients = updates[rows], coefficients[rows]
        out = np.empty(d)
        for start in range(0, d, BLOCK_COLUMNS):
            stop = min(start + BLOCK_COLUMNS, d)
            out[start:stop] = coefficients @ updates[:, start:stop].astype(np.float64)
    if centre is not None and rest != 0.0:
        out += rest * centre
    return out


def distances_from_gram(gram: np.ndarray) -> np.ndarray:
    """Squared distances ``|x_i - x_j|^2`` from a (centred) Gram matrix.

    Symmetric, zero diagonal, entries >= 0 (rounding can make the formula dip
    below zero for near-equal rows; those entries are clipped to 0).
    """
    sq = np.diag(gram)
    with np.errstate(over="ignore", invalid="ignore"):
        dist = sq[:, None] + sq[None, :] - 2.0 * gram
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return dist


def _median_norm_row(updates: np.ndarray) -> int:
    """Index of the row whose (squared) norm is the median (ties: lowest index)."""
    # In the input's dtype: only the order matters, and an overflow to inf still
    # ranks a huge row last.
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.einsum("ij,ij->i", updates, updates)
    order = np.argsort(norms, kind="stable")
    return int(order[(len(order) - 1) // 2])


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
    centre = updates[_median_norm_row(updates)]
    if updates.dtype == np.float32:
        gram = centred_gram(updates, centre, np.float32)
        if np.isfinite(gram).all():
            return distances_from_gram(gram)
    centre = centre.astype(np.float64)
    gram = centred_gram(updates, centre)
    if np.isfinite(gram).all():
        return distances_from_gram(gram)
    # Overflow: recompute pair by pair in a scaled space where it cannot
    # overflow, then scale back (inf where the true value exceeds float64).
    centred = updates.astype(np.float64) - centre
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
