"""The one protocol every aggregation rule follows, and input checks they share.

A rule maps a matrix of client updates, shape ``(n_clients, n_params)``, and a weight
per client, shape ``(n_clients,)``, to one aggregate of shape ``(n_params,)``. Rules
are pure numpy: no Flower, no I/O, no global state, and they never modify their
inputs. Constructor parameters are validated when the rule is built, so a typo fails
at start-up rather than in round 7.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

__all__ = [
    "AggregationResult",
    "AggregationRule",
    "PreAggregation",
    "check_fraction",
    "check_int",
    "check_updates",
]


@dataclass(frozen=True)
class AggregationResult:
    """An aggregate and which rows it was computed from.

    Attributes
    ----------
    value : np.ndarray
        The aggregate, shape ``(n_params,)``, float64.
    selected : np.ndarray
        Boolean mask, shape ``(n_clients,)``: rows the rule kept. Coordinate-wise
        rules (median, trimmed mean) and reweighting rules keep every row.
    """

    value: np.ndarray
    selected: np.ndarray


class AggregationRule(ABC):
    """Base class of all aggregation rules."""

    #: Short name used in logs and metrics.
    name: str = "rule"

    def min_clients(self) -> int:
        """Fewest rows for which the rule is defined (and keeps its guarantee)."""
        return 1

    def excluding_faulty(self, num_excluded: int) -> AggregationRule:
        """Return this rule for a round whose ``num_excluded`` faulty rows are gone.

        Under the Byzantine model at most ``f`` of the sampled clients are faulty,
        and an honest client never sends a malformed reply; so when the caller has
        rejected ``num_excluded`` replies that prove their sender faulty, the rows
        left hold at most ``f - num_excluded`` Byzantine ones. Rules with an ``f``
        parameter (Krum) return a copy tolerating that many; the others return
        ``self``.
        """
        return self

    def aggregate(
        self,
        updates: np.ndarray,
        weights: np.ndarray,
        *,
        overwrite_updates: bool = False,
        check_finite: bool = True,
    ) -> np.ndarray:
        """Aggregate ``updates`` ``(n, d)`` with ``weights`` ``(n,)`` into ``(d,)``.

        ``overwrite_updates=True`` lets the rule use ``updates`` as scratch space
        (e.g. sort it in place instead of sorting a copy): pass it only for a
        buffer you own and no longer need, like scipy's ``overwrite_a``. By
        default the inputs are never modified. ``check_finite=False`` skips the
        scan for NaN/Inf (see :func:`check_updates`): only for updates whose
        every row you have checked.
        """
        return self.aggregate_detailed(
            updates,
            weights,
            overwrite_updates=overwrite_updates,
            check_finite=check_finite,
        ).value

    def aggregate_detailed(
        self,
        updates: np.ndarray,
        weights: np.ndarray,
        *,
        overwrite_updates: bool = False,
        check_finite: bool = True,
    ) -> AggregationResult:
        """Like :meth:`aggregate`, also returning which rows were selected."""
        updates, weights = check_updates(
            updates, weights, self.min_clients(), check_finite=check_finite
        )
        if overwrite_updates:
            value = self._aggregate_overwriting(updates, weights)
        else:
            value = self._aggregate(updates, weights)
        return AggregationResult(value, np.ones(updates.shape[0], dtype=bool))

    @abstractmethod
    def _aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Compute the aggregate from validated inputs (weights sum to 1)."""

    def _aggregate_overwriting(
        self, updates: np.ndarray, weights: np.ndarray
    ) -> np.ndarray:
        """Like :meth:`_aggregate`, free to overwrite ``updates`` (default: same)."""
        return self._aggregate(updates, weights)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({params})"

    def _params(self) -> dict[str, object]:
        return {}


class PreAggregation(ABC):
    """A step that maps ``(n, d)`` updates to ``(n, d)`` before a rule runs.

    Example: nearest-neighbour mixing (:mod:`flwr_ext.aggregation.nnm`).
    """

    name: str = "pre"

    def min_clients(self) -> int:
        """Fewest rows for which the step is defined."""
        return 1

    def excluding_faulty(self, num_excluded: int) -> PreAggregation:
        """See :meth:`AggregationRule.excluding_faulty` (``self`` unless f-based)."""
        return self

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({params})"

    def _params(self) -> dict[str, object]:
        return {}

    @abstractmethod
    def transform(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Return a new ``(n, d)`` float matrix; never modifies ``updates``.

        The result keeps a float input's dtype (float32 in, float32 out), so the
        rule after it runs on the same fast path as without the step.
        """


def check_updates(
    updates: np.ndarray,
    weights: np.ndarray,
    min_rows: int = 1,
    *,
    check_finite: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Validate an update matrix and weights; return them ready for a rule.

    Returns the updates as a 2-D float array (no copy if already float) and the
    weights as float64 normalised to sum to 1. If every weight is 0, weights become
    uniform (a round where every client claims 0 examples still aggregates).
    ``check_finite=False`` skips the ``O(n d)`` scan for NaN/Inf in ``updates``
    (as scipy's ``check_finite``), for callers that have checked every row
    already; the weights are always checked.

    Raises
    ------
    ValueError
        If ``updates`` is not 2-D, has fewer than ``min_rows`` rows, is not finite,
        or ``weights`` has the wrong shape, a negative or a non-finite entry.
    """
    updates = np.asarray(updates)
    if updates.ndim != 2:
        raise ValueError(
            f"updates must be a 2-D (n_clients, n_params) array, got {updates.ndim}-D"
        )
    if updates.dtype.kind != "f":
        updates = updates.astype(np.float64)
    n = updates.shape[0]
    if n < min_rows:
        raise ValueError(f"this rule needs at least {min_rows} updates, got {n}")
    if check_finite and not np.isfinite(updates).all():
        raise ValueError("updates contain NaN or Inf; validate replies first")
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {weights.shape}")
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("weights must be finite and >= 0")
    total = weights.sum()
    weights = np.full(n, 1.0 / n) if total == 0 else weights / total
    return updates, weights


def check_int(name: str, value: object, minimum: int = 0) -> int:
    """Validate an integer constructor parameter (bool is rejected)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_fraction(
    name: str, value: object, low: float, high: float, *, high_inclusive: bool = False
) -> float:
    """Validate a float parameter in ``[low, high)`` (or ``[low, high]``)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    ok = low <= value <= high if high_inclusive else low <= value < high
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value}")
    return value
