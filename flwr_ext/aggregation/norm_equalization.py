"""Median norm equalization, a pre-aggregation step.

Every update is rescaled to the round's median update norm (L2), keeping its
direction: ``x_i -> (m / |x_i|) x_i`` with ``m = median_i |x_i|``. A zero row
stays zero: it has no direction to rescale, and inventing one would hand a
sender of zeros a full-length vote (docs/robustness.md measures attackers who
send exact zeros).

Why: the attacks that hurt the robust rules most at f = 30 % in this project's
benchmark (line-searched IPM and its evasive variant, docs/robustness.md) send
*small* updates, ``-epsilon`` times the honest mean with ``epsilon`` well
below 1, which sit in the middle of the honest cloud: no norm or distance
filter removes them, nearest-neighbour mixing counts them among every honest
row's neighbours, and the aggregate shrinks towards zero round after round.
After equalization an update's norm carries no information: ``epsilon``
stops mattering, the attacker's only lever is a direction, and an update that
opposes the honest ones is an outlier the rule after this step (NNM, a
trimmed mean) already handles. Large updates are clipped to the same norm
(what ARC does for the ``k`` largest rows, here for all of them), so this
step replaces ARC in a chain.

The median of ``n`` norms is decided by the honest rows while ``f < n / 2``:
``f`` Byzantine rows can move it only between two honest norms.

Magnitudes are normalised the same way in FLTrust (Cao, Fang, Liu and Gong,
"FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping", NDSS
2021), to the norm of an update the server computes on its own root data; the
server here has no data, so the median client norm stands in for it.

What it costs: the aggregate no longer shrinks when honest updates disagree
in magnitude, and small honest updates (a client whose data the model
already fits) count as much as large ones. Measured in docs/robustness.md
(clean accuracy and every attack, the rule with and without this step).
"""

from __future__ import annotations

import numpy as np

from .base import PreAggregation, check_updates

__all__ = ["MedianNormEqualization", "median_norm_equalization"]


def median_norm_equalization(updates: np.ndarray) -> np.ndarray:
    """Return a new ``(n, d)`` matrix whose non-zero rows have the median norm.

    Parameters
    ----------
    updates : np.ndarray
        Shape ``(n, d)``, finite. Not modified.

    Returns
    -------
    np.ndarray
        The rescaled rows, in the input's float dtype (float64 for integers),
        always finite: norms are accumulated in float64 (``einsum``), so a
        float32 row near the float32 maximum does not overflow its own squared
        norm; a row whose scale does not fit the dtype (subnormal entries) is
        rescaled in float64; and when the median norm itself would push some
        rescaled entry past the dtype's maximum, every row gets the largest
        common norm that fits instead (hostile magnitudes cannot turn the
        round into Inf/NaN).
    """
    updates = np.asarray(updates)
    dtype = updates.dtype if updates.dtype.kind == "f" else np.dtype(np.float64)
    out = np.array(updates, dtype=dtype, copy=True)
    if out.shape[0] == 0:
        return out
    with np.errstate(over="ignore", under="ignore"):  # handled below
        norms = np.sqrt(np.einsum("ij,ij->i", out, out, dtype=np.float64))
    if out.shape[1] == 0:
        return out
    # Each row as peak * shape: peak = |x_i|_inf, shape r_i = |x_i / peak| in
    # [1, sqrt(d)]. Rows whose squared norm under- or overflows float64 (entries
    # below ~1e-154 or above ~1e154) get their norm from these two instead.
    peaks = np.maximum(out.max(axis=1), -out.min(axis=1)).astype(np.float64)
    shape = np.ones_like(norms)
    live = peaks > 0.0
    shape[live] = norms[live] / peaks[live]
    for i in np.flatnonzero(live & ((norms == 0.0) | ~np.isfinite(norms))):
        unit = np.asarray(out[i], dtype=np.float64) / peaks[i]
        shape[i] = float(np.sqrt(unit @ unit))
        norms[i] = peaks[i] * shape[i]  # may be inf: only the median reads it
    target = float(np.median(norms))
    limit = float(np.finfo(dtype).max)
    if live.any():
        # The largest entry of a row rescaled to norm m is m / r_i. If the median
        # norm does not fit the dtype that way, every row gets the largest common
        # norm that does (the norms stay equal).
        fits = limit * float(shape[live].min()) * (1.0 - 1e-6)
        target = min(target, fits)
    tiny = float(np.finfo(dtype).tiny)
    for i in np.flatnonzero(live):
        with np.errstate(over="ignore", under="ignore"):  # checked on the next line
            scale = float(target / norms[i])
        if tiny <= scale <= limit:
            out[i] *= dtype.type(scale)  # the dtype's own arithmetic
        else:
            # The scale does not fit the dtype (subnormal entries, an extreme
            # row): rescale the unit-peak row in float64, then cast.
            unit = np.asarray(updates[i], dtype=np.float64) / peaks[i]
            out[i] = (unit * (target / shape[i])).astype(dtype)
    return out


class MedianNormEqualization(PreAggregation):
    """Rescale every update to the round's median update norm (see module doc).

    Has no parameter: the median needs no ``f`` and no radius. Use it first in
    a :class:`~flwr_ext.aggregation.PreAggregationChain`, before
    :class:`~flwr_ext.aggregation.NearestNeighborMixing`.
    """

    name = "norm-equalization"

    def transform(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Rescale each non-zero row to the median row norm."""
        updates, _ = check_updates(updates, weights, self.min_clients())
        return median_norm_equalization(updates)

    def __repr__(self) -> str:
        return "MedianNormEqualization()"
