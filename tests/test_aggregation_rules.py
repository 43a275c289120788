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
from flwr_ext.aggregation.distances import centred_gram, median_and_centred_gram

ROBUST_RULES = [
    CoordinateMedian(),
    TrimmedMeanRule(beta=0.25),
    GeometricMedianRule(),
    CenteredClippingRule(),
    CenteredClippingRule(centre="previous"),
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
# float32 rows: the Gram matrix is formed in float32 blocks (ranking precision);
# the same rows as float64: full float64 precision.
@pytest.mark.parametrize(("dtype", "rtol"), [(np.float32, 1e-5), (np.float64, 1e-9)])
def test_distances_exact_for_nearly_identical_float32_models(dtype, rtol):
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1000, size=5000).astype(np.float32)
    rows = np.stack(
        [base + rng.normal(0, 1e-3, 5000).astype(np.float32) for _ in range(6)]
    )
    exact = np.array(
        [[np.sum((a.astype(np.float64) - b) ** 2) for b in rows] for a in rows]
    )
    got = pairwise_squared_distances(rows.astype(dtype))
    np.testing.assert_allclose(got, exact, rtol=rtol, atol=1e-12)
    # The textbook float32 Gram form is wrong here: that is the bug we avoid.
    gram = rows @ rows.T
    sq = np.diag(gram)
    naive = sq[:, None] + sq[None, :] - 2 * gram
    assert np.abs(naive - exact).max() > 10 * exact.max()


def test_float32_rows_beyond_1e19_fall_back_to_the_float64_gram():
    rng = np.random.default_rng(2)
    honest = rng.normal(0, 1e-3, size=(5, 100)).astype(np.float32)
    rows = np.vstack([honest, np.full((1, 100), 1e30, np.float32)])
    dist = pairwise_squared_distances(rows)
    assert np.isfinite(dist).all()
    h = honest.astype(np.float64)
    exact = ((h[:, None, :] - h[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(dist[:5, :5], exact, rtol=1e-9, atol=1e-15)
    assert dist[5, :5].min() > 1e61


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


# ------------------------------------------------- Gram-space implementations
def reference_weiszfeld(x, w, iters=2000, nu=1e-8):
    """Plain Weiszfeld on the full matrix, from the coordinate-wise median."""
    z = np.median(x, axis=0) if np.all(w == w[0]) else None
    assert z is not None
    for _ in range(iters):
        dist = np.maximum(nu, np.linalg.norm(x - z, axis=1))
        beta = w / dist
        z = (beta / beta.sum()) @ x
    return z


def reference_centered_clipping(x, w, tau, iterations):
    v = np.median(x, axis=0)
    for _ in range(iterations):
        diff = x - v
        norms = np.linalg.norm(diff, axis=1)
        radius = np.median(norms) if tau is None else tau
        scale = np.where(norms > radius, radius / np.where(norms > 0, norms, 1), 1.0)
        v = v + (w * scale) @ diff
    return v


# d > BLOCK_COLUMNS so the blockwise accumulation crosses block edges.
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", [0, 1])
def test_gram_space_geometric_median_matches_plain_weiszfeld(dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(11, 5000)) + rng.normal(0, 3, size=(11, 1))
    x[:2] += 40.0  # two outliers
    x = x.astype(dtype)
    w = np.full(11, 1 / 11)
    got, _ = geometric_median(x, w, max_iter=2000, tol=1e-12)
    expected = reference_weiszfeld(x.astype(np.float64), w)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tau", [None, 5.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gram_space_centered_clipping_matches_the_direct_iteration(tau, dtype):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(12, 5000))
    x[:3] = -8.0 * x[:3]  # three sign-flipped-looking rows
    x = x.astype(dtype)
    w = np.full(12, 1 / 12)
    got = centered_clipping(x, w, tau=tau, iterations=3)
    expected = reference_centered_clipping(x.astype(np.float64), w, tau, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "rule", [GeometricMedianRule(), CenteredClippingRule()], ids=repr
)
def test_gram_overflow_falls_back_to_the_direct_iteration(rule):
    honest = np.random.default_rng(3).uniform(-1, 1, size=(6, 4))
    x = np.vstack([honest, np.full((2, 4), 1e200)])
    out = rule.aggregate(x, np.ones(8))
    assert np.isfinite(out).all()
    assert np.abs(out).max() <= 3.0


def test_nnm_keeps_float32_within_float32_rounding_of_the_exact_mix():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(9, 5000)).astype(np.float32)
    mixed = nearest_neighbor_mixing(x, num_byzantine=2)
    assert mixed.dtype == np.float32
    exact = nearest_neighbor_mixing(x.astype(np.float64), num_byzantine=2)
    assert exact.dtype == np.float64
    # Each entry is a mean of 7 rows of magnitude <= 5: float32 accumulation
    # error stays below 7 * 5 * 2**-24.
    assert np.abs(mixed - exact).max() <= 7 * 5 * 2.0**-24


def test_nnm_of_float32_rows_near_the_float32_maximum_does_not_overflow():
    big = np.finfo(np.float32).max
    x = np.vstack([np.zeros((5, 3)), np.full((3, 3), big)]).astype(np.float32)
    mixed = nearest_neighbor_mixing(x, num_byzantine=3)
    assert np.isfinite(mixed).all()
    np.testing.assert_array_equal(mixed[:5], 0.0)


def test_multikrum_is_the_weighted_mean_of_the_selected_rows():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(9, 5000)).astype(np.float32)
    x[0] += 50.0
    w = rng.uniform(1, 3, size=9)
    result = KrumRule(2, num_selected=5).aggregate_detailed(x, w)
    sel = result.selected
    assert sel.sum() == 5 and not sel[0]
    expected = (w[sel] / w[sel].sum()) @ x[sel].astype(np.float64)
    np.testing.assert_allclose(result.value, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rule", ALL_RULES, ids=repr)
@pytest.mark.parametrize("uniform", [True, False])
def test_overwriting_a_scratch_buffer_gives_the_same_aggregate(rule, uniform):
    x, w = sample(d=5000)
    x = x.astype(np.float32)
    w = np.ones(len(x)) if uniform else w
    expected = rule.aggregate(x, w)
    scratch = x.copy()
    got = rule.aggregate(scratch, w, overwrite_updates=True)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("n", [7, 8])
def test_one_pass_median_and_gram_match_the_two_pass_computation(n):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, 9000)).astype(np.float32)  # > 2 column blocks
    centre, gram = median_and_centred_gram(x, np.ones(n))
    expected_centre = np.median(x.astype(np.float64), axis=0)
    np.testing.assert_allclose(centre, expected_centre, rtol=0, atol=1e-7)
    y = x.astype(np.float64) - centre
    np.testing.assert_allclose(gram, y @ y.T, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(centred_gram(x, centre), gram, rtol=1e-12)
