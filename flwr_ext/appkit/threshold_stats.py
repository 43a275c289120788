"""Feature standardisation under threshold CKKS: sums with no single key holder.

With ``secure-aggregation = "ckks-threshold"`` the statistics round before
training runs through the strategy's collective secure sum
(:meth:`flwr_ext.strategy.ThresholdHomomorphicAggregation.secure_sum`): each site
answers with a plain MetricRecord, ``ckks_mod`` encrypts it under the collective
public key before it leaves the site, the server adds the ciphertexts and every
key holder helps decrypt the *sum* only. The server thus learns the pooled
statistics and nothing about one site (SecAgg's semantics, as for the model),
and no one - server or site - can decrypt a single site's numbers alone.

Two secure sums, both before round 1:

1. ``moments`` - each site sends ``rows / ROW_UNIT``, ``sum(x) / ROW_UNIT`` and
   ``sum(x**2) / ROW_UNIT`` per feature over its training rows. The server
   derives the pooled row count ``N``, mean ``mu`` and root mean square
   ``rms = sqrt(mean(x**2))``.
2. ``spread`` - the server sends ``mu``, ``rms`` and a unit ``u = N / 2**20``;
   each site sends ``sum((x - mu) / rms) / u`` and ``sum(((x - mu) / rms)**2) / u``.
   With ``d`` and ``m`` the pooled means of those two, the pooled mean is
   ``mu + rms * d`` and the pooled standard deviation ``rms * sqrt(m - d**2)``
   (exact whatever the error in ``mu`` and ``rms``).

Why two: the secure sum decodes with an absolute error (the flooding noise; about
``1e-7`` at the profile's largest scale ``2**91`` with 3 sites). The variance
``mean(x**2) - mu**2`` would lose to it for a feature whose spread is small
against its mean (WDBC's ``fractal_dimension_se``: mean 0.0038, sd 0.0026), and
so would the mean itself in units of the spread; the second sum measures both in
units of ``rms``, where they are of order one, and scaled to a total of order
``2**20``, so their relative error is about ``1e-7 / 2**20``. The units keep
every value below the per-site bound of the sum (``2**27 / sites`` at scale
``2**91``): the second sum's totals are at most ``2**20`` for honest sites; the
first is ``mean(x**2) rows / ROW_UNIT`` (a site whose data exceed the bound
refuses to answer, saying so).

The resulting scaler equals the plaintext pooled standardisation up to that
error and is sent to the sites in every round's config, as in a plaintext run.
"""

from __future__ import annotations

import math
from logging import INFO
from typing import Any, Protocol

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from ..he.threshold_protocol import KEY_OP, OP_SUM
from ..mods.site_policy import ShareableError
from .standardisation import FeatureStats, Standardizer

__all__ = [
    "ROW_UNIT",
    "THRESHOLD_STATS_QUERY",
    "is_threshold_stats_query",
    "reply_threshold_stats",
    "request_threshold_feature_stats",
]

#: Value of ``config["query"]`` in the threshold statistics QUERY messages.
THRESHOLD_STATS_QUERY = "feature-stats-threshold"
#: Rows per unit: every sum a site sends is divided by it (see the module doc).
ROW_UNIT = 1000.0
STEP_MOMENTS, STEP_SPREAD = "moments", "spread"
_KEY_STEP = "step"
_KEY_ROWS, _KEY_SUM, _KEY_SUMSQ = "rows", "feature-sum", "feature-sumsq"
_KEY_MEAN, _KEY_RMS, _KEY_UNIT = "feature-mean", "feature-rms", "row-unit"
#: The second sum's totals are scaled to at most this (honest sites).
_SPREAD_TOTAL = float(2**20)
_KEY_SHIFT, _KEY_SPREAD = "feature-shift", "feature-spread"


class SecureSummer(Protocol):
    """What the statistics round needs of the server strategy.

    :class:`~flwr_ext.strategy.ThresholdHomomorphicAggregation` provides it
    (named structurally here, so that a ClientApp importing this module does not
    import TenSEAL).
    """

    profile: Any

    def secure_sum(
        self,
        grid: Grid,
        query: ConfigRecord,
        *,
        scale_bits: int = ...,
        timeout: float | None = ...,
    ) -> tuple[MetricRecord, int] | None:
        """Sum one MetricRecord over the key holders; decrypt the sum only."""
        ...


# ------------------------------------------------------------------- client
def is_threshold_stats_query(msg: Message) -> bool:
    """Return True if ``msg`` is a QUERY of the threshold statistics round."""
    config = msg.content.config_records.get("config")
    return config is not None and config.get("query") == THRESHOLD_STATS_QUERY


def reply_threshold_stats(msg: Message, x_train: np.ndarray) -> Message:
    """ClientApp side: answer one step with a plain MetricRecord.

    ``ckks_mod`` (reached through ``secure_aggregation_mod``) encrypts the reply
    under the collective key before it leaves the site; the ClientApp only
    computes. The server's ``feature-mean``/``feature-rms`` are parsed totally.

    Raises
    ------
    ShareableError
        On a query without the secure-sum announcement (``ckks_mod`` would not
        encrypt the answer: it is never computed), an unknown step, or
        malformed server values.
    """
    config = msg.content.config_records["config"]
    if config.get(KEY_OP) != OP_SUM:
        raise ShareableError(
            "a threshold statistics query without the secure-sum announcement: "
            "the answer would leave this site in plaintext; refused"
        )
    step = config.get(_KEY_STEP)
    x = np.asarray(x_train, dtype=np.float64)
    n_features = x.shape[1]
    if step == STEP_MOMENTS:
        values = {
            _KEY_ROWS: x.shape[0] / ROW_UNIT,
            _KEY_SUM: x.sum(axis=0) / ROW_UNIT,
            _KEY_SUMSQ: np.square(x).sum(axis=0) / ROW_UNIT,
        }
    elif step == STEP_SPREAD:
        mean = _vector(config.get(_KEY_MEAN), _KEY_MEAN, n_features)
        rms = _vector(config.get(_KEY_RMS), _KEY_RMS, n_features)
        if not (rms > 0).all():
            raise ShareableError(f"'{_KEY_RMS}' must be > 0")
        unit = config.get(_KEY_UNIT)
        if not (isinstance(unit, float) and math.isfinite(unit) and unit > 0):
            raise ShareableError(f"'{_KEY_UNIT}' must be a finite float > 0")
        units = (x - mean) / rms
        values = {
            _KEY_SHIFT: units.sum(axis=0) / unit,
            _KEY_SPREAD: np.square(units).sum(axis=0) / unit,
        }
    else:
        raise ShareableError("unknown threshold statistics step")
    record = MetricRecord(
        {
            key: float(value) if np.ndim(value) == 0 else [float(v) for v in value]
            for key, value in values.items()
        }
    )
    return Message(RecordDict({"stats": record}), reply_to=msg)


def _vector(value: object, key: str, n_features: int) -> np.ndarray:
    if (
        not isinstance(value, list)
        or len(value) != n_features
        or not all(isinstance(v, float) for v in value)
    ):
        raise ShareableError(f"'{key}' must be a list of {n_features} floats")
    array = np.asarray(value, dtype=np.float64)
    if not np.isfinite(array).all():
        raise ShareableError(f"'{key}' holds NaN or Inf")
    return array


# ------------------------------------------------------------------- server
def request_threshold_feature_stats(
    strategy: SecureSummer,
    grid: Grid,
    n_features: int,
    *,
    timeout: float,
    sites: str = "sites",
) -> Standardizer:
    """ServerApp side: run both secure sums; return the pooled scaler.

    Parameters
    ----------
    strategy : SecureSummer
        The run's :class:`~flwr_ext.strategy.ThresholdHomomorphicAggregation`; its
        first secure sum runs the key-generation setup (logged with the sites).
    grid : Grid
        The ServerApp's grid.
    n_features : int
        Feature columns every site holds.
    timeout : float
        Seconds to wait for each step's answers and partial decryptions.
    sites : str (default: "sites")
        What the log calls the sites.

    Raises
    ------
    RuntimeError
        If a secure sum fails (too few answers, a failed collective decryption:
        the strategy logged which site) or decrypts to impossible statistics.
    """
    scale_bits = int(strategy.profile.scale_bits)

    def secure_sum(step: str, extra: dict[str, Any]) -> tuple[dict, int]:
        query = ConfigRecord({"query": THRESHOLD_STATS_QUERY, _KEY_STEP: step})
        for key, value in extra.items():
            query[key] = value
        result = strategy.secure_sum(
            grid, query, scale_bits=scale_bits, timeout=timeout
        )
        if result is None:
            raise RuntimeError(
                f"feature statistics ({step}) under threshold CKKS: the secure sum "
                "failed; see the warnings above for the site"
            )
        record, count = result
        return dict(record), count

    moments, count = secure_sum(STEP_MOMENTS, {})
    rows = _sum_vector(moments, _KEY_ROWS, 0) * ROW_UNIT
    total = _sum_vector(moments, _KEY_SUM, n_features) * ROW_UNIT
    total_sq = _sum_vector(moments, _KEY_SUMSQ, n_features) * ROW_UNIT
    num_rows = round(float(rows[0]))
    if num_rows < 1 or abs(float(rows[0]) - num_rows) > 0.01:
        raise RuntimeError(
            f"feature statistics under threshold CKKS: the row count decrypts to "
            f"{float(rows[0]):.4f}, not a positive integer"
        )
    mean = total / num_rows
    square = np.maximum(total_sq / num_rows, 0.0)
    rms = np.where(np.sqrt(square) > 1e-12, np.sqrt(square), 1.0)
    unit = num_rows / _SPREAD_TOTAL
    spread, _ = secure_sum(
        STEP_SPREAD,
        {
            _KEY_MEAN: [float(v) for v in mean],
            _KEY_RMS: [float(v) for v in rms],
            _KEY_UNIT: unit,
        },
    )
    shift = _sum_vector(spread, _KEY_SHIFT, n_features) * unit / num_rows
    ratio = _sum_vector(spread, _KEY_SPREAD, n_features) * unit / num_rows
    mean = mean + rms * shift
    variance = np.square(rms) * np.maximum(ratio - np.square(shift), 0.0)
    # FeatureStats of the pooled rows: Standardizer.fit applies the one rule for
    # constant features (scale 1), as in plaintext runs.
    pooled = FeatureStats(num_rows, mean * num_rows, (variance + mean**2) * num_rows)
    log(
        INFO,
        "feature scaling: pooled over %d %s (%d training rows) by threshold-CKKS "
        "secure sums; the server saw the sums only",
        count,
        sites,
        num_rows,
    )
    return Standardizer.fit(pooled)


def _sum_vector(record: dict, key: str, length: int) -> np.ndarray:
    """Read one decrypted sum: ``length`` values (0: a scalar), all finite."""
    value = record.get(key)
    values = [value] if length == 0 else value
    if (
        not isinstance(values, list)
        or len(values) != max(length, 1)
        or not all(isinstance(v, float) and math.isfinite(v) for v in values)
    ):
        raise RuntimeError(
            f"feature statistics under threshold CKKS: the decrypted sum has no "
            f"valid '{key}' (the sites answered with another layout)"
        )
    return np.asarray(values, dtype=np.float64)
