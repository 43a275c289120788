"""Accounting and calibration checked against independent computations.

Independent references, in order of independence from the code under test:

1. Full participation (q = 1): the composition of k Gaussian mechanisms with noise
   multiplier z is exactly one Gaussian mechanism with z / sqrt(k), whose optimal
   (ε, δ) curve has a closed form (Balle & Wang, ICML 2018):
   δ(ε) = Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2), μ = sqrt(k) / z. Solved with scipy.
2. RDP of the Gaussian mechanism in closed form, alpha k / (2 z^2), converted with
   the Balle et al. 2020 bound, written out here.
3. Opacus's accountants used directly, and Google's dp-accounting (through
   Flower's own RdpAccountant) when it is installed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord
from scipy.optimize import brentq
from scipy.stats import norm

from flwr_ext.privacy import (
    RDP_ORDERS,
    Neighbouring,
    PrivacyAccountant,
    PrivacyUnit,
    calibrate_noise_multiplier,
    compute_epsilon,
    effective_noise_multiplier,
    update_noise_multiplier,
)
from flwr_ext.privacy.accountant import (
    PRV_MAX_EPSILON,
    epsilon_and_method,
    rdp_upper_bound,
)

DELTA = 1e-5


def exact_gaussian_epsilon(z: float, k: int, delta: float) -> float:
    mu = math.sqrt(k) / z

    def gap(eps: float) -> float:
        return (
            norm.cdf(-eps / mu + mu / 2)
            - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)
            - delta
        )

    return brentq(gap, 0.0, 500.0)


def rdp_gaussian_epsilon(z: float, k: int, delta: float) -> float:
    """Closed-form Gaussian RDP + the conversion of Balle et al. 2020, Thm 21."""
    best = math.inf
    for alpha in RDP_ORDERS:
        rdp = alpha * k / (2 * z * z)
        eps = (
            rdp
            + math.log1p(-1 / alpha)
            - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        )
        best = min(best, eps)
    return best


@pytest.mark.parametrize(("z", "k"), [(7.67, 50), (1.0, 1), (3.0, 10), (26.6, 50)])
def test_prv_for_full_participation_is_a_tight_upper_bound_of_the_exact_value(z, k):
    exact = exact_gaussian_epsilon(z, k, DELTA)
    prv = compute_epsilon([(z, 1.0, k)], DELTA, "prv")
    assert exact <= prv <= exact + 0.03  # an upper bound, within PRV's eps_error


@pytest.mark.parametrize(("z", "k"), [(7.67, 50), (1.0, 1), (0.8, 30)])
def test_rdp_for_full_participation_matches_the_closed_form(z, k):
    assert compute_epsilon([(z, 1.0, k)], DELTA, "rdp") == pytest.approx(
        rdp_gaussian_epsilon(z, k, DELTA), rel=1e-9
    )


def test_poisson_subsampling_amplifies_and_prv_is_tighter_than_rdp():
    z, k = 1.82, 50
    full = compute_epsilon([(z, 1.0, k)], DELTA, "prv")
    prv = compute_epsilon([(z, 0.2, k)], DELTA, "prv")
    rdp = compute_epsilon([(z, 0.2, k)], DELTA, "rdp")
    assert prv < rdp < full
    assert prv == pytest.approx(4.0, abs=0.05)  # the figure calibrated for below


def test_matches_google_dp_accounting_through_flowers_accountant():
    pytest.importorskip(
        "dp_accounting", reason="dp-accounting not installed (optional cross-check)"
    )
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    for z, q, k in [(1.82, 0.2, 50), (7.67, 1.0, 50)]:
        sampling = SamplingMethod.POISSON if q < 1 else SamplingMethod.NO_AMPLIFICATION
        flower = RdpAccountant(
            PrivacyConfig(DELTA, 100, NeighboringRelation.ADD_OR_REMOVE_ONE, sampling)
        )
        flower.compose(GaussianPrivacyEvent(z, int(q * 100), 100), k)
        theirs = flower.get_epsilon(DELTA)
        ours = compute_epsilon([(z, q, k)], DELTA, "rdp")
        # Different order grids: agreement within 2 %.
        assert ours == pytest.approx(theirs, rel=0.02)


def test_fast_integer_order_bound_is_an_upper_bound():
    for history in ([(1.82, 0.2, 50)], [(1.5, 0.1, 100)], [(3.0, 1.0, 7)]):
        bound = rdp_upper_bound(history, DELTA)
        rdp = compute_epsilon(history, DELTA, "rdp")
        assert bound >= rdp >= compute_epsilon(history, DELTA, "prv")
        assert bound <= 1.1 * rdp  # and nearly as tight


def test_prv_falls_back_to_rdp_where_no_privacy_is_left():
    eps, method = epsilon_and_method([(1e-6, 1.0, 1)], DELTA, "prv")
    assert method == "rdp" and eps > PRV_MAX_EPSILON
    eps, method = epsilon_and_method([(2.0, 0.2, 10)], DELTA, "prv")
    assert method == "prv" and eps < 2


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize(
    ("target", "q", "k"), [(1.0, 0.2, 50), (4.0, 0.2, 50), (4.0, 1.0, 50)]
)
def test_calibration_meets_the_target_from_below(accountant, target, q, k):
    z = calibrate_noise_multiplier(target, DELTA, k, q, accountant)
    eps = compute_epsilon([(z, q, k)], DELTA, accountant)
    assert target - 0.01 <= eps <= target
    # Slightly less noise would break the target: z is (nearly) the smallest.
    assert compute_epsilon([(z * 0.99, q, k)], DELTA, accountant) > target - 0.01


def test_calibration_rejects_impossible_and_malformed_targets():
    with pytest.raises(ValueError, match="target_epsilon must be > 0"):
        calibrate_noise_multiplier(0.0, DELTA, 10)
    with pytest.raises(ValueError, match="num_releases must be an integer >= 1"):
        calibrate_noise_multiplier(1.0, DELTA, 0)
    with pytest.raises(ValueError, match="sampling_rate must be a probability"):
        calibrate_noise_multiplier(1.0, DELTA, 10, 1.5)
    with pytest.raises(ValueError, match="cannot be met"):
        calibrate_noise_multiplier(1e-9, 1e-12, 10_000, 1.0, "rdp")


def test_accountant_composes_heterogeneous_events_and_releases_within():
    acc = PrivacyAccountant("prv", delta=DELTA)
    assert acc.get_epsilon() == 0.0 and acc.releases == 0
    acc.compose(2.0, 0.2, 5)
    acc.compose(2.0, 0.2, 5)  # merged with the previous entry
    acc.compose(3.0, 0.1)
    assert acc.history == ((2.0, 0.2, 10), (3.0, 0.1, 1))
    assert acc.releases == 11
    assert acc.get_epsilon() == pytest.approx(
        compute_epsilon([(2.0, 0.2, 10), (3.0, 0.1, 1)], DELTA, "prv")
    )
    # The budget search (RDP here: closed form at q=1, milliseconds per call).
    budget = PrivacyAccountant("rdp", delta=DELTA)
    budget.compose(2.0, 1.0, 5)
    cap = budget.epsilon_after(2.0, 1.0, 7)
    assert budget.releases_within(cap, 2.0, 1.0, 100) == 7
    assert budget.releases_within(budget.get_epsilon() / 2, 2.0, 1.0, 100) == 0
    assert budget.releases_within(1e6, 2.0, 1.0, 40) == 40


def test_accountant_state_round_trips_through_a_configrecord():
    acc = PrivacyAccountant(
        "rdp", delta=1e-6, unit=PrivacyUnit.RECORD, neighbouring="add-or-remove-one"
    )
    acc.compose(1.1, 0.05, 300)
    record = ConfigRecord(acc.state_dict())
    restored = PrivacyAccountant.from_state_dict(record)
    assert restored.history == acc.history
    assert restored.get_epsilon() == acc.get_epsilon()
    assert restored.unit is PrivacyUnit.RECORD


def test_state_of_another_unit_or_method_is_refused():
    acc = PrivacyAccountant("prv", delta=DELTA, unit=PrivacyUnit.CLIENT)
    acc.compose(1.0, 1.0)
    record_level = PrivacyAccountant("prv", delta=DELTA, unit=PrivacyUnit.RECORD)
    with pytest.raises(ValueError, match="unit='client'"):
        record_level.load_state_dict(acc.state_dict())
    zero_out = PrivacyAccountant(
        "prv", delta=DELTA, neighbouring=Neighbouring.ZERO_OUT_ONE
    )
    with pytest.raises(ValueError, match="neighbouring"):
        zero_out.load_state_dict(acc.state_dict())
    with pytest.raises(ValueError, match="accountant='prv'"):
        PrivacyAccountant("rdp", delta=DELTA).load_state_dict(acc.state_dict())
    broken = {**acc.state_dict(), "counts": [1, 2]}
    with pytest.raises(ValueError, match="lengths"):
        PrivacyAccountant("prv", delta=DELTA).load_state_dict(broken)


def test_spent_names_unit_relation_sampling_and_method():
    acc = PrivacyAccountant("prv", delta=DELTA)
    acc.compose(1.8, 0.2, 50)
    spent = acc.spent()
    text = spent.describe()
    assert spent.accountant == "prv" and spent.releases == 50
    for part in ("per client", "add-or-remove-one client", "Poisson q=0.2", "PRV"):
        assert part in text
    full = PrivacyAccountant("rdp", delta=DELTA)
    full.compose(7.0, 1.0, 3)
    assert "q=1" in full.spent().describe()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"accountant": "gdp"}, ValueError, "accountant must be one of"),
        ({"delta": 0.0}, ValueError, r"delta must be in the open interval \(0, 1\)"),
        ({"delta": True}, TypeError, "delta must be a number"),
    ],
)
def test_accountant_parameters_are_validated(kwargs, error, match):
    with pytest.raises(error, match=match):
        PrivacyAccountant(**{"accountant": "prv", "delta": DELTA, **kwargs})


def test_compose_rejects_bad_events():
    acc = PrivacyAccountant()
    with pytest.raises(ValueError, match="noise_multiplier must be > 0"):
        acc.compose(0.0, 0.5)
    with pytest.raises(ValueError, match="sampling_rate must be in"):
        acc.compose(1.0, 0.0)
    with pytest.raises(ValueError, match="count must be an integer >= 1"):
        acc.compose(1.0, 0.5, 0)


def test_adaptive_clipping_noise_split_inverts_the_joint_multiplier():
    for z, s in [(1.0, 1.5), (1.8, 2.7), (5.0, 100.0)]:
        z_update = update_noise_multiplier(z, s)
        assert z_update > z
        assert effective_noise_multiplier(z_update, s) == pytest.approx(z)
    # Default of DPFedAvg: s = 1.5 z costs about 6 % more update noise.
    assert update_noise_multiplier(2.0, 3.0) / 2.0 == pytest.approx(
        1 / math.sqrt(1 - 1 / 9)
    )
    with pytest.raises(ValueError, match="too small"):
        update_noise_multiplier(2.0, 1.0)
    assert np.isfinite(update_noise_multiplier(2.0, 1.0001))
