"""bank-fraud through `flwr run` in Flower's Simulation Engine, per configuration.

One private simulation SuperLink (own FLWR_HOME, free port) serves the plaintext
runs of this module and a second one, whose environment holds the banks' CKKS
secret context, the encrypted run. Every run has 4 simulated SuperNodes (the
generator's four banks, scaled down) and must finish with status
``finished:completed``, a summary line and a results folder. Runs are short (2
rounds): the point is that every configuration works end to end in Flower's
engine, not its final AUPRC (benchmarks/bank.py measures that).
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

APP = Path(__file__).resolve().parents[2] / "apps" / "bank-fraud"
APP_NAME = "bank-fraud"
SHORT = {"num-server-rounds": 2, "simulation-scale": 0.15, "round-timeout": 300.0}

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """Run the app in a simulation SuperLink; ``ckks=True`` uses one whose
    environment holds the banks' CKKS secret context (simulated nodes get only
    partition-id/num-partitions as node config, so ``ckks_mod`` reads it from
    FLWR_EXT_CKKS_CONTEXT, which every simulated ClientApp inherits)."""
    from flwr_ext.he import create_keys

    root = tmp_path_factory.mktemp("bank-sim")
    keys = create_keys(root / "keys")
    links = {}

    def link(ckks: bool) -> FlowerHome:
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

    def run(name: str, *, ckks: bool = False, **run_config) -> tuple[RunOutcome, Path]:
        out = root / name
        config = {**SHORT, **run_config, "output-dir": str(out)}
        if ckks:
            config.update({"secure-aggregation": "ckks",
                           "ckks-server-context": str(keys.server)})  # fmt: skip
        home = link(ckks)
        run_id = submit_run(home, APP, "sim", run_config=config, num_supernodes=4)
        outcome = wait_for_run(home, "sim", run_id, timeout=600)
        assert outcome.completed, (
            f"{name}: {outcome.status} {outcome.details}\n{outcome.log[-4000:]}"
        )
        return outcome, out

    yield run
    for _, process in links.values():
        process.stop()


def final_round(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())["rounds"][-1]


def test_fedavg_and_ckks_give_the_same_fraud_metrics(engine):
    plain, plain_out = engine("plain")
    values = parse_summary(plain.log, APP_NAME)
    assert values["sites"] == "4" and values["dropped"] == "none"
    assert float(values["auprc"]) > 0.3 and 0 < float(values["threshold"]) < 1
    for name in ("final_model.pt", "auprc.png", "pr_curve.png", "preprocessing.json"):
        assert (plain_out / name).is_file(), name

    ckks, ckks_out = engine("ckks", ckks=True)
    assert "ckks-summed" in ckks.log
    assert (ckks_out / "final_model.ckks-model").is_file()
    assert not (ckks_out / "final_model.pt").exists()  # the server never had it
    a, b = final_round(plain_out), final_round(ckks_out)
    for key in ("auprc", "recall-at-1pct-fpr", "precision", "f1", "threshold"):
        assert abs(a["aggregated"]["evaluate"][key]
                   - b["aggregated"]["evaluate"][key]) <= 1e-4, key  # fmt: skip
        for site in a["sites"]:
            assert abs(a["sites"][site]["evaluate"][key]
                       - b["sites"][site]["evaluate"][key]) <= 1e-4  # fmt: skip


def test_robust_rule_with_a_poisoning_bank_and_per_bank_thresholds(engine):
    outcome, out = engine(
        "median-byzantine", strategy="median", attack="scaling",
        **{"robust-pre-aggregation": "nnm", "num-byzantine": 1,
           "attack-strength": -20.0, "attack-partition-ids": "3",
           "threshold-selection": "site", "threshold-rule": "max-fpr"},
    )  # fmt: skip
    values = parse_summary(outcome.log, APP_NAME)
    assert float(values["auprc"]) > 0.3 and values["threshold"] == "per-bank"
    assert "[Median] round 2: received 4" in outcome.log
    thresholds = {
        s["evaluate"]["threshold"] for s in final_round(out)["sites"].values()
    }
    assert len(thresholds) > 1


def test_user_level_and_record_level_dp_together(engine):
    """DP-FedAvg on the server and DP-SGD at every bank, in one run."""
    outcome, out = engine(
        "dp",
        strategy="dp-fedavg",
        **{"dp-fedavg-noise-multiplier": 0.3, "dp-fedavg-num-clients": 4,
           "dp-sgd": True, "dp-sgd-epsilon": 4.0},
    )  # fmt: skip
    values = parse_summary(outcome.log, APP_NAME)
    assert values["sites"] == "4"
    assert 0 < float(values["epsilon"]) <= 4.0 + 1e-6  # record level, worst bank
    assert float(values["client-epsilon"]) > 0  # user level
    assert "[record-level DP]" in outcome.log
    assert (out / "epsilon.png").is_file()
