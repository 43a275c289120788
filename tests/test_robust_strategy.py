"""RobustAggregation through real Flower Messages and real inner strategies."""

import logging
import math

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
)
from flwr.serverapp.strategy import Krum as FlowerKrum

from flwr_ext.aggregation import TrimmedMeanRule
from flwr_ext.strategy import (
    ROBUST_STRATEGIES,
    CenteredClipping,
    GeometricMedian,
    Krum,
    Median,
    MultiKrum,
    RobustAggregation,
    TrimmedMean,
)

from .conftest import instructions, model, reply_to

NODES = list(range(101, 111))  # 10 nodes


def models(values):
    return [model(v) for v in values]


def run_round(strategy, values, global_value=0.0, weights=None, mutate=None):
    """Configure a round, reply with one constant model per node, aggregate."""
    msgs = instructions(strategy, model(global_value), NODES[: len(values)])
    weights = weights or [10] * len(values)
    replies = [
        reply_to(m, model(v), w, {"loss": float(v)})
        for m, v, w in zip(msgs, values, weights, strict=True)
    ]
    if mutate:
        replies = mutate(msgs, replies)
    return strategy.aggregate_train(1, replies), replies


def value_of(arrays: ArrayRecord) -> float:
    w = arrays["w"].numpy()
    assert np.all(w == w.flat[0])
    return float(w.flat[0])


# ------------------------------------------------------------------ basics
def test_dropin_classes_default_to_fedavg_and_accept_a_strategy():
    assert isinstance(TrimmedMean(beta=0.2).strategy, FedAvg)
    prox = FedProx(proximal_mu=0.1)
    assert TrimmedMean(prox, beta=0.1).strategy is prox
    assert set(ROBUST_STRATEGIES) == {
        "krum", "multi-krum", "trimmed-mean", "median", "geometric-median",
        "centered-clipping",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("strategy", "selected"),
    [
        (TrimmedMean(beta=0.2), 10),
        (Median(), 10),
        (GeometricMedian(), 10),
        (CenteredClipping(), 10),
        (Krum(num_byzantine=2), 1),  # Krum keeps one update
        (MultiKrum(num_byzantine=2), 8),  # n - f
        (TrimmedMean(beta=0.2, pre_aggregation="nnm", num_byzantine=2), 10),
        (Median(pre_aggregation="nnm", num_byzantine=2), 10),
    ],
    ids=lambda s: (
        f"{type(s).__name__}-{s.pre_aggregation!r}"
        if not isinstance(s, int)
        else str(s)
    ),
)
def test_two_attackers_cannot_drag_the_model(strategy, selected):
    values = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 0.98, 1e6, -1e6]
    (arrays, metrics), _ = run_round(strategy, values)
    assert 0.85 <= value_of(arrays) <= 1.15
    assert arrays["w"].numpy().dtype == np.float32
    assert metrics["robust-received"] == 10
    assert metrics["robust-dropped"] == 0
    assert metrics["robust-selected"] == selected
    seconds = metrics["robust-aggregation-s"]  # reported, finite (not timed here)
    assert isinstance(seconds, float) and math.isfinite(seconds)


def test_plain_fedavg_is_dragged_which_shows_the_test_can_fail():
    values = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 0.98, 1e6, -1e5]
    msgs = instructions(FedAvg(), model(), NODES)
    replies = [reply_to(m, model(v)) for m, v in zip(msgs, values, strict=True)]
    arrays, _ = FedAvg().aggregate_train(1, replies)
    assert value_of(arrays) > 1000


def test_replies_are_not_modified():
    strategy = Median()
    (arrays, _), replies = run_round(strategy, [1, 2, 3, 4, 50])
    for reply, v in zip(replies, [1, 2, 3, 4, 50], strict=True):
        np.testing.assert_array_equal(reply.content["arrays"]["w"].numpy(), v)
    assert value_of(arrays) == 3


# ------------------------------------------------------------------ weights
def test_weight_inflation_does_not_dominate_uniform_weighting():
    values = [1.0] * 8 + [100.0]
    weights = [10] * 8 + [1000 * 10]
    (arrays, _), _ = run_round(TrimmedMean(beta=0.0), values, weights=weights)
    assert value_of(arrays) == pytest.approx((8 + 100) / 9)


def test_capped_weighting_bounds_a_claim_to_cap_times_the_median():
    values = [0.0] * 4 + [9.0]
    weights = [10, 10, 10, 10, 10_000]
    strategy = TrimmedMean(beta=0.0, weighting="capped", weight_cap=2.0)
    (arrays, _), _ = run_round(strategy, values, weights=weights)
    assert value_of(arrays) == pytest.approx(9.0 * 20 / 60)


def test_all_zero_weights_aggregate_uniformly():
    (arrays, _), _ = run_round(TrimmedMean(beta=0.0), [1.0, 3.0], weights=[0, 0])
    assert value_of(arrays) == 2.0


# ------------------------------------------------------------------ malformed
def corruptions(msgs, replies):
    """Replace the last six replies by one of each kind of malformed reply."""
    good_w = np.zeros((3, 2), np.float32)
    good_b = np.zeros(2, np.float32)
    bad = [
        reply_to(msgs[4], model(np.nan)),
        reply_to(msgs[5], ArrayRecord({"w": Array(good_w)})),
        reply_to(
            msgs[6], ArrayRecord({"w": Array(good_w.T.copy()), "b": Array(good_b)})
        ),
        reply_to(msgs[7], model(), num_examples=-3),
        reply_to(msgs[8], model(), extra_records={"x": model()}),
        Message(Error(code=0, reason="client crashed"), reply_to=msgs[9]),
    ]
    return replies[:4] + bad


def test_malformed_replies_are_dropped_with_one_line_each(caplog):
    strategy = TrimmedMean(beta=0.0)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        (arrays, metrics), _ = run_round(strategy, [2.0] * 10, mutate=corruptions)
    assert value_of(arrays) == 2.0
    assert metrics["robust-received"] == 10
    assert metrics["robust-dropped"] == 6
    assert metrics["robust-selected"] == 4
    dropped = [
        r.getMessage() for r in caplog.records if "dropped reply" in r.getMessage()
    ]
    assert len(dropped) == 6
    expected = [
        "node 105: non-finite values",
        "node 106: missing arrays ['b']",
        "node 107: array 'w' has shape (2, 3)",
        "node 108: weight 'num-examples' must be finite and >= 0, got -3",
        "node 109: expected exactly one ArrayRecord, got 2",
        "node 110: client error 0: client crashed",
    ]
    for line, text in zip(dropped, expected, strict=True):
        assert text in line


def test_duplicate_and_unsampled_replies_are_dropped(caplog):
    strategy = Median()
    msgs = instructions(strategy, model(), NODES[:3])
    replies = [reply_to(m, model(1.0)) for m in msgs]
    replies.append(reply_to(msgs[0], model(50.0)))  # second reply of node 101
    stranger = Message(
        RecordDict({"arrays": model(9.0), "m": MetricRecord({"num-examples": 1})}),
        dst_node_id=999,
        message_type="train",
    )
    replies.append(reply_to(stranger, model(9.0)))  # reply "from" node 999
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert value_of(arrays) == 1.0
    assert metrics["robust-dropped"] == 2
    text = caplog.text
    assert "node 101: second reply from the same node" in text
    assert "node 999: node was not sampled in this round" in text


def test_too_few_valid_replies_keeps_previous_model(caplog):
    strategy = Krum(num_byzantine=2)  # needs 7: 7 sampled, 6 reply
    msgs = instructions(strategy, model(), NODES[:7])
    replies = [reply_to(m, model(1.0)) for m in msgs[:6]]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None
    assert metrics["robust-received"] == 6 and metrics["robust-selected"] == 0
    assert "needs at least 7: keeping the previous global model" in caplog.text


def test_nan_metric_drops_the_reply_not_the_round():
    strategy = Median()
    msgs = instructions(strategy, model(), NODES[:3])
    replies = [
        reply_to(msgs[0], model(1.0)),
        reply_to(msgs[1], model(1.0)),
        reply_to(msgs[2], model(7.0), extra_metrics={"loss": float("inf")}),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert value_of(arrays) == 1.0
    assert metrics["robust-dropped"] == 1


def test_inconsistent_client_metrics_never_crash_aggregation(caplog):
    strategy = Median()
    msgs = instructions(strategy, model(), NODES[:2])
    replies = [
        reply_to(msgs[0], model(1.0), extra_metrics={"curve": [1.0, 2.0]}),
        reply_to(msgs[1], model(1.0), extra_metrics={"curve": [1.0]}),
    ]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert value_of(arrays) == 1.0
    assert "robust-received" in metrics
    assert "could not be aggregated" in caplog.text


def test_aggregate_before_configure_is_a_clear_error():
    with pytest.raises(RuntimeError, match="before configure_train"):
        Median().aggregate_train(1, [])


# ------------------------------------------------------------- inner strategies
def test_fedadam_applies_its_step_to_the_robust_aggregate_and_keeps_float32():
    strategy = TrimmedMean(FedAdam(eta=0.1), beta=0.2)
    values = [1.0, 1.1, 0.9, 1.05, 0.95, 1e6, -1e6, 1.0, 1.0, 1.0]
    (arrays, _), _ = run_round(strategy, values)
    assert arrays["w"].numpy().dtype == np.float32
    # Reference: a fresh FedAdam fed the trimmed mean as its only reply.
    reference = FedAdam(eta=0.1)
    msgs = instructions(reference, model(0.0), NODES[:2])
    expected_value = TrimmedMeanRule(0.2).aggregate(
        np.array(values)[:, None], np.ones(10)
    )[0]
    expected, _ = reference.aggregate_train(
        1, [reply_to(msgs[0], model(expected_value))]
    )
    np.testing.assert_allclose(
        arrays["w"].numpy(), expected["w"].numpy().astype(np.float32), rtol=1e-6
    )
    assert value_of(arrays) != pytest.approx(expected_value)  # Adam really ran


def test_fedprox_config_reaches_clients():
    strategy = TrimmedMean(FedProx(proximal_mu=0.3), beta=0.1)
    msgs = instructions(strategy, model(), NODES)
    assert all(m.content["config"]["proximal-mu"] == 0.3 for m in msgs)
    replies = [reply_to(m, model(2.0)) for m in msgs]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert value_of(arrays) == 2.0


def test_inner_returning_non_finite_keeps_previous_model(caplog):
    class Exploding(FedAvg):
        def aggregate_train(self, server_round, replies):
            arrays, metrics = super().aggregate_train(server_round, replies)
            return ArrayRecord(
                {k: Array(v.numpy() * np.inf) for k, v in arrays.items()}
            ), metrics

    with caplog.at_level(logging.WARNING, logger="flwr"):
        (arrays, _), _ = run_round(Median(Exploding()), [1.0, 2.0, 3.0])
    assert arrays is None
    assert "non-finite or reshaped" in caplog.text


# ------------------------------------------------------------- evaluate
def test_aggregate_evaluate_drops_malformed_replies(caplog):
    strategy = Median()
    msgs = list(
        strategy.configure_evaluate(1, model(), ConfigRecord(), _Grid(NODES[:3]))
    )
    msgs.sort(key=lambda m: m.metadata.dst_node_id)
    replies = [
        Message(
            RecordDict({"m": MetricRecord({"num-examples": 5, "acc": 0.8})}),
            reply_to=msgs[0],
        ),
        Message(
            RecordDict({"m": MetricRecord({"num-examples": 5000, "acc": 0.6})}),
            reply_to=msgs[1],
        ),
        Message(RecordDict({"m": MetricRecord({"acc": 0.1})}), reply_to=msgs[2]),
    ]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics["acc"] == pytest.approx(0.7)  # uniform: the 5000 claim is ignored
    assert "dropped evaluate reply from node 103" in caplog.text


class _Grid:
    def __init__(self, ids):
        self.ids = ids

    def get_node_ids(self):
        return self.ids


# ------------------------------------------------------------- construction
@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: TrimmedMean(pre_aggregation="nnm"), "needs num_byzantine"),
        (lambda: TrimmedMean(pre_aggregation="bucketing"), "must be None, 'nnm'"),
        (lambda: TrimmedMean(weighting="weighted"), "weighting must be one of"),
        (
            lambda: TrimmedMean(weighting="capped", weight_cap=0.5),
            "weight_cap must be in",
        ),
        (lambda: TrimmedMean(beta=0.7), r"beta must be in \[0.0, 0.5\), got 0.7"),
        (lambda: Krum(num_byzantine=-2), "num_byzantine must be >= 0, got -2"),
        (lambda: RobustAggregation(FedAvg(), "median"), "must be an flwr_ext"),
        (lambda: TrimmedMean("fedavg"), "wraps a Flower Strategy"),
    ],
)
def test_constructor_errors_are_specific(factory, message):
    with pytest.raises((ValueError, TypeError), match=message):
        factory()


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (
            lambda: TrimmedMean(
                DifferentialPrivacyServerSideFixedClipping(FedAvg(), 1.0, 1.0, 10)
            ),
            "cannot wrap DifferentialPrivacyServerSideFixedClipping: a DP wrapper",
        ),
        (lambda: Median(FlowerKrum()), "cannot wrap Krum: two robust rules"),
        (lambda: Median(TrimmedMean()), "cannot wrap TrimmedMean: two robust rules"),
    ],
)
def test_unsound_compositions_fail_at_construction(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_an_update_that_overflows_float32_is_dropped_not_a_crash(caplog):
    # Finite model values whose difference from the global model is not finite
    # in float32 would otherwise reach the rule as Inf.
    strategy = Median()
    big = float(np.finfo(np.float32).max)
    msgs = instructions(strategy, model(-big), NODES[:3])
    replies = [
        reply_to(msgs[0], model(-big)),
        reply_to(msgs[1], model(-big)),
        reply_to(msgs[2], model(big)),
    ]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert value_of(arrays) == -big
    assert metrics["robust-dropped"] == 1
    assert "node 103: update (model - global model) overflows float32" in caplog.text


def test_scalar_and_integer_arrays_keep_their_shape_and_dtype():
    # A 0-d array (e.g. a BatchNorm step counter) must stay 0-d, an int64 array
    # int64, through the robust aggregate and the inner strategy's step.
    def scalar_model(value: float) -> ArrayRecord:
        return ArrayRecord(
            {
                "w": Array(np.full((3, 2), value, dtype=np.float32)),
                "scale": Array(np.array(value, dtype=np.float32)),
                "steps": Array(np.array([7, 7], dtype=np.int64)),
            }
        )

    strategy = Median()
    msgs = instructions(strategy, scalar_model(0.0), NODES[:5])
    replies = [
        reply_to(m, scalar_model(v)) for m, v in zip(msgs, range(5), strict=True)
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays["scale"].numpy().shape == ()
    assert float(arrays["scale"].numpy()) == 2.0
    assert arrays["steps"].numpy().dtype == np.int64
    assert arrays["steps"].numpy().shape == (2,)


def _nan_model() -> ArrayRecord:
    return ArrayRecord(
        {
            "w": Array(np.full((3, 2), np.nan, dtype=np.float32)),
            "b": Array(np.zeros(2, dtype=np.float32)),
        }
    )


@pytest.mark.parametrize("discount", [True, False])
def test_rejected_replies_lower_f_for_krum(caplog, discount):
    # Krum(f=2) needs 7 valid replies. Two of 7 nodes send NaN: those two are
    # proven Byzantine, so the 5 valid replies hold none, and Krum with f=0
    # (needs 3) is sound. With discount_rejected=False the round is skipped.
    strategy = Krum(num_byzantine=2, discount_rejected=discount)

    def poison(msgs, replies):
        return replies[:5] + [reply_to(m, _nan_model()) for m in msgs[5:]]

    with caplog.at_level(logging.INFO, logger="flwr"):
        (arrays, metrics), _ = run_round(strategy, [1.0] * 7, mutate=poison)
    assert metrics["robust-dropped"] == 2
    if discount:
        assert value_of(arrays) == 1.0
        assert "2 rejected replies prove their senders Byzantine" in caplog.text
    else:
        assert arrays is None
        assert "needs at least 7: keeping the previous global model" in caplog.text


def test_error_replies_do_not_lower_f(caplog):
    # An honest ClientApp can crash: an error reply proves nothing about its
    # sender, so f stays 2 and 5 valid replies are too few for Krum.
    strategy = MultiKrum(num_byzantine=2)

    def crash(msgs, replies):
        errors = [
            Message(Error(code=0, reason="out of memory"), reply_to=m) for m in msgs[5:]
        ]
        return replies[:5] + errors

    with caplog.at_level(logging.WARNING, logger="flwr"):
        (arrays, _), _ = run_round(strategy, [1.0] * 7, mutate=crash)
    assert arrays is None
    assert "needs at least 7" in caplog.text


def test_nnm_and_multikrum_lower_f_together():
    # f=3 with NNM: 3 malformed replies of 9 leave 6 honest rows; MultiKrum then
    # averages all n - 0 = 6 of them.
    strategy = MultiKrum(num_byzantine=3, pre_aggregation="nnm")

    def poison(msgs, replies):
        return replies[:6] + [reply_to(m, _nan_model()) for m in msgs[6:]]

    (arrays, metrics), _ = run_round(
        strategy, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0, 0.0, 0.0], mutate=poison
    )
    assert metrics["robust-selected"] == 6
    assert value_of(arrays) == pytest.approx(3.5)
