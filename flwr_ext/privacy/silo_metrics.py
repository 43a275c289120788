"""Server side of record-level DP: report the worst silo's ε, not an average.

Each silo running DP-SGD (:func:`flwr_ext.privacy.make_private`) puts its own
cumulative record-level ε in its train reply (``dp-record-epsilon``). A record
belongs to exactly one silo, so the federation protects every record with the
*largest* of those figures (parallel composition); averaging them, as Flower's
default metric aggregation would, understates the risk for the records of the most
exposed silo.

:func:`aggregate_silo_metrics` is a drop-in ``train_metrics_aggr_fn`` for Flower's
FedAvg family::

    strategy = FedAvg(train_metrics_aggr_fn=aggregate_silo_metrics)
"""

from __future__ import annotations

from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore import log

from .keys import (
    RECORD_DELTA,
    RECORD_EPSILON,
    RECORD_NOISE_MULTIPLIER,
    RECORD_STEPS,
    SILOS_REPORTING,
)

__all__ = ["aggregate_silo_metrics"]

_MAX_KEYS = (RECORD_EPSILON, RECORD_DELTA, RECORD_NOISE_MULTIPLIER, RECORD_STEPS)


def aggregate_silo_metrics(
    records: list[RecordDict], weighting_metric_name: str
) -> MetricRecord:
    """Aggregate train metrics; take the maximum over silos of the DP keys.

    Ordinary metrics are averaged with Flower's ``aggregate_metricrecords``
    (weighted by ``weighting_metric_name``). ``dp-record-epsilon``,
    ``dp-record-delta``, ``dp-record-noise-multiplier`` and ``dp-record-steps``
    are replaced by their maximum over the silos that reported them,
    ``dp-silos-reporting`` counts those silos, and
    one log line states the record-level guarantee. A silo that reports no ε is
    named in a WARNING: its records may not be protected at all.
    """
    maxima: dict[str, float] = {}
    reporting = 0
    stripped: list[RecordDict] = []
    for index, record in enumerate(records):
        metric_records = list(record.metric_records.items())
        has_epsilon = False
        cleaned: dict[str, ArrayRecord | ConfigRecord | MetricRecord] = {}
        for name, metrics in metric_records:
            kept = MetricRecord()
            for key, value in metrics.items():
                if key in _MAX_KEYS and isinstance(value, int | float):
                    maxima[key] = max(maxima.get(key, float("-inf")), float(value))
                    has_epsilon |= key == RECORD_EPSILON
                else:
                    kept[key] = value
            cleaned[name] = kept
        if has_epsilon:
            reporting += 1
        else:
            log(
                WARNING,
                "[record-level DP] reply %d of %d reports no '%s': that silo's "
                "records may not be protected by DP-SGD",
                index + 1,
                len(records),
                RECORD_EPSILON,
            )
        stripped.append(RecordDict(cleaned))
    aggregated = aggregate_metricrecords(stripped, weighting_metric_name)
    for key, value in maxima.items():
        aggregated[key] = int(value) if key == RECORD_STEPS else value
    aggregated[SILOS_REPORTING] = reporting
    if RECORD_EPSILON in maxima:
        log(
            INFO,
            "[record-level DP] epsilon=%.4g at delta=%g per record (max over %d "
            "silo%s; add-or-remove-one-record, Poisson sampling of records)",
            maxima[RECORD_EPSILON],
            maxima.get(RECORD_DELTA, float("nan")),
            reporting,
            "" if reporting == 1 else "s",
        )
    return aggregated
