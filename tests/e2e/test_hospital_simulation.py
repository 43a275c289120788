"""hospital-diagnostics through `flwr run` in Flower's Simulation Engine.

One private simulation SuperLink (own FLWR_HOME, free port) serves every run of
this module; each run has 3 simulated SuperNodes (hospitals; 4 for the robust
rule, one of them Byzantine) and must finish
with status ``finished:completed`` and a pooled AUROC above a floor. Runs are
kept short (3 rounds, 1 local epoch): the point is that every configuration
works end to end in Flower's engine, not its final accuracy (see
benchmarks/hospital.py for that).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from flwr_ext.appkit import parse_summary
from flwr_ext.launch import (
    FlowerHome,
    RunOutcome,
    start_superlink,
    submit_run,
    wait_for_run,
)

APP = Path(__file__).resolve().parents[2] / "apps" / "hospital-diagnostics"
APP_NAME = "hospital-diagnostics"
SHORT = {"num-server-rounds": 3, "local-epochs": 1}

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A simulation SuperLink whose environment holds a CKKS secret context.

    Simulated nodes only get partition-id/num-partitions as node config, so
    ckks_mod reads the data owners' secret context from FLWR_EXT_CKKS_CONTEXT,
    which the SuperLink (and so every simulated ClientApp) inherits. Sites with a
    secret context encrypt every update (secure_aggregation_mod), so the
    plaintext runs use a second SuperLink without it.
    """
    from flwr_ext.he import create_keys

    root = tmp_path_factory.mktemp("hospital-sim")
    keys = create_keys(root / "keys")
    links = {}

    def link(ckks: bool):
        if ckks not in links:
            saved = os.environ.get("FLWR_EXT_CKKS_CONTEXT")
            if ckks:
                os.environ["FLWR_EXT_CKKS_CONTEXT"] = str(keys.secret)
            else:
                os.environ.pop("FLWR_EXT_CKKS_CONTEXT", None)
            try:
                home = FlowerHome(root / f"home-{'ckks' if ckks else 'plain'}")
                process, port = start_superlink(home, simulation=True)
                home.add_connection("sim", port)
            finally:
                if saved is None:
                    os.environ.pop("FLWR_EXT_CKKS_CONTEXT", None)
                else:
                    os.environ["FLWR_EXT_CKKS_CONTEXT"] = saved
            links[ckks] = (home, process)
        return links[ckks][0]

    def run(
        name: str, *, ckks: bool = False, nodes: int = 3, **run_config
    ) -> tuple[RunOutcome, Path]:
        out = root / name
        config = {**SHORT, **run_config, "output-dir": str(out)}
        if ckks:
            config.update({"secure-aggregation": "ckks",
                           "ckks-server-context": str(keys.server)})  # fmt: skip
        home = link(ckks)
        run_id = submit_run(home, APP, "sim", run_config=config, num_supernodes=nodes)
        outcome = wait_for_run(home, "sim", run_id, timeout=600)
        assert outcome.completed, (
            f"{name}: {outcome.status} {outcome.details}\n{outcome.log[-4000:]}"
        )
        return outcome, out

    yield run
    for _, process in links.values():
        process.stop()


def final_metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())["rounds"][-1]


def test_plain_fedavg_and_ckks_give_the_same_metrics(engine):
    plain, plain_out = engine("plain")
    values = parse_summary(plain.log, APP_NAME)
    assert float(values["auroc"]) > 0.95 and values["sites"] == "3"
    assert (plain_out / "final_model.pt").is_file()
    assert (plain_out / "auroc.png").is_file()

    ckks, ckks_out = engine("ckks", ckks=True)
    assert "ckks-summed" in ckks.log
    assert "the server saw ciphertexts only" in ckks.log
    assert (ckks_out / "final_model.ckks-model").is_file()
    assert not (ckks_out / "final_model.pt").exists()  # the server never had it
    a, b = final_metrics(plain_out), final_metrics(ckks_out)
    for key in ("auroc", "sensitivity", "specificity", "accuracy"):
        assert (
            abs(a["aggregated"]["evaluate"][key] - b["aggregated"]["evaluate"][key])
            <= 1e-4
        )
        for site in a["sites"]:
            assert abs(a["sites"][site]["evaluate"][key]
                       - b["sites"][site]["evaluate"][key]) <= 1e-4  # fmt: skip


def test_robust_rule_with_a_byzantine_hospital(engine):
    # Three honest hospitals and one that flips and boosts its update 20x: the
    # coordinate-wise median keeps the model (FedAvg would be destroyed by it).
    outcome, _ = engine(
        "median-byzantine", nodes=4, strategy="median", attack="scaling",
        **{"attack-strength": -20.0, "attack-partition-ids": "2"},
    )  # fmt: skip
    values = parse_summary(outcome.log, APP_NAME)
    assert float(values["auroc"]) > 0.95 and values["sites"] == "4"
    assert "[Median] round 3: received 4" in outcome.log
    assert "median of 4 hospitals' statistics" in outcome.log


def test_record_level_dp_sgd(engine):
    outcome, out = engine("dp-sgd", **{"dp-sgd": True, "dp-sgd-epsilon": 4.0})
    values = parse_summary(outcome.log, APP_NAME)
    assert 0 < float(values["epsilon"]) <= 4.0 + 1e-6
    assert float(values["auroc"]) > 0.9
    assert "[record-level DP]" in outcome.log
    assert (out / "epsilon.png").is_file()
