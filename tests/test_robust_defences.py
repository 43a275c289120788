"""ARC, bucketing, pre-aggregation chains and stateful centered clipping.

The guarantees every rule already has (inputs unmodified, dtype kept, bounded
influence, malformed replies dropped, no NaN model) checked for the new steps,
plus what each step does by hand.
"""

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvg, FedAvgM
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flwr_ext.aggregation import (
    AdaptiveRobustClipping,
    Bucketing,
    CenteredClippingRule,
    MedianNormEqualization,
    NearestNeighborMixing,
    PreAggregationChain,
    TrimmedMeanRule,
    adaptive_robust_clipping,
    bucketing,
    median_norm_equalization,
)
from flwr_ext.aggregation.arc import arc_num_clipped
from flwr_ext.strategy import (
    CenteredClipping,
    GeometricMedian,
    Median,
    RobustAggregation,
    TrimmedMean,
)

from .conftest import instructions, model, reply_to
from .test_robust_strategy import NODES, corruptions, run_round, value_of

PRE_STEPS = [
    AdaptiveRobustClipping(2),
    Bucketing(2, seed=0),
    PreAggregationChain([AdaptiveRobustClipping(2), NearestNeighborMixing(2)]),
    PreAggregationChain([Bucketing(2, seed=1), AdaptiveRobustClipping(2)]),
    MedianNormEqualization(),
    PreAggregationChain([MedianNormEqualization(), NearestNeighborMixing(2)]),
]


def sample(seed=3, n=12, d=7):
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 1.0, (n, d)), rng.uniform(0.5, 2.0, n)


# ---------------------------------------------------------------- by hand
def test_arc_clips_the_k_longest_rows_to_the_next_norm():
    # n = 10, f = 2: k = floor(2 * 2/10 * 8) = 3 rows clipped.
    assert arc_num_clipped(10, 2) == 3
    norms = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], dtype=np.float64)
    x = np.zeros((10, 3))
    x[:, 0] = norms
    out = adaptive_robust_clipping(x, 2)
    np.testing.assert_allclose(
        np.linalg.norm(out, axis=1), [1, 2, 3, 4, 5, 6, 7] + [7] * 3
    )
    np.testing.assert_array_equal(out[:, 1:], 0.0)
    np.testing.assert_array_equal(adaptive_robust_clipping(x, 0), x)  # f = 0: no-op


def test_arc_built_for_more_byzantine_rows_than_the_round_has_never_fails():
    """A round with fewer valid replies than ARC's ``f`` (dropouts, rejected
    replies, or ``f`` over-estimated on purpose) clips as for ``f = n / 2``.

    The count ``floor(2 (f/n)(n - f))`` turns negative for ``f > n``, and the
    old code then indexed past the rows (IndexError, a crashed round).
    """
    assert arc_num_clipped(3, 5) == 1  # as f = 1.5: floor(2 * 0.5 * 1.5)
    assert arc_num_clipped(20, 12) == arc_num_clipped(20, 10) == 10  # never fewer
    assert arc_num_clipped(20, 8) == 9  # below n / 2: the formula as before
    norms = np.array([1.0, 2.0, 3.0])
    x = np.zeros((3, 2))
    x[:, 0] = norms
    out = AdaptiveRobustClipping(5).transform(x, np.ones(3))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), [1, 2, 2])


def test_norm_equalization_rescales_every_row_to_the_median_norm():
    x = np.zeros((5, 3))
    x[:, 0] = [1.0, -2.0, 3.0, 0.0, 10.0]  # norms 1, 2, 3, 0, 10: median 2
    x[4, 1] = 0.0
    out = median_norm_equalization(x)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), [2, 2, 2, 0, 2])
    np.testing.assert_allclose(out[:, 0], [2, -2, 2, 0, 2])  # directions kept
    np.testing.assert_array_equal(out[3], 0.0)  # a zero row has no direction
    assert repr(MedianNormEqualization()) == "MedianNormEqualization()"
    big = np.full((3, 4), 1e38, dtype=np.float32)  # |row|^2 overflows float32
    out32 = median_norm_equalization(big)
    assert out32.dtype == np.float32 and np.isfinite(out32).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_norm_equalization_of_hostile_magnitudes_stays_finite(dtype):
    """A row of subnormals (its scale to the median overflows the dtype) and a
    one-hot row among huge spread rows (its rescaled entry would overflow) must
    come out finite, with equal norms: one hostile client must not turn the
    round's matrix into Inf/NaN (the first version did; NNM then raised
    ValueError out of aggregate_train, which stops a Flower run)."""
    tiny = np.finfo(dtype).smallest_subnormal
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 5)).astype(dtype)
    x[0] = tiny
    x[0, 1] = 0.0
    out = median_norm_equalization(x)
    assert np.isfinite(out).all()
    norms = np.linalg.norm(out.astype(np.float64), axis=1)
    np.testing.assert_allclose(norms, np.median(norms), rtol=1e-3)
    big = float(np.finfo(dtype).max) / 4
    y = np.full((5, 16), big, dtype=dtype)  # norms 4 * big, beyond the dtype
    y[0] = 0.0
    y[0, 0] = 1.0  # one-hot: rescaled alone it would be 4 * big in one entry
    out = median_norm_equalization(y)
    assert np.isfinite(out).all() and out.dtype == dtype
    peak = np.abs(out.astype(np.float64)).max(axis=1, keepdims=True)
    norms = peak[:, 0] * np.linalg.norm(out / peak, axis=1)  # no overflow
    np.testing.assert_allclose(norms, norms[1], rtol=1e-3)
    # In a strategy: the round aggregates instead of failing.
    w = np.ones(7)
    chain = PreAggregationChain([MedianNormEqualization(), NearestNeighborMixing(1)])
    assert np.isfinite(TrimmedMeanRule(0.2).aggregate(chain.transform(x, w), w)).all()


def inner_product_manipulation(epsilon, seed=0, h=14, f=6, d=50):
    """Heterogeneous honest rows and ``f`` IPM rows ``-epsilon * mean(honest)``."""
    honest = 1.0 + np.random.default_rng(seed).normal(0.0, 3.0, (h, d))
    mean = honest.mean(axis=0)
    return np.vstack([honest, np.tile(-epsilon * mean, (f, 1))]), mean


@pytest.mark.parametrize("epsilon", [0.01, 0.1, 0.3, 1.0])
def test_norm_equalization_takes_ipm_its_strength(epsilon):
    """Why the recommended chain starts with it (docs/robustness.md).

    IPM's small updates sit inside the honest cloud: after ARC + NNM the
    trimmed mean keeps well under half of the honest mean's length (0.07 at
    ``epsilon = 1``). After norm equalization every IPM row is the same unit
    direction at the median norm whatever ``epsilon`` is, and the aggregate
    keeps at least 90 % of the honest mean's projection.
    """
    x, mean = inner_product_manipulation(epsilon)
    w = np.ones(len(x))
    unit = mean / np.linalg.norm(mean)
    arc_nnm = PreAggregationChain(
        [AdaptiveRobustClipping(10), NearestNeighborMixing(6)]
    )
    equalized = PreAggregationChain(
        [MedianNormEqualization(), NearestNeighborMixing(6)]
    )
    rule = TrimmedMeanRule(0.3)
    before = rule.aggregate(arc_nnm.transform(x, w), w) @ unit
    after = rule.aggregate(equalized.transform(x, w), w) @ unit
    assert before < 0.5 * np.linalg.norm(mean)
    assert after > 0.9 * np.linalg.norm(mean)
    # The attacker's epsilon no longer reaches the rule.
    reference, _ = inner_product_manipulation(0.5)
    np.testing.assert_allclose(
        MedianNormEqualization().transform(x, w)[14:],
        MedianNormEqualization().transform(reference, w)[14:],
        rtol=1e-12,
    )


def test_bucketing_averages_random_pairs():
    x = np.arange(8, dtype=np.float64)[:, None]
    out = bucketing(x, 2, np.random.default_rng(0))
    # Each value appears twice: rows of one bucket are equal, buckets average 2 rows.
    values, counts = np.unique(out, return_counts=True)
    assert (counts == 2).all() and len(values) == 4
    assert out.sum() == pytest.approx(x.sum())
    # Bucket size 3 with 8 rows: buckets of 3, 3 and 2.
    out3 = bucketing(x, 3, np.random.default_rng(0))
    assert sorted(np.unique(out3, return_counts=True)[1]) == [2, 3, 3]


def test_bucketing_shuffles_differently_each_round_without_a_seed():
    x = np.arange(20, dtype=np.float64)[:, None]
    step = Bucketing(2)
    outs = {tuple(step.transform(x, np.ones(20)).ravel()) for _ in range(5)}
    assert len(outs) > 1


# ---------------------------------------------------------------- guarantees
@pytest.mark.parametrize("step", PRE_STEPS, ids=repr)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pre_steps_keep_shape_and_dtype_and_never_modify_inputs(step, dtype):
    x, w = sample()
    x = x.astype(dtype)
    before, w_before = x.copy(), w.copy()
    out = step.transform(x, w)
    np.testing.assert_array_equal(x, before)
    np.testing.assert_array_equal(w, w_before)
    assert out.shape == x.shape and out.dtype == dtype
    assert np.isfinite(out).all()


@pytest.mark.parametrize("step", PRE_STEPS, ids=repr)
@pytest.mark.parametrize("kind", ["huge", "opposite"])
def test_pre_steps_then_a_robust_rule_keep_bounded_influence(step, kind):
    rng = np.random.default_rng(7)
    honest = rng.uniform(-1, 1, size=(18, 6))
    byz = np.full((2, 6), 1e9) if kind == "huge" else np.array([[1e6] * 6, [-1e6] * 6])
    x = np.vstack([honest, byz])
    out = TrimmedMeanRule(0.25).aggregate(step.transform(x, np.ones(20)), np.ones(20))
    diameter = np.linalg.norm(honest.max(0) - honest.min(0))
    assert np.linalg.norm(out - honest.mean(0)) <= diameter


def test_bounded_influence_test_fails_without_a_robust_rule():
    honest = np.random.default_rng(7).uniform(-1, 1, size=(18, 6))
    x = np.vstack([honest, np.full((2, 6), 1e9)])
    out = Bucketing(2, seed=0).transform(x, np.ones(20)).mean(axis=0)
    assert np.linalg.norm(out) > 1e6


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: AdaptiveRobustClipping(-1), "num_byzantine must be >= 0"),
        (lambda: Bucketing(0), "bucket_size must be >= 1"),
        (lambda: Bucketing(2, seed=-1), "seed must be >= 0"),
        (lambda: PreAggregationChain([]), "at least one step"),
        (lambda: PreAggregationChain([TrimmedMeanRule()]), "must be a PreAggregation"),
        (lambda: CenteredClippingRule(centre="mean"), "centre must be 'median'"),
    ],
)
def test_constructor_errors(factory, message):
    with pytest.raises((ValueError, TypeError), match=message):
        factory()


def test_reprs_are_readable():
    assert repr(AdaptiveRobustClipping(2)) == "AdaptiveRobustClipping(num_byzantine=2)"
    assert repr(Bucketing(2)) == "Bucketing(bucket_size=2)"
    assert repr(CenteredClippingRule(centre="previous")) == (
        "CenteredClippingRule(tau=None, iterations=3, centre='previous')"
    )
    assert "AdaptiveRobustClipping(num_byzantine=1)" in repr(
        PreAggregationChain([AdaptiveRobustClipping(1), Bucketing(2)])
    )


def test_chain_lowers_f_in_every_step():
    chain = PreAggregationChain([AdaptiveRobustClipping(3), NearestNeighborMixing(3)])
    lowered = chain.excluding_faulty(2)
    assert [s.num_byzantine for s in lowered.steps] == [1, 1]
    assert chain.excluding_faulty(0) is chain
    assert chain.min_clients() == 4


# ---------------------------------------------------------------- stateful CC
def test_stateful_centered_clipping_starts_from_the_previous_aggregate():
    rule = CenteredClippingRule(tau=0.5, iterations=1, centre="previous")
    x = np.array([[0.0], [10.0], [10.0]])
    w = np.ones(3)
    first, state = rule.aggregate_stateful(x, w, None)
    # No state: starts at the median (10) like the stateless rule.
    assert first.value[0] == pytest.approx(
        CenteredClippingRule(tau=0.5, iterations=1).aggregate(x, w)[0]
    )
    np.testing.assert_array_equal(state, first.value)
    # From a centre at 0, each row moves it by at most tau / 3.
    second, _ = rule.aggregate_stateful(x, w, np.zeros(1))
    assert second.value[0] == pytest.approx(2 * 0.5 / 3)
    # A state of the wrong width (the model changed) is ignored.
    third, _ = rule.aggregate_stateful(x, w, np.zeros(5))
    assert third.value[0] == pytest.approx(first.value[0])
    # Stateless rules return no state.
    assert TrimmedMeanRule().aggregate_stateful(x, w, np.zeros(1))[1] is None


def test_the_wrapper_keeps_exports_and_restores_the_centre():
    strategy = CenteredClipping(centre="previous", tau=0.1, iterations=1)
    assert len(strategy.export_state()) == 0
    (arrays, _), _ = run_round(strategy, [1.0] * 10)
    assert value_of(arrays) == pytest.approx(1.0)  # first round: from the median
    saved = strategy.export_state()
    np.testing.assert_allclose(
        saved["rule-state"].numpy(), strategy.rule_state, rtol=0, atol=0
    )
    with pytest.raises(ValueError):
        strategy.rule_state[0] = 1.0  # read-only view
    # A fresh strategy that imports the state clips around the same centre.
    restored = CenteredClipping(centre="previous", tau=0.1, iterations=1)
    restored.import_state(saved)
    fresh = CenteredClipping(centre="previous", tau=0.1, iterations=1)
    (a, _), _ = run_round(strategy, [5.0] * 10)
    (b, _), _ = run_round(restored, [5.0] * 10)
    (c, _), _ = run_round(fresh, [5.0] * 10)
    assert value_of(a) == pytest.approx(value_of(b))
    # 1 + tau in L2 over the 8 parameters of the test model
    assert value_of(a) == pytest.approx(1 + 0.1 / np.sqrt(8), abs=1e-6)
    assert value_of(c) == pytest.approx(5.0)  # no state: from the median


def test_the_wrapper_exports_and_restores_fedavgms_server_momentum():
    """A restarted ServerApp resumes FedAvgM's momentum, not momentum zero.

    Round 1 from 0 with every reply at 1: pseudo-gradient -1, momentum -1, new
    model 0 + 0.5. Round 2 with replies at 1: pseudo-gradient -0.5; with the
    momentum kept 0.9 * -1 - 0.5 = -1.4 and the model 0.5 + 0.7 = 1.2; from
    momentum zero only 0.5 + 0.25 = 0.75.
    """

    def make():
        return TrimmedMean(
            FedAvgM(server_momentum=0.9, server_learning_rate=0.5), beta=0.1
        )

    strategy = make()
    (arrays, _), _ = run_round(strategy, [1.0] * 10)
    assert value_of(arrays) == pytest.approx(0.5)
    saved = strategy.export_state()
    assert sorted(saved.keys()) == ["server-momentum-00000", "server-momentum-00001"]
    restored, fresh = make(), make()
    restored.import_state(saved)
    (a, _), _ = run_round(strategy, [1.0] * 10, global_value=0.5)
    (b, _), _ = run_round(restored, [1.0] * 10, global_value=0.5)
    (c, _), _ = run_round(fresh, [1.0] * 10, global_value=0.5)
    assert value_of(a) == pytest.approx(1.2)
    assert value_of(b) == pytest.approx(value_of(a))
    assert value_of(c) == pytest.approx(0.75)
    # The momentum belongs to a FedAvgM: another inner strategy refuses it.
    with pytest.raises(ValueError, match="not FedAvgM"):
        TrimmedMean(beta=0.1).import_state(saved)
    broken = ArrayRecord(dict(saved.items()))
    broken["server-momentum-00000"] = Array(np.full(8, np.nan))
    with pytest.raises(ValueError, match="not finite"):
        make().import_state(broken)
    gap = ArrayRecord({"server-momentum-00001": saved["server-momentum-00001"]})
    with pytest.raises(ValueError, match="numbered from 0"):
        make().import_state(gap)


def test_import_state_rejects_foreign_records():
    strategy = CenteredClipping(centre="previous")
    with pytest.raises(ValueError, match="one array"):
        strategy.import_state(model())
    strategy.import_state(ArrayRecord())
    assert strategy.rule_state is None


# ---------------------------------------------------------------- in the wrapper
DEFENCES = [
    lambda: CenteredClipping(centre="previous"),
    lambda: TrimmedMean(beta=0.2, pre_aggregation=AdaptiveRobustClipping(2)),
    lambda: Median(pre_aggregation=Bucketing(2, seed=0)),
    lambda: GeometricMedian(
        pre_aggregation=PreAggregationChain(
            [AdaptiveRobustClipping(2), NearestNeighborMixing(2)]
        )
    ),
    lambda: CenteredClipping(
        centre="previous", pre_aggregation=AdaptiveRobustClipping(2)
    ),
    lambda: TrimmedMean(
        beta=0.2,
        pre_aggregation=PreAggregationChain(
            [MedianNormEqualization(), NearestNeighborMixing(2)]
        ),
    ),
]


@pytest.mark.parametrize("factory", DEFENCES)
def test_new_defences_resist_two_attackers_and_keep_float32(factory):
    values = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 0.98, 1e6, -1e6]
    (arrays, metrics), _ = run_round(factory(), values)
    assert 0.85 <= value_of(arrays) <= 1.15
    assert arrays["w"].numpy().dtype == np.float32
    assert metrics["robust-dropped"] == 0


@pytest.mark.parametrize("factory", DEFENCES)
def test_new_defences_drop_malformed_replies_and_leave_replies_intact(factory, caplog):
    strategy = factory()
    msgs = instructions(strategy, model(0.0), NODES)
    replies = [reply_to(m, model(2.0), 10) for m in msgs]
    replies = corruptions(msgs, replies)
    before = [
        {k: a.numpy().copy() for k, a in r.content["arrays"].items()}
        if not r.has_error() and "arrays" in r.content
        else None
        for r in replies
    ]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["robust-dropped"] == 6
    assert value_of(arrays) == pytest.approx(2.0, abs=1e-6)
    assert np.isfinite(arrays["w"].numpy()).all()
    for r, b in zip(replies, before, strict=True):
        if b is not None:
            for k, v in b.items():
                np.testing.assert_array_equal(r.content["arrays"][k].numpy(), v)


def test_stateful_wrapper_keeps_its_centre_when_a_round_fails():
    strategy = CenteredClipping(centre="previous")
    run_round(strategy, [1.0] * 10)
    centre = strategy.rule_state.copy()
    msgs = instructions(strategy, model(0.0), NODES)
    # Every reply malformed: no model, and the centre is untouched.
    bad = corruptions(msgs, [reply_to(m, model(np.nan)) for m in msgs])
    arrays, _ = strategy.aggregate_train(2, bad)
    assert arrays is None
    np.testing.assert_array_equal(strategy.rule_state, centre)


def test_wrapper_accepts_a_chain_as_pre_aggregation():
    chain = PreAggregationChain([AdaptiveRobustClipping(1), Bucketing(2)])
    strategy = RobustAggregation(FedAvg(), TrimmedMeanRule(0.2), pre_aggregation=chain)
    assert strategy.pre_aggregation is chain


def test_arc_of_float32_rows_near_the_float32_maximum_stays_finite():
    x = np.full((5, 4), 3e38, np.float32)
    x[0] = 1.0
    x[4] *= -1
    out = adaptive_robust_clipping(x, 2)  # k = floor(2 * 2/5 * 3) = 2 rows
    assert out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_allclose(
        np.linalg.norm(out.astype(np.float64), axis=1)[1:], 6e38, rtol=1e-6
    )


def test_the_recommended_chain_by_name():
    """``pre_aggregation="norm-equalization+nnm"``: what the apps' run config uses."""
    strategy = TrimmedMean(pre_aggregation="norm-equalization+nnm", num_byzantine=2)
    chain = strategy.pre_aggregation
    assert isinstance(chain, PreAggregationChain)
    assert repr(chain) == repr(
        PreAggregationChain([MedianNormEqualization(), NearestNeighborMixing(2)])
    )
    with pytest.raises(ValueError, match="needs num_byzantine"):
        TrimmedMean(pre_aggregation="norm-equalization+nnm")
    with pytest.raises(
        ValueError, match="'norm-equalization\\+nnm' or a PreAggregation"
    ):
        TrimmedMean(pre_aggregation="norm-equalisation+nnm", num_byzantine=2)


@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6),
        elements=st.floats(allow_nan=False, allow_infinity=False, width=32),
    )
)
@settings(max_examples=300, deadline=None)
def test_norm_equalization_of_any_finite_float32_matrix(x):
    """Whatever the magnitudes: finite, dtype kept, input unmodified, every row
    with a non-zero entry at one common norm, all-zero rows left at zero (and
    everything at zero when most rows are: the median norm is then 0)."""
    before = x.copy()
    out = median_norm_equalization(x)
    np.testing.assert_array_equal(x, before)
    assert out.dtype == np.float32 and out.shape == x.shape
    assert np.isfinite(out).all()
    live = np.abs(x).max(axis=1) > 0
    np.testing.assert_array_equal(out[~live], 0.0)
    if 2 * live.sum() < len(x):
        np.testing.assert_array_equal(out, 0.0)  # the median norm is 0
        return
    wide_in = x.astype(np.float64)
    peak_in = np.abs(wide_in).max(axis=1)
    norms_in = np.zeros(len(x))
    norms_in[live] = peak_in[live] * np.linalg.norm(
        wide_in[live] / peak_in[live, None], axis=1
    )
    if not live.any() or np.median(norms_in) < 1e-30:
        return  # a common norm that small is not representable in float32
    wide = out.astype(np.float64)
    peak = np.abs(wide).max(axis=1)
    assert (peak[live] > 0).all()
    norms = peak[live] * np.linalg.norm(wide[live] / peak[live, None], axis=1)
    np.testing.assert_allclose(norms, norms[0], rtol=1e-3)
