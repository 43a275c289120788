"""DPFedAvg with real Flower Messages, strategies and Strategy.start() loops.

Statistical tests use the noise as it is drawn in production - from an OS-seeded
generator that cannot be seeded - so each check is sized to make a false failure
astronomically unlikely. With ``d`` independent Gaussian samples the relative
standard error of the sample standard deviation is ``1 / sqrt(2 d)``:
``d = 40_000`` gives 0.35 %, so the +-5 % band is 14 standard errors wide and is
left with probability below 1e-40.
"""

from __future__ import annotations

import logging
import math
import random

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, QFedAvg
from opacus.accountants import PRVAccountant, RDPAccountant

from flwr_ext.inprocess import InProcessGrid
from flwr_ext.privacy import RDP_ORDERS, compute_epsilon, keys
from flwr_ext.strategy import DPFedAvg, HomomorphicAggregation, TrimmedMean

from .conftest import StaticGrid, model, reply_to

DIM = 40_000  # coordinates of the "big" model used by statistical tests


def big_model(d: int = DIM, value: float = 0.0) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full(d, value, dtype=np.float32))})


def vector(arrays: ArrayRecord) -> np.ndarray:
    return np.concatenate(
        [a.numpy().astype(np.float64).ravel() for a in arrays.values()]
    )


def update_app(update_of):
    """A node handler that returns ``global + update_of(node_id, round)``."""

    def handler(msg: Message, context: Context) -> Message:
        arrays = msg.content["arrays"]
        rnd = int(msg.content["config"]["server-round"])
        out = {}
        for key, array in arrays.items():
            value = array.numpy()
            delta = update_of(context.node_id, rnd, key, value.shape)
            out[key] = Array((value + delta).astype(value.dtype))
        metrics = MetricRecord({"num-examples": 10, "loss": 1.0})
        return Message(
            RecordDict({"arrays": ArrayRecord(out), "metrics": metrics}), reply_to=msg
        )

    return handler


def zero_app():
    return update_app(lambda node, rnd, key, shape: np.zeros(shape))


def one_round(strategy, nodes: list[int], global_arrays, reply_fn, server_round=1):
    """configure_train on a static grid, one reply per sampled node, aggregate."""
    msgs = list(
        strategy.configure_train(
            server_round, global_arrays, ConfigRecord(), StaticGrid(nodes)
        )
    )
    replies = [r for r in (reply_fn(m) for m in msgs) if r is not None]
    return strategy.aggregate_train(server_round, replies)


def constant_update_reply(global_arrays, delta, weight=10):
    def fn(msg):
        node = int(msg.metadata.dst_node_id)
        d = delta(node) if callable(delta) else delta
        if d is None:
            return None  # a dropout
        out = {
            k: Array((a.numpy() + d).astype(a.numpy().dtype))
            for k, a in global_arrays.items()
        }
        w = weight(node) if callable(weight) else weight
        return reply_to(msg, ArrayRecord(out), w)

    return fn


NODES = list(range(1, 11))
HUGE_PER_COORDINATE = 1000.0 / math.sqrt(8)  # norm 1000 over the 8 model coordinates


# ------------------------------------------------------------------- noise
def test_noise_std_is_z_times_c_over_m():
    strategy = DPFedAvg(
        FedAvg(), num_clients=10, clipping_norm=2.0, noise_multiplier=1.5
    )
    g = big_model()
    arrays, metrics = one_round(strategy, NODES, g, constant_update_reply(g, 0.0))
    noise = vector(arrays) - vector(g)
    expected = 1.5 * 2.0 / 10
    assert metrics[keys.NOISE_STDDEV] == pytest.approx(expected)
    assert noise.std() == pytest.approx(expected, rel=0.05)
    # Mean within 6 standard errors of 0 (P(false failure) < 1e-8).
    assert abs(noise.mean()) < 6 * expected / math.sqrt(DIM)


def test_claimed_weights_and_dropouts_do_not_change_noise_to_sensitivity():
    """Noise std stays z*C/m and one client's influence stays <= C/m."""
    z, clip, m = 1.0, 1.0, 10
    expected = z * clip / m
    g = big_model()
    cases = {
        "all reply, equal weights": (lambda node: 0.0, 10),
        "half drop out": (lambda node: None if node % 2 else 0.0, 10),
        "one claims half the weight": (
            lambda node: 0.0,
            lambda node: 9e9 if node == 1 else 1,
        ),
    }
    for name, (delta, weight) in cases.items():
        strategy = DPFedAvg(
            FedAvg(), num_clients=m, clipping_norm=clip, noise_multiplier=z
        )
        arrays, metrics = one_round(
            strategy, NODES, g, constant_update_reply(g, delta, weight)
        )
        noise = vector(arrays) - vector(g)
        assert noise.std() == pytest.approx(expected, rel=0.05), name
        assert metrics[keys.NOISE_STDDEV] / (clip / m) == pytest.approx(z), name
        assert metrics[keys.EXPECTED_CLIENTS] == m, name

    # Influence of a heavy-claiming client with a huge update: at most C/m,
    # whoever else replied. Noise made negligible (z=1e-6) to see the bound.
    for others in (9, 4, 0):
        strategy = DPFedAvg(
            FedAvg(min_available_nodes=1, min_train_nodes=1),
            num_clients=m,
            clipping_norm=clip,
            noise_multiplier=1e-6,
        )
        small = model()
        with_attacker, _ = one_round(
            strategy,
            NODES[: others + 1],
            small,
            constant_update_reply(
                small,
                lambda node: HUGE_PER_COORDINATE if node == 1 else 0.0,
                lambda node: 1e9 if node == 1 else 10,
            ),
        )
        moved = np.linalg.norm(vector(with_attacker) - vector(small))
        assert moved <= clip / m + 1e-5, others
        assert moved >= clip / m - 1e-5, others  # clipped, not dropped


def test_update_of_norm_1000_moves_the_aggregate_by_at_most_c_over_m():
    clip, m = 0.5, 20
    strategy = DPFedAvg(
        FedAvg(), num_clients=m, clipping_norm=clip, noise_multiplier=1e-6
    )
    g = model(3.0)
    direction = np.random.default_rng(1).normal(size=8)
    huge = 1000.0 * direction / np.linalg.norm(direction)

    def reply_fn(msg):
        if int(msg.metadata.dst_node_id) != 1:
            return reply_to(msg, g)  # zero update
        vec = vector(g) + huge
        out = ArrayRecord(
            {
                "w": Array(vec[:6].reshape(3, 2).astype(np.float32)),
                "b": Array(vec[6:].astype(np.float32)),
            }
        )
        return reply_to(msg, out)

    arrays, metrics = one_round(strategy, list(range(1, 21)), g, reply_fn)
    moved = vector(arrays) - vector(g)
    assert np.linalg.norm(moved) <= clip / m + 1e-5
    # ... in the attacker's direction, scaled to exactly C/m.
    np.testing.assert_allclose(moved, huge / 1000 * clip / m, atol=2e-6)
    assert metrics[keys.PARTICIPANTS] == 20


def test_zero_update_is_fine():
    strategy = DPFedAvg(
        FedAvg(), num_clients=3, clipping_norm=1.0, noise_multiplier=1.0
    )
    g = model(1.0)
    arrays, metrics = one_round(strategy, [1, 2, 3], g, lambda m: reply_to(m, g))
    assert arrays is not None and np.isfinite(vector(arrays)).all()
    assert metrics[keys.PARTICIPANTS] == 3 and metrics[keys.DROPPED] == 0


def test_seeding_global_generators_does_not_reproduce_noise_or_sampling():
    def run_seeded():
        np.random.seed(0)
        random.seed(0)
        torch.manual_seed(0)
        strategy = DPFedAvg(
            FedAvg(),
            num_clients=100,
            sampling_rate=0.5,
            clipping_norm=1.0,
            noise_multiplier=1.0,
        )
        g = big_model(2_000)
        msgs = list(
            strategy.configure_train(
                1, g, ConfigRecord(), StaticGrid(list(range(1, 101)))
            )
        )
        sampled = sorted(int(m.metadata.dst_node_id) for m in msgs)
        arrays, _ = strategy.aggregate_train(1, [reply_to(m, g) for m in msgs])
        return sampled, vector(arrays)

    sampled_a, noise_a = run_seeded()
    sampled_b, noise_b = run_seeded()
    # Identical samples of 100 nodes at q=0.5 have probability 2**-100.
    assert sampled_a != sampled_b
    # Independent noise: correlation ~ N(0, 1/2000); 0.2 is 9 standard errors.
    assert abs(np.corrcoef(noise_a, noise_b)[0, 1]) < 0.2


def test_poisson_sampling_includes_each_node_with_probability_q():
    strategy = DPFedAvg(
        FedAvg(),
        num_clients=200,
        sampling_rate=0.2,
        clipping_norm=1.0,
        noise_multiplier=1.0,
    )
    counts = []
    grid = StaticGrid(list(range(1, 201)))
    for rnd in range(1, 26):  # configure only: nothing released, nothing accounted
        msgs = strategy.configure_train(rnd, model(), ConfigRecord(), grid)
        counts.append(len(list(msgs)))
    # 25 rounds x 200 nodes, Binomial(5000, 0.2): mean 1000, sd 28.3; +-200 is 7 sd.
    assert abs(sum(counts) - 1000) < 200
    assert len(set(counts)) > 1  # the sample size varies: not a fixed-size sample


# ------------------------------------------------------------ accounting
def start_run(strategy, n_nodes, rounds, update=None, initial=None):
    nodes = {
        i: update_app(update or (lambda node, rnd, key, shape: np.full(shape, 0.01)))
        for i in range(1, n_nodes + 1)
    }
    grid = InProcessGrid(nodes)
    return strategy.start(
        grid=grid, initial_arrays=initial or model(), num_rounds=rounds
    )


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_reported_epsilon_equals_an_independent_opacus_computation(accountant):
    strategy = DPFedAvg(
        FedAvg(fraction_evaluate=0.0),
        num_clients=20,
        sampling_rate=0.25,
        clipping_norm=1.0,
        noise_multiplier=1.3,
        delta=1e-5,
        accountant=accountant,
    )
    result = start_run(strategy, 20, 3)
    for rnd in (1, 3):
        m = result.train_metrics_clientapp[rnd]
        z, q, n, delta = (
            m[keys.NOISE_MULTIPLIER],
            m[keys.SAMPLING_RATE],
            m[keys.RELEASES],
            m[keys.CLIENT_DELTA],
        )
        assert (z, q, n, delta) == (1.3, 0.25, rnd, 1e-5)
        if accountant == "prv":
            reference = PRVAccountant()
            reference.history = [(z, q, n)]
            expected = reference.get_epsilon(delta=delta, eps_error=0.01)
        else:
            reference = RDPAccountant()
            reference.history = [(z, q, n)]
            expected = reference.get_epsilon(delta=delta, alphas=list(RDP_ORDERS))
        assert m[keys.CLIENT_EPSILON] == pytest.approx(expected, rel=1e-12)
    assert strategy.privacy_spent().releases == 3


def test_adaptive_clipping_epsilon_accounts_the_clipped_count():
    strategy = DPFedAvg(
        FedAvg(fraction_evaluate=0.0),
        num_clients=10,
        clipping_norm=0.1,
        noise_multiplier=2.0,
        adaptive_clipping=True,
        clipped_count_stddev=3.0,
    )
    # The accounted z is the joint one; the update itself gets more noise.
    joint = (strategy.update_noise_multiplier**-2 + (2 * 3.0) ** -2) ** -0.5
    assert joint == pytest.approx(2.0)
    result = start_run(strategy, 10, 3)
    m = result.train_metrics_clientapp[3]
    assert m[keys.NOISE_MULTIPLIER] == 2.0
    assert m[keys.UPDATE_NOISE_MULTIPLIER] == pytest.approx(
        strategy.update_noise_multiplier
    )
    assert m[keys.CLIENT_EPSILON] == pytest.approx(
        compute_epsilon([(2.0, 1.0, 3)], 1e-5, "prv"), rel=1e-12
    )
    # Noise of each round used the C that clipped that round.
    for rnd in (1, 2, 3):
        r = result.train_metrics_clientapp[rnd]
        assert r[keys.NOISE_STDDEV] == pytest.approx(
            strategy.update_noise_multiplier * r[keys.CLIPPING_NORM] / 10
        )
        if rnd > 1:
            previous = result.train_metrics_clientapp[rnd - 1]
            assert r[keys.CLIPPING_NORM] == previous[keys.NEXT_CLIPPING_NORM]


@pytest.mark.parametrize("start", [0.1, 1.0, 10.0])
def test_adaptive_clipping_converges_to_the_target_quantile(start):
    """Update norms log-uniform on [0.5, 2]: their median (the target) is 1.0."""
    n = 24
    norms = np.geomspace(0.5, 2.0, n)
    strategy = DPFedAvg(
        FedAvg(),
        num_clients=n,
        clipping_norm=start,
        noise_multiplier=1.0,
        adaptive_clipping=True,
        target_quantile=0.5,
        accountant="rdp",  # closed form at q=1: keeps 80 rounds fast
    )
    g = model()
    nodes = list(range(1, n + 1))
    unit = np.ones(8) / math.sqrt(8)
    history = [start]
    for rnd in range(1, 71):
        _, metrics = one_round(
            strategy,
            nodes,
            g,
            constant_update_reply(g, lambda node: norms[node - 1] * unit[0]),
            server_round=rnd,
        )
        history.append(metrics[keys.NEXT_CLIPPING_NORM])
    # It moves the right way from the start ...
    # (all clipped: x e^{0.1} per round; none clipped: x e^{-0.1})
    if start < 0.5:
        assert history[10] > 2 * start
    if start > 2:
        assert history[10] < start / 2
    # ... and settles at the median norm (stationary jitter ~3 % here).
    final = float(np.exp(np.mean(np.log(history[-10:]))))
    assert final == pytest.approx(1.0, rel=0.15)


def test_budget_stop_ends_training_before_the_cap_and_keeps_the_last_model(caplog):
    z = 1.0
    cap = (
        compute_epsilon([(z, 1.0, 3)], 1e-5) + compute_epsilon([(z, 1.0, 4)], 1e-5)
    ) / 2
    strategy = DPFedAvg(
        FedAvg(fraction_evaluate=0.0),
        num_clients=4,
        clipping_norm=10.0,
        noise_multiplier=z,
        max_epsilon=cap,
    )
    with caplog.at_level(logging.WARNING):
        result = start_run(strategy, 4, 10)
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]
    last = result.train_metrics_clientapp[3]
    assert last[keys.CLIENT_EPSILON] <= cap
    assert strategy.accountant.epsilon_after(z, 1.0) > cap
    assert strategy.budget_exhausted
    assert (
        "max_epsilon" in caplog.text and "stopped after 3 of 10 rounds" in caplog.text
    )
    assert len(result.arrays) == 2  # the model of round 3

    # A hand-written loop is stopped by configure_train itself.
    assert (
        strategy.configure_train(4, result.arrays, ConfigRecord(), StaticGrid([1]))
        == []
    )
    assert strategy.aggregate_train(4, []) == (None, None)


def test_target_epsilon_calibrates_and_caps_the_run():
    strategy = DPFedAvg(
        FedAvg(fraction_evaluate=0.0),
        num_clients=10,
        sampling_rate=0.3,
        clipping_norm=1.0,
        target_epsilon=3.0,
        num_rounds=5,
        accountant="rdp",
    )
    assert strategy.max_epsilon == 3.0
    result = start_run(strategy, 10, 8)
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3, 4, 5]
    eps = result.train_metrics_clientapp[5][keys.CLIENT_EPSILON]
    assert 3.0 - 0.011 <= eps <= 3.0


def test_state_round_trip_continues_the_account():
    kwargs = dict(
        num_clients=5, clipping_norm=0.3, noise_multiplier=1.1, adaptive_clipping=True
    )
    first = DPFedAvg(FedAvg(fraction_evaluate=0.0), **kwargs)
    start_run(first, 5, 2)
    state = first.state_dict()
    record = ConfigRecord(state)  # fits a ConfigRecord, e.g. context.state
    second = DPFedAvg(FedAvg(fraction_evaluate=0.0), **kwargs)
    second.load_state_dict(record)
    assert second.current_clipping_norm == first.current_clipping_norm
    assert second.privacy_spent().releases == 2
    result = start_run(second, 5, 1)
    assert result.train_metrics_clientapp[1][keys.RELEASES] == 3
    assert result.train_metrics_clientapp[1][keys.CLIENT_EPSILON] == pytest.approx(
        compute_epsilon([(1.1, 1.0, 3)], 1e-5)
    )


# ------------------------------------------------------------ composition
def test_composes_with_fedadam_and_fedprox():
    for inner in (
        FedAdam(eta=0.1, fraction_evaluate=0.0),
        FedProx(proximal_mu=0.1, fraction_evaluate=0.0),
    ):
        strategy = DPFedAvg(
            inner, num_clients=4, clipping_norm=1.0, noise_multiplier=0.5
        )
        result = start_run(strategy, 4, 2)
        assert set(result.arrays.keys()) == {"w", "b"}
        for array in result.arrays.values():
            assert array.numpy().dtype == np.float32  # FedAdam's float64 cast back
            assert np.isfinite(array.numpy()).all()


def test_fedprox_config_reaches_clients():
    seen = []

    def handler(msg, context):
        seen.append(msg.content["config"]["proximal-mu"])
        return update_app(lambda *a: np.zeros(a[-1]))(msg, context)

    strategy = DPFedAvg(
        FedProx(proximal_mu=0.25, fraction_evaluate=0.0),
        num_clients=2,
        clipping_norm=1.0,
        noise_multiplier=1.0,
    )
    strategy.start(
        grid=InProcessGrid({1: handler, 2: handler}),
        initial_arrays=model(),
        num_rounds=1,
    )
    assert seen == [0.25, 0.25]


@pytest.mark.parametrize(
    ("inner", "match"),
    [
        (lambda: TrimmedMean(beta=0.2), "robust rule inside"),
        (lambda: QFedAvg(client_learning_rate=0.1), "q-FedAvg"),
        (lambda: FedAvg(fraction_train=0.5), "fraction_train=0.5"),
        (
            lambda: DPFedAvg(num_clients=5, clipping_norm=1.0, noise_multiplier=1.0),
            "two DP wrappers",
        ),
    ],
)
def test_unsound_compositions_are_refused(inner, match):
    with pytest.raises(ValueError, match=match):
        DPFedAvg(inner(), num_clients=5, clipping_norm=1.0, noise_multiplier=1.0)


def test_central_dp_over_homomorphic_aggregation_is_refused(tmp_path):
    from flwr_ext.he import SERVER_FILE, create_keys

    create_keys(tmp_path, "default")
    inner = HomomorphicAggregation(FedAvg(), tmp_path / SERVER_FILE)
    with pytest.raises(ValueError, match="DistributedDP"):
        DPFedAvg(inner, num_clients=5, clipping_norm=1.0, noise_multiplier=1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clipping_norm": -1.0}, r"clipping_norm must be > 0 .* got -1.0"),
        ({"noise_multiplier": 0.0}, r"noise_multiplier must be > 0"),
        ({"noise_multiplier": None}, "exactly one of noise_multiplier"),
        ({"target_epsilon": 4.0}, "exactly one of noise_multiplier"),
        ({"noise_multiplier": None, "target_epsilon": 4.0}, "needs num_rounds"),
        ({"sampling_rate": 20}, r"sampling_rate must be a probability in \(0, 1\]"),
        ({"delta": 0.5}, r"delta=0.5 must be below 1/num_clients"),
        ({"delta": 1.0}, r"delta must be in the open interval"),
        ({"num_clients": 0}, "num_clients must be an integer >= 1"),
        ({"accountant": "gdp"}, "accountant must be one of"),
        ({"client_metrics": "keep"}, "client_metrics must be one of"),
        ({"max_epsilon": float("inf")}, "max_epsilon must be finite"),
        ({"adaptive_clipping": True, "target_quantile": 1.0}, "target_quantile"),
        (
            {"adaptive_clipping": True, "clipped_count_stddev": 0.2},
            "clipped_count_stddev=0.2 is too small",
        ),
    ],
)
def test_bad_parameters_fail_at_construction_naming_the_parameter(kwargs, match):
    params = {
        "num_clients": 10,
        "clipping_norm": 1.0,
        "noise_multiplier": 1.0,
        **kwargs,
    }
    with pytest.raises((ValueError, TypeError), match=match):
        DPFedAvg(FedAvg(), **params)


def test_malformed_replies_are_dropped_and_count_as_dropouts(caplog):
    strategy = DPFedAvg(
        FedAvg(), num_clients=4, clipping_norm=1.0, noise_multiplier=1e-6
    )
    g = model()
    msgs = list(
        strategy.configure_train(1, g, ConfigRecord(), StaticGrid([1, 2, 3, 4]))
    )
    nan = ArrayRecord(
        {
            "w": Array(np.full((3, 2), np.nan, np.float32)),
            "b": Array(np.zeros(2, np.float32)),
        }
    )
    wrong = ArrayRecord(
        {"w": Array(np.zeros((2, 2), np.float32)), "b": Array(np.zeros(2, np.float32))}
    )
    replies = [
        reply_to(msgs[0], model(0.1)),
        reply_to(msgs[1], nan),
        reply_to(msgs[2], wrong),
        reply_to(msgs[3], model(0.1), num_examples=-5),
    ]
    with caplog.at_level(logging.WARNING):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics[keys.PARTICIPANTS] == 1 and metrics[keys.DROPPED] == 3
    assert np.isfinite(vector(arrays)).all()
    assert caplog.text.count("dropped reply") == 3


def test_metrics_and_log_carry_epsilon_delta_z_c_and_counts(caplog):
    strategy = DPFedAvg(
        FedAvg(), num_clients=4, clipping_norm=0.7, noise_multiplier=1.2
    )
    g = model()
    with caplog.at_level(logging.INFO):
        _, metrics = one_round(
            strategy,
            [1, 2, 3],
            g,
            lambda m: reply_to(m, g, extra_metrics={"loss": 2.0}),
        )
    for key in (
        keys.CLIENT_EPSILON,
        keys.CLIENT_DELTA,
        keys.NOISE_MULTIPLIER,
        keys.CLIPPING_NORM,
        keys.PARTICIPANTS,
        keys.SAMPLED,
        keys.SAMPLING_RATE,
        keys.NOISE_STDDEV,
    ):
        assert key in metrics
    assert metrics["loss"] == pytest.approx(2.0)
    assert metrics[keys.CLIPPING_NORM] == 0.7 and metrics[keys.PARTICIPANTS] == 3
    assert "epsilon=" in caplog.text and "per client" in caplog.text
    assert "add-or-remove-one" in caplog.text

    dropping = DPFedAvg(
        FedAvg(),
        num_clients=4,
        clipping_norm=0.7,
        noise_multiplier=1.2,
        client_metrics="drop",
    )
    _, metrics = one_round(
        dropping, [1, 2], g, lambda m: reply_to(m, g, extra_metrics={"loss": 2.0})
    )
    assert "loss" not in metrics and keys.CLIENT_EPSILON in metrics


def test_a_round_with_no_replies_is_still_released_and_accounted():
    """Skipping it would leak that nobody was sampled; McMahan et al. release noise."""
    strategy = DPFedAvg(
        FedAvg(),
        num_clients=50,
        sampling_rate=0.02,
        clipping_norm=1.0,
        noise_multiplier=1.0,
    )
    g = model()
    strategy.configure_train(1, g, ConfigRecord(), StaticGrid(list(range(1, 51))))
    arrays, metrics = strategy.aggregate_train(1, [])
    assert arrays is not None and metrics[keys.PARTICIPANTS] == 0
    assert metrics[keys.RELEASES] == 1
    assert not np.allclose(vector(arrays), 0.0)
