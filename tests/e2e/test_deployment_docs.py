"""The documented deployment is a test: docs/deployment.md's commands, verbatim.

For each app, the marked ``bash`` blocks of ``docs/deployment.md`` run as
written (:mod:`tests.e2e.doc_commands`) on 127.0.0.1, with the settings
block's variables set to test values: a TLS certificate for ``localhost`` and
``IP:127.0.0.1``, a SuperLink with SuperNode authentication, one ECDSA node key
per site registered with ``flwr supernode register``, a CKKS key set, three
SuperNodes on one host (distinct ``--port``), each with its own CSV file and a
``state-dir``; ``flwr run`` with the page's run config, the summary line, the
results folder, the decryption at a site, and the README's model-loading
snippet scoring the site's rows.

For the hospital app the same steps run once, with three rounds and a fault
(module fixture ``hospital_fault_run``): one SuperNode is ``kill -9``ed once
round 2 has begun and restarted with the same documented command (retrying as a
service manager would, while the SuperLink still lists the dead node). Two
tests read that one deployment: the verbatim-commands checks (summary, results,
decryption, the README's snippet, the dropped site named, the coordinator
summing ciphertexts), and the rejoin checks (the run completes with that
hospital back in round 3, under CKKS). Starting the deployment once for both
saves a whole TLS + CKKS deployment per CI run.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from flwr_ext.appkit import parse_summary
from flwr_ext.launch import (
    FLOWER_ENV,
    FlowerHome,
    FlowerProcess,
    _wait_healthy,
    free_port,
    run_log,
    wait_for_nodes_online,
)

from .doc_commands import (
    ROOT,
    Block,
    blocks,
    check_environment,
    merged,
    python_block,
    run_block,
    settings_names,
    start_block,
)

pytestmark = pytest.mark.e2e

#: What a SuperNode logs when it pulls a train instruction (once per round).
TRAIN_RECEIVED = "Receiving: train message"

APPS = {
    "hospital-diagnostics": "hospital_diagnostics",
    "bank-fraud": "bank_fraud",
}


class DocumentedDeployment:
    """docs/deployment.md's steps 0-7 for ``app``, one site per CSV file."""

    def __init__(self, root: Path, app: str, sites: dict[str, Path], rounds: int):
        self.root = root
        self.app = app
        self.home = FlowerHome(root / "flwr-home")
        self.log = root / "commands.log"
        self.processes: list[FlowerProcess] = []
        self.nodes: dict[str, FlowerProcess] = {}
        self.port = free_port()
        pki = root / "pki"
        self.shared = {
            "SUPERLINK_NAME": "localhost",
            "SUPERLINK_PORT": str(self.port),
            "CA_CERT": str(pki / "ca.crt"),
            "SUPERLINK_LISTEN": "127.0.0.1",
            "PKI": str(pki),
            "SUPERLINK_DB": str(root / "superlink.db"),
            "NODE_KEYS_IN": str(root / "node-keys"),
            "SERVER_CONTEXT": str(root / "ckks" / "server-context.ckks"),
            "APP": str(ROOT / "apps" / app),
            "ROUNDS": str(rounds),
            "RESULTS": str(root / "results"),
            "FLWR_HOME": str(self.home.path),
            "CKKS_KEYS": str(root / "ckks"),
            "SECRET_CONTEXT": str(root / "ckks" / "secret-context.ckks"),
            "APP_MODULE": APPS[app],
        }
        self.site_env = {
            name: {
                "SITE": name,
                "DATA": str(path),
                # The key lands where the coordinator reads it: one machine.
                "SITE_KEY": str(root / "node-keys" / name),
                "STATE_DIR": str(root / "state" / name),
                "NODE_PORT": str(free_port()),
            }
            for name, path in sites.items()
        }
        self.base = merged(self.home.env(), FLOWER_ENV, self.shared)
        check_environment(
            merged(self.base, next(iter(self.site_env.values()))), settings_names()
        )
        self.blocks = [b for b in blocks() if not b.has("settings")]

    def env(self, site: str | None = None) -> dict[str, str]:
        """The environment a block runs with (a site's values for per-site ones)."""
        return merged(self.base, self.site_env[site]) if site else dict(self.base)

    def up(self) -> None:
        """Run the page's steps up to the SuperNodes; wait until all are online."""
        for block in self.blocks:
            if block.has("run"):
                continue
            if block.has("background", "superlink"):
                superlink = start_block(
                    block, self.env(), "superlink", self.root / "superlink.log"
                )
                self.processes.append(superlink)
                _wait_healthy(superlink, self.port, 90.0, tls=True)
            elif block.has("background", "per-site"):
                for site in self.site_env:
                    self.start_node(site, block)
            elif block.has("per-site"):
                for site in self.site_env:
                    run_block(block, self.env(site), self.log)
            elif block.has("once") and "decrypt" not in block.code:
                run_block(block, self.env(), self.log)
        wait_for_nodes_online(self.home, "consortium", len(self.site_env))

    def start_node(self, site: str, block: Block | None = None) -> FlowerProcess:
        """Start (or restart) a site's SuperNode with the page's command."""
        block = block or self.block("background", "per-site")
        node = start_block(
            block, self.env(site), f"supernode-{site}", self.root / f"{site}.log"
        )
        self.nodes[site] = node
        self.processes.append(node)
        return node

    def block(self, *tags: str) -> Block:
        """The one block carrying ``tags``."""
        (found,) = [b for b in self.blocks if b.has(*tags)]
        return found

    def submit(self) -> FlowerProcess:
        """Start the page's submit-and-wait block."""
        process = start_block(
            self.block("once", "run"), self.env(), "run", self.root / "run.log"
        )
        self.processes.append(process)
        return process

    def run_id(self, timeout: float = 120.0) -> str:
        """The run id the submit block printed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"submitted run (\d+)", _read(self.root / "run.log"))
            if found:
                return found.group(1)
            time.sleep(1.0)
        raise AssertionError(f"no run id:\n{_read(self.root / 'run.log')}")

    def decrypt(self) -> None:
        """Step 10 at a site: the page's decryption block."""
        (block,) = [b for b in self.blocks if "decrypt" in b.code and b.has("once")]
        run_block(block, self.env(next(iter(self.site_env))), self.log)

    def stop(self) -> None:
        """Stop every process started here: run block, SuperNodes, SuperLink."""
        for process in reversed(self.processes):
            process.stop()
        assert not any(p.alive() for p in self.processes)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _wait(process: FlowerProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while process.alive():
        assert time.monotonic() < deadline, f"still running:\n{process.tail()}"
        time.sleep(1.0)
    assert process.process.returncode == 0, process.tail(60)


def hospital_sites(directory: Path) -> dict[str, Path]:
    from .test_hospital_deployment import write_hospital_csvs

    names = ("st-marys", "northgate", "riverside")
    return dict(zip(names, write_hospital_csvs(directory), strict=True))


def bank_sites(directory: Path) -> dict[str, Path]:
    from .test_bank_deployment import BANKS, write_bank_csvs

    return dict(zip(BANKS.values(), write_bank_csvs(directory), strict=True))


def _predict(app: str, deployment: DocumentedDeployment, csv_path: Path):
    code = python_block(ROOT / "apps" / app / "README.md", "predict")
    namespace: dict = {}
    exec(compile(code, f"apps/{app}/README.md", "exec"), namespace)
    return namespace["predict"](
        ROOT / "apps" / app, Path(deployment.shared["RESULTS"]), csv_path
    )


def _check_documented_results(
    app: str, deployment: DocumentedDeployment, sites: dict[str, Path], output: str
) -> dict[str, str]:
    """What steps 8-10 and the README promise: summary, results, decryption, scores.

    Returns the summary line's fields.
    """
    values = parse_summary(output, app)
    assert values["status"] == "completed", output[-3000:]
    assert values["sites"] == "3", output
    assert "finished:completed" in output
    results = Path(deployment.shared["RESULTS"])
    data = json.loads((results / "metrics.json").read_text())
    assert set(data["rounds"][-1]["sites"]) == set(sites)
    assert (results / "final_model.ckks-model").is_file()
    assert not (results / "final_model.pt").exists()  # the coordinator: ciphertexts
    assert (results / "decrypted" / "final_model.pt").is_file()
    first = next(iter(sites.values()))
    scores = np.asarray(_predict(app, deployment, first)[0])
    assert scores.ndim == 1 and len(scores) > 10
    assert np.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()
    return values


def test_the_documented_deployment_runs_verbatim_for_the_bank_app(tmp_path):
    app = "bank-fraud"
    sites = bank_sites(tmp_path / "data")
    # One round: the commands are what is tested; later rounds of a CKKS
    # deployment (an encrypted global model at the sites) are the hospital run's.
    deployment = DocumentedDeployment(tmp_path, app, sites, rounds=1)
    try:
        deployment.up()
        run = deployment.submit()
        _wait(run, 600)
        deployment.decrypt()
    finally:
        deployment.stop()
    output = _read(tmp_path / "run.log")
    values = _check_documented_results(app, deployment, sites, output)
    assert values["dropped"] == "none", output


@dataclass
class FaultRun:
    """The hospital app's documented deployment, one site killed and restarted."""

    deployment: DocumentedDeployment
    sites: dict[str, Path]
    victim: str
    output: str  # what the page's run block printed
    log: str  # the ServerApp's log (flwr log)
    restarts: int


@pytest.fixture(scope="module")
def hospital_fault_run(tmp_path_factory) -> FaultRun:
    """docs/deployment.md for the hospital app, 3 rounds, with a crash in round 2.

    One deployment serves the verbatim-commands test and the rejoin test (both
    would start the same SuperLink, keys and SuperNodes): ``riverside`` is
    ``kill -9``ed once round 2 has begun and restarted with the page's command
    until the SuperLink admits it again; then step 10 decrypts the results.
    """
    app = "hospital-diagnostics"
    root = tmp_path_factory.mktemp("documented-hospital")
    sites = hospital_sites(root / "data")
    victim = "riverside"
    deployment = DocumentedDeployment(root, app, sites, rounds=3)
    try:
        deployment.up()
        run = deployment.submit()
        run_id = deployment.run_id()
        deadline = time.monotonic() + 400
        # Round 2 has begun at the site once its SuperNode received its second
        # train instruction (read from its log: no `flwr` process per poll).
        while deployment.nodes[victim].log_count(TRAIN_RECEIVED) < 2:
            assert run.alive(), run.tail()
            assert time.monotonic() < deadline, "round 2 never started"
            time.sleep(0.5)
        deployment.nodes[victim].kill()  # kill -9 of the SuperNode's process group
        restarts = 0
        node = deployment.start_node(victim)
        # Until the SuperLink has noticed the missing heartbeats it refuses the
        # restarted node ("Failed to activate SuperNode"): retry, as systemd's
        # Restart=on-failure would.
        while run.alive():
            assert time.monotonic() < deadline + 600, "the run never finished"
            if not node.alive():
                restarts += 1
                time.sleep(5.0)
                node = deployment.start_node(victim)
            time.sleep(1.0)
        assert run.process.returncode == 0, run.tail(60)
        log = run_log(deployment.home, "consortium", run_id)
        deployment.decrypt()
    finally:
        deployment.stop()
    return FaultRun(deployment, sites, victim, _read(root / "run.log"), log, restarts)


def test_the_documented_deployment_runs_verbatim_for_the_hospital_app(
    hospital_fault_run,
):
    """Steps 1-10 under TLS, SuperNode authentication and CKKS, one CSV per site."""
    from flwr_ext.he import decrypt_model_file

    run = hospital_fault_run
    app = "hospital-diagnostics"
    values = _check_documented_results(app, run.deployment, run.sites, run.output)
    assert values["dropped"] == run.victim, run.output  # named, not hidden
    assert float(values["auroc"]) > 0.95, run.output
    assert "ckks-summed" in run.log
    shared = run.deployment.shared
    model = decrypt_model_file(
        Path(shared["RESULTS"]) / "final_model.ckks-model",
        Path(shared["SECRET_CONTEXT"]),
    )
    weights = np.concatenate([a.numpy().ravel() for a in model.arrays.values()])
    assert np.isfinite(weights).all() and np.abs(weights).max() > 0


def test_a_hospital_killed_in_round_2_rejoins_in_round_3_under_ckks(
    hospital_fault_run,
):
    run = hospital_fault_run
    victim, log = run.victim, run.log
    values = parse_summary(run.output, "hospital-diagnostics")
    assert values["status"] == "completed", log[-5000:]
    results = Path(run.deployment.shared["RESULTS"])
    data = json.loads((results / "metrics.json").read_text())
    rounds = {entry["round"]: entry for entry in data["rounds"]}
    assert victim in rounds[1]["sites"]
    assert victim in rounds[3]["sites"], (run.restarts, log[-5000:])
    assert "train" in rounds[3]["sites"][victim], rounds[3]["sites"][victim]
    assert f"({victim})" in log  # every line about it names the site
    assert "not sampled" not in log
