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
   scores (:func:`counts_at`).

:func:`make_threshold_metrics_aggregator` does this every round as a Flower
``evaluate_metrics_aggr_fn``; :func:`add_site_threshold_metrics` does it per
site for the results folder. If the validation rows hold no positive (or no
negative), no rule can be evaluated and ``decision-threshold`` is used, with a
WARNING.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from logging import WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.supercore import log

from .config import Option
from .metrics import BinaryStats, make_metrics_aggregator, score_bin_edges

if TYPE_CHECKING:
    from .histogram_recorder import HistogramRecordingGrid

__all__ = [
    "HISTOGRAM_KEYS",
    "THRESHOLD_OPTIONS",
    "THRESHOLD_RULES",
    "THRESHOLD_SELECTIONS",
    "VAL_KEYS",
    "OperatingPoint",
    "SiteEvaluation",
    "ThresholdChoice",
    "ThresholdRule",
    "add_site_threshold_metrics",
    "choose_threshold",
    "counts_at",
    "make_threshold_metrics_aggregator",
    "operating_curve",
    "threshold_rule_from_settings",
    "validation_metrics",
    "validation_stats",
]

#: MetricRecord keys of a site's validation-score histograms.
KEY_VAL_POS, KEY_VAL_NEG = "val-hist-pos", "val-hist-neg"
VAL_KEYS = (KEY_VAL_POS, KEY_VAL_NEG)
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


# ------------------------------------------------------------ exact counts
@dataclass(frozen=True)
class OperatingPoint:
    """Confusion counts and rates of ``score >= threshold`` on some rows."""

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def precision(self) -> float:
        """TP / (TP + FP); NaN when nothing is flagged."""
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        """TP / (TP + FN): the share of fraud caught."""
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def fpr(self) -> float:
        """FP / (FP + TN): the share of legitimate rows flagged."""
        return _ratio(self.fp, self.fp + self.tn)

    @property
    def f1(self) -> float:
        """2 TP / (2 TP + FP + FN)."""
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def alert_rate(self) -> float:
        """(TP + FP) / rows: alerts per row scored."""
        return _ratio(self.tp + self.fp, self.tp + self.fp + self.tn + self.fn)

    def counts(self) -> dict[str, float]:
        """Return ``tp``, ``fp``, ``tn``, ``fn`` (as floats, like recorded metrics)."""
        return {k: float(getattr(self, k)) for k in ("tp", "fp", "tn", "fn")}

    def metrics(self) -> dict[str, float]:
        """Return the finite values of :data:`AT_THRESHOLD` and the threshold."""
        values = {
            "threshold": self.threshold,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "alert-rate": self.alert_rate,
            "fpr": self.fpr,
        }
        return {k: float(v) for k, v in values.items() if math.isfinite(v)}


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else math.nan


def counts_at(stats: BinaryStats, index: int) -> OperatingPoint:
    """Exact counts of ``score >= edges[index]`` from the histograms.

    ``index`` is an inner edge of :func:`score_bin_edges` (1 ... bins - 1): a
    score is in bin ``i`` exactly when ``edges[i] <= score < edges[i + 1]``, so
    it is at or above ``edges[index]`` exactly when ``i >= index``.
    """
    bins = stats.num_bins
    if not 1 <= index <= bins - 1:
        raise ValueError(f"index must be an inner bin edge in [1, {bins - 1}]")
    tp = int(stats.hist_pos[index:].sum())
    fp = int(stats.hist_neg[index:].sum())
    return OperatingPoint(
        float(score_bin_edges(bins)[index]),
        tp,
        fp,
        stats.negatives - fp,
        stats.positives - tp,
    )


@dataclass(frozen=True)
class OperatingCurve:
    """Counts at every inner bin edge, thresholds increasing.

    Attributes
    ----------
    thresholds : np.ndarray
        ``(bins - 1,)`` inner edges.
    tp, fp : np.ndarray
        ``(bins - 1,)`` rows of each class with ``score >= threshold``.
    positives, negatives : int
        Rows of each class.
    """

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    positives: int
    negatives: int

    @property
    def recall(self) -> np.ndarray:
        """Recall per threshold (NaN without positives)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return (
                self.tp / float(self.positives) if self.positives else self.tp * np.nan
            )

    @property
    def precision(self) -> np.ndarray:
        """Precision per threshold (NaN where nothing is flagged)."""
        flagged = self.tp + self.fp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(flagged > 0, self.tp / np.maximum(flagged, 1), np.nan)

    @property
    def fpr(self) -> np.ndarray:
        """False-positive rate per threshold (NaN without negatives)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return (
                self.fp / float(self.negatives) if self.negatives else self.fp * np.nan
            )

    @property
    def f1(self) -> np.ndarray:
        """F1 per threshold."""
        den = self.tp + self.positives + self.fp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, 2 * self.tp / np.maximum(den, 1), np.nan)


def operating_curve(stats: BinaryStats) -> OperatingCurve:
    """Return the counts of ``stats`` at every inner bin edge (a PR/ROC curve)."""
    bins = stats.num_bins
    tp_desc = np.cumsum(stats.hist_pos[::-1])[::-1]  # tp_desc[i] = sum(pos[i:])
    fp_desc = np.cumsum(stats.hist_neg[::-1])[::-1]
    return OperatingCurve(
        thresholds=score_bin_edges(bins)[1:bins],
        tp=tp_desc[1:bins].astype(np.float64),
        fp=fp_desc[1:bins].astype(np.float64),
        positives=stats.positives,
        negatives=stats.negatives,
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
        return _choice(validation, _nearest_edge(edges, rule.fallback), "fixed")
    if validation.positives == 0 or validation.negatives == 0:
        missing = "positive" if validation.positives == 0 else "negative"
        return _choice(
            validation,
            _nearest_edge(edges, rule.fallback),
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


def _nearest_edge(edges: np.ndarray, threshold: float) -> int:
    inner = edges[1:-1]
    logit = math.log(threshold / (1.0 - threshold))
    distance = np.abs(np.log(inner / (1.0 - inner)) - logit)
    return int(np.argmin(distance)) + 1


def _choice(
    validation: BinaryStats, index: int, rule: str, reason: str = ""
) -> ThresholdChoice:
    point = counts_at(validation, index)
    return ThresholdChoice(index, point.threshold, point, rule, reason)


# -------------------------------------------------------------- site side
def validation_metrics(
    labels: np.ndarray, scores: np.ndarray, *, num_bins: int
) -> dict[str, list[int]]:
    """Return what a site adds to its evaluate reply: validation histograms."""
    stats = BinaryStats.from_scores(labels, scores, num_bins=num_bins)
    return {
        KEY_VAL_POS: [int(v) for v in stats.hist_pos],
        KEY_VAL_NEG: [int(v) for v in stats.hist_neg],
    }


def validation_stats(record: Mapping[str, Any]) -> BinaryStats:
    """Read a site's validation histograms; ``ValueError`` says what is wrong."""
    missing = [key for key in VAL_KEYS if key not in record]
    if missing:
        raise ValueError(f"missing validation histograms {missing}")
    hists = []
    for key in VAL_KEYS:
        value = record[key]
        if not isinstance(value, list) or len(value) < 2:
            raise ValueError(f"'{key}' must be a list of >= 2 counts")
        if not all(
            isinstance(v, (int, float))
            and not isinstance(v, bool)
            and math.isfinite(v)
            and v >= 0
            and v == int(v)
            for v in value
        ):
            raise ValueError(f"'{key}' must hold non-negative integer counts")
        hists.append([int(v) for v in value])
    positives, negatives = sum(hists[0]), sum(hists[1])
    return BinaryStats.from_metrics(
        {"tp": positives, "fn": 0, "fp": negatives, "tn": 0,
         "hist-pos": hists[0], "hist-neg": hists[1]}
    )  # fmt: skip


# ------------------------------------------------------------ server side
def _own_index(
    num_bins: int, validation: BinaryStats | None, rule: ThresholdRule
) -> int:
    """Bin edge of a site's own threshold (``threshold-selection = "site"``)."""
    if validation is None:
        return _nearest_edge(score_bin_edges(num_bins), rule.fallback)
    choice = choose_threshold(validation, rule)
    if choice.reason:
        log(WARNING, "threshold (a site): %s", choice.reason)
    return choice.index


def make_threshold_metrics_aggregator(
    names: Sequence[str],
    rule: ThresholdRule,
    *,
    selection: str = "federated",
) -> Callable[[list[RecordDict], str], MetricRecord]:
    """Return a Flower ``evaluate_metrics_aggr_fn`` with threshold metrics.

    On top of :func:`~flwr_ext.appkit.metrics.make_metrics_aggregator`'s pooled
    ``names`` (use threshold-free ones: ``auprc``, ``recall-at-1pct-fpr``,
    ``auroc``) and site means, the aggregated record holds, at the chosen
    threshold on the pooled *test* histograms: ``precision``, ``recall``,
    ``f1``, ``alert-rate``, ``fpr`` and the counts ``tp``, ``fp``, ``tn``,
    ``fn``; plus ``threshold`` and ``val-f1``, ``val-recall``,
    ``val-precision`` (``"federated"``), or ``threshold-site-mean``
    (``"site"``: each site's counts at its own threshold, summed).

    A reply with malformed histograms is left out with a WARNING; it never
    raises.
    """
    if selection not in THRESHOLD_SELECTIONS:
        raise ValueError(
            f"selection={selection!r} is not valid; choose one of "
            f"{', '.join(THRESHOLD_SELECTIONS)}"
        )
    base = make_metrics_aggregator(names)

    def aggregate(records: list[RecordDict], weight_key: str) -> MetricRecord:
        out = base(records, weight_key)
        for key in ("tp", "fp", "tn", "fn"):
            if key in out:
                del out[key]
        pairs = _parse(records)
        if not pairs:
            return out
        if selection == "federated":
            pooled_val = _sum(v for _, v in pairs if v is not None)
            if pooled_val is None:
                log(WARNING, "threshold: no site sent validation histograms")
                return out
            choice = choose_threshold(pooled_val, rule)
            if choice.reason:
                log(WARNING, "threshold: %s", choice.reason)
            pooled_test = _sum(t for t, _ in pairs)
            assert pooled_test is not None
            point = counts_at(pooled_test, choice.index)
            out.update(point.metrics())
            for key, value in choice.validation.metrics().items():
                if key in ("precision", "recall", "f1"):
                    out[f"val-{key}"] = value
        else:
            total = None
            thresholds: list[tuple[float, float]] = []
            for test, val in pairs:
                point = counts_at(test, _own_index(test.num_bins, val, rule))
                total = point if total is None else _add_points(total, point)
                rows = float(test.positives + test.negatives)
                thresholds.append((point.threshold, rows))
            assert total is not None
            out.update({k: v for k, v in total.metrics().items() if k != "threshold"})
            weight = sum(w for _, w in thresholds)
            out["threshold-site-mean"] = sum(t * w for t, w in thresholds) / weight
            point = total
        for key in ("tp", "fp", "tn", "fn"):
            out[key] = int(getattr(point, key))
        return out

    return aggregate


def _parse(records: list[RecordDict]) -> list[tuple[BinaryStats, BinaryStats | None]]:
    pairs = []
    for record in records:
        metric_records = list(record.metric_records.values())
        if not metric_records:
            continue
        values = metric_records[0]
        try:
            test = BinaryStats.from_metrics(values)
        except ValueError:
            continue  # already reported by the base aggregator
        val = None
        try:
            val = validation_stats(values)
            if val.num_bins != test.num_bins:
                raise ValueError("validation and test histograms differ in bins")
        except ValueError as err:
            log(WARNING, "threshold: a reply's validation statistics were ignored: %s",
                err)  # fmt: skip
            val = None
        pairs.append((test, val))
    if pairs and len({t.num_bins for t, _ in pairs}) > 1:
        log(WARNING, "threshold: sites sent histograms with different bin counts; "
            "no threshold metrics this round")  # fmt: skip
        return []
    return pairs


def _sum(items: Any) -> BinaryStats | None:
    total = None
    for item in items:
        total = item if total is None else total + item
    return total


def _add_points(a: OperatingPoint, b: OperatingPoint) -> OperatingPoint:
    return OperatingPoint(math.nan, a.tp + b.tp, a.fp + b.fp, a.tn + b.tn, a.fn + b.fn)


# ------------------------------------------------------------- per site
#: Keys a HistogramRecordingGrid must keep for :func:`add_site_threshold_metrics`.
HISTOGRAM_KEYS = ("hist-pos", "hist-neg", *VAL_KEYS)


@dataclass(frozen=True)
class SiteEvaluation:
    """One site's test statistics in one round, and its point at the threshold."""

    test: BinaryStats
    point: OperatingPoint


def add_site_threshold_metrics(
    history: list[dict[str, Any]],
    grid: HistogramRecordingGrid,
    rule: ThresholdRule,
    *,
    selection: str = "federated",
) -> dict[int, dict[str, SiteEvaluation]]:
    """Add each site's metrics at its threshold to a run's history, in place.

    Parameters
    ----------
    history : list of dict
        :func:`flwr_ext.appkit.results.round_history` entries; each site's
        ``evaluate`` dict gains ``threshold``, ``precision``, ``recall``,
        ``f1``, ``alert-rate`` and ``fpr``, and its ``tp``, ``fp``, ``tn``,
        ``fn`` become the counts at that threshold.
    grid : HistogramRecordingGrid
        The grid the run went through, keeping :data:`HISTOGRAM_KEYS`.
    rule : ThresholdRule
        The run's rule.
    selection : {"federated", "site"}
        ``"federated"``: every site at the round's aggregated ``threshold``;
        ``"site"``: each site at the threshold of its own validation rows.

    Returns
    -------
    dict
        Round -> site -> :class:`SiteEvaluation` (for curves of the final model).
    """
    out: dict[int, dict[str, SiteEvaluation]] = {}
    for entry in history:
        server_round = entry["round"]
        record = grid.phases.get("evaluate", {}).get(server_round)
        lists = grid.node_lists("evaluate", server_round)
        if record is None or not lists:
            continue
        threshold = (entry["aggregated"].get("evaluate") or {}).get("threshold")
        if selection == "federated" and threshold is None:
            continue  # no pooled threshold this round (no valid evaluation)
        for node_id, values in sorted(lists.items()):
            scalars = record.per_node.get(node_id, {})
            try:
                test = BinaryStats.from_metrics(
                    {**{k: scalars.get(k) for k in ("tp", "fp", "tn", "fn")},
                     **values}
                )  # fmt: skip
            except (ValueError, TypeError):
                continue
            val = None
            try:
                val = validation_stats(values)
            except ValueError:
                val = None
            if selection == "federated":
                edges = score_bin_edges(test.num_bins)
                point = counts_at(test, _nearest_edge(edges, float(threshold)))
            else:
                point = counts_at(test, _own_index(test.num_bins, val, rule))
            site = grid.site_of(node_id)
            metrics = entry["sites"].setdefault(site, {"node-id": node_id})
            metrics.setdefault("evaluate", {}).update(
                {**point.metrics(), **point.counts()}
            )
            out.setdefault(server_round, {})[site] = SiteEvaluation(test, point)
    return out
