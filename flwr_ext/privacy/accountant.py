"""Cumulative (ε, δ) accounting for repeated (subsampled) Gaussian releases.

Every private release in flwr-ext - a noised model update in DP-FedAvg, a noised
gradient step in DP-SGD - is one Gaussian mechanism, optionally applied to a Poisson
subsample. :class:`PrivacyAccountant` records those releases and answers "how much
privacy has been spent, for whom, under which assumptions?".

Which library, and why
----------------------
The arithmetic is delegated to Opacus's accountants (``opacus.accountants``), which
are maintained, installed with flwr-ext, and handle Poisson subsampling:

* ``"prv"`` (default): numerical composition of privacy-loss random variables
  (Gopi, Lee & Wutschitz, NeurIPS 2021). It is near-exact - within 0.5 % of the
  closed form for full participation and 5-10 % below RDP for Poisson sampling
  at q = 0.2 - and Opacus returns the *upper* end of its error interval, so the
  reported ε is a guarantee, not an estimate.
* ``"rdp"``: Rényi DP (Mironov 2017; Mironov, Talwar & Zhang 2019) with the
  improved conversion to (ε, δ) of Balle et al. 2020. Looser, but the most widely
  audited method; use it to compare with other tools. flwr-ext searches a wider
  range of orders (:data:`RDP_ORDERS`) than Opacus's default, which matters for
  strong privacy (ε ≈ 1) where the best order is large.

Google's ``dp-accounting`` (RDP and PLD) is equally good but is not a dependency of
Flower or flwr-ext; Opacus is (for DP-SGD), so using it everywhere keeps one
accountant implementation for client-level and record-level guarantees.

What the numbers mean
---------------------
A figure (ε, δ) is only meaningful with its *unit* (whose data is protected: one
client's entire dataset, or one record) and its *neighbouring relation*:

* ``add-or-remove-one``: the outputs barely change whether one unit's data is
  included or not. This is the relation under which Poisson subsampling amplifies
  privacy (each unit is included independently with probability q).
* ``zero-out-one``: the outputs barely change if one unit's contribution is
  replaced by zeros while its participation stays visible (used for distributed
  DP, where each client adds a share of the noise; see
  :class:`flwr_ext.strategy.DistributedDP`).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.rdp import RDPAccountant

from . import _opacus  # noqa: F401 - undoes Opacus's basicConfig
from .validation import check_choice, check_int, check_open_unit, check_positive

__all__ = [
    "ACCOUNTANTS",
    "RDP_ORDERS",
    "Neighbouring",
    "PrivacyAccountant",
    "PrivacySpent",
    "PrivacyUnit",
    "compute_epsilon",
    "epsilon_and_method",
    "rdp_upper_bound",
]

#: Accountants flwr-ext accepts (Opacus mechanism names).
ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp")

#: Rényi orders searched by the ``"rdp"`` accountant: Opacus's defaults (1.1 ... 63)
#: plus larger orders, which give the tightest bound when the noise is large.
RDP_ORDERS: tuple[float, ...] = (
    *(float(a) for a in RDPAccountant.DEFAULT_ALPHAS),
    80.0,
    96.0,
    128.0,
    160.0,
    192.0,
    256.0,
    384.0,
    512.0,
    768.0,
    1024.0,
)

#: The integer orders of :data:`RDP_ORDERS` (see :func:`rdp_upper_bound`).
_INTEGER_ORDERS: tuple[float, ...] = tuple(a for a in RDP_ORDERS if a == int(a))

#: Error target of the PRV accountant in ε (Opacus's default); the reported ε is
#: the upper end of the interval.
PRV_EPS_ERROR = 0.01

#: Above this ε (as bounded by RDP) no meaningful privacy is left, and the PRV
#: accountant's discretisation domain explodes (seconds to minutes per call, then
#: ``inf`` or an allocation of petabytes). flwr-ext then reports the RDP bound,
#: which is also a valid upper bound, and names "rdp" as the method used.
PRV_MAX_EPSILON = 30.0


class PrivacyUnit(StrEnum):
    """Whose data one (ε, δ) figure protects."""

    CLIENT = "client"
    RECORD = "record"


class Neighbouring(StrEnum):
    """Which pairs of datasets the guarantee makes indistinguishable."""

    ADD_OR_REMOVE_ONE = "add-or-remove-one"
    ZERO_OUT_ONE = "zero-out-one"


#: One entry of an accountant's history: (noise multiplier, sampling rate, count).
Event = tuple[float, float, int]


@dataclass(frozen=True)
class PrivacySpent:
    """Cumulative privacy spent, with everything needed to interpret it.

    Attributes
    ----------
    epsilon : float
        Cumulative ε at ``delta`` (0.0 before the first release).
    delta : float
        The δ the ε is reported at.
    releases : int
        Number of Gaussian releases composed (rounds, or DP-SGD steps).
    accountant : str
        Method that computed ε: ``"prv"`` or ``"rdp"`` (Opacus's
        implementations; see :func:`epsilon_and_method`).
    unit : PrivacyUnit
        Whose data is protected: one client's whole dataset, or one record.
    neighbouring : Neighbouring
        The neighbouring relation of the guarantee.
    sampling : str
        How the unit was sampled, e.g. ``"Poisson q=0.2"`` or ``"none (q=1)"``.
    """

    epsilon: float
    delta: float
    releases: int
    accountant: str
    unit: PrivacyUnit
    neighbouring: Neighbouring
    sampling: str

    def describe(self) -> str:
        """One line for logs and reports, e.g. for a compliance officer."""
        return (
            f"(epsilon={self.epsilon:.4g}, delta={self.delta:g}) per {self.unit} "
            f"[{self.neighbouring} {self.unit}; sampling: {self.sampling}; "
            f"{self.accountant.upper()} accountant (Opacus); "
            f"{self.releases} release{'s' if self.releases != 1 else ''}]"
        )


def compute_epsilon(
    history: list[Event] | tuple[Event, ...], delta: float, accountant: str = "prv"
) -> float:
    """Cumulative ε at ``delta`` of a history of Poisson-subsampled Gaussians.

    Parameters
    ----------
    history : sequence of (noise_multiplier, sampling_rate, count)
        Each entry is ``count`` releases of a Gaussian mechanism with noise
        standard deviation ``noise_multiplier`` x sensitivity, applied to a
        Poisson sample with rate ``sampling_rate`` (1.0: no subsampling).
    delta : float
        The δ to report ε at, in (0, 1).
    accountant : {"prv", "rdp"}
        Opacus accountant to use.

    Returns
    -------
    float
        ε (0.0 for an empty history). With ``"prv"`` it is the upper end of the
        numerical error interval; where PRV is infeasible (ε above
        :data:`PRV_MAX_EPSILON`) it is the RDP bound (see
        :func:`epsilon_and_method`).
    """
    return epsilon_and_method(history, delta, accountant)[0]


def epsilon_and_method(
    history: list[Event] | tuple[Event, ...], delta: float, accountant: str = "prv"
) -> tuple[float, str]:
    """Like :func:`compute_epsilon`, also naming the method that produced ε.

    The method is ``accountant``, except that ``"prv"`` falls back to ``"rdp"``
    when the RDP bound already exceeds :data:`PRV_MAX_EPSILON`.
    """
    check_choice("accountant", accountant, ACCOUNTANTS)
    delta = check_open_unit("delta", delta)
    if not history:
        return 0.0, accountant
    events = tuple((float(z), float(q), int(n)) for z, q, n in history)
    return _cached_epsilon(events, delta, accountant)


@functools.lru_cache(maxsize=4096)
def _cached_epsilon(
    events: tuple[Event, ...], delta: float, accountant: str
) -> tuple[float, str]:
    """Pure function of its arguments, so results are memoised process-wide."""
    if accountant == "rdp":
        return _opacus_epsilon(events, delta, "rdp"), "rdp"
    # Cheap upper bounds first: subsampling only lowers ε, so RDP without it
    # (q = 1, closed form) bounds ε; so does RDP over integer orders only (fast).
    # Either at most PRV_MAX_EPSILON means PRV is safe to run.
    unsampled = [(z, 1.0, n) for z, _, n in events]
    if (
        _opacus_epsilon(unsampled, delta, "rdp") > PRV_MAX_EPSILON
        and rdp_upper_bound(events, delta) > PRV_MAX_EPSILON
    ):
        rdp = _opacus_epsilon(events, delta, "rdp")
        if rdp > PRV_MAX_EPSILON:
            return rdp, "rdp"
    return _opacus_epsilon(events, delta, "prv"), "prv"


def rdp_upper_bound(events: tuple[Event, ...] | list[Event], delta: float) -> float:
    """RDP ε over the integer orders only: a valid, slightly looser, fast bound.

    Fractional orders need a slowly converging series in Opacus (most of the
    cost of an RDP evaluation when q < 1); dropping them can only raise the
    minimum over orders, so the result is never below :func:`compute_epsilon`'s
    RDP or PRV figure. Used to bracket calibration and to gate PRV.
    """
    return _opacus_epsilon(events, delta, "rdp", orders=_INTEGER_ORDERS)


def _opacus_epsilon(
    events: tuple[Event, ...] | list[Event],
    delta: float,
    mechanism: str,
    orders: tuple[float, ...] = RDP_ORDERS,
) -> float:
    engine = create_accountant(mechanism=mechanism)
    engine.history = list(events)
    # PRV with q = 1 takes log(1 - q) = -inf in a branch it then discards; Opacus
    # handles it, numpy warns about it. RDP may note that the best order is the
    # largest one searched: the bound is still valid, only not the tightest.
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        if mechanism == "rdp":
            epsilon = engine.get_epsilon(delta=delta, alphas=list(orders))
        else:
            epsilon = engine.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR)
    epsilon = float(epsilon)
    if math.isnan(epsilon):
        raise ArithmeticError(
            f"the {mechanism} accountant returned NaN for history {events} at "
            f"delta={delta}"
        )
    return max(epsilon, 0.0)


def _describe_sampling(history: list[Event]) -> str:
    rates = sorted({q for _, q, _ in history})
    if not rates:
        return "none yet"
    if rates == [1.0]:
        return "none (every unit in every release, q=1)"
    return "Poisson q=" + "/".join(f"{q:g}" for q in rates)


class PrivacyAccountant:
    """Composes Gaussian releases and reports cumulative (ε, δ) for one unit.

    Parameters
    ----------
    accountant : {"prv", "rdp"} (default: "prv")
        Opacus accountant used for the arithmetic (see the module docstring).
    delta : float (default: 1e-5)
        δ at which ε is reported, in (0, 1). It should be well below
        1 / (number of units): a mechanism that publishes one random unit's data
        outright is (0, 1/N)-DP.
    unit : PrivacyUnit (default: CLIENT)
        Whose data the figure protects.
    neighbouring : Neighbouring (default: ADD_OR_REMOVE_ONE)
        Neighbouring relation of the guarantee.

    Notes
    -----
    The state (:meth:`state_dict`) is a flat mapping of str, float and lists that
    fits a Flower ``ConfigRecord`` or JSON, so the accountant can be saved with a
    run (e.g. in ``context.state``) and restored to continue it.
    """

    def __init__(
        self,
        accountant: str = "prv",
        *,
        delta: float = 1e-5,
        unit: PrivacyUnit = PrivacyUnit.CLIENT,
        neighbouring: Neighbouring = Neighbouring.ADD_OR_REMOVE_ONE,
    ) -> None:
        self.accountant = check_choice("accountant", accountant, ACCOUNTANTS)
        self.delta = check_open_unit("delta", delta)
        self.unit = PrivacyUnit(unit)
        self.neighbouring = Neighbouring(neighbouring)
        self._history: list[Event] = []

    # ----------------------------------------------------------------- queries
    @property
    def history(self) -> tuple[Event, ...]:
        """Composed releases as (noise multiplier, sampling rate, count)."""
        return tuple(self._history)

    @property
    def releases(self) -> int:
        """Number of releases composed so far."""
        return sum(n for _, _, n in self._history)

    def get_epsilon(self, delta: float | None = None) -> float:
        """Cumulative ε at ``delta`` (default: the accountant's δ)."""
        return self._epsilon(tuple(self._history), self._delta(delta))

    def epsilon_after(
        self,
        noise_multiplier: float,
        sampling_rate: float,
        count: int = 1,
        delta: float | None = None,
    ) -> float:
        """ε that *would* be spent after ``count`` more such releases."""
        event = _event(noise_multiplier, sampling_rate, count)
        return self._epsilon(_merged(self._history, event), self._delta(delta))

    def releases_within(
        self,
        max_epsilon: float,
        noise_multiplier: float,
        sampling_rate: float,
        limit: int,
    ) -> int:
        """Most further releases (at most ``limit``) that keep ε <= ``max_epsilon``.

        ε grows with every release, so a bisection over the count finds the
        largest count that fits (0 if not even one does).
        """
        max_epsilon = check_positive("max_epsilon", max_epsilon)
        limit = check_int("limit", limit, 0)
        if limit == 0 or (
            self.epsilon_after(noise_multiplier, sampling_rate, 1) > max_epsilon
        ):
            return 0
        if self.epsilon_after(noise_multiplier, sampling_rate, limit) <= max_epsilon:
            return limit
        low, high = 1, limit  # fits(low) and not fits(high)
        while high - low > 1:
            mid = (low + high) // 2
            if self.epsilon_after(noise_multiplier, sampling_rate, mid) <= max_epsilon:
                low = mid
            else:
                high = mid
        return low

    def spent(self, delta: float | None = None) -> PrivacySpent:
        """Cumulative privacy spent, with its unit and assumptions."""
        delta = self._delta(delta)
        epsilon, method = self._epsilon_method(tuple(self._history), delta)
        return PrivacySpent(
            epsilon=epsilon,
            delta=delta,
            releases=self.releases,
            accountant=method,
            unit=self.unit,
            neighbouring=self.neighbouring,
            sampling=_describe_sampling(self._history),
        )

    # ----------------------------------------------------------------- updates
    def compose(
        self, noise_multiplier: float, sampling_rate: float, count: int = 1
    ) -> None:
        """Record ``count`` releases of a (subsampled) Gaussian mechanism.

        Parameters
        ----------
        noise_multiplier : float
            Noise standard deviation divided by the sensitivity (> 0).
        sampling_rate : float
            Probability with which each unit was included, independently (Poisson
            sampling), in (0, 1]; 1.0 for no subsampling.
        count : int (default: 1)
            Number of identical releases.
        """
        self._history = list(
            _merged(self._history, _event(noise_multiplier, sampling_rate, count))
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, str | float | list[float] | list[int]]:
        """Return the state as a flat dict that fits a ConfigRecord or JSON."""
        return {
            "accountant": self.accountant,
            "delta": self.delta,
            "unit": str(self.unit),
            "neighbouring": str(self.neighbouring),
            "noise-multipliers": [z for z, _, _ in self._history],
            "sampling-rates": [q for _, q, _ in self._history],
            "counts": [n for _, _, n in self._history],
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore a history saved with :meth:`state_dict`.

        Raises ``ValueError`` if the state was written by a different kind of
        accountant, for a different unit or relation, or is malformed; δ may
        differ (ε can be reported at any δ).
        """
        for key in ("accountant", "unit", "neighbouring"):
            if key not in state:
                raise ValueError(f"privacy accountant state has no '{key}'")
        mine = {
            "accountant": self.accountant,
            "unit": str(self.unit),
            "neighbouring": str(self.neighbouring),
        }
        for key, expected in mine.items():
            if str(state[key]) != expected:
                raise ValueError(
                    f"privacy accountant state has {key}={state[key]!r}, but this "
                    f"accountant has {key}={expected!r}: ε composed under different "
                    "assumptions cannot be added up"
                )
        try:
            zs = [float(z) for z in state["noise-multipliers"]]  # type: ignore[attr-defined]
            qs = [float(q) for q in state["sampling-rates"]]  # type: ignore[attr-defined]
            ns = [int(n) for n in state["counts"]]  # type: ignore[attr-defined]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed privacy accountant state: {err!r}") from err
        if not len(zs) == len(qs) == len(ns):
            raise ValueError(
                "malformed privacy accountant state: noise-multipliers, "
                f"sampling-rates and counts have lengths {len(zs)}, {len(qs)}, "
                f"{len(ns)}"
            )
        history: list[Event] = []
        for z, q, n in zip(zs, qs, ns, strict=True):
            history = list(_merged(history, _event(z, q, n)))
        self._history = history

    @classmethod
    def from_state_dict(cls, state: Mapping[str, object]) -> PrivacyAccountant:
        """Build an accountant from :meth:`state_dict` output."""
        try:
            accountant = cls(
                str(state["accountant"]),
                delta=float(state["delta"]),  # type: ignore[arg-type]
                unit=PrivacyUnit(str(state["unit"])),
                neighbouring=Neighbouring(str(state["neighbouring"])),
            )
        except KeyError as err:
            raise ValueError(f"privacy accountant state has no {err}") from err
        accountant.load_state_dict(state)
        return accountant

    def __repr__(self) -> str:
        return (
            f"PrivacyAccountant({self.accountant!r}, delta={self.delta:g}, "
            f"unit={self.unit.value!r}, neighbouring={self.neighbouring.value!r}, "
            f"releases={self.releases})"
        )

    # --------------------------------------------------------------- private
    def _delta(self, delta: float | None) -> float:
        return self.delta if delta is None else check_open_unit("delta", delta)

    def _epsilon(self, history: tuple[Event, ...], delta: float) -> float:
        return self._epsilon_method(history, delta)[0]

    def _epsilon_method(
        self, history: tuple[Event, ...], delta: float
    ) -> tuple[float, str]:
        return epsilon_and_method(history, delta, self.accountant)


def _event(noise_multiplier: float, sampling_rate: float, count: int) -> Event:
    z = check_positive("noise_multiplier", noise_multiplier)
    q = float(sampling_rate)
    if not (math.isfinite(q) and 0 < q <= 1):
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    return (z, q, check_int("count", count, 1))


def _merged(history: list[Event] | tuple[Event, ...], event: Event) -> tuple:
    """``history`` plus ``event``, merged into the last entry if identical."""
    items = list(history)
    if items and items[-1][:2] == event[:2]:
        z, q, n = items.pop()
        items.append((z, q, n + event[2]))
    else:
        items.append(event)
    return tuple(items)
