"""bank-fraud on Flower's Deployment Engine: real processes on 127.0.0.1.

A ``flower-superlink`` with TLS and SuperNode authentication (each bank's ECDSA
node key registered first) and three ``flower-supernode`` processes, one per bank,
each reading its own CSV file (written here by the generator) through node
config ``data-path``. One bank exports its columns under its own names and
maps them with a JSON ``schema-path`` file. The coordinator submits the app with
``flwr run``; the test checks the run's final status, the summary line, every
bank's metrics at the consortium's threshold and the results folder, then stops
every process it started.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from flwr_ext.appkit import parse_summary
from flwr_ext.launch import (
    FlowerHome,
    FlowerProcess,
    make_node_key,
    make_tls_files,
    register_supernode,
    start_superlink,
    start_supernode,
    submit_run,
    wait_for_nodes_online,
    wait_for_run,
)

APP = Path(__file__).resolve().parents[2] / "apps" / "bank-fraud"
APP_NAME = "bank-fraud"
#: Generated bank index -> name (three banks keep the test short: with Flower's
#: default subprocess isolation every message starts a ClientApp process).
BANKS = {0: "high-street", 1: "neobank", 3: "credit-union"}

pytestmark = pytest.mark.e2e


def write_bank_csvs(directory: Path) -> list[Path]:
    """Give each bank its own CSV in the app's transactions format (scaled down)."""
    sys.path.insert(0, str(APP))
    try:
        from bank_fraud.generator import generate_bank, write_transactions_csv
    finally:
        sys.path.remove(str(APP))
    return [
        write_transactions_csv(
            directory / f"{name}.csv", generate_bank(i, seed=11, scale=0.25)
        )
        for i, name in BANKS.items()
    ]


def test_three_banks_each_with_its_own_csv(tmp_path):
    csvs = write_bank_csvs(tmp_path / "data")
    # The credit union's export names the label 'fraud_flag': its schema file maps it.
    renamed = csvs[2].read_text().replace("is_fraud", "fraud_flag", 1)
    csvs[2].write_text(renamed)
    schema = tmp_path / "data" / "credit-union-schema.json"
    sys.path.insert(0, str(APP))
    try:
        from bank_fraud.generator import FEATURES
    finally:
        sys.path.remove(str(APP))
    schema.write_text(
        json.dumps(
            {
                "label": "fraud_flag",
                "positive_label": "1",
                "features": list(FEATURES),
                "ignore": ["transaction_id", "typology"],
            }
        )
    )

    home = FlowerHome(tmp_path / "flwr-home")
    processes: list[FlowerProcess] = []
    try:
        tls = make_tls_files(tmp_path / "tls")
        superlink, port = start_superlink(
            home, simulation=False, tls=tls, node_auth=True
        )
        processes.append(superlink)
        home.add_connection("consortium", port, root_certificates=tls.ca_cert)
        for name, path in zip(BANKS.values(), csvs, strict=True):
            node_config = {"data-path": str(path), "site-name": name}
            if name == "credit-union":
                node_config["schema-path"] = str(schema)
            key = make_node_key(tmp_path / "node-keys", name)
            register_supernode(home, "consortium", key.public)
            node = start_supernode(
                home,
                port,
                node_config=node_config,
                name=f"supernode-{name}",
                root_certificates=tls.ca_cert,
                auth_key=key.private,
            )
            processes.append(node)
        wait_for_nodes_online(home, "consortium", len(BANKS))
        out = tmp_path / "results"
        run_id = submit_run(
            home,
            APP,
            "consortium",
            run_config={
                "num-server-rounds": 1,
                "min-nodes": 3,
                "round-timeout": 180.0,
                "output-dir": str(out),
            },
        )
        outcome = wait_for_run(home, "consortium", run_id, timeout=480)
    finally:
        for process in reversed(processes):  # SuperNodes first
            process.stop()
    assert not any(p.alive() for p in processes)
    assert outcome.completed, f"{outcome.status}: {outcome.details}\n{outcome.log}"
    values = parse_summary(outcome.log, APP_NAME)
    assert values["sites"] == "3" and values["dropped"] == "none"
    assert values["rounds"] == "1" and float(values["auprc"]) > 0.2
    data = json.loads((out / "metrics.json").read_text())
    last = data["rounds"][-1]
    assert set(last["sites"]) == set(BANKS.values())
    pooled = last["aggregated"]["evaluate"]
    for site in last["sites"].values():
        assert site["evaluate"]["threshold"] == pooled["threshold"]
        assert site["train"]["num-examples"] > 1000
    for name in ("final_model.pt", "pr_curve.png", "auprc.png", "metrics.csv"):
        assert (out / name).is_file(), name
