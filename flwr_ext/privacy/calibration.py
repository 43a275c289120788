"""Choose the noise multiplier from a privacy target, before training starts.

The noise a run needs depends on four things fixed in advance: the target ε, δ,
the number of releases (rounds, or DP-SGD steps) and the sampling rate. Calibrating
up front - rather than discovering after the run what ε it cost - is what lets a
consortium agree on a budget and then hold the run to it.

Adaptive clipping (Andrew et al. 2021) releases a second Gaussian quantity every
round: the noised count of clients whose update was not clipped. The two releases
use the same sampled clients, so together they are one Gaussian mechanism with an
*effective* noise multiplier ``z`` given by ``z**-2 = z_update**-2 + (2 s)**-2``
(``s``: standard deviation of the count noise; the count of centred bits has
sensitivity 1/2). :func:`update_noise_multiplier` inverts that so the account
stays at the calibrated ``z``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

from .accountant import ACCOUNTANTS, compute_epsilon, rdp_upper_bound
from .validation import (
    check_choice,
    check_int,
    check_open_unit,
    check_positive,
    check_rate,
)

#: Largest noise multiplier the calibration tries before giving up.
_MAX_NOISE_MULTIPLIER = 1e6

__all__ = [
    "calibrate_noise_multiplier",
    "effective_noise_multiplier",
    "resolve_noise_multiplier",
    "update_noise_multiplier",
]


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    num_releases: int,
    sampling_rate: float = 1.0,
    accountant: str = "prv",
    tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier whose ε after ``num_releases`` is <= the target.

    Parameters
    ----------
    target_epsilon : float
        Total ε allowed after all releases, > 0.
    delta : float
        δ of the target, in (0, 1).
    num_releases : int
        Number of releases planned: federated rounds for DP-FedAvg, optimiser
        steps for DP-SGD.
    sampling_rate : float (default: 1.0)
        Poisson sampling rate of each unit, in (0, 1]; 1.0 for no subsampling.
    accountant : {"prv", "rdp"} (default: "prv")
        Opacus accountant (see :mod:`flwr_ext.privacy.accountant`).
    tolerance : float (default: 0.01)
        The result's ε lies in ``[target - tolerance, target]``.

    Returns
    -------
    float
        The noise multiplier ``z`` (noise standard deviation / sensitivity).

    Raises
    ------
    ValueError
        If a parameter is out of range, or the target cannot be met with any
        noise multiplier below 10**6.

    Notes
    -----
    A bisection on z over :func:`flwr_ext.privacy.compute_epsilon` - the very
    function that reports ε during the run - so a calibrated run can never
    report more than its target (Opacus's ``get_noise_multiplier`` does the same
    search but with its own accountant settings).
    """
    target_epsilon = check_positive("target_epsilon", target_epsilon)
    delta = check_open_unit("delta", delta)
    num_releases = check_int("num_releases", num_releases, 1)
    sampling_rate = check_rate("sampling_rate", sampling_rate)
    accountant = check_choice("accountant", accountant, ACCOUNTANTS)
    tolerance = check_positive("tolerance", tolerance)
    return _calibrate(
        target_epsilon, delta, num_releases, sampling_rate, accountant, tolerance
    )


@functools.lru_cache(maxsize=256)
def _calibrate(
    target_epsilon: float,
    delta: float,
    num_releases: int,
    sampling_rate: float,
    accountant: str,
    tolerance: float,
) -> float:
    """Pure function of its (validated) arguments: memoised process-wide."""

    @functools.cache
    def epsilon(z: float, method: str = accountant) -> float:
        return compute_epsilon([(z, sampling_rate, num_releases)], delta, method)

    if accountant == "rdp":
        return _bisect(epsilon, target_epsilon, tolerance, 1.0)

    # A fast RDP bound first (integer orders: milliseconds): its z meets the
    # target under that bound, and PRV's ε is never above it, so it brackets
    # PRV's z from above and few PRV evaluations remain.
    def bound(z: float) -> float:
        return rdp_upper_bound([(z, sampling_rate, num_releases)], delta)

    z_bound = _bisect(bound, target_epsilon, tolerance, 1.0)
    return _bisect(epsilon, target_epsilon, tolerance, z_bound)


def _bisect(
    epsilon: Callable[[float], float],
    target: float,
    tolerance: float,
    guess: float,
) -> float:
    """Smallest z (to ``tolerance`` in ε) with ``epsilon(z) <= target``.

    ε falls as z grows. The bracket starts at ``guess``: doubled until it meets
    the target, then a lower end is found below it, then bisection.
    """
    high = guess
    while (eps_high := epsilon(high)) > target:
        high *= 2.0
        if high > _MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"the target epsilon={target} cannot be met even with "
                f"noise_multiplier={_MAX_NOISE_MULTIPLIER:g}. Allow a larger "
                "epsilon or delta, or fewer releases."
            )
    low = 0.8 * high
    while epsilon(low) <= target:
        high, low = low, 0.8 * low
        if low < 1e-6:
            return high
    # Regula falsi (Illinois variant) on log ε against log z: ε is close to a
    # power law in z, so a handful of evaluations reach the tolerance, where
    # plain bisection needs a dozen (each PRV evaluation costs ~0.1-1 s).
    eps_high, eps_low = epsilon(high), epsilon(low)
    f_high = math.log(eps_high / target)  # <= 0
    f_low = math.log(eps_low / target)  # > 0
    side = 0
    for _ in range(100):
        if target - eps_high <= tolerance or high - low <= 1e-9 * high:
            break
        log_low, log_high = math.log(low), math.log(high)
        mid = math.exp(log_high - f_high * (log_high - log_low) / (f_high - f_low))
        if not low < mid < high:
            mid = (low + high) / 2.0
        eps_mid = epsilon(mid)
        f_mid = math.log(eps_mid / target) if eps_mid > 0 else -math.inf
        if eps_mid <= target:
            high, eps_high, f_high = mid, eps_mid, f_mid
            if side == -1:
                f_low /= 2.0
            side = -1
        else:
            low, f_low = mid, f_mid
            if side == 1:
                f_high /= 2.0
            side = 1
    return float(high)


def resolve_noise_multiplier(
    *,
    noise_multiplier: float | None,
    target_epsilon: float | None,
    num_rounds: int | None,
    delta: float,
    sampling_rate: float,
    accountant: str,
) -> float:
    """Return the noise multiplier given directly, or calibrated from a target.

    Exactly one of ``noise_multiplier`` and ``target_epsilon`` must be set;
    ``target_epsilon`` needs ``num_rounds``. Used by the DP strategy wrappers so
    that both construct from run config the same way.
    """
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError(
            "set exactly one of noise_multiplier (e.g. 1.0) and target_epsilon "
            "(e.g. 4.0, calibrated over num_rounds); got "
            f"noise_multiplier={noise_multiplier!r}, "
            f"target_epsilon={target_epsilon!r}"
        )
    if noise_multiplier is not None:
        return check_positive("noise_multiplier", noise_multiplier)
    if num_rounds is None:
        raise ValueError(
            f"target_epsilon={target_epsilon} needs num_rounds (the number of "
            "rounds the budget is spread over) to calibrate the noise"
        )
    return calibrate_noise_multiplier(
        target_epsilon,  # type: ignore[arg-type]
        delta,
        check_int("num_rounds", num_rounds, 1),
        sampling_rate,
        accountant,
    )


def effective_noise_multiplier(
    update_noise_multiplier: float, count_noise_stddev: float
) -> float:
    """Noise multiplier of the joint (update, clipped-count) release.

    ``z = (z_update**-2 + (2 * count_noise_stddev)**-2) ** -0.5``
    (Andrew et al. 2021, Theorem 1; centred bits have sensitivity 1/2).
    """
    z_update = check_positive("update_noise_multiplier", update_noise_multiplier)
    stddev = check_positive("count_noise_stddev", count_noise_stddev)
    return (z_update**-2 + (2.0 * stddev) ** -2) ** -0.5


def update_noise_multiplier(
    noise_multiplier: float, count_noise_stddev: float
) -> float:
    """Noise multiplier for the update so the joint release has ``noise_multiplier``.

    The inverse of :func:`effective_noise_multiplier`:
    ``z_update = (z**-2 - (2 * count_noise_stddev)**-2) ** -0.5``.

    Raises
    ------
    ValueError
        If ``2 * count_noise_stddev <= noise_multiplier``: the count alone would
        already spend the whole budget.
    """
    z = check_positive("noise_multiplier", noise_multiplier)
    stddev = check_positive("clipped_count_stddev", count_noise_stddev)
    remainder = z**-2 - (2.0 * stddev) ** -2
    if remainder <= 0 or not math.isfinite(remainder):
        raise ValueError(
            f"clipped_count_stddev={stddev} is too small for noise_multiplier={z}: "
            f"the noised clipped count alone would spend the whole budget. Use "
            f"clipped_count_stddev > {z / 2:.4g} (e.g. {1.5 * z:.4g}, which costs "
            "about 6 % more noise on the update)"
        )
    return remainder**-0.5
