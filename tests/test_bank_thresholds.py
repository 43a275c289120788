"""bank_fraud's thresholds, threshold metrics, PR curves and site thresholds.

Every count the server computes from histograms is checked against the same
count computed directly from the scores, and every chosen threshold against a
brute-force search over the bin edges.
"""

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from flwr_ext.appkit.metrics import (
    BinaryStats,
    counts_at,
    operating_curve,
    score_bin_edges,
)
from flwr_ext.appkit.recorder import RecordingGrid
from flwr_ext.inprocess import InProcessGrid

APP = Path(__file__).resolve().parents[1] / "apps" / "bank-fraud"
sys.path.insert(0, str(APP))

from bank_fraud.pr_curves import plot_pr_curves, pr_points  # noqa: E402
from bank_fraud.site_thresholds import HISTOGRAM_KEYS  # noqa: E402
from bank_fraud.threshold_metrics import (  # noqa: E402
    make_threshold_metrics_aggregator,
)
from bank_fraud.thresholds import ThresholdRule, choose_threshold  # noqa: E402
from bank_fraud.validation_histograms import (  # noqa: E402
    validation_metrics,
    validation_stats,
)

BINS = 50


def scores_of(rng, n, positives):
    y = np.zeros(n, dtype=np.int64)
    y[rng.choice(n, positives, replace=False)] = 1
    logits = rng.normal(-3.0, 1.5, n) + 4.0 * y
    return y, 1.0 / (1.0 + np.exp(-logits))


def exact(y, s, t):
    flagged = s >= t
    return (int(np.sum(flagged & (y == 1))), int(np.sum(flagged & (y == 0))))


def test_counts_at_every_edge_equal_the_counts_from_the_scores():
    rng = np.random.default_rng(0)
    y, s = scores_of(rng, 2000, 40)
    stats = BinaryStats.from_scores(y, s, num_bins=BINS)
    edges = score_bin_edges(BINS)
    for index in range(1, BINS):
        point = counts_at(stats, index)
        assert point.threshold == edges[index]
        assert (point.tp, point.fp) == exact(y, s, edges[index])
        assert point.tp + point.fn == 40 and point.fp + point.tn == 1960
    with pytest.raises(ValueError, match="inner bin edge"):
        counts_at(stats, 0)


def brute_force(y, s, keep):
    edges = score_bin_edges(BINS)
    best = None
    for index in range(1, BINS):
        tp, fp = exact(y, s, edges[index])
        fn, tn = int(y.sum()) - tp, int((y == 0).sum()) - fp
        if keep(index, tp, fp, tn, fn):
            best = index if best is None else best
    return best


def test_max_f1_is_the_best_edge_and_ties_go_to_the_higher_threshold():
    rng = np.random.default_rng(1)
    y, s = scores_of(rng, 3000, 60)
    stats = BinaryStats.from_scores(y, s, num_bins=BINS)
    choice = choose_threshold(stats, ThresholdRule("max-f1"))
    edges = score_bin_edges(BINS)
    f1 = []
    for index in range(1, BINS):
        tp, fp = exact(y, s, edges[index])
        f1.append(2 * tp / (2 * tp + fp + (60 - tp)))
    best = max(f1)
    assert choice.validation.f1 == pytest.approx(best)
    assert choice.index == max(i + 1 for i, v in enumerate(f1) if v == best)
    assert choice.rule == "max-f1" and not choice.reason


def test_max_fpr_gives_the_most_recall_within_the_alert_budget():
    rng = np.random.default_rng(2)
    y, s = scores_of(rng, 3000, 60)
    stats = BinaryStats.from_scores(y, s, num_bins=BINS)
    choice = choose_threshold(stats, ThresholdRule("max-fpr", max_fpr=0.02))
    assert choice.validation.fpr <= 0.02
    lower = counts_at(stats, choice.index - 1)
    assert lower.fpr > 0.02  # one edge lower breaks the budget
    expected = brute_force(y, s, lambda i, tp, fp, tn, fn: fp / (fp + tn) <= 0.02)
    assert choice.index == expected


def test_min_precision_and_its_fallback_when_unreachable(caplog):
    rng = np.random.default_rng(3)
    y, s = scores_of(rng, 3000, 60)
    stats = BinaryStats.from_scores(y, s, num_bins=BINS)
    choice = choose_threshold(stats, ThresholdRule("min-precision", min_precision=0.6))
    assert choice.validation.precision >= 0.6
    expected = brute_force(y, s, lambda i, tp, fp, tn, fn: tp + fp > 0
                           and tp / (tp + fp) >= 0.6)  # fmt: skip
    assert choice.index == expected
    impossible = choose_threshold(
        BinaryStats.from_scores(y, rng.random(3000), num_bins=BINS),
        ThresholdRule("min-precision", min_precision=0.99),
    )
    assert impossible.rule == "max-f1" and "no threshold reaches" in impossible.reason


def test_fixed_snaps_to_the_nearest_edge_and_a_single_class_falls_back():
    y = np.array([0, 0, 1, 1])
    stats = BinaryStats.from_scores(y, np.array([0.1, 0.2, 0.8, 0.9]), num_bins=200)
    fixed = choose_threshold(stats, ThresholdRule("fixed", fallback=0.5))
    assert fixed.threshold == 0.5 and fixed.rule == "fixed"  # 0.5 is an edge
    no_fraud = BinaryStats.from_scores(np.zeros(4, int), np.full(4, 0.3),
                                       num_bins=200)  # fmt: skip
    choice = choose_threshold(no_fraud, ThresholdRule("max-f1", fallback=0.7))
    assert choice.rule == "fallback" and "no positive row" in choice.reason
    assert abs(choice.threshold - 0.7) < 0.02
    with pytest.raises(ValueError, match="choose one of"):
        ThresholdRule("best")
    with pytest.raises(ValueError, match="max_fpr"):
        ThresholdRule("max-fpr", max_fpr=0.0)


def test_validation_stats_reject_what_a_site_should_not_send():
    good = validation_metrics(np.array([0, 1, 0]), np.array([0.1, 0.9, 0.2]),
                              num_bins=10)  # fmt: skip
    assert validation_stats(good).positives == 1
    for bad, message in (
        ({}, "missing validation"),
        ({**good, "val-hist-pos": [1, -1] + [0] * 8}, "non-negative integer"),
        ({**good, "val-hist-pos": [True] * 10}, "non-negative integer"),
        ({**good, "val-hist-neg": 3}, "list"),
        ({**good, "val-hist-neg": [0] * 9}, "differ in length"),
    ):
        with pytest.raises(ValueError, match=message):
            validation_stats(bad)


def site_reply(rng, n, positives, *, bins=BINS, name="s"):
    y, s = scores_of(rng, n, positives)
    yv, sv = scores_of(rng, n, positives)
    stats = BinaryStats.from_scores(y, s, num_bins=bins)
    record = {**stats.to_metrics(), "num-examples": n, "auprc": 0.5,
              **validation_metrics(yv, sv, num_bins=bins)}  # fmt: skip
    content = RecordDict({"metrics": MetricRecord(record),
                          "site": ConfigRecord({"name": name})})  # fmt: skip
    return content, (y, s), (yv, sv)


def test_federated_aggregator_equals_choosing_on_the_pooled_scores():
    rng = np.random.default_rng(4)
    replies = [site_reply(rng, n, p) for n, p in ((1500, 30), (900, 10), (600, 12))]
    aggregate = make_threshold_metrics_aggregator(("auprc", "auroc"),
                                                  ThresholdRule("max-f1"))  # fmt: skip
    out = aggregate([r[0] for r in replies], "num-examples")
    yv = np.concatenate([r[2][0] for r in replies])
    sv = np.concatenate([r[2][1] for r in replies])
    pooled_val = BinaryStats.from_scores(yv, sv, num_bins=BINS)
    choice = choose_threshold(pooled_val, ThresholdRule("max-f1"))
    assert out["threshold"] == pytest.approx(choice.threshold)
    y = np.concatenate([r[1][0] for r in replies])
    s = np.concatenate([r[1][1] for r in replies])
    tp, fp = exact(y, s, choice.threshold)
    assert (out["tp"], out["fp"]) == (tp, fp)
    assert out["precision"] == pytest.approx(tp / (tp + fp))
    assert out["recall"] == pytest.approx(tp / y.sum())
    assert out["alert-rate"] == pytest.approx((tp + fp) / y.size)
    assert out["val-f1"] == pytest.approx(choice.validation.f1)
    assert "auprc" in out and "auprc-site-mean" in out


def test_site_selection_sums_each_sites_counts_at_its_own_threshold():
    rng = np.random.default_rng(5)
    replies = [site_reply(rng, n, p) for n, p in ((1500, 30), (900, 10))]
    rule = ThresholdRule("max-fpr", max_fpr=0.05)
    out = make_threshold_metrics_aggregator(("auprc",), rule, selection="site")(
        [r[0] for r in replies], "num-examples"
    )
    tp = fp = 0
    thresholds = []
    for _, (y, s), (yv, sv) in replies:
        own = choose_threshold(BinaryStats.from_scores(yv, sv, num_bins=BINS), rule)
        a, b = exact(y, s, own.threshold)
        tp, fp = tp + a, fp + b
        thresholds.append(own.threshold)
    assert (out["tp"], out["fp"]) == (tp, fp)
    assert "threshold" not in out
    assert out["threshold-site-mean"] == pytest.approx(
        (1500 * thresholds[0] + 900 * thresholds[1]) / 2400
    )
    with pytest.raises(ValueError, match="selection"):
        make_threshold_metrics_aggregator(("auprc",), rule, selection="pooled")


def test_a_reply_with_bad_validation_histograms_is_left_out_not_fatal(caplog):
    rng = np.random.default_rng(6)
    good, _, _ = site_reply(rng, 1000, 20)
    bad, _, _ = site_reply(rng, 1000, 20)
    bad["metrics"]["val-hist-neg"] = [-5] * BINS
    with caplog.at_level(logging.WARNING, logger="flwr"):
        out = make_threshold_metrics_aggregator(("auprc",), ThresholdRule())(
            [good, bad], "num-examples"
        )
    assert "validation statistics were ignored" in caplog.text
    assert "threshold" in out and out["tp"] + out["fn"] == 40  # both test sets


def test_pr_points_run_from_recall_0_to_1_and_end_at_the_prevalence(tmp_path):
    rng = np.random.default_rng(7)
    y, s = scores_of(rng, 2000, 50)
    stats = BinaryStats.from_scores(y, s, num_bins=BINS)
    recall, precision = pr_points(stats)
    assert recall[0] == 0 and recall[-1] == 1 and np.all(np.diff(recall) >= 0)
    assert precision[-1] == pytest.approx(50 / 2000)
    curve = operating_curve(stats)
    assert np.nanmax(curve.precision) <= 1.0
    choice = choose_threshold(stats, ThresholdRule())
    path = plot_pr_curves({"all": stats}, tmp_path / "pr.png", title="t",
                          highlight="all",
                          operating_points={"all": choice.validation})  # fmt: skip
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = BinaryStats.from_scores(np.zeros(3, int), np.full(3, 0.2), num_bins=BINS)
    assert plot_pr_curves({"x": empty}, tmp_path / "none.png", title="t") is None


def test_histogram_recording_grid_keeps_each_nodes_lists_per_round():
    def node(msg: Message, context: Context) -> Message:
        record = MetricRecord({"num-examples": 3, "hist-pos": [context.node_id, 1],
                               "other": [9.0]})  # fmt: skip
        return Message(RecordDict({"metrics": record}), reply_to=msg)

    inner = InProcessGrid({1: node, 2: node})
    grid = RecordingGrid(inner, keep_lists=HISTOGRAM_KEYS)
    messages = [
        Message(RecordDict({"config": ConfigRecord({"server-round": 3})}),
                dst_node_id=n, message_type="evaluate")
        for n in (1, 2)
    ]  # fmt: skip
    replies = list(grid.send_and_receive(messages, timeout=5))
    assert len(replies) == 2
    kept = grid.node_lists("evaluate", 3)
    assert kept == {1: {"hist-pos": [1, 1]}, 2: {"hist-pos": [2, 1]}}
    assert grid.phases["evaluate"][3].per_node[1]["num-examples"] == 3.0
    assert grid.node_lists("train", 3) == {}
