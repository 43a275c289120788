"""Distributed DP under CKKS: clients clip and add their noise share, then encrypt.

Server: ``DistributedDP(HomomorphicAggregation(FedAvg()))``; client:
``ClientApp(mods=[ckks_mod, distributed_dp_mod])``. A spy mod between the two sees
exactly what ``distributed_dp_mod`` produced (the clipped, noised plaintext model)
before ``ckks_mod`` encrypts it; a second spy outside ``ckks_mod`` sees what leaves
the node. Real Flower strategies, ClientApps, Messages and TenSEAL ciphertexts.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from flwr_ext.he import (
    SECRET_FILE,
    SERVER_FILE,
    decrypt_record,
    is_encrypted,
    load_keys,
)
from flwr_ext.inprocess import InProcessGrid
from flwr_ext.mods import ckks_mod, distributed_dp_mod
from flwr_ext.strategy import DistributedDP, HomomorphicAggregation
from flwr_ext.strategy.round_report import ConfigurationError

NODES = (1, 2, 3)
CLIP = 1.0


def initial_model() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros((8, 4), np.float32)),
                        "b": Array(np.zeros(4, np.float32))})  # fmt: skip


def train_fn(msg: Message, context: Context) -> Message:
    """Moves the model by a large step (norm >> CLIP), so clipping is visible."""
    pid = int(context.node_config["partition-id"])
    arrays = msg.content["arrays"]
    out = ArrayRecord(
        {
            "w": Array((arrays["w"].numpy() + 2.0 * (pid + 1)).astype(np.float32)),
            "b": Array((arrays["b"].numpy() - 1.0).astype(np.float32)),
        }
    )
    metrics = MetricRecord({"num-examples": 100 * (pid + 1)})
    return Message(RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)


def build_app(mods: list) -> ClientApp:
    app = ClientApp(mods=mods)
    app.train()(train_fn)
    return app


def flat(record: ArrayRecord) -> np.ndarray:
    return np.concatenate([a.numpy().astype(np.float64).ravel()
                           for a in record.values()])  # fmt: skip


def strategy(keys_dir, noise_multiplier: float, **kwargs) -> DistributedDP:
    return DistributedDP(
        HomomorphicAggregation(FedAvg(fraction_evaluate=0.0), keys_dir / SERVER_FILE),
        clipping_norm=CLIP,
        min_clients=3,
        noise_multiplier=noise_multiplier,
        **kwargs,
    )


def test_noise_is_added_before_encryption_and_the_sum_is_exact(keys_dir):
    noised: dict[int, list[np.ndarray]] = {}
    left_node: list[bool] = []

    def inner_spy(msg, context, call_next):  # between ckks_mod and the DP mod
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train" and not reply.has_error():
            assert not is_encrypted(reply.content["arrays"])
            assert reply.content["metrics"]["num-examples"] == 1
            noised.setdefault(int(msg.content["config"]["server-round"]), []).append(
                flat(reply.content["arrays"])
            )
        return reply

    def outer_spy(msg, context, call_next):  # outside ckks_mod: the wire
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train":
            left_node.append(is_encrypted(reply.content["arrays"]))
        return reply

    app = build_app([outer_spy, ckks_mod, inner_spy, distributed_dp_mod])
    grid = InProcessGrid(
        dict.fromkeys(NODES, app),
        node_configs={n: {"partition-id": n - 1,
                          "ckks-context": str(keys_dir / SECRET_FILE),
                          "policy-require-ckks": True,
                          "policy-min-contributions": 3}
                      for n in NODES},
    )  # fmt: skip
    result = strategy(keys_dir, noise_multiplier=0.5).start(
        grid=grid, initial_arrays=initial_model(), num_rounds=2
    )

    assert left_node == [True] * 6  # every update left its node encrypted
    assert is_encrypted(result.arrays)  # the server never held a plaintext model
    secret = load_keys(keys_dir / SECRET_FILE)
    decrypted = decrypt_record(result.arrays, secret)
    assert decrypted.contributions == 3
    # The encrypted sum is exactly the uniform mean of the clipped, noised models
    # (the DP mod set num-examples to 1).
    np.testing.assert_allclose(
        flat(decrypted.arrays), np.mean(noised[2], axis=0), atol=1e-5
    )
    # Each client's update was clipped to C and then noised: its distance from
    # the round-1 global model (zeros) is not the raw step (norm ~ 2 * sqrt(32)).
    for model in noised[1]:
        assert np.linalg.norm(model) < 10 * CLIP  # clipped (+ noise), not ~11-34
    # Noise was added: three identical clip directions would otherwise agree.
    assert np.std([np.linalg.norm(m) for m in noised[1]]) > 0
    # The DP wrapper counted the encrypted replies and accounted the release.
    metrics = result.train_metrics_clientapp[2]
    assert metrics["ckks-summed"] == 3
    assert metrics["dp-participants"] == 3
    assert metrics["dp-discarded"] == 0
    assert metrics["dp-client-epsilon"] > 0


# Opacus warns that z = 0.01 needs larger RDP orders for a tight epsilon; the
# test is about the mechanics, not epsilon.
@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")
def test_without_noise_the_composition_is_plain_fedavg_of_clipped_updates(keys_dir):
    """Little noise (z = 0.01) isolates the mechanics: the mean of clipped models."""
    app = build_app([ckks_mod, distributed_dp_mod])
    grid = InProcessGrid(
        dict.fromkeys(NODES, app),
        node_configs={n: {"partition-id": n - 1,
                          "ckks-context": str(keys_dir / SECRET_FILE),
                          "policy-min-noise-multiplier": 0.0}  # z=0.01: opt out
                      for n in NODES},
    )  # fmt: skip
    result = strategy(keys_dir, noise_multiplier=0.01, accountant="rdp").start(
        grid=grid, initial_arrays=initial_model(), num_rounds=1
    )
    decrypted = decrypt_record(result.arrays, load_keys(keys_dir / SECRET_FILE))
    expected = []
    for pid in range(3):
        step = np.concatenate([np.full(32, 2.0 * (pid + 1)), np.full(4, -1.0)])
        expected.append(step * min(1.0, CLIP / np.linalg.norm(step)))
    # Clipped steps have entries of ~0.2; unclipped ones 2-6; the mean noise
    # has std 0.01 / sqrt(3) / sqrt(3) ~ 0.003 per entry.
    np.testing.assert_allclose(
        flat(decrypted.arrays), np.mean(expected, axis=0), atol=0.02
    )


def test_wrong_mod_order_fails_closed(keys_dir, caplog):
    """DP mod outside ckks_mod would see ciphertexts: every reply is an error."""
    app = build_app([distributed_dp_mod, ckks_mod])
    grid = InProcessGrid(
        dict.fromkeys(NODES, app),
        node_configs={n: {"partition-id": n - 1,
                          "ckks-context": str(keys_dir / SECRET_FILE),
                          "policy-require-ckks": True,
                          "policy-min-contributions": 3}
                      for n in NODES},
    )  # fmt: skip
    with (
        caplog.at_level(logging.WARNING, logger="flwr"),
        pytest.raises(ConfigurationError, match=r"mod order"),
    ):
        strategy(keys_dir, noise_multiplier=0.5).start(
            grid=grid, initial_arrays=initial_model(), num_rounds=1
        )
    assert "distributed_dp_mod" in caplog.text
