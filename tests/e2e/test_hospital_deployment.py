"""hospital-diagnostics on Flower's Deployment Engine: real processes on 127.0.0.1.

A ``flower-superlink`` with TLS (a self-signed CA made here) and SuperNode
authentication (each hospital's ECDSA node key registered with ``flwr supernode
register``), and three ``flower-supernode`` processes, one per hospital, each
reading its own CSV file through node config ``data-path``, all started with
:mod:`flwr_ext.launch`. The test kills one hospital's SuperNode (SIGKILL, as a
crash) once round 2 has begun: the run must still complete with the other two,
and the log must name the hospital that dropped out.

The happy path under TLS, SuperNode authentication and CKKS (each hospital with
its own CSV and the data owners' secret context, the coordinator only summing
ciphertexts, a site decrypting the final model) is
``tests/e2e/test_deployment_docs.py``: the same deployment, started with the
commands of docs/deployment.md.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
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

APP = Path(__file__).resolve().parents[2] / "apps" / "hospital-diagnostics"
APP_NAME = "hospital-diagnostics"

pytestmark = pytest.mark.e2e


def write_hospital_csvs(directory: Path, count: int = 3) -> list[Path]:
    """Give each hospital its own CSV: a non-IID share of WDBC (id, diagnosis, ...)."""
    sys.path.insert(0, str(APP))
    try:
        from hospital_diagnostics.task import wdbc, write_csv
    finally:
        sys.path.remove(str(APP))
    from flwr_ext.appkit.tabular import dirichlet_partition

    data = wdbc()
    parts = dirichlet_partition(data.y, count, alpha=1.0, seed=7, min_per_class=10)
    return [
        write_csv(directory / f"hospital-{i}.csv", data.subset(np.sort(rows)))
        for i, rows in enumerate(parts)
    ]


class Federation:
    """SuperLink (TLS + SuperNode authentication) + SuperNodes; ``stop()`` ends all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = FlowerHome(root / "flwr-home")
        self.tls = make_tls_files(root / "tls")
        self.processes: list[FlowerProcess] = []
        self.nodes: list[FlowerProcess] = []
        superlink, self.port = start_superlink(
            self.home, simulation=False, tls=self.tls, node_auth=True
        )
        self.processes.append(superlink)
        # The connection first: `flwr supernode register` uses it.
        self.home.add_connection(
            "consortium", self.port, root_certificates=self.tls.ca_cert
        )

    def add_hospital(self, name: str, node_config: dict) -> FlowerProcess:
        key = make_node_key(self.root / "node-keys", name)
        register_supernode(self.home, "consortium", key.public)
        node = start_supernode(
            self.home,
            self.port,
            node_config={**node_config, "site-name": name},
            root_certificates=self.tls.ca_cert,
            auth_key=key.private,
            name=f"supernode-{name}",
        )
        self.processes.append(node)
        self.nodes.append(node)
        return node

    def wait_online(self) -> None:
        wait_for_nodes_online(self.home, "consortium", len(self.nodes))

    def stop(self) -> None:
        for process in reversed(self.processes):  # SuperNodes first
            process.stop()
        assert not any(p.alive() for p in self.processes)


def test_a_killed_supernode_drops_out_and_the_run_completes(tmp_path):
    csvs = write_hospital_csvs(tmp_path / "data")
    federation = Federation(tmp_path)
    try:
        victims = [
            federation.add_hospital(f"hospital-{i}", {"data-path": str(path)})
            for i, path in enumerate(csvs)
        ]
        federation.wait_online()
        out = tmp_path / "results"
        run_id = submit_run(
            federation.home,
            APP,
            "consortium",
            run_config={
                "num-server-rounds": 2,
                "local-epochs": 2,
                # No statistics round before round 1: the crash is what is tested.
                "standardisation": "site",
                "min-nodes": 2,
                "round-timeout": 120.0,
                "node-wait-timeout": 5.0,  # the path, not the length, is tested
                "output-dir": str(out),
            },
        )
        deadline = time.monotonic() + 300
        # Round 2 has begun at hospital-2 once its SuperNode received its second
        # train instruction (read from its log: no `flwr` process per poll).
        while victims[2].log_count("Receiving: train message") < 2:
            assert time.monotonic() < deadline, "round 2 never started"
            time.sleep(0.5)
        victims[2].kill()  # SIGKILL the SuperNode and its ClientApp processes
        outcome = wait_for_run(federation.home, "consortium", run_id, timeout=420)
    finally:
        federation.stop()
    assert outcome.completed, f"{outcome.status}: {outcome.details}\n{outcome.log}"
    assert "(hospital-2) sent no reply" in outcome.log or (
        "(hospital-2) replied with an error" in outcome.log
    ), outcome.log[-5000:]
    values = parse_summary(outcome.log, APP_NAME)
    assert values["dropped"] == "hospital-2" and values["sites"] == "2"
    assert float(values["auroc"]) > 0.9
    data = json.loads((out / "metrics.json").read_text())
    assert [d["site"] for d in data["dropped-out"]] == ["hospital-2"]
