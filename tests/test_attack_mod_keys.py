"""Issue 14, item 4: the attack mod's run-config keys are named, never guessed.

``-c 'attack="nan"' -c 'attack-partition-ids="0"'`` on an app that does not
declare them gave "[code: 15] Invalid run configuration." naming no key; an app
that declared ``attack`` but not ``attack-partition-ids`` attacked nobody,
silently. Real ClientApps with the real ``byzantine_mod`` on an InProcessGrid.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from flwr_ext.attacks import byzantine_mod
from flwr_ext.cli import main
from flwr_ext.inprocess import InProcessGrid

ROOT = Path(__file__).resolve().parents[1]


def _app() -> ClientApp:
    app = ClientApp(mods=[byzantine_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = ArrayRecord({"w": Array(np.ones(3, np.float32))})
        metrics = MetricRecord({"num-examples": 1})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    return app


def _train_reply(run_config: dict) -> Message:
    grid = InProcessGrid(
        {1: _app()},
        node_configs={1: {"partition-id": 0, "num-partitions": 1}},
        run_config=run_config,
    )
    strategy = FedAvg(min_available_nodes=1, min_train_nodes=1)
    initial = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    (reply,) = grid.send_and_receive(
        list(strategy.configure_train(1, initial, ConfigRecord(), grid))
    )
    return reply


def test_attack_without_partition_ids_names_the_missing_key():
    reply = _train_reply({"attack": "nan"})
    assert reply.has_error(), "the node trained honestly: nobody was told"
    assert "'attack-partition-ids'" in reply.error.reason
    assert "[tool.flwr.app.config]" in reply.error.reason


def test_partition_ids_without_attack_names_the_missing_key():
    reply = _train_reply({"attack-partition-ids": "0"})
    assert reply.has_error()
    assert "no 'attack'" in reply.error.reason
    assert "[tool.flwr.app.config]" in reply.error.reason


def test_declared_keys_attack_the_listed_partitions():
    reply = _train_reply(
        {"attack": "nan", "attack-strength": 0.0, "attack-partition-ids": "0"}
    )
    assert not reply.has_error()
    assert np.isnan(reply.content["arrays"]["w"].numpy()).all()


def test_the_declared_default_strength_means_the_attacks_default():
    """`-c 'attack="scaling"'` alone on an app declaring attack-strength: it attacks."""
    reply = _train_reply(
        {"attack": "scaling", "attack-strength": 0.0, "attack-partition-ids": "0"}
    )
    np.testing.assert_allclose(reply.content["arrays"]["w"].numpy(), 10.0)


def test_the_documented_toml_declares_every_key_the_mod_reads():
    from flwr_ext.attacks.mod import RUN_CONFIG_KEYS, RUN_CONFIG_TOML

    table = tomllib.loads(RUN_CONFIG_TOML)["tool"]["flwr"]["app"]["config"]
    assert tuple(table) == RUN_CONFIG_KEYS
    assert RUN_CONFIG_TOML.strip() in (ROOT / "README.md").read_text()


def test_simulate_names_an_undeclared_key_before_starting_anything(tmp_path, capsys):
    app = tmp_path / "myapp"
    app.mkdir()
    (app / "pyproject.toml").write_text(
        "[tool.flwr.app.config]\nnum-server-rounds = 1\n[tool.flwr.app.nested]\nx = 1\n"
    )
    code = main(
        ["simulate", str(app), "-c", 'attack="nan"', "-c", 'attack-partition-ids="0"',
         "-c", "num-server-rounds=2", "--timeout", "1"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert "'attack'" in err and "'attack-partition-ids'" in err
    assert "'num-server-rounds'" not in err  # declared
    assert 'attack = "none"' in err  # the lines to add


@pytest.mark.parametrize("app", ["hospital-diagnostics", "bank-fraud"])
def test_both_apps_declare_the_attack_keys(app):
    from flwr_ext.attacks.mod import RUN_CONFIG_KEYS
    from flwr_ext.cli.simulate import declared_run_config

    assert set(RUN_CONFIG_KEYS) <= declared_run_config(ROOT / "apps" / app)
