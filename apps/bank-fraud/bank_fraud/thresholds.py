"""Choosing a decision threshold on validation data, without pooling any scores.

A fraud (or screening) model outputs a score; the bank acts on ``score >=
threshold``. The threshold is an operating decision - how many alerts the
investigators can handle, how much fraud may slip through - and it must be
chosen on *validation* rows, never on the test rows it is then judged on.

Every site already sends the server per-class histograms of its test scores
over the fixed bins of :func:`flwr_ext.appkit.metrics.score_bin_edges`
(:class:`~flwr_ext.appkit.metrics.BinaryStats`). Here a site also sends the same
histograms of its **validation** scores (:func:`validation_metrics`, keys
``val-hist-pos``/``val-hist-neg``): counts per bin, never a score or a row. On
a bin edge ``t`` the confusion counts of ``score >= t`` are exact sums of bins,
so the server can:

1. pool the validation histograms (``threshold-selection = "federated"``: one
   threshold for the whole consortium), or take each site's own
   (``"site"``: every bank its own threshold);
2. pick the edge the rule asks for (:func:`choose_threshold`):

   - ``max-f1`` - the highest F1 on validation rows;
   - ``max-fpr`` - the most recall whose false-positive rate is at most
     ``threshold-max-fpr`` (an alert budget: 1 % of legitimate transactions);
   - ``min-precision`` - the most recall whose precision is at least
     ``threshold-min-precision`` (at least one real fraud per N alerts);
   - ``fixed`` - ``decision-threshold``, snapped to the nearest bin edge;

3. compute precision, recall, F1 and alert rate *at that threshold* on the test
   histograms - exactly the numbers each site would compute from its own
   scores (:func:`flwr_ext.appkit.metrics.counts_at`).

This module holds the run-config options and the choice itself. The pieces
around it, one concept each: :mod:`bank_fraud.validation_histograms` (what a
bank sends), :mod:`bank_fraud.threshold_metrics` (the Flower
``evaluate_metrics_aggr_fn`` that applies the choice every round) and
:mod:`bank_fraud.site_thresholds` (each bank's metrics at its threshold, added
to the run's history for the results folder).

If the validation rows hold no positive (or no negative), no rule can be
evaluated and ``decision-threshold`` is used, with a WARNING.

Bins are uniform in logit space (200 bins: about 0.12 logit apart), so the
chosen threshold is within half a bin of the best one on the validation rows.

What the server learns: per site, how many validation and test rows of each
class fall in each score bin - as for the pooled AUROC/AUPRC of
:mod:`flwr_ext.appkit.metrics`. A Byzantine site can skew a pooled threshold by
sending crafted validation histograms; ``"site"`` selection confines that to
its own threshold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import numpy as np
from flwr.supercore import log

from flwr_ext.appkit.config import Option
from flwr_ext.appkit.metrics import (
    BinaryStats,
    OperatingCurve,
    OperatingPoint,
    counts_at,
    operating_curve,
    score_bin_edges,
)

__all__ = [
    "AT_THRESHOLD",
    "THRESHOLD_OPTIONS",
    "THRESHOLD_RULES",
    "THRESHOLD_SELECTIONS",
    "ThresholdChoice",
    "ThresholdRule",
    "choose_threshold",
    "nearest_edge",
    "own_threshold_index",
    "threshold_rule_from_settings",
]

THRESHOLD_RULES = ("max-f1", "max-fpr", "min-precision", "fixed")
THRESHOLD_SELECTIONS = ("federated", "site")
#: Metrics computed at the chosen threshold (keys of the aggregated record).
AT_THRESHOLD = ("precision", "recall", "f1", "alert-rate", "fpr")

#: Run-config options of threshold selection.
THRESHOLD_OPTIONS: tuple[Option, ...] = (
    Option(
        "threshold-selection",
        str,
        "federated",
        "decision threshold from 'federated' (pooled) validation histograms, or "
        "each 'site''s own",
        choices=THRESHOLD_SELECTIONS,
    ),
    Option(
        "threshold-rule",
        str,
        "max-f1",
        "how the threshold is chosen on validation rows",
        choices=THRESHOLD_RULES,
    ),
    Option(
        "threshold-max-fpr",
        float,
        0.01,
        "max-fpr rule: largest false-positive rate allowed (the alert budget)",
        min=0.0,
        max=1.0,
        min_exclusive=True,
    ),
    Option(
        "threshold-min-precision",
        float,
        0.5,
        "min-precision rule: smallest precision allowed",
        min=0.0,
        max=1.0,
        min_exclusive=True,
    ),
    Option(
        "decision-threshold",
        float,
        0.5,
        "fixed rule, and the fallback when validation rows lack a class",
        min=0.0,
        max=1.0,
        min_exclusive=True,
        max_exclusive=True,
    ),
)


@dataclass(frozen=True)
class ThresholdRule:
    """How to choose a threshold (see the module docstring).

    Attributes
    ----------
    rule : {"max-f1", "max-fpr", "min-precision", "fixed"}
        The criterion.
    max_fpr : float
        ``max-fpr``: largest false-positive rate, in (0, 1].
    min_precision : float
        ``min-precision``: smallest precision, in (0, 1].
    fallback : float
        ``fixed``: the threshold; else used when the rule cannot be evaluated.
    """

    rule: str = "max-f1"
    max_fpr: float = 0.01
    min_precision: float = 0.5
    fallback: float = 0.5

    def __post_init__(self) -> None:
        if self.rule not in THRESHOLD_RULES:
            raise ValueError(
                f"rule={self.rule!r} is not valid; choose one of "
                f"{', '.join(THRESHOLD_RULES)}"
            )
        for name in ("max_fpr", "min_precision"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if not 0 < self.fallback < 1:
            raise ValueError(f"fallback must be in (0, 1), got {self.fallback}")


def threshold_rule_from_settings(settings: Mapping[str, Any]) -> ThresholdRule:
    """Return the :class:`ThresholdRule` of validated :data:`THRESHOLD_OPTIONS`."""
    return ThresholdRule(
        rule=settings["threshold-rule"],
        max_fpr=settings["threshold-max-fpr"],
        min_precision=settings["threshold-min-precision"],
        fallback=settings["decision-threshold"],
    )


@dataclass(frozen=True)
class ThresholdChoice:
    """A chosen threshold and how it did on the validation rows.

    Attributes
    ----------
    index : int
        Inner bin edge (see :func:`counts_at`).
    threshold : float
        ``score_bin_edges(bins)[index]``.
    validation : OperatingPoint
        Counts on the validation rows it was chosen on.
    rule : str
        The rule applied, or ``"fallback"`` if it could not be.
    reason : str
        Why the fallback was used (empty otherwise).
    """

    index: int
    threshold: float
    validation: OperatingPoint
    rule: str
    reason: str = ""


def choose_threshold(validation: BinaryStats, rule: ThresholdRule) -> ThresholdChoice:
    """Choose the threshold ``rule`` asks for on ``validation``'s histograms.

    Ties go to the *higher* threshold for ``max-f1`` (fewer alerts for the same
    F1) and to the *lower* one for ``max-fpr`` and ``min-precision`` (more
    fraud caught within the constraint). ``min-precision`` with no edge reaching
    the precision falls back to ``max-f1`` and says so in ``reason``.
    """
    curve = operating_curve(validation)
    edges = score_bin_edges(validation.num_bins)
    if rule.rule == "fixed":
        return _choice(validation, nearest_edge(edges, rule.fallback), "fixed")
    if validation.positives == 0 or validation.negatives == 0:
        missing = "positive" if validation.positives == 0 else "negative"
        return _choice(
            validation,
            nearest_edge(edges, rule.fallback),
            "fallback",
            f"the validation rows hold no {missing} row; using decision-threshold "
            f"{rule.fallback:g}",
        )
    if rule.rule == "max-fpr":
        ok = np.flatnonzero(curve.fpr <= rule.max_fpr)
        # fpr falls as the threshold rises: ok is a tail; its start has most recall.
        if ok.size:
            return _choice(validation, int(ok[0]) + 1, "max-fpr")
        return _choice(
            validation,
            validation.num_bins - 1,
            "max-fpr",
            f"even the highest threshold flags more than {rule.max_fpr:g} of the "
            "validation negatives; using the highest",
        )
    if rule.rule == "min-precision":
        precision = np.nan_to_num(curve.precision, nan=0.0)
        ok = np.flatnonzero(precision >= rule.min_precision)
        if ok.size:
            return _choice(validation, int(ok[0]) + 1, "min-precision")
        best = _max_f1_index(curve)
        return _choice(
            validation,
            best,
            "max-f1",
            f"no threshold reaches precision {rule.min_precision:g} on the "
            f"validation rows (best {float(precision.max()):.3f}); using max-f1",
        )
    return _choice(validation, _max_f1_index(curve), "max-f1")


def _max_f1_index(curve: OperatingCurve) -> int:
    f1 = np.nan_to_num(curve.f1, nan=-1.0)
    best = np.flatnonzero(f1 == f1.max())
    return int(best[-1]) + 1


def nearest_edge(edges: np.ndarray, threshold: float) -> int:
    """Return the inner edge index nearest ``threshold`` in logit space."""
    inner = edges[1:-1]
    logit = math.log(threshold / (1.0 - threshold))
    distance = np.abs(np.log(inner / (1.0 - inner)) - logit)
    return int(np.argmin(distance)) + 1


def _choice(
    validation: BinaryStats, index: int, rule: str, reason: str = ""
) -> ThresholdChoice:
    point = counts_at(validation, index)
    return ThresholdChoice(index, point.threshold, point, rule, reason)


def own_threshold_index(
    num_bins: int, validation: BinaryStats | None, rule: ThresholdRule
) -> int:
    """Return the bin edge of a site's own threshold (``selection = "site"``).

    ``validation`` None (the site sent no usable validation histograms): the
    edge nearest ``rule.fallback``. A fallback the rule had to take is logged.
    """
    if validation is None:
        return nearest_edge(score_bin_edges(num_bins), rule.fallback)
    choice = choose_threshold(validation, rule)
    if choice.reason:
        log(WARNING, "threshold (a site): %s", choice.reason)
    return choice.index
