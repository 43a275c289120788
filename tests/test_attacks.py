import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from flwr_ext.attacks import (
    MOD_ATTACKS,
    alie,
    alie_z,
    byzantine_mod,
    configured_attack,
    flip_labels_if_attacking,
    gaussian_noise,
    inflate_weight,
    ipm,
    label_flip,
    non_finite,
    scaling,
    sign_flip,
)
from flwr_ext.inprocess import InProcessGrid
from flwr_ext.strategy import TrimmedMean

TARGET = 3.0


def test_update_attacks_by_hand():
    u = np.array([1.0, -2.0])
    np.testing.assert_array_equal(sign_flip(u), [-1, 2])
    np.testing.assert_array_equal(sign_flip(u, 3), [-3, 6])
    np.testing.assert_array_equal(scaling(u, 10), [10, -20])
    assert np.isnan(non_finite(u)).all() and np.isinf(non_finite(u, math.inf)).all()
    assert inflate_weight(12, 100) == 1200
    np.testing.assert_array_equal(label_flip(np.array([0, 1, 9]), 10), [9, 8, 0])
    noise = gaussian_noise(np.zeros(20000), std=2.0, rng=np.random.default_rng(0))
    assert noise.std() == pytest.approx(2.0, rel=0.05)


def test_alie_and_ipm_by_hand():
    honest = np.array([[0.0, 1.0], [2.0, 3.0]])
    # n = 2 honest + 1 Byzantine: s = floor(3/2 + 1) - 1 = 1, z = Phi^-1(2/3).
    assert alie_z(3, 1) == pytest.approx(0.4307, abs=1e-4)
    np.testing.assert_allclose(alie(honest, 1, z=2.0), [1 - 2, 2 - 2])
    np.testing.assert_allclose(ipm(honest, 0.5), [-0.5, -1.0])
    # n = 50, f = 24: s = 26 - 24 = 2, z = Phi^-1(48/50) = 1.75 (Baruch et al.).
    assert alie_z(50, 24) == pytest.approx(1.751, abs=1e-3)


def ctx(node_config=None, run_config=None):
    return Context(1, 1, dict(node_config or {}), RecordDict(), dict(run_config or {}))


def test_configured_attack_sources_and_errors():
    assert configured_attack(ctx()) == ("none", pytest.approx(math.nan, nan_ok=True))
    assert configured_attack(ctx({"attack": "scaling"}))[1] == 10.0
    assert configured_attack(ctx({"attack": "sign-flip", "attack-strength": 4}))[1] == 4
    run = {"attack": "ipm", "attack-partition-ids": "0, 3"}
    assert configured_attack(ctx({"partition-id": 3}, run))[0] == "ipm"
    assert configured_attack(ctx({"partition-id": 1}, run))[0] == "none"
    with pytest.raises(ValueError, match="'sing-flip' is not an attack; choose one of"):
        configured_attack(ctx({"attack": "sing-flip"}))
    with pytest.raises(ValueError, match="attack-strength must be a number"):
        configured_attack(ctx({"attack": "scaling", "attack-strength": "x"}))
    with pytest.raises(ValueError, match="comma-separated partition ids"):
        configured_attack(
            ctx({"partition-id": 1}, {"attack": "nan", "attack-partition-ids": "a"})
        )
    labels = np.array([0, 1])
    np.testing.assert_array_equal(flip_labels_if_attacking(labels, ctx(), 2), [0, 1])
    flipped = flip_labels_if_attacking(labels, ctx({"attack": "label-flip"}), 2)
    np.testing.assert_array_equal(flipped, [1, 0])
    assert set(MOD_ATTACKS) >= {"sign-flip", "nan", "weight-inflation", "label-flip"}


def make_app() -> ClientApp:
    """Honest clients step half-way from the global model towards TARGET."""
    app = ClientApp(mods=[byzantine_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        w = msg.content["arrays"]["w"].numpy()
        new = w + 0.5 * (TARGET - w)
        return Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({"w": Array(new.astype(np.float32))}),
                    "metrics": MetricRecord({"num-examples": 10}),
                }
            ),
            reply_to=msg,
        )

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        w = msg.content["arrays"]["w"].numpy()
        error = float(np.abs(w - TARGET).mean()) if np.isfinite(w).all() else 1e9
        return Message(
            RecordDict({"metrics": MetricRecord({"num-examples": 10, "error": error})}),
            reply_to=msg,
        )

    return app


def federation(attacks: dict[int, dict]) -> InProcessGrid:
    app = make_app()
    return InProcessGrid(
        {n: app for n in range(1, 11)},
        node_configs={n: attacks.get(n, {}) for n in range(1, 11)},
    )


def start(strategy, grid, rounds=8):
    initial = ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))})
    return strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds)


@pytest.mark.parametrize(
    "attack",
    ["sign-flip", "scaling", "nan", "inf", "ipm", "gaussian-noise", "weight-inflation"],
)
def test_mod_attacks_inside_real_clientapps_are_contained(attack):
    attacks = {9: {"attack": attack, "attack-seed": 1}, 10: {"attack": attack}}
    if attack == "scaling":
        attacks[9]["attack-strength"] = attacks[10]["attack-strength"] = 1000.0
    result = start(TrimmedMean(beta=0.2), federation(attacks))
    final = result.arrays["w"].numpy()
    assert final.dtype == np.float32 and np.isfinite(final).all()
    assert np.abs(final - TARGET).max() < 0.05


def test_the_same_attack_breaks_fedavg():
    attacks = {9: {"attack": "scaling", "attack-strength": -50.0}}
    result = start(FedAvg(), federation(attacks))
    assert np.abs(result.arrays["w"].numpy() - TARGET).max() > 1.0


def test_mod_is_a_no_op_for_honest_nodes():
    grid = federation({})
    result = start(FedAvg(), grid, rounds=3)
    np.testing.assert_allclose(result.arrays["w"].numpy(), TARGET * (1 - 0.5**3))


def test_unknown_attack_becomes_an_error_reply_that_the_server_drops(caplog):
    grid = federation({10: {"attack": "sign-flop"}})
    with caplog.at_level("WARNING", logger="flwr"):
        result = start(TrimmedMean(beta=0.1), grid, rounds=1)
    assert "node 10: client error" in caplog.text
    assert "'sign-flop' is not an attack" in caplog.text
    assert result.train_metrics_clientapp[1]["robust-dropped"] == 1


def test_mod_attacks_when_the_server_sends_float64_and_the_client_float32():
    # Flower's FedAdam turns a float32 model into float64; clients still reply in
    # float32. The attack must still happen (not become an error reply).
    grid = federation({1: {"attack": "sign-flip"}})
    instruction = Message(
        RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(4, np.float64))})}),
        dst_node_id=1,
        message_type="train",
    )
    reply = make_app()(instruction, grid.context(1))
    assert not reply.has_error()
    w = reply.content["arrays"]["w"].numpy()
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, -0.5 * TARGET)
