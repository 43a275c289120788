"""Train / validation / test splits of one site's rows: by time, or stratified.

A model whose decision threshold is tuned needs three disjoint sets of rows:
it is trained on the first, its threshold is chosen on the second
(:mod:`bank_fraud.thresholds`), and both are judged on the third.

- :func:`temporal_split` - when rows have a time stamp (transactions, claims),
  the test rows are the *latest* ones and validation rows the ones just before:
  the model is judged as it would be used, on a period it has not seen, so
  drifting patterns (a new fraud scheme) count against it. A random split would
  leak the future into training and overstate every metric.
- :func:`stratified_split3` - without time stamps, each class is split
  separately, so every split keeps the class mix (a rare class is not left out
  of a small split by chance).
"""

from __future__ import annotations

import numpy as np

from flwr_ext.appkit.tabular import stratified_split

__all__ = ["Split", "stratified_split3", "temporal_split"]

#: ``(train, validation, test)`` sorted row indices.
Split = tuple[np.ndarray, np.ndarray, np.ndarray]


def _check_fractions(validation_fraction: float, test_fraction: float) -> None:
    if not 0 <= validation_fraction < 1:
        raise ValueError(
            f"validation_fraction must be in [0, 1), got {validation_fraction}"
        )
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if validation_fraction + test_fraction >= 1:
        raise ValueError(
            f"validation_fraction + test_fraction = "
            f"{validation_fraction + test_fraction:g} leaves no training rows; "
            "their sum must be < 1"
        )


def temporal_split(
    times: np.ndarray, validation_fraction: float, test_fraction: float
) -> Split:
    """Split rows by time: latest for testing, just before them for validation.

    The last ``test_fraction`` of the rows (in time) are the test rows, the
    ``validation_fraction`` before them the validation rows, the rest train.
    Rows with equal times keep their file order (a stable sort). Fractions are
    of the number of rows (``round``), with at least one test row.

    Raises
    ------
    ValueError
        For fractions outside their ranges, non-finite times, or too few rows.
    """
    _check_fractions(validation_fraction, test_fraction)
    times = np.asarray(times, dtype=np.float64).reshape(-1)
    if not np.isfinite(times).all():
        raise ValueError("times must be finite numbers")
    n = times.size
    n_test = max(1, round(test_fraction * n))
    n_val = round(validation_fraction * n)
    if n - n_test - n_val < 1:
        raise ValueError(f"{n} rows are too few to split into train/validation/test")
    order = np.argsort(times, kind="stable")
    train = order[: n - n_test - n_val]
    validation = order[n - n_test - n_val : n - n_test]
    test = order[n - n_test :]
    return np.sort(train), np.sort(validation), np.sort(test)


def stratified_split3(
    labels: np.ndarray, validation_fraction: float, test_fraction: float, seed: int
) -> Split:
    """Split rows at random, per class, into train / validation / test.

    The test rows are drawn first (``test_fraction`` of each class), then the
    validation rows (``validation_fraction`` of each class, of all rows).

    Raises
    ------
    ValueError
        For fractions outside their ranges, or a class with too few rows to
        appear in every split (the message says how many it has).
    """
    _check_fractions(validation_fraction, test_fraction)
    labels = np.asarray(labels)
    rest, test = stratified_split(labels, test_fraction, seed)
    if validation_fraction == 0:
        return rest, np.empty(0, dtype=np.int64), test
    share = validation_fraction / (1.0 - test_fraction)
    train_part, val_part = stratified_split(labels[rest], share, seed + 1)
    return rest[train_part], rest[val_part], test
