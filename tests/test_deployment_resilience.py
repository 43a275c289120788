"""A consortium run survives a crash, names the site at fault, and records failures.

The hospital app's real ServerApp and ClientApp (mods included) in-process
(:class:`flwr_ext.inprocess.InProcessGrid`): real strategies, real Messages,
real TenSEAL ciphertexts under CKKS. The same behaviour on real SuperLink and
SuperNode processes is in ``tests/e2e/test_deployment_docs.py``.

- liveness: a site that stays away past ``node-wait-timeout`` is left out when
  ``min-nodes`` remain, and the run fails naming it otherwise - instead of
  Flower's endless "Waiting for nodes to connect";
- rejoin: a site whose SuperNode restarts mid-run (its ``context.state`` lost)
  takes back the pooled CKKS feature scaler from its ``state-dir`` and is back in
  the next round;
- failure is a result: a site with a missing CSV column, or with another CKKS
  key set, gives a results folder and a summary line naming it and the cause;
- the SuperLink's "Node Unavailable" reply is logged under the real node.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from flwr_ext.appkit.liveness import (
    DeadlineGrid,
    RestartAwareGrid,
    SitesUnavailableError,
)
from flwr_ext.appkit.recorder import RecordingGrid
from flwr_ext.appkit.results import parse_summary
from flwr_ext.appkit.site_errors import site_from_reason
from flwr_ext.appkit.site_state import load_scaler, save_scaler
from flwr_ext.appkit.standardisation import Standardizer
from flwr_ext.inprocess import InProcessGrid

APP = Path(__file__).resolve().parents[1] / "apps" / "hospital-diagnostics"
sys.path.insert(0, str(APP))

from hospital_diagnostics.client_app import app as client_app  # noqa: E402
from hospital_diagnostics.server_app import app as server_app  # noqa: E402
from hospital_diagnostics.settings import SCHEMA  # noqa: E402
from hospital_diagnostics.task import wdbc, write_csv  # noqa: E402

NAME = "hospital-diagnostics"


class FaultyGrid(InProcessGrid):
    """InProcessGrid with the faults of a real deployment, from a given round on.

    ``offline_from``: node -> round from which it is gone (not listed, no reply).
    ``restart_after``: node -> round after whose evaluation its SuperNode
    restarts (a fresh, empty ``context.state``, as after ``kill -9``).
    ``unavailable_in``: node -> round whose train instruction the SuperLink
    answers for it with "Node Unavailable" under the SuperLink's own id.
    """

    offline_from: dict[int, int]
    restart_after: dict[int, int]
    unavailable_in: dict[int, int]

    def push_messages(self, messages):
        ids = []
        for message in messages:
            node = int(message.metadata.dst_node_id)
            server_round = _round(message)
            if self.unavailable_in.get(node) == server_round and _phase(message) == (
                "train"
            ):
                ids.extend(self._superlink_answers(message))
                continue
            ids.extend(super().push_messages([message]))
            if self.restart_after.get(node) == server_round and _phase(message) == (
                "evaluate"
            ):
                old = self.context(node)
                self._contexts[node] = Context(
                    old.run_id, node, dict(old.node_config), RecordDict(),
                    dict(old.run_config),
                )  # fmt: skip
        return ids

    def get_node_ids(self):
        for node, first in self.offline_from.items():
            self.set_offline(node, first - 1 in self.evaluations)
        return super().get_node_ids()

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and _phase(messages[0]) == "evaluate":
            self.evaluations.add(_round(messages[0]))
        return super().send_and_receive(messages, timeout=timeout)

    def _superlink_answers(self, message):
        message_id = f"superlink-{len(self._replies)}"
        message.metadata.__dict__["_message_id"] = message_id
        reply = Message(
            Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable"),
            reply_to=message,
        )
        reply.metadata.__dict__["_src_node_id"] = 1  # as the SuperLink writes it
        self._replies[message_id] = reply
        return [message_id]


def _round(message) -> int:
    config = message.content.config_records.get("config", {})
    return int(config.get("server-round", 0))


def _phase(message) -> str:
    return str(message.metadata.message_type).split(".", 1)[0]


def run(tmp_path, node_configs, *, offline_from=None, restart_after=None,
        unavailable_in=None, **overrides):  # fmt: skip
    """Run the hospital app in-process; return (results folder, grid)."""
    run_config = SCHEMA.defaults()
    run_config.update({"num-server-rounds": 3, "output-dir": str(tmp_path / "out")})
    run_config.update({k.replace("_", "-"): v for k, v in overrides.items()})
    grid = FaultyGrid(
        dict.fromkeys(node_configs, client_app),
        node_configs=node_configs,
        run_config=run_config,
    )
    grid.offline_from = offline_from or {}
    grid.restart_after = restart_after or {}
    grid.unavailable_in = unavailable_in or {}
    grid.evaluations = set()
    try:
        server_app(grid, Context(1, 0, {}, RecordDict(), run_config))
    finally:
        grid.final_contexts = {n: grid.context(n) for n in node_configs}
    return tmp_path / "out", grid


def partitions(n=3, **extra):
    return {i + 1: {"partition-id": i, "num-partitions": n, **extra} for i in range(n)}


def csv_sites(tmp_path, broken: str | None = None):
    """Three hospitals' CSV files; ``east``'s lacks a column if ``broken``."""
    data = wdbc()
    configs = {}
    for i, name in enumerate(("north", "south", "east")):
        path = write_csv(tmp_path / f"{name}.csv", data.subset(np.arange(i, 569, 3)))
        if name == broken:
            lines = path.read_text().splitlines()
            header = lines[0].split(",")
            drop = header.index("radius_mean")
            path.write_text(
                "\n".join(
                    ",".join(v for j, v in enumerate(line.split(",")) if j != drop)
                    for line in lines
                )
                + "\n"
            )
        configs[i + 1] = {"data-path": str(path), "site-name": name}
    return configs


def summary(caplog) -> dict[str, str]:
    return parse_summary(caplog.text, NAME)


# --------------------------------------------------------------- liveness
def test_a_site_gone_for_good_is_left_out_after_the_deadline(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="flwr"):
        out, _ = run(tmp_path, partitions(), offline_from={3: 2}, min_nodes=2,
                     node_wait_timeout=1.0)  # fmt: skip
    assert "hospital-2) not connected after 1 s (node-wait-timeout): going on" in (
        caplog.text
    )
    values = summary(caplog)
    assert values["status"] == "completed" and values["rounds"] == "3"
    data = json.loads((out / "metrics.json").read_text())
    assert set(data["rounds"][0]["sites"]) == {"hospital-0", "hospital-1",
                                                "hospital-2"}  # fmt: skip
    assert set(data["rounds"][-1]["sites"]) == {"hospital-0", "hospital-1"}


def test_below_the_minimum_the_run_fails_naming_the_missing_site(tmp_path, caplog):
    with (
        caplog.at_level(logging.INFO, logger="flwr"),
        pytest.raises(SitesUnavailableError, match=r"missing: node 3 \(hospital-2\)"),
    ):
        run(tmp_path, partitions(), offline_from={3: 2}, min_nodes=3,
            node_wait_timeout=1.0)  # fmt: skip
    values = summary(caplog)
    assert values["status"] == "failed" and values["rounds"] == "1"
    assert "min-nodes=3" in values["error"]
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert data["status"] == "failed" and data["rounds-completed"] == 1
    assert [r["round"] for r in data["rounds"]] == [1]


def test_deadline_grid_waits_then_goes_on_or_fails_with_a_fake_clock():
    grid = InProcessGrid({2: lambda m, c: m, 3: lambda m, c: m, 4: lambda m, c: m})
    now = [0.0]
    waiter = DeadlineGrid(
        RecordingGrid(grid), min_nodes=2, wait_s=30.0, clock=lambda: now[0],
        sleep=lambda s: now.__setitem__(0, now[0] + s),
    )  # fmt: skip
    assert sorted(waiter.get_node_ids()) == [2, 3, 4]
    grid.set_offline(4)
    assert sorted(waiter.get_node_ids()) == [2, 3]
    assert now[0] == pytest.approx(30.0)  # waited the deadline, not for ever
    assert sorted(waiter.get_node_ids()) == [2, 3]  # same phase: no second wait
    grid.set_offline(3)
    waiter.send_and_receive([])  # next phase
    with pytest.raises(SitesUnavailableError, match="node 3"):
        waiter.get_node_ids()


# ----------------------------------------------------------------- rejoin
class RestartingNodesGrid(InProcessGrid):
    """A deployment-like grid: ``get_nodes()`` with activation stamps.

    Node 3 loses every instruction (its SuperNode was killed mid-round) and is
    activated again (restarted) once ``restart_at`` polls have happened.
    """

    def __init__(self, *args, restart_at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.polls, self.restart_at = 0, restart_at

    def get_nodes(self):
        from types import SimpleNamespace

        self.polls += 1
        stamp = "t1" if self.polls > self.restart_at else "t0"
        return [
            SimpleNamespace(node_id=n, last_activated_at=stamp if n == 3 else "t0")
            for n in self.get_node_ids()
        ]

    def push_messages(self, messages):
        ids = []
        for message in messages:
            if int(message.metadata.dst_node_id) == 3:
                message.metadata.__dict__["_message_id"] = f"lost-{len(ids)}"
                ids.append(f"lost-{len(ids)}")
                continue
            ids.extend(super().push_messages([message]))
        return ids


def test_a_reply_lost_to_a_restart_does_not_wait_for_the_round_timeout():
    from flwr.app import ConfigRecord, MessageType

    grid = RestartingNodesGrid(
        {2: lambda m, c: Message(RecordDict(), reply_to=m), 3: lambda m, c: m},
        restart_at=3,
    )
    now = [0.0]
    watch = RestartAwareGrid(
        grid, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s)
    )
    messages = [
        Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n,
                message_type=MessageType.TRAIN)
        for n in (2, 3)
    ]  # fmt: skip
    replies = list(watch.send_and_receive(messages, timeout=600.0))
    assert now[0] < 30.0  # a few polls, not the 600 s round timeout
    by_node = {int(r.metadata.src_node_id): r for r in replies}
    assert set(by_node) == {2, 3} and not by_node[2].has_error()
    assert "restarted while its reply was pending" in by_node[3].error.reason
    # Without a restart the lost reply is waited for until the timeout, as before.
    grid.restart_at, grid.polls, now[0] = 10**9, 0, 0.0
    messages = [
        Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n,
                message_type=MessageType.TRAIN)
        for n in (2, 3)
    ]  # fmt: skip
    replies = list(watch.send_and_receive(messages, timeout=60.0))
    assert [int(r.metadata.src_node_id) for r in replies] == [2]
    assert now[0] >= 60.0


def test_a_restarted_site_rejoins_a_ckks_run_from_its_state_dir(tmp_path, caplog):
    from flwr_ext.he import create_keys

    keys = create_keys(tmp_path / "keys")
    configs = partitions()
    for node, config in configs.items():
        config["ckks-context"] = str(keys.secret)
        config["state-dir"] = str(tmp_path / f"state-{node}")
    with caplog.at_level(logging.INFO, logger="flwr"):
        out, grid = run(tmp_path, configs, restart_after={3: 1}, min_nodes=2,
                        secure_aggregation="ckks",
                        ckks_server_context=str(keys.server))  # fmt: skip
    assert (
        grid.final_contexts[3].state.config_records.get("flwr-ext-feature-scaler")
        is None
    ), "the restart did not wipe the state"
    values = summary(caplog)
    assert values["dropped"] == "none", caplog.text[-3000:]
    data = json.loads((out / "metrics.json").read_text())
    for entry in data["rounds"]:
        assert "hospital-2" in entry["sites"], entry["round"]
    folder = tmp_path / "state-3"
    (kept,) = folder.iterdir()
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(kept).st_mode) == 0o600


def test_without_a_state_dir_the_restarted_site_says_what_to_set(tmp_path, caplog):
    from flwr_ext.he import create_keys

    keys = create_keys(tmp_path / "keys")
    configs = partitions()
    for config in configs.values():
        config["ckks-context"] = str(keys.secret)
    with caplog.at_level(logging.INFO, logger="flwr"):
        run(tmp_path, configs, restart_after={3: 1}, min_nodes=2,
            secure_aggregation="ckks",
            ckks_server_context=str(keys.server))  # fmt: skip
    assert "site 'hospital-2': ShareableError: no feature scaler" in caplog.text
    assert "state-dir" in caplog.text
    assert summary(caplog)["dropped"] == "hospital-2"


def test_a_restarted_site_continues_its_dp_sgd_account(tmp_path):
    # Lost with a restart, the account would count epsilon from zero again and
    # the site would report less privacy loss than it has spent.
    def epsilons(folder, state_dir: bool, restart: bool) -> list[float]:
        configs = partitions()
        if state_dir:
            for node, config in configs.items():
                config["state-dir"] = str(folder / f"state-{node}")
        out, _ = run(folder, configs, restart_after={3: 1} if restart else None,
                     dp_sgd=True, dp_sgd_epsilon=4.0)  # fmt: skip
        data = json.loads((out / "metrics.json").read_text())
        return [r["sites"]["hospital-2"]["train"]["dp-record-epsilon"]
                for r in data["rounds"]]  # fmt: skip

    steady = epsilons(tmp_path / "steady", state_dir=False, restart=False)
    kept = epsilons(tmp_path / "kept", state_dir=True, restart=True)
    assert kept == pytest.approx(steady, rel=1e-9)
    lost = epsilons(tmp_path / "lost", state_dir=False, restart=True)
    assert lost[2] < steady[2]  # what happened without the kept account


def test_state_file_is_private_per_run_and_refuses_a_symlinked_folder(tmp_path):
    scaler = Standardizer(np.array([1.0, 2.0]), np.array([0.5, 3.0]))
    context = Context(7, 3, {"state-dir": str(tmp_path / "s")}, RecordDict(), {})
    path = save_scaler(context, scaler)
    assert path is not None and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = load_scaler(context)
    assert again is not None and np.array_equal(again.scale, scaler.scale)
    other_run = Context(8, 3, {"state-dir": str(tmp_path / "s")}, RecordDict(), {})
    assert load_scaler(other_run) is None
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    linked = Context(7, 3, {"state-dir": str(tmp_path / "link")}, RecordDict(), {})
    with pytest.raises(ValueError, match="symlink"):
        save_scaler(linked, scaler)
    relative = Context(7, 3, {"state-dir": "state"}, RecordDict(), {})
    with pytest.raises(ValueError, match="absolute"):
        load_scaler(relative)


# ------------------------------------------------------- failure is a result
def test_a_missing_column_with_min_nodes_met_leaves_that_site_out(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="flwr"):
        out, _ = run(tmp_path, csv_sites(tmp_path, broken="east"), min_nodes=2)
    values = summary(caplog)
    assert values["status"] == "completed" and values["dropped"] == "east"
    data = json.loads((out / "metrics.json").read_text())
    reasons = {d["site"]: d["reason"] for d in data["rounds"][0]["dropped"]}
    assert "missing columns" in reasons["east"] and "radius_mean" in reasons["east"]


def test_a_missing_column_below_the_minimum_fails_at_once_naming_it(tmp_path, caplog):
    with (
        caplog.at_level(logging.INFO, logger="flwr"),
        pytest.raises(RuntimeError, match=r"failed: node 3 \(east\)"),
    ):
        run(tmp_path, csv_sites(tmp_path, broken="east"), min_nodes=3)
    values = summary(caplog)
    assert values["status"] == "failed" and values["rounds"] == "0"
    assert values["failed"] == "east"
    assert values["reason"].startswith("site 'east': SchemaError:")
    assert "missing columns" in values["reason"]
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert data["status"] == "failed"
    assert data["failed-sites"][0]["site"] == "east"
    assert "feature statistics" in data["error"]


@pytest.mark.parametrize("min_nodes", [2, 3])
def test_a_site_with_another_key_set_is_named_with_the_cause(
    tmp_path, caplog, min_nodes
):
    from flwr_ext.he import create_keys

    ours = create_keys(tmp_path / "keys")
    theirs = create_keys(tmp_path / "other-keys")
    configs = partitions()
    for node, config in configs.items():
        config["site-name"] = ("north", "south", "east")[node - 1]
        config["ckks-context"] = str(theirs.secret if node == 3 else ours.secret)
    with caplog.at_level(logging.INFO, logger="flwr"):
        if min_nodes == 3:
            with pytest.raises(RuntimeError, match=r"failed: node 3 \(east\)"):
                run(tmp_path, configs, min_nodes=3, secure_aggregation="ckks",
                    ckks_server_context=str(ours.server))  # fmt: skip
        else:
            run(tmp_path, configs, min_nodes=2, secure_aggregation="ckks",
                ckks_server_context=str(ours.server))  # fmt: skip
    values = summary(caplog)
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())
    if min_nodes == 3:
        assert values["status"] == "failed" and values["failed"] == "east"
        assert "same `flwr-ext keys create` run" in values["reason"]
        assert data["failed-sites"][0]["site"] == "east"
    else:
        assert values["status"] == "completed" and values["dropped"] == "east"
        assert {"north", "south"} == set(data["rounds"][-1]["sites"])


# ------------------------------------------------------------- log lines
def test_the_superlinks_node_unavailable_reply_names_the_real_node(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="flwr"):
        run(tmp_path, partitions(), unavailable_in={3: 2}, min_nodes=2)
    text = caplog.text
    assert "round 2 train: node 3 (hospital-2) replied with an error: Error: Node " \
           "Unavailable" in text  # fmt: skip
    assert "from node 1" not in text and "not sampled" not in text
    assert "round 2 train: 3 site(s) sampled, 2 replied, 1 with an error, 0 " \
           "missing" in text  # fmt: skip


def test_site_name_is_read_back_only_from_the_marked_prefix():
    assert site_from_reason("site 'st-marys': ValueError: x") == "st-marys"
    assert site_from_reason("<class 'ValueError'>:<'site 'x': y'>") is None


def test_importing_the_privacy_layer_leaves_the_root_logger_alone():
    # Opacus's logging.basicConfig() at import made every ServerApp line print
    # twice in `flwr log` (once as "12/06/2026 01:54:46:INFO:...").
    import subprocess

    code = (
        "import logging, flwr_ext.privacy, flwr_ext.privacy.dpsgd; "
        "print(len(logging.getLogger().handlers))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "0"
