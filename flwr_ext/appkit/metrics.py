"""Binary-classification metrics per site, and their federated aggregate.

Each site evaluates the global model on its own held-out rows and reports two
things in its evaluate reply's MetricRecord:

1. its own metrics, computed exactly from its scores (``auroc``, ``sensitivity``...);
2. :class:`BinaryStats`, *summable* statistics of its predictions: the confusion
   counts at the decision threshold and, per class, a histogram of the scores over
   fixed bins. No individual score or row leaves the site.

The server adds the sites' statistics and computes every metric of the pooled
test set from the sum (:func:`make_metrics_aggregator`, a drop-in
``evaluate_metrics_aggr_fn`` for any Flower strategy). Confusion-count metrics
(sensitivity, specificity, accuracy, precision, F1) are then exactly those of the
pooled rows; ranking metrics (AUROC, AUPRC, recall at a fixed FPR) are computed
from the histograms, treating scores within one bin as ties. Bins are uniform in
logit space, so confident scores near 0 and 1 stay resolved; with 200 bins the
pooled AUROC differs from the exact one by at most half the fraction of
(positive, negative) pairs that share a bin (:func:`tie_bound`).

Why not the mean of the sites' AUROCs? It is not the AUROC of anything: two sites
with perfect within-site ranking but differently calibrated scores have a mean
AUROC of 1 and a pooled one far below. Both are reported (``auroc`` and
``auroc-site-mean``).

Adding a metric (e.g. for a fraud app) is one entry in :data:`METRICS`: a
:class:`BinaryMetric` with a function of :class:`BinaryStats` and, optionally, an
exact function of ``(labels, scores, threshold)`` used at the site.

The positive class is label 1 (malignant, fraud). Scores are probabilities of the
positive class, in ``[0, 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.supercore import log

__all__ = [
    "METRICS",
    "STAT_KEYS",
    "BinaryMetric",
    "BinaryStats",
    "OperatingCurve",
    "OperatingPoint",
    "counts_at",
    "make_metrics_aggregator",
    "operating_curve",
    "ratio",
    "score_bin_edges",
    "site_metrics",
    "tie_bound",
]

#: Keys of the summable statistics in a MetricRecord.
KEY_TP, KEY_FP, KEY_TN, KEY_FN = "tp", "fp", "tn", "fn"
KEY_HIST_POS, KEY_HIST_NEG = "hist-pos", "hist-neg"
STAT_KEYS = (KEY_TP, KEY_FP, KEY_TN, KEY_FN, KEY_HIST_POS, KEY_HIST_NEG)

#: Scores are binned uniformly in logit space over [-LOGIT_RANGE, LOGIT_RANGE].
LOGIT_RANGE = 12.0


def score_bin_edges(num_bins: int) -> np.ndarray:
    """Return ``num_bins + 1`` increasing bin edges over ``[0, 1]``.

    Inner edges are ``sigmoid(t)`` for ``t`` uniform in ``[-12, 12]``; the outer
    edges are 0 and 1. Every site uses the same edges, so histograms add.
    """
    if num_bins < 2:
        raise ValueError(f"num_bins must be >= 2, got {num_bins}")
    inner = 1.0 / (1.0 + np.exp(-np.linspace(-LOGIT_RANGE, LOGIT_RANGE, num_bins - 1)))
    return np.concatenate([[0.0], inner, [1.0]])


@dataclass(frozen=True)
class BinaryStats:
    """Summable statistics of one site's (or the pooled) binary predictions.

    Attributes
    ----------
    tp, fp, tn, fn : int
        Confusion counts at the decision threshold (``score >= threshold`` is
        predicted positive).
    hist_pos, hist_neg : np.ndarray
        ``(num_bins,)`` int64 counts of positive / negative rows' scores per bin
        of :func:`score_bin_edges`.
    """

    tp: int
    fp: int
    tn: int
    fn: int
    hist_pos: np.ndarray
    hist_neg: np.ndarray

    @classmethod
    def from_scores(
        cls,
        labels: np.ndarray,
        scores: np.ndarray,
        *,
        threshold: float = 0.5,
        num_bins: int = 200,
    ) -> BinaryStats:
        """Compute the statistics of ``scores`` (probabilities) against ``labels``.

        Parameters
        ----------
        labels : np.ndarray
            ``(n,)`` labels in {0, 1}; 1 is the positive class.
        scores : np.ndarray
            ``(n,)`` probabilities of the positive class.
        threshold : float (default: 0.5)
            Decision threshold for the confusion counts.
        num_bins : int (default: 200)
            Histogram bins (see :func:`score_bin_edges`).
        """
        labels, scores = _check_labels_scores(labels, scores)
        predicted = scores >= threshold
        positive = labels == 1
        edges = score_bin_edges(num_bins)
        bins = np.clip(
            np.searchsorted(edges, scores, side="right") - 1, 0, num_bins - 1
        )
        return cls(
            tp=int(np.sum(predicted & positive)),
            fp=int(np.sum(predicted & ~positive)),
            tn=int(np.sum(~predicted & ~positive)),
            fn=int(np.sum(~predicted & positive)),
            hist_pos=np.bincount(bins[positive], minlength=num_bins).astype(np.int64),
            hist_neg=np.bincount(bins[~positive], minlength=num_bins).astype(np.int64),
        )

    @property
    def num_bins(self) -> int:
        """Number of histogram bins."""
        return int(self.hist_pos.shape[0])

    @property
    def positives(self) -> int:
        """Rows with label 1."""
        return self.tp + self.fn

    @property
    def negatives(self) -> int:
        """Rows with label 0."""
        return self.tn + self.fp

    @property
    def point(self) -> OperatingPoint:
        """The confusion counts at the site's decision threshold (not stored: NaN)."""
        return OperatingPoint(math.nan, self.tp, self.fp, self.tn, self.fn)

    def __add__(self, other: BinaryStats) -> BinaryStats:
        if self.num_bins != other.num_bins:
            raise ValueError(
                f"cannot add statistics with {self.num_bins} and {other.num_bins} bins"
            )
        return BinaryStats(
            self.tp + other.tp,
            self.fp + other.fp,
            self.tn + other.tn,
            self.fn + other.fn,
            self.hist_pos + other.hist_pos,
            self.hist_neg + other.hist_neg,
        )

    def to_metrics(self) -> dict[str, int | list[int]]:
        """Return the statistics as MetricRecord items (:data:`STAT_KEYS`)."""
        return {
            KEY_TP: self.tp,
            KEY_FP: self.fp,
            KEY_TN: self.tn,
            KEY_FN: self.fn,
            KEY_HIST_POS: [int(v) for v in self.hist_pos],
            KEY_HIST_NEG: [int(v) for v in self.hist_neg],
        }

    @classmethod
    def from_metrics(cls, record: Mapping[str, Any]) -> BinaryStats:
        """Read statistics sent by a site; ``ValueError`` if they are inconsistent.

        A site's reply is not trusted: counts must be non-negative integers, both
        histograms the same length, and each histogram must sum to its class's
        count.
        """
        missing = [k for k in STAT_KEYS if k not in record]
        if missing:
            raise ValueError(f"missing statistics {missing}")
        counts = {}
        for key in (KEY_TP, KEY_FP, KEY_TN, KEY_FN):
            counts[key] = _count(record[key], key)
        hists = {}
        for key in (KEY_HIST_POS, KEY_HIST_NEG):
            value = record[key]
            if not isinstance(value, list) or len(value) < 2:
                raise ValueError(f"'{key}' must be a list of >= 2 counts")
            hists[key] = np.array([_count(v, key) for v in value], dtype=np.int64)
        if hists[KEY_HIST_POS].shape != hists[KEY_HIST_NEG].shape:
            raise ValueError("'hist-pos' and 'hist-neg' differ in length")
        stats = cls(
            counts[KEY_TP],
            counts[KEY_FP],
            counts[KEY_TN],
            counts[KEY_FN],
            hists[KEY_HIST_POS],
            hists[KEY_HIST_NEG],
        )
        if int(stats.hist_pos.sum()) != stats.positives:
            raise ValueError(
                f"'hist-pos' sums to {int(stats.hist_pos.sum())} but tp + fn = "
                f"{stats.positives}"
            )
        if int(stats.hist_neg.sum()) != stats.negatives:
            raise ValueError(
                f"'hist-neg' sums to {int(stats.hist_neg.sum())} but tn + fp = "
                f"{stats.negatives}"
            )
        return stats


# ------------------------------------------------ counts at a threshold
def ratio(num: float, den: float) -> float:
    """Return ``num / den``, or NaN when ``den`` is 0 (a rate with no rows)."""
    return float(num) / float(den) if den > 0 else math.nan


@dataclass(frozen=True)
class OperatingPoint:
    """Confusion counts and rates of ``score >= threshold`` on some rows.

    ``threshold`` is NaN where it is not known (e.g. counts summed over sites
    that each used their own threshold).
    """

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def precision(self) -> float:
        """TP / (TP + FP); NaN when nothing is flagged."""
        return ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        """TP / (TP + FN): the share of positives caught (sensitivity)."""
        return ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        """TN / (TN + FP): the share of negatives left alone."""
        return ratio(self.tn, self.tn + self.fp)

    @property
    def fpr(self) -> float:
        """FP / (FP + TN): the share of negatives flagged."""
        return ratio(self.fp, self.fp + self.tn)

    @property
    def accuracy(self) -> float:
        """(TP + TN) / rows."""
        return ratio(self.tp + self.tn, self.tp + self.tn + self.fp + self.fn)

    @property
    def f1(self) -> float:
        """2 TP / (2 TP + FP + FN): harmonic mean of precision and recall."""
        return ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def alert_rate(self) -> float:
        """(TP + FP) / rows: alerts per row scored."""
        return ratio(self.tp + self.fp, self.tp + self.fp + self.tn + self.fn)

    def __add__(self, other: OperatingPoint) -> OperatingPoint:
        """Sum the counts (the threshold becomes NaN unless both agree)."""
        same = self.threshold == other.threshold
        return OperatingPoint(
            self.threshold if same else math.nan,
            self.tp + other.tp,
            self.fp + other.fp,
            self.tn + other.tn,
            self.fn + other.fn,
        )

    def counts(self) -> dict[str, float]:
        """Return ``tp``, ``fp``, ``tn``, ``fn`` (as floats, like recorded metrics)."""
        return {k: float(getattr(self, k)) for k in ("tp", "fp", "tn", "fn")}

    def metrics(self) -> dict[str, float]:
        """Return the finite threshold, precision, recall, f1, alert-rate and fpr."""
        values = {
            "threshold": self.threshold,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "alert-rate": self.alert_rate,
            "fpr": self.fpr,
        }
        return {k: float(v) for k, v in values.items() if math.isfinite(v)}


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


def _flagged(stats: BinaryStats) -> tuple[np.ndarray, np.ndarray]:
    """``(tp, fp)``: rows of each class with ``score >= edges[i]``, i = 0..bins-1."""
    tp = np.cumsum(stats.hist_pos[::-1])[::-1].astype(np.float64)
    fp = np.cumsum(stats.hist_neg[::-1])[::-1].astype(np.float64)
    return tp, fp


def _flagged_high_to_low(stats: BinaryStats) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_flagged` with thresholds decreasing (the last entry flags all)."""
    tp, fp = _flagged(stats)
    return tp[::-1], fp[::-1]


def operating_curve(stats: BinaryStats) -> OperatingCurve:
    """Return the counts of ``stats`` at every inner bin edge (a PR/ROC curve)."""
    bins = stats.num_bins
    tp, fp = _flagged(stats)
    return OperatingCurve(
        thresholds=score_bin_edges(bins)[1:bins],
        tp=tp[1:bins],
        fp=fp[1:bins],
        positives=stats.positives,
        negatives=stats.negatives,
    )


def _count(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"'{key}' must hold counts, got {value!r}")
    if not math.isfinite(value) or value < 0 or value != int(value):
        raise ValueError(f"'{key}' must hold non-negative integers, got {value!r}")
    return int(value)


def _check_labels_scores(
    labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.shape[0]} labels but {scores.shape[0]} scores")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if (
        not np.isfinite(scores).all()
        or scores.min(initial=0) < 0
        or scores.max(initial=0) > 1
    ):
        raise ValueError("scores must be probabilities in [0, 1]")
    return labels.astype(np.int64), scores


# ------------------------------------------------------------------ metrics
def _exact_curve(
    labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (tp, fp) at every distinct score, highest first (ties grouped).

    The same curve as scikit-learn's ``_binary_clf_curve``, in numpy only, so a
    ClientApp need not import scikit-learn (seconds per message on a SuperNode
    that starts one process per message).
    """
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1]
    tp = np.cumsum(sorted_labels)[last_of_tie].astype(np.float64)
    fp = (last_of_tie + 1) - tp
    return tp, fp


def _exact_auroc(labels: np.ndarray, scores: np.ndarray, _threshold: float) -> float:
    tp, fp = _exact_curve(labels, scores)
    tpr = np.r_[0.0, tp / tp[-1]]
    fpr = np.r_[0.0, fp / fp[-1]]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def _exact_auprc(labels: np.ndarray, scores: np.ndarray, _threshold: float) -> float:
    tp, fp = _exact_curve(labels, scores)
    precision = tp / (tp + fp)
    steps = np.diff(np.r_[0.0, tp / tp[-1]])
    return float(np.sum(steps * precision))


def _auroc(stats: BinaryStats) -> float:
    """AUROC from the histograms: P(score_pos > score_neg) + 0.5 P(same bin)."""
    pos, neg = stats.hist_pos.astype(np.float64), stats.hist_neg.astype(np.float64)
    below = np.cumsum(neg) - neg  # negatives in lower bins
    wins = float(np.sum(pos * (below + 0.5 * neg)))
    return ratio(wins, pos.sum() * neg.sum())


def _auprc(stats: BinaryStats) -> float:
    """Average precision from the histograms (as sklearn's, with bins as ties)."""
    tp, fp = _flagged_high_to_low(stats)
    if tp[-1] == 0:
        return math.nan
    recall = tp / tp[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 1.0)
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(steps * precision))


def recall_at_fpr(max_fpr: float) -> Callable[[BinaryStats], float]:
    """Return a metric: the highest recall at a bin threshold with FPR <= max_fpr."""

    def metric(stats: BinaryStats) -> float:
        tp, fp = _flagged_high_to_low(stats)
        if tp[-1] == 0 or fp[-1] == 0:
            return math.nan
        ok = fp / fp[-1] <= max_fpr
        return float((tp[ok] / tp[-1]).max(initial=0.0))

    return metric


def _exact_recall_at_fpr(max_fpr: float) -> Callable[..., float]:
    def metric(labels: np.ndarray, scores: np.ndarray, _threshold: float) -> float:
        tp, fp = _exact_curve(labels, scores)
        ok = fp / fp[-1] <= max_fpr
        return float((tp[ok] / tp[-1]).max(initial=0.0))

    return metric


@dataclass(frozen=True)
class BinaryMetric:
    """A metric computable from :class:`BinaryStats` (and optionally exactly).

    Attributes
    ----------
    name : str
        MetricRecord key, e.g. ``"auroc"``.
    from_stats : callable
        ``BinaryStats -> float`` (NaN when undefined, e.g. no positives).
    exact : callable, optional
        ``(labels, scores, threshold) -> float`` computed at a site from its own
        scores. When absent, the site uses ``from_stats`` on its own statistics.
    help : str
        One line for documentation.
    """

    name: str
    from_stats: Callable[[BinaryStats], float]
    exact: Callable[[np.ndarray, np.ndarray, float], float] | None = None
    help: str = ""


#: Registered metrics by name. Apps pick theirs by name; add new ones here.
METRICS: dict[str, BinaryMetric] = {
    m.name: m
    for m in (
        BinaryMetric(
            "auroc",
            _auroc,
            _exact_auroc,
            "area under the ROC curve",
        ),
        BinaryMetric(
            "sensitivity",
            lambda st: st.point.recall,
            help="recall of the positive class, TP / (TP + FN)",
        ),
        BinaryMetric(
            "specificity",
            lambda st: st.point.specificity,
            help="recall of the negative class, TN / (TN + FP)",
        ),
        BinaryMetric(
            "accuracy",
            lambda st: st.point.accuracy,
            help="(TP + TN) / all",
        ),
        BinaryMetric(
            "precision",
            lambda st: st.point.precision,
            help="TP / (TP + FP)",
        ),
        BinaryMetric(
            "f1",
            lambda st: st.point.f1,
            help="harmonic mean of precision and sensitivity",
        ),
        BinaryMetric(
            "auprc",
            _auprc,
            _exact_auprc,
            "area under the precision-recall curve (average precision)",
        ),
        BinaryMetric(
            "recall-at-1pct-fpr",
            recall_at_fpr(0.01),
            _exact_recall_at_fpr(0.01),
            "highest recall with a false-positive rate <= 1 %",
        ),
    )
}


def _lookup(names: Sequence[str]) -> list[BinaryMetric]:
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; registered: {', '.join(METRICS)}")
    return [METRICS[n] for n in names]


def site_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    names: Sequence[str],
    *,
    threshold: float = 0.5,
    num_bins: int = 200,
) -> dict[str, float | int | list[int]]:
    """Everything a site puts in its evaluate reply: its metrics and statistics.

    Returns ``{name: value}`` for each metric in ``names`` (exact where the metric
    has an exact form) plus the :data:`STAT_KEYS` statistics.

    Raises
    ------
    ValueError
        If a metric is undefined on these rows (e.g. the test rows hold a single
        class), since a MetricRecord cannot carry NaN through the strategies.
    """
    labels, scores = _check_labels_scores(labels, scores)
    stats = BinaryStats.from_scores(
        labels, scores, threshold=threshold, num_bins=num_bins
    )
    result: dict[str, float | int | list[int]] = {}
    for metric in _lookup(names):
        if metric.exact is not None and stats.positives and stats.negatives:
            value = metric.exact(labels, scores, threshold)
        else:
            value = metric.from_stats(stats)
        if not math.isfinite(value):
            raise ValueError(
                f"metric '{metric.name}' is undefined on these {len(labels)} rows "
                f"({stats.positives} positive, {stats.negatives} negative); a "
                "site's test split needs rows of both classes"
            )
        result[metric.name] = float(value)
    result.update(stats.to_metrics())
    return result


def tie_bound(stats: BinaryStats) -> float:
    """Return the largest possible |histogram AUROC - exact AUROC|.

    Half the fraction of (positive, negative) pairs whose scores share a bin.
    """
    pairs = float(stats.hist_pos.sum()) * float(stats.hist_neg.sum())
    if pairs == 0:
        return math.nan
    return 0.5 * float(np.sum(stats.hist_pos * stats.hist_neg)) / pairs


def make_metrics_aggregator(
    names: Sequence[str],
    *,
    max_keys: Sequence[str] = (),
    sum_keys: Sequence[str] = (),
) -> Callable[[list[RecordDict], str], MetricRecord]:
    """Return a Flower ``*_metrics_aggr_fn`` that pools binary statistics.

    The returned function has Flower's signature ``(records, weight_key) ->
    MetricRecord`` and can be passed as ``evaluate_metrics_aggr_fn`` (and
    ``train_metrics_aggr_fn``) to FedAvg & co. Per key of the replies:

    - :data:`STAT_KEYS` are summed into one :class:`BinaryStats`; each metric in
      ``names`` is computed from the sum, and the confusion counts are reported;
      the histograms are not (they would flood the log).
    - each metric in ``names`` that sites also reported is additionally averaged,
      weighted by ``weight_key``, as ``<name>-site-mean``;
    - keys in ``max_keys`` take the maximum over sites (e.g. each site's
      cumulative ``epsilon``: the federation's record-level guarantee is the
      weakest site's);
    - keys in ``sum_keys`` are summed; every other numeric key is the
      ``weight_key``-weighted mean, as in Flower's default.

    A reply whose statistics are malformed (a buggy or malicious site) is left
    out of the pooled statistics with a WARNING; it never raises.
    """
    metrics = _lookup(names)
    max_set, sum_set = set(max_keys), set(sum_keys)

    def aggregate(records: list[RecordDict], weight_key: str) -> MetricRecord:
        out = MetricRecord()
        weighted: dict[str, list[tuple[float, float]]] = {}
        pooled: BinaryStats | None = None
        for record in records:
            metric_records = list(record.metric_records.values())
            if not metric_records:
                continue
            values = metric_records[0]
            weight = _weight(values.get(weight_key, 0.0))
            if any(key in values for key in STAT_KEYS):
                try:
                    stats = BinaryStats.from_metrics(values)
                    pooled = stats if pooled is None else pooled + stats
                except ValueError as err:
                    log(WARNING, "metrics: a reply's statistics were ignored: %s", err)
            for key, value in values.items():
                if key in STAT_KEYS or key == weight_key or isinstance(value, list):
                    continue
                if not isinstance(value, (int, float)) or not math.isfinite(value):
                    continue
                weighted.setdefault(key, []).append((float(value), weight))
        for key, pairs in weighted.items():
            values_only = [v for v, _ in pairs]
            if key in max_set:
                out[key] = max(values_only)
            elif key in sum_set:
                out[key] = float(sum(values_only))
            else:
                mean = _weighted_mean(pairs)
                name = f"{key}-site-mean" if key in METRICS else key
                if math.isfinite(mean):
                    out[name] = mean
        if pooled is not None:
            for metric in metrics:
                value = metric.from_stats(pooled)
                if math.isfinite(value):
                    out[metric.name] = float(value)
            for key in (KEY_TP, KEY_FP, KEY_TN, KEY_FN):
                out[key] = int(getattr(pooled, key))
        return out

    return aggregate


def _weight(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    return float(value) if math.isfinite(value) and value > 0 else 0.0


def _weighted_mean(pairs: list[tuple[float, float]]) -> float:
    total = sum(w for _, w in pairs)
    if total <= 0:
        return float(np.mean([v for v, _ in pairs])) if pairs else math.nan
    return sum(v * w for v, w in pairs) / total
