"""Clipping a client's update to a norm, and adapting that norm privately.

Clipping bounds what one client can do to the aggregate: after
:func:`clip_to_norm`, an update has L2 norm at most ``C`` whatever the client sent,
so a sum over clients changes by at most ``C`` when one client is added or
removed - the *sensitivity* the Gaussian noise is calibrated to.

:class:`AdaptiveClipNorm` implements the quantile-tracking rule of Andrew, Thakkar,
McMahan & Ramaswamy, "Differentially Private Learning with Adaptive Clipping"
(NeurIPS 2021): each round the server releases a noised count of the clients whose
update was *not* clipped, and moves ``C`` geometrically towards the norm below which
a fraction ``target_quantile`` of updates fall::

    C <- C * exp(-learning_rate * (unclipped_fraction - target_quantile))

Too many unclipped updates (fraction above the target) means ``C`` is too large,
so it shrinks; too few means it grows. (Flower 1.42's adaptive clipping moves the
opposite way and diverges; see ``docs/privacy.md``.)
"""

from __future__ import annotations

import math

import numpy as np

from .validation import check_open_unit, check_positive

__all__ = ["AdaptiveClipNorm", "clip_to_norm", "l2_norm"]


def l2_norm(vector: np.ndarray) -> float:
    """L2 norm of a 1-D array, without overflow for huge finite entries."""
    if vector.size == 0:
        return 0.0
    scale = float(np.max(np.abs(vector)))
    if scale == 0.0 or not math.isfinite(scale):
        return scale
    norm = float(np.linalg.norm(vector.astype(np.float64, copy=False)))
    if math.isfinite(norm):
        return norm
    return scale * float(np.linalg.norm(vector / scale))


def clip_to_norm(update: np.ndarray, clipping_norm: float) -> tuple[np.ndarray, float]:
    """Scale ``update`` in place so its L2 norm is at most ``clipping_norm``.

    Parameters
    ----------
    update : np.ndarray
        1-D float array (a client's model minus the global model). Modified in
        place.
    clipping_norm : float
        The bound ``C`` > 0.

    Returns
    -------
    tuple[np.ndarray, float]
        The (clipped) update and its norm *before* clipping. A zero update stays
        zero (no division by its norm).
    """
    norm = l2_norm(update)
    if norm > clipping_norm:
        update *= clipping_norm / norm
    return update, norm


class AdaptiveClipNorm:
    """A clip norm that tracks a quantile of the update norms, privately.

    Parameters
    ----------
    initial : float
        Clip norm of the first round, > 0. The rule converges from far away
        (log-distance / (learning_rate * min(q, 1 - q)) rounds), so a rough guess
        is enough; Andrew et al. start at 0.1.
    target_quantile : float (default: 0.5)
        Fraction of updates that should be left unclipped, in (0, 1).
    learning_rate : float (default: 0.2)
        Step size of the geometric update, > 0 (the paper's eta_C).
    count_noise_stddev : float
        Standard deviation of the Gaussian noise added to the count of
        unclipped updates (the paper's sigma_b), > 0. Its privacy cost is
        accounted through :func:`flwr_ext.privacy.effective_noise_multiplier`.

    Attributes
    ----------
    value : float
        The clip norm to use in the current round.
    """

    def __init__(
        self,
        initial: float,
        *,
        target_quantile: float = 0.5,
        learning_rate: float = 0.2,
        count_noise_stddev: float,
    ) -> None:
        self.value = check_positive("clipping_norm", initial)
        self.target_quantile = check_open_unit("target_quantile", target_quantile)
        self.learning_rate = check_positive("clip_learning_rate", learning_rate)
        self.count_noise_stddev = check_positive(
            "clipped_count_stddev", count_noise_stddev
        )

    def noisy_unclipped_fraction(
        self,
        unclipped: int,
        participants: int,
        expected_clients: float,
        rng: np.random.Generator,
    ) -> float:
        """Privately estimate the fraction of updates that were not clipped.

        Each participant contributes the centred bit ``b - 1/2`` (``b = 1`` if its
        update norm was <= C), so adding or removing one client moves the sum by
        at most 1/2. The noised sum is divided by the fixed, public
        ``expected_clients`` (never by the actual count, which would leak it)::

            fraction = 1/2 + (sum(b - 1/2) + N(0, s**2)) / expected_clients
        """
        centred = unclipped - 0.5 * participants
        noisy = centred + rng.normal(0.0, self.count_noise_stddev)
        return 0.5 + noisy / expected_clients

    def step(self, unclipped_fraction: float) -> float:
        """Move the clip norm towards the target quantile; return the new value."""
        error = unclipped_fraction - self.target_quantile
        self.value *= math.exp(-self.learning_rate * error)
        return self.value

    def __repr__(self) -> str:
        return (
            f"AdaptiveClipNorm(value={self.value:.4g}, "
            f"target_quantile={self.target_quantile}, "
            f"learning_rate={self.learning_rate}, "
            f"count_noise_stddev={self.count_noise_stddev:.4g})"
        )
