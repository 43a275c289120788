"""Adaptive robust clipping (ARC), a pre-aggregation step.

Allouah, Guerraoui, Gupta, Jellouli, Rizk and Stephan, "The Vital Role of Gradient
Clipping in Byzantine-Resilient Distributed Learning", 2024.

A pre-aggregation step: the ``k = floor(2 (f / n) (n - f))`` rows with the largest
L2 norms are scaled down to the norm of the largest row left unclipped (``f``
counts as at most ``n / 2``, where ``k`` peaks). The
threshold adapts to the round (no radius to tune) and depends only on norms, so
a Byzantine row can carry at most the norm of an honest one into the rule after
it. Allouah et al. prove that ARC keeps a rule's robustness guarantee and
improves it markedly when the honest updates are small relative to the attack
(as late in training).
"""

from __future__ import annotations

import numpy as np

from .base import PreAggregation, check_int, check_updates

__all__ = ["AdaptiveRobustClipping", "adaptive_robust_clipping", "arc_num_clipped"]


def arc_num_clipped(n: int, num_byzantine: int) -> int:
    """Rows ARC clips for ``n`` rows and ``f`` Byzantine: ``floor(2 (f/n) (n - f))``.

    ``f`` counts as at most ``n / 2``, where the count peaks (``floor(n / 2)``
    rows): built for more Byzantine rows than half the round (a round with few
    valid replies, or ``f`` over-estimated on purpose), ARC clips as many rows
    as it can, never fewer, and the count never turns negative (``f > n``).
    """
    if n <= 0:
        return 0
    f = min(float(num_byzantine), n / 2.0)
    return max(0, min(n - 1, int(np.floor(2.0 * f * (n - f) / n))))


def adaptive_robust_clipping(updates: np.ndarray, num_byzantine: int) -> np.ndarray:
    """Return a new ``(n, d)`` matrix with the ``k`` longest rows clipped.

    Parameters
    ----------
    updates : np.ndarray
        Shape ``(n, d)``, finite. Not modified.
    num_byzantine : int
        ``f``.

    Returns
    -------
    np.ndarray
        The clipped rows, in the input's float dtype (float64 for integers).
        Squared norms are accumulated in float64 by ``einsum`` (a float32 row
        near the float32 maximum would overflow its own squared norm in
        float32), without a float64 copy of the matrix.
    """
    updates = np.asarray(updates)
    dtype = updates.dtype if updates.dtype.kind == "f" else np.dtype(np.float64)
    out = np.array(updates, dtype=dtype, copy=True)
    n = out.shape[0]
    k = arc_num_clipped(n, num_byzantine)
    if k == 0:
        return out
    norms = np.sqrt(np.einsum("ij,ij->i", out, out, dtype=np.float64))
    order = np.argsort(norms, kind="stable")
    threshold = norms[order[n - k - 1]]
    clipped = order[n - k :]
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(norms[clipped] > threshold, threshold / norms[clipped], 1.0)
    out[clipped] *= scale[:, None].astype(dtype)
    return out


class AdaptiveRobustClipping(PreAggregation):
    """ARC pre-aggregation.

    Parameters
    ----------
    num_byzantine : int
        ``f``, the number of Byzantine clients to tolerate (>= 0; 0 clips nothing).
    """

    name = "arc"

    def __init__(self, num_byzantine: int) -> None:
        self.num_byzantine = check_int("num_byzantine", num_byzantine, 0)

    def excluding_faulty(self, num_excluded: int) -> AdaptiveRobustClipping:
        """ARC for ``f - num_excluded`` (never below 0) Byzantine rows."""
        if num_excluded <= 0 or self.num_byzantine == 0:
            return self
        return AdaptiveRobustClipping(max(0, self.num_byzantine - num_excluded))

    def transform(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Clip the ``k`` longest rows to the norm of the longest row left."""
        updates, _ = check_updates(updates, weights, self.min_clients())
        return adaptive_robust_clipping(updates, self.num_byzantine)

    def __repr__(self) -> str:
        return f"AdaptiveRobustClipping(num_byzantine={self.num_byzantine})"
