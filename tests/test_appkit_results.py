import csv
import json
import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from flwr_ext.appkit.metrics import make_metrics_aggregator
from flwr_ext.appkit.plots import plot_bars, plot_rounds
from flwr_ext.appkit.recorder import RecordingGrid, site_record
from flwr_ext.appkit.results import (
    OUTPUT_OPTIONS,
    ResultsWriter,
    default_output_root,
    parse_summary,
    resolve_output_dir,
    round_history,
    summary_line,
)
from flwr_ext.inprocess import InProcessGrid


def _site(name: str, quality: float, *, fail_train: bool = False) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg, context):
        if fail_train:
            raise RuntimeError("disk full")
        arrays = msg.content["arrays"]
        w = arrays["w"].numpy() + quality
        return Message(
            RecordDict(
                {"arrays": ArrayRecord({"w": Array(w)}),
                 "metrics": MetricRecord({"num-examples": 10, "train-loss": quality,
                                          "hist": [1, 2]})}
            ),
            reply_to=msg,
        )  # fmt: skip

    @app.evaluate()
    def evaluate(msg, context):
        return Message(
            RecordDict(
                {"metrics": MetricRecord({"num-examples": 5, "auroc": quality}),
                 "site": site_record(name)}
            ),
            reply_to=msg,
        )  # fmt: skip

    return app


class CrashingGrid(InProcessGrid):
    """Node ``crashed`` stops answering from ``crash_round`` on, yet stays listed,
    as a killed SuperNode does until its heartbeat expires."""

    crashed, crash_round = 2, 2

    def push_messages(self, messages):
        ids = []
        for i, message in enumerate(messages):
            config = message.content.config_records.get("config", {})
            if (
                int(message.metadata.dst_node_id) == self.crashed
                and int(config.get("server-round", 0)) >= self.crash_round
            ):
                ids.append(f"lost-{id(message)}-{i}")
                continue
            ids.extend(super().push_messages([message]))
        return ids


def _run(rounds: int = 3):
    inner = CrashingGrid(
        {1: _site("hospital-a", 0.9), 2: _site("hospital-b", 0.8),
         3: _site("hospital-c", 0.7, fail_train=True)}
    )  # fmt: skip
    grid = RecordingGrid(inner)
    strategy = FedAvg(
        min_available_nodes=2,
        train_metrics_aggr_fn=make_metrics_aggregator(()),
        evaluate_metrics_aggr_fn=make_metrics_aggregator(()),
    )
    arrays = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=rounds)
    return grid, result


def test_recording_grid_keeps_per_site_metrics_and_names_dropouts(caplog):
    with caplog.at_level(logging.WARNING, logger="flwr"):
        grid, result = _run()
    train1 = grid.phases["train"][1]
    assert train1.sampled == [1, 2, 3]
    assert set(train1.per_node) == {1, 2} and "hist" not in train1.per_node[1]
    assert "disk full" in train1.failed[3]
    assert grid.phases["train"][2].missing == [2]
    assert grid.site_names == {1: "hospital-a", 2: "hospital-b", 3: "hospital-c"}
    # The dropout is named by node id and by the site name learned in round 1.
    assert "round 2 train: node 2 (hospital-b) sent no reply" in caplog.text
    assert "node 3 (hospital-c) replied with an error" in caplog.text
    events = grid.dropouts()
    assert {(e["round"], e["site"]) for e in events} >= {(2, "hospital-b")}

    history = round_history(grid, result)
    assert [e["round"] for e in history] == [1, 2, 3]
    first = history[0]
    assert list(first["sites"]) == ["hospital-a", "hospital-b", "hospital-c"]
    assert first["sites"]["hospital-a"]["evaluate"]["auroc"] == 0.9
    assert first["aggregated"]["evaluate"]["auroc-site-mean"] == pytest.approx(
        (0.9 * 5 + 0.8 * 5 + 0.7 * 5) / 15
    )
    assert "hospital-b" not in history[1]["sites"]
    assert any(d["site"] == "hospital-b" for d in history[1]["dropped"])


def test_site_names_are_sanitised_and_unique():
    inner = InProcessGrid({1: _site("a/../b\n", 0.9), 2: _site("a/../b\n", 0.9)})
    grid = RecordingGrid(inner)
    FedAvg(min_available_nodes=2).start(
        grid=grid, initial_arrays=ArrayRecord({"w": Array(np.zeros(2))}), num_rounds=1
    )
    names = grid.site_names
    assert sorted(names.values())[0] == "a_.._b"
    assert sorted(names.values())[1] in {"a_.._b@1", "a_.._b@2"}
    assert all(n == "a_.._b" or n == f"a_.._b@{i}" for i, n in names.items())


def test_results_writer_writes_json_csv_model_and_plots(tmp_path):
    grid, result = _run()
    history = round_history(grid, result)
    writer = ResultsWriter(tmp_path / "out")
    json_path, csv_path = writer.write_metrics(history, run={"app": "t", "x": 1.0})
    data = json.loads(json_path.read_text())
    assert data["app"] == "t" and len(data["rounds"]) == 3
    rows = list(csv.DictReader(csv_path.open()))
    assert {"round", "site", "node-id", "phase", "auroc", "train-loss"} <= set(rows[0])
    assert {r["site"] for r in rows} == {"all", "hospital-a", "hospital-b",
                                         "hospital-c"}  # fmt: skip
    model = writer.write_arrays(result.arrays)
    assert set(np.load(model)) == {"w"}
    png = plot_rounds(history, "auroc", writer.path("auroc.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_rounds(history, "epsilon", writer.path("e.png")) is None
    bars = plot_bars(["a", "b"], [0.9, 0.95], writer.path("b.png"), title="t",
                     ylabel="AUROC", errors=[0.01, 0.02], reference=0.97)  # fmt: skip
    assert bars.stat().st_size > 1000


def test_results_writer_fails_early_on_unwritable_or_relative_folders(tmp_path):
    with pytest.raises(ValueError, match="absolute"):
        ResultsWriter("relative/out")  # type: ignore[arg-type]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="cannot write results"):
        ResultsWriter(blocker / "out")


def test_output_dir_resolution(tmp_path, monkeypatch):
    assert resolve_output_dir(str(tmp_path), "app", 7) == tmp_path
    with pytest.raises(ValueError, match="absolute"):
        resolve_output_dir("out", "app", 7)
    monkeypatch.setenv("FLWR_EXT_OUTPUT_ROOT", str(tmp_path / "root"))
    default = resolve_output_dir("", "app", 7)
    assert default.parent == tmp_path / "root" / "app"
    assert default.name.endswith("-run-7")
    monkeypatch.delenv("FLWR_EXT_OUTPUT_ROOT")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_output_root() == tmp_path / "xdg" / "flwr-ext" / "outputs"
    with pytest.raises(ValueError, match="absolute path"):
        OUTPUT_OPTIONS[0].parse("rel/dir")


def test_summary_line_is_one_parseable_line():
    line = summary_line("hd", {"auroc": 0.98765, "sites": 3, "output": "/a b",
                               "eps": float("nan")})  # fmt: skip
    assert line == (
        'flwr-ext result: app=hd auroc=0.9877 sites=3 output="/a b" eps=nan'
    )


def test_parse_summary_reads_back_the_last_line_of_its_app():
    tricky = {"path": '/data/o\'brien \\ "x"', "site": "Zürich", "empty": ""}
    log = "\n".join([
        "INFO :      " + summary_line("hd", {"auroc": 0.5, **tricky}),
        "INFO :      " + summary_line("other-app", {"auroc": 0.1}),
        "INFO :      " + summary_line("hd", {"auroc": 0.98765, "sites": 3, **tricky}),
        "INFO :      run finished",
    ])  # fmt: skip
    assert parse_summary(log, "hd") == {"auroc": "0.9877", "sites": "3", **tricky}
    assert parse_summary(log, "other-app") == {"auroc": "0.1000"}
    with pytest.raises(ValueError, match=r"(?s)app=bank.*did not finish.*run finished"):
        parse_summary(log, "bank")


class UnavailableGrid(InProcessGrid):
    """Node 2 is gone: the "SuperLink" answers for it, from node 0, as Flower's
    does once a node's heartbeat has expired (ErrorCode.NODE_UNAVAILABLE)."""

    def push_messages(self, messages):
        ids = []
        for message in messages:
            if int(message.metadata.dst_node_id) != 2:
                ids.extend(super().push_messages([message]))
                continue
            message_id = f"gone-{id(message)}"
            message.metadata.__dict__["_message_id"] = message_id
            error = Message(Error(code=5, reason="Node Unavailable"), reply_to=message)
            error.metadata.__dict__["_src_node_id"] = 0
            self._replies[message_id] = error
            ids.append(message_id)
        return ids


def test_superlink_errors_for_an_unavailable_node_are_attributed_to_that_node(
    caplog,
):
    grid = RecordingGrid(
        UnavailableGrid({1: _site("a", 0.9), 2: _site("b", 0.8), 3: _site("c", 0.7)})
    )
    with caplog.at_level(logging.WARNING, logger="flwr"):
        FedAvg(min_available_nodes=2).start(
            grid=grid,
            initial_arrays=ArrayRecord({"w": Array(np.zeros(2, np.float32))}),
            num_rounds=1,
        )
    record = grid.phases["train"][1]
    assert record.failed == {2: "Node Unavailable"} and record.missing == []
    assert "node 2 replied with an error: Node Unavailable" in caplog.text
