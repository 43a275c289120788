import logging

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from flwr_ext.appkit.metrics import (
    METRICS,
    BinaryStats,
    make_metrics_aggregator,
    score_bin_edges,
    site_metrics,
    tie_bound,
)

NAMES = ("auroc", "sensitivity", "specificity", "accuracy")


def _data(n: int, seed: int, shift: float = 1.5):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    logits = rng.normal(0, 1.5, n) + shift * (2 * y - 1)
    return y, 1 / (1 + np.exp(-logits))


def _record(values: dict) -> RecordDict:
    return RecordDict({"metrics": MetricRecord(values)})


def test_bin_edges_are_increasing_and_cover_0_1():
    edges = score_bin_edges(200)
    assert edges[0] == 0 and edges[-1] == 1 and len(edges) == 201
    assert np.all(np.diff(edges) > 0)
    with pytest.raises(ValueError):
        score_bin_edges(1)


def test_confusion_counts_and_threshold_metrics_are_exact():
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.6, 0.2, 0.7, 0.1, 0.4, 0.5])
    stats = BinaryStats.from_scores(y, s, threshold=0.5)
    assert (stats.tp, stats.fn, stats.fp, stats.tn) == (2, 1, 2, 2)
    assert METRICS["sensitivity"].from_stats(stats) == pytest.approx(2 / 3)
    assert METRICS["specificity"].from_stats(stats) == pytest.approx(2 / 4)
    assert METRICS["accuracy"].from_stats(stats) == pytest.approx(4 / 7)
    assert METRICS["precision"].from_stats(stats) == pytest.approx(2 / 4)
    assert METRICS["f1"].from_stats(stats) == pytest.approx(2 * 2 / (4 + 3))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_histogram_auroc_is_within_its_tie_bound_of_the_exact_auroc(seed):
    y, s = _data(400, seed)
    stats = BinaryStats.from_scores(y, s, num_bins=200)
    exact = roc_auc_score(y, s)
    bound = tie_bound(stats)
    assert abs(METRICS["auroc"].from_stats(stats) - exact) <= bound + 1e-12
    assert bound < 0.01  # 200 logit bins resolve these scores well


def test_histogram_metrics_equal_sklearn_when_bins_do_not_merge_scores():
    edges = score_bin_edges(200)
    centres = (edges[1:-1] + edges[2:]) / 2  # one score per bin, distinct bins
    rng = np.random.default_rng(3)
    s = rng.choice(centres, size=150, replace=False)
    y = (rng.random(150) < 1 / (1 + np.exp(-8 * (s - 0.5)))).astype(int)
    stats = BinaryStats.from_scores(y, s, num_bins=200)
    assert tie_bound(stats) == 0
    assert METRICS["auroc"].from_stats(stats) == pytest.approx(roc_auc_score(y, s))
    assert METRICS["auprc"].from_stats(stats) == pytest.approx(
        average_precision_score(y, s)
    )
    fpr, tpr, _ = roc_curve(y, s)
    assert METRICS["recall-at-1pct-fpr"].from_stats(stats) == pytest.approx(
        tpr[fpr <= 0.01].max()
    )


def test_statistics_add_up_to_those_of_the_pooled_rows():
    y1, s1 = _data(120, 4)
    y2, s2 = _data(80, 5)
    pooled = BinaryStats.from_scores(np.r_[y1, y2], np.r_[s1, s2])
    summed = BinaryStats.from_scores(y1, s1) + BinaryStats.from_scores(y2, s2)
    assert summed.to_metrics() == pooled.to_metrics()
    with pytest.raises(ValueError, match="bins"):
        summed + BinaryStats.from_scores(y1, s1, num_bins=50)


def test_round_trip_through_a_metric_record_and_tampering_is_caught():
    y, s = _data(50, 6)
    stats = BinaryStats.from_scores(y, s, num_bins=20)
    record = MetricRecord(stats.to_metrics())
    assert BinaryStats.from_metrics(record).to_metrics() == stats.to_metrics()
    bad = dict(record)
    bad["tp"] = bad["tp"] + 1
    with pytest.raises(ValueError, match="hist-pos"):
        BinaryStats.from_metrics(bad)
    for key, value in [("fn", -1), ("fp", 1.5), ("tn", float("nan"))]:
        with pytest.raises(ValueError, match=key):
            BinaryStats.from_metrics({**dict(record), key: value})
    with pytest.raises(ValueError, match="missing"):
        BinaryStats.from_metrics({"tp": 1})


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_site_metrics_equal_scikit_learn_including_ties(seed):
    y, s = _data(300, seed)
    s = np.round(s, 2)  # many ties
    values = site_metrics(y, s, ["auroc", "auprc", "recall-at-1pct-fpr"])
    assert values["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert values["auprc"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    fpr, tpr, _ = roc_curve(y, s)
    assert values["recall-at-1pct-fpr"] == pytest.approx(tpr[fpr <= 0.01].max())


def test_site_metrics_exact_values_plus_statistics():
    y, s = _data(100, 7)
    values = site_metrics(y, s, NAMES)
    assert values["auroc"] == pytest.approx(roc_auc_score(y, s))
    assert {"tp", "fp", "tn", "fn", "hist-pos", "hist-neg"} <= set(values)
    with pytest.raises(ValueError, match="both classes"):
        site_metrics(np.ones(5), np.full(5, 0.7), NAMES)
    with pytest.raises(ValueError, match="unknown metrics"):
        site_metrics(y, s, ["auroc", "kappa"])
    with pytest.raises(ValueError, match="probabilities"):
        site_metrics(y, s * 2, NAMES)


def test_aggregator_pools_statistics_instead_of_averaging_site_aurocs():
    # Two sites, each ranks its own rows perfectly, but their scores are
    # calibrated differently: the mean of site AUROCs is 1, the pooled one is not.
    y_a, s_a = np.array([0, 0, 1, 1]), np.array([0.5, 0.6, 0.8, 0.9])
    y_b, s_b = np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])
    aggregate = make_metrics_aggregator(NAMES)
    records = [
        _record({**site_metrics(y, s, NAMES), "num-examples": 4})
        for y, s in ((y_a, s_a), (y_b, s_b))
    ]
    out = aggregate(records, "num-examples")
    assert out["auroc-site-mean"] == pytest.approx(1.0)
    assert out["auroc"] == pytest.approx(
        roc_auc_score(np.r_[y_a, y_b], np.r_[s_a, s_b])
    )
    assert out["auroc"] < 0.8
    # Pooled sensitivity counts rows, not sites.
    assert out["sensitivity"] == pytest.approx(2 / 4)
    assert out["tp"] == 2 and "hist-pos" not in out and "num-examples" not in out


def test_aggregator_takes_max_of_epsilon_and_weighted_mean_of_the_rest():
    aggregate = make_metrics_aggregator((), max_keys=("epsilon",), sum_keys=("n",))
    out = aggregate(
        [
            _record({"num-examples": 10, "epsilon": 2.0, "train-loss": 1.0, "n": 1}),
            _record({"num-examples": 30, "epsilon": 3.5, "train-loss": 2.0, "n": 2}),
        ],
        "num-examples",
    )
    assert out["epsilon"] == 3.5
    assert out["train-loss"] == pytest.approx((10 * 1 + 30 * 2) / 40)
    assert out["n"] == 3


def test_aggregator_drops_malformed_statistics_without_raising(caplog):
    y, s = _data(40, 8)
    good = {**site_metrics(y, s, NAMES), "num-examples": 40}
    forged = {**good, "tp": good["tp"] + 5}
    aggregate = make_metrics_aggregator(NAMES)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        out = aggregate([_record(good), _record(forged)], "num-examples")
    assert out["tp"] == good["tp"]  # only the valid site is pooled
    assert "statistics were ignored" in caplog.text
