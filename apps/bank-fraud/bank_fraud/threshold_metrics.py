"""The Flower ``evaluate_metrics_aggr_fn`` that applies threshold selection.

Every round, on top of :func:`flwr_ext.appkit.metrics.make_metrics_aggregator`'s
pooled metrics, it chooses the decision threshold on the banks' validation
histograms (:mod:`bank_fraud.thresholds`) and reports precision, recall, F1 and
alert rate at that threshold on the pooled test histograms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from logging import WARNING
from typing import Any

from flwr.app import MetricRecord, RecordDict
from flwr.supercore import log

from flwr_ext.appkit.metrics import (
    BinaryStats,
    counts_at,
    make_metrics_aggregator,
)

from .thresholds import (
    THRESHOLD_SELECTIONS,
    ThresholdRule,
    choose_threshold,
    own_threshold_index,
)
from .validation_histograms import validation_stats

__all__ = ["make_threshold_metrics_aggregator"]


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
                point = counts_at(test, own_threshold_index(test.num_bins, val, rule))
                total = point if total is None else total + point
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
