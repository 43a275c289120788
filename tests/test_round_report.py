"""Fail loudly: a misconfigured federation stops; a run that trained nothing fails.

Issue 14, item 1. Each scenario is one a new user met (CKKS without the secret
context, Krum with 3 nodes, a trimmed mean that trims nothing), run through the
real components: Flower's ``Strategy.start`` loop on an InProcessGrid, real
ClientApps with the real ``ckks_mod``, real TenSEAL keys. The error types are
checked by name and caught as ``RuntimeError`` (their base) so that this file
runs - and fails for the right reason - on code without the fail-loudly helper.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
)
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from flwr_ext.he import SECRET_FILE, SERVER_FILE
from flwr_ext.inprocess import InProcessGrid
from flwr_ext.mods import ckks_mod
from flwr_ext.strategy import (
    DistributedDP,
    HomomorphicAggregation,
    Krum,
    Median,
    MultiKrum,
    TrimmedMean,
)

from .he_fixtures import grid_for, toy_client_app

NODES = (1, 2, 3)


@pytest.fixture(scope="module")
def keys_dir(ckks_keys):
    return ckks_keys("main", "compact")


@pytest.fixture(scope="module")
def other_keys_dir(ckks_keys):
    return ckks_keys("other", "compact")


def initial() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros(4, np.float32))})


def make_app(mods=(), value: float | None = 1.0) -> ClientApp:
    """A ClientApp that returns ``global + value`` (NaN when value is None)."""

    def update(pid: int, msg: Message) -> dict:
        w = msg.content["arrays"]["w"].numpy()
        return {"w": (w + (np.nan if value is None else value)).astype(np.float32)}

    return toy_client_app(mods, update, num_examples=lambda pid: 10)


def grid(apps: dict, node_configs: dict | None = None) -> InProcessGrid:
    return grid_for(apps, per_node=node_configs)


def start(strategy, g, rounds=2):
    return strategy.start(grid=g, initial_arrays=initial(), num_rounds=rounds)


def fedavg(n: int) -> FedAvg:
    return FedAvg(min_available_nodes=n, min_train_nodes=n, fraction_evaluate=0.0)


# --------------------------------------------- configuration errors stop the run
def test_ckks_without_secret_context_stops_the_run_at_round_1(keys_dir, caplog):
    """Issue 14, 1(a): the run ended 'completed' with an empty model."""
    strategy = HomomorphicAggregation(fedavg(3), keys_dir / SERVER_FILE)
    g = grid(dict.fromkeys(NODES, make_app([ckks_mod])))  # no secret context
    with pytest.raises(RuntimeError, match="no CKKS secret context") as err:
        start(strategy, g)
    assert type(err.value).__name__ == "ConfigurationError"
    assert err.value.server_round == 1
    assert "ckks-context" in str(err.value) or "ckks" in str(err.value)
    assert "round 1" in str(err.value)


def test_ckks_mod_missing_on_every_node_stops_the_run(keys_dir):
    strategy = HomomorphicAggregation(fedavg(3), keys_dir / SERVER_FILE)
    g = grid(dict.fromkeys(NODES, make_app([])))
    with pytest.raises(RuntimeError, match="ckks_mod missing on the node") as err:
        start(strategy, g)
    assert type(err.value).__name__ == "ConfigurationError"


def test_wrong_key_set_stops_the_run(keys_dir, other_keys_dir):
    strategy = HomomorphicAggregation(fedavg(3), keys_dir / SERVER_FILE)
    configs = {n: {"ckks-context": str(other_keys_dir / SECRET_FILE)} for n in NODES}
    g = grid(dict.fromkeys(NODES, make_app([ckks_mod])), configs)
    with pytest.raises(RuntimeError, match="wrong CKKS key set") as err:
        start(strategy, g)
    assert type(err.value).__name__ == "ConfigurationError"


def test_mixed_causes_cost_the_round_not_the_run_and_are_counted(keys_dir, caplog):
    """One node without its context, two NaN updates: not one config cause."""
    strategy = Median(fedavg(3))
    apps = {1: make_app([ckks_mod]), 2: make_app(value=None), 3: make_app(value=None)}
    with (
        caplog.at_level(logging.WARNING, logger="flwr"),
        pytest.raises(RuntimeError, match="none of the 2 rounds produced a model"),
    ):
        start(strategy, grid(apps))
    text = caplog.text
    assert "round 1 aggregated nothing" in text
    assert "received 3 replies, dropped 3" in text
    assert "2 x " in text and "1 x " in text  # the count per drop reason


# ------------------------------------------------- a run without a model fails
def test_a_run_whose_rounds_never_produce_a_model_fails(caplog):
    strategy = Median(fedavg(3))
    g = grid(dict.fromkeys(NODES, make_app(value=None)))  # every update is NaN
    with pytest.raises(RuntimeError, match="none of the 2 rounds") as err:
        start(strategy, g)
    assert type(err.value).__name__ == "NoModelError"
    assert sorted(err.value.rounds) == [1, 2]
    assert len(err.value.result.arrays) == 0
    assert "The run is failed, not completed" in str(err.value)


def test_a_run_with_one_good_round_succeeds():
    strategy = Median(fedavg(3))
    result = start(strategy, grid(dict.fromkeys(NODES, make_app(value=1.0))))
    np.testing.assert_allclose(result.arrays["w"].numpy(), 2.0)


# ------------------------------------------- cohort sizes at configure_train
@pytest.mark.parametrize(
    ("strategy", "nodes", "message"),
    [
        (Krum(fedavg(3), num_byzantine=1), 3, r"KrumRule.*needs at least 5"),
        (MultiKrum(fedavg(4), num_byzantine=1), 4, r"needs at least 5"),
        (TrimmedMean(fedavg(2), beta=0.2), 2, r"trims floor\(beta \* n\) = 0"),
        (
            Median(fedavg(3), pre_aggregation="nnm", num_byzantine=3),
            3,
            r"NearestNeighborMixing\(num_byzantine=3\) needs at least 4",
        ),
        (
            DistributedDP(
                fedavg(3), clipping_norm=1.0, min_clients=4, noise_multiplier=1.0
            ),
            3,
            r"sampled 3 nodes, fewer than min_clients=4",
        ),
    ],
    ids=["krum-3", "multikrum-4", "trimmed-mean-2", "nnm-3", "distributed-dp-3"],
)
def test_a_cohort_too_small_for_the_rule_is_refused_before_training(
    strategy, nodes, message
):
    """Issue 14, 1(b) and 1(c): Krum with 3 nodes; TrimmedMean(0.2) with 2."""
    trained: list[int] = []
    app = make_app()
    counting = ClientApp()

    @counting.train()
    def train(msg, context):
        trained.append(int(context.node_id))
        return app(msg, context)

    g = grid(dict.fromkeys(range(1, nodes + 1), counting))
    with pytest.raises(RuntimeError, match=message) as err:
        start(strategy, g)
    assert type(err.value).__name__ == "ConfigurationError"
    assert "round 1" in str(err.value)
    assert trained == []  # refused at configure_train: no site trained for nothing


def test_a_cohort_that_shrinks_after_a_model_skips_the_round(caplog):
    strategy = Krum(
        FedAvg(fraction_evaluate=0.0, min_available_nodes=1), num_byzantine=1
    )
    g = grid(dict.fromkeys(range(1, 6), make_app()))
    result = start(strategy, g, rounds=1)
    g.set_offline(5)  # a dropout: 4 nodes left, Krum(f=1) needs 5
    with caplog.at_level(logging.WARNING, logger="flwr"):
        messages = list(strategy.configure_train(2, result.arrays, ConfigRecord(), g))
    assert messages == []
    assert "needs at least 5" in caplog.text and "skipping the round" in caplog.text


# ---------------------------------------------------------------- the apps
def test_hospital_app_under_ckks_without_secret_contexts_fails_the_run(
    tmp_path, keys_dir
):
    from .test_hospital_app import run_in_process

    with pytest.raises(RuntimeError, match="no CKKS secret context") as err:
        run_in_process(
            tmp_path,
            num_sites=3,
            secure_aggregation="ckks",
            standardisation="site",
            ckks_server_context=str(keys_dir / SERVER_FILE),
        )
    assert type(err.value).__name__ == "ConfigurationError"


def test_bank_app_under_ckks_without_secret_contexts_fails_the_run(tmp_path, keys_dir):
    from .test_bank_app import run_in_process

    with pytest.raises(RuntimeError, match="no CKKS secret context") as err:
        run_in_process(
            tmp_path,
            num_banks=3,
            secure_aggregation="ckks",
            standardisation="site",
            ckks_server_context=str(keys_dir / SERVER_FILE),
        )
    assert type(err.value).__name__ == "ConfigurationError"
