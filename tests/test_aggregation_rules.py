import numpy as np
import pytest

from flwr_ext.aggregation import (
    CenteredClippingRule,
    CoordinateMedian,
    GeometricMedianRule,
    KrumRule,
    NearestNeighborMixing,
    TrimmedMeanRule,
    WeightedMean,
    centered_clipping,
    geometric_median,
    krum_scores,
    nearest_neighbor_mixing,
    pairwise_squared_distances,
)

ROBUST_RULES = [
    CoordinateMedian(),
    TrimmedMeanRule(beta=0.25),
    GeometricMedianRule(),
    CenteredClippingRule(),
    KrumRule(num_byzantine=2),
    KrumRule(num_byzantine=2, num_selected=None),
]
ALL_RULES = [WeightedMean(), *ROBUST_RULES]


def col(*values):
    """Rows of a (n, 1) matrix."""
    return np.array(values, dtype=np.float64)[:, None]


# ---------------------------------------------------------------- hand-computed
def test_weighted_mean_by_hand():
    x = col(1.0, 3.0)
    assert WeightedMean().aggregate(x, np.array([1.0, 3.0]))[0] == pytest.approx(2.5)
    assert WeightedMean().aggregate(x, np.array([0.0, 0.0]))[0] == pytest.approx(2.0)


def test_median_by_hand():
    assert CoordinateMedian().aggregate(col(1, 2, 100), np.ones(3))[0] == 2
    assert CoordinateMedian().aggregate(col(1, 2, 3, 100), np.ones(4))[0] == 2.5
    weighted = CoordinateMedian().aggregate(col(1, 2, 3), np.array([0.1, 0.1, 0.8]))
    assert weighted[0] == 3
    # Weighted median landing exactly on one half averages its neighbours.
    even = CoordinateMedian().aggregate(col(1, 2, 3, 4), np.array([1, 1, 2, 0.0]))
    assert even[0] == 2.5


def test_trimmed_mean_by_hand():
    rule = TrimmedMeanRule(beta=0.2)
    assert rule.aggregate(col(1, 2, 3, 4, 100), np.ones(5))[0] == pytest.approx(3.0)
    weighted = rule.aggregate(col(1, 2, 3, 4, 100), np.array([1, 1, 2, 1, 1.0]))
    assert weighted[0] == pytest.approx((2 + 6 + 4) / 4)
    assert TrimmedMeanRule(beta=0.0).aggregate(col(1, 2, 6), np.ones(3))[0] == 3


def test_krum_by_hand():
    x = col(0, 1, 2, 10)
    np.testing.assert_allclose(krum_scores(x, 0), [5, 2, 5, 145])
    result = KrumRule(num_byzantine=0).aggregate_detailed(x, np.ones(4))
    assert result.value[0] == 1.0
    assert result.selected.tolist() == [False, True, False, False]
    multi = KrumRule(num_byzantine=0, num_selected=2).aggregate(x, np.ones(4))
    assert multi[0] == 0.5


def test_geometric_median_by_hand():
    assert GeometricMedianRule().aggregate(col(0, 1, 10), np.ones(3))[
        0
    ] == pytest.approx(1.0, abs=1e-6)
    triangle = np.array([[0.0, 0.0], [2.0, 0.0], [1.0, np.sqrt(3.0)]])
    value, iterations = geometric_median(triangle, np.ones(3) / 3, tol=1e-10)
    np.testing.assert_allclose(value, [1.0, np.sqrt(3.0) / 3], atol=1e-6)
    assert iterations >= 1


def test_centered_clipping_by_hand():
    x = col(0, 0, 0, 10)
    value = centered_clipping(x, np.ones(4) / 4, tau=1.0, iterations=1)
    assert value[0] == pytest.approx(0.25)
    # With a radius no row exceeds, one iteration from any centre is the mean.
    far = CenteredClippingRule(tau=1e9, iterations=1).aggregate(x, np.ones(4))
    assert far[0] == pytest.approx(2.5)


def test_nnm_by_hand():
    mixed = nearest_neighbor_mixing(col(0, 1, 2, 10), num_byzantine=1)
    np.testing.assert_allclose(mixed[:, 0], [1, 1, 1, 13 / 3])


# ------------------------------------------------------------- distances
def test_distances_exact_for_nearly_identical_float32_models():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1000, size=5000).astype(np.float32)
    rows = np.stack(
        [base + rng.normal(0, 1e-3, 5000).astype(np.float32) for _ in range(6)]
    )
    exact = np.array(
        [[np.sum((a.astype(np.float64) - b) ** 2) for b in rows] for a in rows]
    )
    got = pairwise_squared_distances(rows)
    np.testing.assert_allclose(got, exact, rtol=1e-9, atol=1e-12)
    # The textbook float32 Gram form is wrong here: that is the bug we avoid.
    gram = rows @ rows.T
    sq = np.diag(gram)
    naive = sq[:, None] + sq[None, :] - 2 * gram
    assert np.abs(naive - exact).max() > 10 * exact.max()


def test_a_huge_row_does_not_drown_honest_distances():
    rng = np.random.default_rng(1)
    honest = rng.normal(0, 1e-3, size=(5, 100))
    rows = np.vstack([honest, np.full((1, 100), 1e20)])
    got = pairwise_squared_distances(rows)[:5, :5]
    exact = ((honest[:, None, :] - honest[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(got, exact, rtol=1e-9, atol=1e-15)
    assert KrumRule(1).aggregate_detailed(rows, np.ones(6)).selected[:5].any()


def test_overflowing_rows_still_give_ordered_distances():
    rows = np.vstack([np.zeros((4, 3)), np.full((1, 3), 1e200)])
    dist = pairwise_squared_distances(rows)
    assert np.isinf(dist[4, :4]).all() and (dist[:4, :4] == 0).all()
    assert KrumRule(1).aggregate_detailed(rows, np.ones(5)).selected[4] == np.False_


# ------------------------------------------------------------- invariants
def sample(n=9, d=7, seed=3):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.uniform(0.5, 2.0, size=n)


@pytest.mark.parametrize("rule", ALL_RULES, ids=repr)
def test_permutation_invariance(rule):
    x, w = sample()
    perm = np.random.default_rng(5).permutation(len(x))
    np.testing.assert_allclose(
        rule.aggregate(x, w), rule.aggregate(x[perm], w[perm]), rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize("rule", ALL_RULES, ids=repr)
def test_translation_equivariance(rule):
    x, w = sample()
    shift = np.linspace(-50, 50, x.shape[1])
    np.testing.assert_allclose(
        rule.aggregate(x + shift, w), rule.aggregate(x, w) + shift, rtol=1e-7, atol=1e-7
    )


@pytest.mark.parametrize("rule", ALL_RULES, ids=repr)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inputs_never_modified_and_output_is_float64(rule, dtype):
    x, w = sample()
    x = x.astype(dtype)
    x_before, w_before = x.copy(), w.copy()
    out = rule.aggregate(x, w)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(w, w_before)
    assert out.dtype == np.float64 and out.shape == (x.shape[1],)


def byzantine_rows(kind: str, f: int, d: int) -> np.ndarray:
    rng = np.random.default_rng(11)
    return {
        "huge": np.full((f, d), 1e12),
        "opposite": np.vstack([np.full(d, 1e6), np.full(d, -1e6)] * f)[:f],
        "random": rng.normal(0, 1e8, size=(f, d)),
    }[kind]


@pytest.mark.parametrize("rule", ROBUST_RULES, ids=repr)
@pytest.mark.parametrize("kind", ["huge", "opposite", "random"])
def test_bounded_influence_of_f_arbitrary_rows(rule, kind):
    rng = np.random.default_rng(7)
    honest = rng.uniform(-1, 1, size=(10, 6))
    x = np.vstack([honest, byzantine_rows(kind, 2, 6)])
    out = rule.aggregate(x, np.ones(len(x)))
    # Whatever the two Byzantine rows send, the aggregate stays within the honest
    # rows' bounding box widened by their diameter.
    diameter = np.linalg.norm(honest.max(0) - honest.min(0))
    assert np.linalg.norm(out - honest.mean(0)) <= diameter


def test_mean_is_not_robust_which_the_invariant_test_would_catch():
    honest = np.random.default_rng(7).uniform(-1, 1, size=(10, 6))
    x = np.vstack([honest, byzantine_rows("huge", 2, 6)])
    assert np.linalg.norm(WeightedMean().aggregate(x, np.ones(12))) > 1e10


def test_nnm_bounded_and_does_not_modify():
    honest = np.random.default_rng(2).uniform(-1, 1, size=(10, 4))
    x = np.vstack([honest, np.full((2, 4), 1e9)])
    before = x.copy()
    mixed = NearestNeighborMixing(2).transform(x, np.ones(12))
    np.testing.assert_array_equal(x, before)
    assert np.abs(mixed[:10]).max() <= 1.0  # honest rows mix only honest rows
    out = TrimmedMeanRule(beta=0.2).aggregate(mixed, np.ones(12))
    assert np.abs(out).max() <= 1.0


# ------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: TrimmedMeanRule(beta=0.5), r"beta must be in \[0.0, 0.5\), got 0.5"),
        (lambda: TrimmedMeanRule(beta=-0.1), r"beta must be in \[0.0, 0.5\)"),
        (lambda: TrimmedMeanRule(beta="0.1"), "beta must be a number"),
        (lambda: KrumRule(num_byzantine=-1), "num_byzantine must be >= 0, got -1"),
        (lambda: KrumRule(num_byzantine=1.5), "num_byzantine must be an integer"),
        (lambda: KrumRule(1, num_selected=0), "num_selected must be >= 1, got 0"),
        (lambda: GeometricMedianRule(max_iter=0), "max_iter must be >= 1"),
        (lambda: GeometricMedianRule(nu=0.0), "nu must be > 0"),
        (lambda: CenteredClippingRule(tau=0.0), "tau must be > 0"),
        (lambda: CenteredClippingRule(iterations=0), "iterations must be >= 1"),
        (lambda: NearestNeighborMixing(num_byzantine=True), "must be an integer"),
    ],
)
def test_constructor_errors_name_parameter_value_and_range(factory, message):
    with pytest.raises((ValueError, TypeError), match=message):
        factory()


def test_aggregate_input_errors():
    rule = CoordinateMedian()
    with pytest.raises(ValueError, match="2-D"):
        rule.aggregate(np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        rule.aggregate(col(1, np.nan), np.ones(2))
    with pytest.raises(ValueError, match=r"weights must have shape \(2,\)"):
        rule.aggregate(col(1, 2), np.ones(3))
    with pytest.raises(ValueError, match="finite and >= 0"):
        rule.aggregate(col(1, 2), np.array([1, -1.0]))
    with pytest.raises(ValueError, match="at least 7 updates, got 4"):
        KrumRule(2).aggregate(col(1, 2, 3, 4), np.ones(4))


def test_min_clients():
    assert KrumRule(2).min_clients() == 7
    assert TrimmedMeanRule(0.2).min_clients() == 1
    assert TrimmedMeanRule(0.45).min_clients() == 1
    assert NearestNeighborMixing(3).min_clients() == 4
