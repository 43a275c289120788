"""The rule-aware attacker's model of the server step (benchmarks/_targets.py).

The line-searched attacks compare candidates by the model step the server
would take (``target_server_step``); the model must be Flower's own step,
checked here against Flower's FedAvgM, FedAdam, FedYogi and FedAdagrad behind
a robust wrapper over three rounds (their state changes every round).
"""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi

from benchmarks._targets import target_server_step
from flwr_ext.strategy import TrimmedMean

from .conftest import StaticGrid, reply_to

NODES = [1, 2, 3, 4, 5]


def _record(vector: np.ndarray) -> ArrayRecord:
    return ArrayRecord(
        {
            "w": Array(vector[:6].reshape(3, 2).astype(np.float32)),
            "b": Array(vector[6:].astype(np.float32)),
        }
    )


def _flat(record: ArrayRecord) -> np.ndarray:
    return np.concatenate([record[k].numpy().ravel() for k in ("w", "b")]).astype(
        np.float64
    )


def _fedadam_rate(strategy: FedAdam, server_round: int) -> float:
    """FedAdam's bias-corrected rate over eta (a positive factor of the round)."""
    b1, b2 = strategy.beta_1, strategy.beta_2
    return np.sqrt(1 - b2 ** (server_round + 1.0)) / (1 - b1 ** (server_round + 1.0))


@pytest.mark.parametrize(
    "inner",
    [
        lambda: FedAvgM(server_learning_rate=0.5, server_momentum=0.9),
        lambda: FedAdam(eta=0.03, tau=1e-9),
        lambda: FedYogi(eta=0.03, tau=1e-3),
        lambda: FedAdagrad(eta=0.1, tau=1e-3),
    ],
    ids=["FedAvgM", "FedAdam", "FedYogi", "FedAdagrad"],
)
def test_the_attackers_server_step_is_flowers_step(inner):
    strategy = TrimmedMean(inner(), beta=0.0)  # the rule is the plain mean here
    step = target_server_step(strategy)
    assert step is not None
    rng = np.random.default_rng(0)
    current = rng.normal(size=8)
    for server_round in (1, 2, 3):
        messages = strategy.configure_train(
            server_round, _record(current), ConfigRecord(), StaticGrid(NODES)
        )
        updates = rng.normal(0.5, 1.0, (len(messages), 8)).astype(np.float32)
        replies = [
            reply_to(m, _record(current.astype(np.float32) + u), 10)
            for m, u in zip(messages, updates, strict=True)
        ]
        aggregate = np.stack([_flat(r.content["arrays"]) for r in replies]).mean(
            axis=0
        ) - current.astype(np.float32)
        predicted = step(aggregate)  # before the server takes it
        arrays, _ = strategy.aggregate_train(server_round, replies)
        taken = _flat(arrays) - current.astype(np.float32)
        if isinstance(strategy.strategy, FedAdam):
            predicted = predicted * _fedadam_rate(strategy.strategy, server_round)
        np.testing.assert_allclose(taken, predicted, rtol=1e-4, atol=1e-6)
        current = _flat(arrays)


def test_no_server_step_without_a_server_optimizer():
    assert target_server_step(TrimmedMean(FedAvg(), beta=0.1)) is None
    assert target_server_step(FedAvg()) is None
    assert target_server_step(FedAvgM()) is None  # lr 1, no momentum: FedAvg
    assert target_server_step(FedAdam()) is not None  # Flower's own, unwrapped
