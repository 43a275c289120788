"""bank_fraud.splits: train / validation / test by time or per class."""

import sys
from pathlib import Path

import numpy as np
import pytest

APP = Path(__file__).resolve().parents[1] / "apps" / "bank-fraud"
sys.path.insert(0, str(APP))

from bank_fraud.splits import stratified_split3, temporal_split  # noqa: E402


def test_temporal_split_puts_the_latest_rows_in_test_and_validation_before():
    rng = np.random.default_rng(0)
    times = rng.permutation(1000).astype(float)
    train, val, test = temporal_split(times, 0.15, 0.25)
    assert (len(train), len(val), len(test)) == (600, 150, 250)
    assert (
        times[train].max() < times[val].min() and times[val].max() < times[test].min()
    )
    assert sorted(np.concatenate([train, val, test])) == list(range(1000))


def test_temporal_split_keeps_file_order_for_equal_times_and_checks_input():
    _, val, test = temporal_split(np.zeros(10), 0.2, 0.3)
    assert list(test) == [7, 8, 9] and list(val) == [5, 6]
    with pytest.raises(ValueError, match="leaves no training rows"):
        temporal_split(np.arange(10.0), 0.5, 0.5)
    with pytest.raises(ValueError, match="finite"):
        temporal_split(np.array([0.0, np.nan, 1.0]), 0.1, 0.3)
    with pytest.raises(ValueError, match="too few"):
        temporal_split(np.arange(2.0), 0.4, 0.4)


def test_stratified_split3_keeps_the_class_mix_in_every_split():
    y = np.array([1] * 40 + [0] * 960)
    train, val, test = stratified_split3(y, 0.15, 0.25, seed=3)
    assert len(set(train) | set(val) | set(test)) == 1000
    assert not set(train) & set(val) and not set(val) & set(test)
    assert (y[test].sum(), y[val].sum(), y[train].sum()) == (10, 6, 24)
    with pytest.raises(ValueError, match="class 1 has 1 row"):
        stratified_split3(np.array([1] + [0] * 20), 0.2, 0.2, seed=0)
