"""Feature standardisation without pooling data: per site, or from federated sums.

A model trained across sites needs the *same* input scaling at every site. Fitting
one scaler on pooled rows is not allowed (no site may see another's rows), and
standardising each site on its own rows is wrong when sites differ in case mix:
a hospital with 60 % malignant cases would subtract a much larger mean "radius"
than one with 15 %, so the same tumour would reach the model as two different
inputs (on the bundled breast-cancer split this drops the pooled AUROC of a
logistic model from 0.99 to 0.91).

The default is therefore a one-off **statistics round** before training:

1. the ServerApp sends every site a QUERY message (:func:`request_feature_stats`);
2. each site answers with the row count, per-feature sum and sum of squares of its
   *training* rows (:func:`reply_feature_stats`) - aggregates, never rows;
3. the server combines them (:func:`combine`) into one :class:`Standardizer` and
   sends its mean and scale to every site in each round's config.

``combine(..., method="pooled")`` gives exactly the mean and standard deviation of
the pooled training rows. ``method="median"`` takes the coordinate-wise median of
the sites' means and standard deviations: any common affine scaling serves the
model equally well, and the median cannot be dragged far by one Byzantine site
(use it with robust strategies). Replies are validated (shapes, finite values,
non-negative variance); a bad one is dropped with a WARNING naming the node.

What the server learns: each site's feature means and variances (not under
``"site"`` standardisation, where nothing leaves the site). Under DP-SGD these
statistics are *not* covered by the privacy accounting; see the app README.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Literal

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

__all__ = [
    "FeatureStats",
    "Standardizer",
    "combine",
    "is_stats_query",
    "reply_feature_stats",
    "request_feature_stats",
    "site_label",
]

#: Value of ``config["query"]`` in the statistics QUERY message.
STATS_QUERY = "feature-stats"
_KEY_N, _KEY_SUM, _KEY_SUMSQ = "num-examples", "feature-sum", "feature-sumsq"
_KEY_MEAN, _KEY_SCALE = "feature-mean", "feature-scale"
CombineMethod = Literal["pooled", "median"]


@dataclass(frozen=True)
class FeatureStats:
    """Row count, per-feature sum and sum of squares of one site's rows.

    Attributes
    ----------
    count : int
        Number of rows.
    total : np.ndarray
        ``(n_features,)`` float64 sums.
    total_sq : np.ndarray
        ``(n_features,)`` float64 sums of squares.
    """

    count: int
    total: np.ndarray
    total_sq: np.ndarray

    @classmethod
    def from_array(cls, x: np.ndarray) -> FeatureStats:
        """Statistics of the rows of ``x`` ``(n_rows, n_features)``."""
        x = np.asarray(x, dtype=np.float64)
        return cls(int(x.shape[0]), x.sum(axis=0), np.square(x).sum(axis=0))

    @property
    def mean(self) -> np.ndarray:
        """Per-feature mean."""
        return self.total / self.count

    @property
    def std(self) -> np.ndarray:
        """Per-feature (population) standard deviation."""
        mean = self.mean
        return np.sqrt(np.maximum(self.total_sq / self.count - mean * mean, 0.0))

    def __add__(self, other: FeatureStats) -> FeatureStats:
        return FeatureStats(
            self.count + other.count,
            self.total + other.total,
            self.total_sq + other.total_sq,
        )

    def to_metrics(self) -> MetricRecord:
        """Encode for a reply."""
        return MetricRecord(
            {
                _KEY_N: self.count,
                _KEY_SUM: [float(v) for v in self.total],
                _KEY_SUMSQ: [float(v) for v in self.total_sq],
            }
        )

    @classmethod
    def from_metrics(
        cls, record: Mapping[str, object], n_features: int
    ) -> FeatureStats:
        """Decode a site's reply; ``ValueError`` says what is wrong with it."""
        count = record.get(_KEY_N)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"'{_KEY_N}' must be a positive integer, got {count!r}")
        arrays = []
        for key in (_KEY_SUM, _KEY_SUMSQ):
            value = record.get(key)
            if not isinstance(value, list) or len(value) != n_features:
                raise ValueError(
                    f"'{key}' must be a list of {n_features} numbers, got "
                    f"{type(value).__name__} of length "
                    f"{len(value) if isinstance(value, list) else '-'}"
                )
            array = np.asarray(value, dtype=np.float64)
            if not np.isfinite(array).all():
                raise ValueError(f"'{key}' holds NaN or Inf")
            arrays.append(array)
        stats = cls(count, arrays[0], arrays[1])
        variance = stats.total_sq / count - stats.mean**2
        scale = np.maximum(stats.total_sq / count, 1.0)
        if (variance < -1e-9 * scale).any():
            raise ValueError("sums of squares imply a negative variance")
        return stats


@dataclass(frozen=True)
class Standardizer:
    """``(x - mean) / scale``, the same at every site.

    Attributes
    ----------
    mean, scale : np.ndarray
        ``(n_features,)`` float64; ``scale`` is the standard deviation, with
        constant features given scale 1 so they map to 0 instead of NaN.
    """

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, stats: FeatureStats) -> Standardizer:
        """Standardise to the mean and standard deviation of ``stats``."""
        return cls(stats.mean, _safe_scale(stats.std, stats.mean))

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Return standardised float32 features."""
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"data has {x.shape[1]} features but the scaler was fitted on "
                f"{self.mean.shape[0]} features"
            )
        return ((np.asarray(x, np.float64) - self.mean) / self.scale).astype(np.float32)

    def to_config(self, config: ConfigRecord) -> None:
        """Put mean and scale into a round's ConfigRecord (as float lists)."""
        config[_KEY_MEAN] = [float(v) for v in self.mean]
        config[_KEY_SCALE] = [float(v) for v in self.scale]

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> Standardizer | None:
        """Read mean and scale from a round's config; None if absent."""
        if _KEY_MEAN not in config or _KEY_SCALE not in config:
            return None
        mean = np.asarray(config[_KEY_MEAN], dtype=np.float64)
        scale = np.asarray(config[_KEY_SCALE], dtype=np.float64)
        if mean.shape != scale.shape or mean.ndim != 1:
            raise ValueError("config feature-mean and feature-scale differ in shape")
        if not (
            np.isfinite(mean).all() and np.isfinite(scale).all() and (scale > 0).all()
        ):
            raise ValueError(
                "config feature-mean/feature-scale must be finite, scale > 0"
            )
        return cls(mean, scale)


def _safe_scale(std: np.ndarray, mean: np.ndarray) -> np.ndarray:
    tiny = 1e-12 * np.maximum(np.abs(mean), 1.0)
    return np.where(std > tiny, std, 1.0)


def combine(
    stats: Iterable[FeatureStats], method: CombineMethod = "pooled"
) -> Standardizer:
    """Combine sites' statistics into one :class:`Standardizer`.

    Parameters
    ----------
    stats : iterable of FeatureStats
        One per site (at least one).
    method : {"pooled", "median"} (default: "pooled")
        ``"pooled"``: mean and standard deviation of all rows together (exact).
        ``"median"``: coordinate-wise median of the sites' means and standard
        deviations - robust to a minority of Byzantine sites.
    """
    stats = list(stats)
    if not stats:
        raise ValueError("no feature statistics to combine")
    if method == "pooled":
        total = stats[0]
        for item in stats[1:]:
            total = total + item
        return Standardizer.fit(total)
    if method == "median":
        mean = np.median(np.stack([s.mean for s in stats]), axis=0)
        std = np.median(np.stack([s.std for s in stats]), axis=0)
        return Standardizer(mean, _safe_scale(std, mean))
    raise ValueError(f"method must be 'pooled' or 'median', got {method!r}")


# --------------------------------------------------------------- messaging
def is_stats_query(msg: Message) -> bool:
    """Return True if ``msg`` is the statistics QUERY of this module."""
    config = msg.content.config_records.get("config")
    return config is not None and config.get("query") == STATS_QUERY


def reply_feature_stats(msg: Message, x_train: np.ndarray) -> Message:
    """ClientApp side: answer the statistics QUERY with the training rows' sums."""
    content = RecordDict({"stats": FeatureStats.from_array(x_train).to_metrics()})
    return Message(content, reply_to=msg)


def request_feature_stats(
    grid: Grid,
    n_features: int,
    *,
    min_nodes: int,
    timeout: float,
    wait_s: float = 300.0,
) -> list[tuple[int, FeatureStats]]:
    """ServerApp side: ask every connected site for its statistics.

    Waits up to ``wait_s`` seconds for ``min_nodes`` nodes, sends each a QUERY
    message, and returns the valid ``(node_id, FeatureStats)`` replies received
    within ``timeout`` seconds. Invalid, error and missing replies are logged by
    node id and left out.

    Raises
    ------
    RuntimeError
        If fewer than ``min_nodes`` valid replies arrive.
    """
    node_ids = _wait_for_nodes(grid, min_nodes, wait_s)
    messages = [
        Message(
            RecordDict({"config": ConfigRecord({"query": STATS_QUERY})}),
            dst_node_id=node_id,
            message_type=MessageType.QUERY,
        )
        for node_id in node_ids
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    valid: list[tuple[int, FeatureStats]] = []
    answered: set[int] = set()
    failed: list[str] = []
    for reply in replies:
        node_id = int(reply.metadata.src_node_id)
        if node_id in answered:
            log(
                WARNING,
                "feature statistics: second reply from %s ignored",
                site_label(grid, node_id),
            )
            continue
        answered.add(node_id)
        if reply.has_error():
            failed.append(site_label(grid, node_id))
            log(
                WARNING,
                "feature statistics: %s replied with an error: %s",
                site_label(grid, node_id),
                reply.error.reason,
            )
            continue
        try:
            records = list(reply.content.metric_records.values())
            if len(records) != 1:
                raise ValueError(f"expected one MetricRecord, got {len(records)}")
            valid.append((node_id, FeatureStats.from_metrics(records[0], n_features)))
        except ValueError as err:
            failed.append(site_label(grid, node_id))
            log(
                WARNING,
                "feature statistics: reply from %s dropped: %s",
                site_label(grid, node_id),
                err,
            )
    for node_id in sorted(set(node_ids) - answered):
        failed.append(site_label(grid, node_id))
        log(
            WARNING,
            "feature statistics: no reply from %s within %.0f s",
            site_label(grid, node_id),
            timeout,
        )
    if len(valid) < min_nodes:
        raise RuntimeError(
            f"feature statistics: {len(valid)} valid replies from {len(node_ids)} "
            f"sites, need {min_nodes} (min-nodes); failed: "
            f"{', '.join(failed) or 'none'}; see the warnings above"
        )
    log(
        INFO,
        "feature statistics: %d sites, %d training rows",
        len(valid),
        sum(s.count for _, s in valid),
    )
    return valid


def site_label(grid: Grid, node_id: int) -> str:
    """``"node 12 (st-marys)"`` if ``grid`` knows the site's name, else ``"node 12"``.

    Uses the ``label`` method of a
    :class:`~flwr_ext.appkit.recorder.RecordingGrid` (or a grid wrapping one).
    """
    label = getattr(grid, "label", None)
    return str(label(node_id)) if callable(label) else f"node {node_id}"


def _wait_for_nodes(grid: Grid, min_nodes: int, wait_s: float) -> list[int]:
    deadline = time.monotonic() + wait_s
    while True:
        node_ids = sorted(int(n) for n in grid.get_node_ids())
        if len(node_ids) >= min_nodes:
            return node_ids
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(node_ids)} node(s) connected after {wait_s:.0f} s; "
                f"need {min_nodes} (run config min-nodes)"
            )
        log(INFO, "waiting for nodes: %d connected, need %d", len(node_ids), min_nodes)
        time.sleep(1.0)
