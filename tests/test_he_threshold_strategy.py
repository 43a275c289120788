"""ThresholdHomomorphicAggregation + ckks_mod through real Flower Messages.

An InProcessGrid runs Flower's real ``Strategy.start()`` loop and real ClientApps
(mods included; every message crosses Flower's protobuf serialisation) with real
SEAL ciphertexts: collective key generation, public-key encryption, flooded
partial decryptions.
"""

from __future__ import annotations

import logging

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
from flwr.app.message_type import MessageType
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdam, FedAvg

from flwr_ext.he.threshold_protocol import (
    KEY_CONTRIBUTIONS,
    KEY_KEYSET,
    KEY_OP,
    KEY_ROUND,
    OP_DECRYPT,
    residue_record,
)
from flwr_ext.inprocess import InProcessGrid
from flwr_ext.mods import ckks_mod
from flwr_ext.strategy import (
    NoModelError,
    ThresholdHomomorphicAggregation,
    TrimmedMean,
)

NUM_CLIENTS = 10


def initial_model() -> ArrayRecord:
    return ArrayRecord(
        {
            "w": Array(np.zeros((90, 100), np.float32)),
            "b": Array(np.zeros(100, np.float64)),
        }
    )


def make_app(mods: list, cheat_weight: int | None = None) -> ClientApp:
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        rng = np.random.default_rng(1000 * pid + rnd)
        arrays = msg.content["arrays"]
        w = np.clip(arrays["w"].numpy() + rng.uniform(-3, 3, (90, 100)), -10, 10)
        b = np.clip(arrays["b"].numpy() + rng.uniform(-3, 3, 100), -10, 10)
        out = ArrayRecord(
            {"w": Array(w.astype(np.float32)), "b": Array(b.astype(np.float64))}
        )
        examples = 10 * (pid + 1)
        metrics = MetricRecord({"num-examples": examples, "loss": float(pid)})
        return Message(RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        w = msg.content["arrays"]["w"].numpy()
        metrics = MetricRecord({"num-examples": 5, "w-sum": float(w.sum())})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def grid_for(apps: dict, share_dir, extra: dict | None = None) -> InProcessGrid:
    for node in apps:  # each site its own directory, as on its own machine
        (share_dir / f"site{node}").mkdir(exist_ok=True)
    configs = {
        node: {
            "partition-id": node - 1,
            "ckks-threshold-dir": str(share_dir / f"site{node}"),
            "site-name": f"hospital-{node}",
            **((extra or {}).get(node, {})),
        }
        for node in apps
    }
    return InProcessGrid(apps, node_configs=configs)


def run(strategy, apps, share_dir, rounds=2, extra=None, grid=None):
    grid = grid or grid_for(apps, share_dir, extra)
    result = strategy.start(
        grid=grid, initial_arrays=initial_model(), num_rounds=rounds
    )
    return result, grid


def nodes() -> range:
    return range(1, NUM_CLIENTS + 1)


def assert_close(a: ArrayRecord, b: ArrayRecord, atol: float) -> None:
    for key in a:
        np.testing.assert_allclose(
            a[key].numpy(), b[key].numpy(), atol=atol, rtol=0, err_msg=key
        )
        assert a[key].numpy().dtype == initial_model()[key].numpy().dtype


@pytest.mark.parametrize("inner", [FedAvg, lambda: FedAdam(eta=0.1)])
def test_threshold_aggregation_equals_plaintext(tmp_path, inner):
    plain = InProcessGrid(
        {n: make_app([]) for n in nodes()},
        node_configs={n: {"partition-id": n - 1} for n in nodes()},
    )
    expected = inner().start(grid=plain, initial_arrays=initial_model(), num_rounds=2)
    strategy = ThresholdHomomorphicAggregation(inner())
    result, _ = run(strategy, {n: make_app([ckks_mod]) for n in nodes()}, tmp_path)
    # 10 clients, |values| <= 10: the bound
    assert_close(result.arrays, expected.arrays, atol=1e-5)
    metrics = result.train_metrics_clientapp[2]
    assert metrics["ckks-summed"] == NUM_CLIENTS and metrics["ckks-dropped"] == 0
    # every site keeps its own share file (0600); the server has none
    assert len(list(tmp_path.glob("site*/*.share"))) == NUM_CLIENTS


def test_a_missing_site_keeps_the_model_and_is_named(tmp_path, caplog):
    apps = {n: make_app([ckks_mod]) for n in range(1, 4)}
    strategy = ThresholdHomomorphicAggregation(FedAvg())
    grid = grid_for(apps, tmp_path)
    strategy.setup(grid)

    original = strategy._decrypt

    def decrypt_after_a_crash(server_round, blobs, valid):
        grid.set_offline(3)  # hospital-3 crashes after sending its update
        return original(server_round, blobs, valid)

    strategy._decrypt = decrypt_after_a_crash
    # The only round trains nothing: a failed run (NoModelError), never a
    # "completed" one, with the missing site named.
    with caplog.at_level(logging.WARNING), pytest.raises(NoModelError) as failed:
        strategy.start(grid=grid, initial_arrays=initial_model(), num_rounds=1)
    assert "hospital-3: no partial decryption" in caplog.text
    assert_close(failed.value.result.arrays, initial_model(), atol=0)  # kept


def test_a_client_lying_about_its_weight_costs_one_round(tmp_path, caplog):
    """A client encrypting another weight than it claims is caught by the slot
    check; the round keeps the previous model and the next round recovers."""
    calls = {"n": 0}

    def liar(msg, context, call_next):
        reply = call_next(msg, context)
        if (
            msg.metadata.message_type == "train"
            and calls["n"] == 0
            and (
                int(context.node_config["partition-id"]) == 0
                and "arrays" in reply.content
            )
        ):
            calls["n"] += 1
            reply.content["metrics"]["num-examples"] = 1000  # claims far more
        return reply

    apps = {n: make_app([liar, ckks_mod]) for n in range(1, 4)}  # lies on the wire
    strategy = ThresholdHomomorphicAggregation(FedAvg())
    with caplog.at_level(logging.WARNING):
        result, _ = run(strategy, apps, tmp_path, rounds=2)
    assert "fails its check" in caplog.text
    assert "round 1" in caplog.text
    assert result.train_metrics_clientapp[2]["ckks-summed"] == 3
    assert not np.allclose(result.arrays["w"].numpy(), 0)  # round 2 trained


def _decrypt_request(keyset: str, server_round: int, contributions: int, c1s):
    return Message(
        content=RecordDict(
            {
                "c1": residue_record("c1", c1s),
                "config": ConfigRecord(
                    {
                        KEY_OP: OP_DECRYPT,
                        KEY_KEYSET: keyset,
                        KEY_ROUND: server_round,
                        KEY_CONTRIBUTIONS: contributions,
                    }
                ),
            }
        ),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )


def test_sites_refuse_replays_small_aggregates_and_unknown_key_sets(tmp_path):
    apps = {n: make_app([ckks_mod]) for n in range(1, 3)}
    strategy = ThresholdHomomorphicAggregation(FedAvg())
    grid = grid_for(apps, tmp_path, extra={1: {"policy-min-contributions": 3}})
    strategy.setup(grid)
    ctx = strategy._context
    c1 = [np.zeros((ctx.k, ctx.n), dtype=np.uint64)]

    def ask(keyset, rnd, contributions):
        (answer,) = grid.send_and_receive(
            [_decrypt_request(keyset, rnd, contributions, c1)]
        )
        return answer

    small = ask(strategy._keyset, 1, 2)
    assert small.has_error() and "policy-min-contributions" in small.error.reason
    first = ask(strategy._keyset, 1, 3)
    assert not first.has_error()
    replay = ask(strategy._keyset, 1, 3)
    assert replay.has_error() and "replay" in replay.error.reason
    unknown = ask("0" * 32, 2, 3)
    assert unknown.has_error() and "no share of key set" in unknown.error.reason


def test_hostile_replies_are_dropped_and_the_round_goes_on(tmp_path, caplog):
    def vandal(msg, context, call_next):
        reply = call_next(msg, context)
        if int(context.node_config["partition-id"]) == 0 and not reply.has_error():
            record = reply.content.array_records.get("arrays")
            if record is not None and "ct-00000" in record:
                data = record["ct-00000"].numpy().copy()
                data[200:260] ^= 0xFF  # damage the ciphertext bytes
                record["ct-00000"] = Array(data)
        return reply

    apps = {n: make_app([vandal, ckks_mod]) for n in range(1, 5)}
    strategy = ThresholdHomomorphicAggregation(FedAvg())
    with caplog.at_level(logging.WARNING):
        result, _ = run(strategy, apps, tmp_path, rounds=1)
    assert "dropped reply from hospital-1" in caplog.text
    assert result.train_metrics_clientapp[1]["ckks-summed"] == 3


def test_a_residue_out_of_range_is_dropped_and_rolled_back_exactly(tmp_path, caplog):
    """A well-formed update (right key set, level, scale, sizes) whose *last*
    ciphertext holds one residue >= its prime: SEAL's load refused it, so must the
    residue sum; its earlier ciphertexts, already added, are subtracted again, so
    the round's aggregate is exactly the other three sites' FedAvg."""
    from flwr_ext.he.threshold import ThresholdContext

    q = ThresholdContext().data_moduli[1]

    def forger(msg, context, call_next):
        reply = call_next(msg, context)
        if int(context.node_config["partition-id"]) == 0 and not reply.has_error():
            record = reply.content.array_records.get("arrays")
            if record is not None and "ct-00001" in record:
                data = record["ct-00001"].numpy().copy()
                offset = 113 + 8 * (3 * 8192 + 17)  # c1, prime 1, coefficient 17
                data[offset : offset + 8] = np.frombuffer(
                    int(q).to_bytes(8, "little"), np.uint8
                )
                record["ct-00001"] = Array(data)
        return reply

    apps = {n: make_app([forger, ckks_mod]) for n in range(1, 5)}
    strategy = ThresholdHomomorphicAggregation(FedAvg())
    with caplog.at_level(logging.WARNING):
        result, _ = run(strategy, apps, tmp_path, rounds=1)
    assert "dropped reply from hospital-1" in caplog.text
    assert "out of range" in caplog.text
    assert result.train_metrics_clientapp[1]["ckks-summed"] == 3
    plain = InProcessGrid(
        {n: make_app([]) for n in range(2, 5)},
        node_configs={n: {"partition-id": n - 1} for n in range(2, 5)},
    )
    expected = FedAvg().start(grid=plain, initial_arrays=initial_model(), num_rounds=1)
    assert_close(result.arrays, expected.arrays, atol=1e-5)


def test_two_sites_sharing_one_share_are_refused_at_setup(tmp_path, caplog):
    """A shared share directory would give two sites the same s_i: the server
    sees their public shares differ by a small polynomial and refuses both."""
    apps = {n: make_app([ckks_mod]) for n in range(1, 4)}
    grid = grid_for(
        apps, tmp_path, extra={2: {"ckks-threshold-dir": str(tmp_path / "site1")}}
    )
    strategy = ThresholdHomomorphicAggregation(FedAvg(), min_sites=1)
    with caplog.at_level(logging.WARNING):
        strategy.setup(grid)
    assert "hold the same secret share" in caplog.text
    assert sorted(strategy._sites) == [3]


def test_setup_fails_loudly_with_too_few_sites(tmp_path):
    apps = {1: make_app([ckks_mod])}
    strategy = ThresholdHomomorphicAggregation(FedAvg(), setup_timeout=1)
    with pytest.raises(RuntimeError, match="min_sites=2"):
        strategy.setup(grid_for(apps, tmp_path))


def test_a_site_without_a_share_directory_is_left_out_with_the_reason(tmp_path, caplog):
    apps = {n: make_app([ckks_mod]) for n in range(1, 4)}
    grid = grid_for(apps, tmp_path, extra={3: {"ckks-threshold-dir": ""}})
    strategy = ThresholdHomomorphicAggregation(FedAvg())
    with caplog.at_level(logging.WARNING):
        strategy.setup(grid)
    assert "node 3 left out" in caplog.text and "share directory" in caplog.text
    assert sorted(strategy._sites) == [1, 2]


def test_robust_rules_cannot_wrap_threshold_aggregation():
    with pytest.raises(ValueError):
        TrimmedMean(ThresholdHomomorphicAggregation(FedAvg()))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight_unit": 0}, "weight_unit"),
        ({"min_sites": 0}, "min_sites"),
        ({"decrypt_timeout": -1}, "decrypt_timeout"),
    ],
)
def test_config_typos_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ThresholdHomomorphicAggregation(FedAvg(), **kwargs)


def _stats_app(rows: int, offset: float, layout_twist: bool = False) -> ClientApp:
    app = make_app([ckks_mod])  # Flower dispatches keygen/decrypt to a train handler

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        rng = np.random.default_rng(rows)
        x = rng.normal(offset, 300.0, size=(rows, 4))  # an 'area'-like feature
        metrics = {
            "n": rows,
            "sum": [float(v) for v in x.sum(axis=0)],
            "sumsq": [float(v) for v in np.square(x).sum(axis=0)],
        }
        if layout_twist:
            metrics["extra"] = 1.0
        return Message(RecordDict({"stats": MetricRecord(metrics)}), reply_to=msg)

    return app


def test_secure_sum_releases_only_the_sum_of_the_sites_statistics(tmp_path, caplog):
    apps = {
        1: _stats_app(150, 900.0),
        2: _stats_app(220, 1100.0),
        3: _stats_app(90, 700.0),
    }
    seen_by_server: list[Message] = []
    grid = grid_for(apps, tmp_path)
    original = grid.pull_messages

    def spy(ids):
        replies = list(original(ids))
        seen_by_server.extend(replies)
        return replies

    grid.pull_messages = spy
    strategy = ThresholdHomomorphicAggregation(FedAvg())
    summed, count = strategy.secure_sum(grid, ConfigRecord({"query": "feature-stats"}))
    assert count == 3
    expected = {"n": 0.0, "sum": np.zeros(4), "sumsq": np.zeros(4)}
    for rows, offset in ((150, 900.0), (220, 1100.0), (90, 700.0)):
        x = np.random.default_rng(rows).normal(offset, 300.0, size=(rows, 4))
        expected["n"] += rows
        expected["sum"] += x.sum(axis=0)
        expected["sumsq"] += np.square(x).sum(axis=0)
    assert round(summed["n"]) == 460 and abs(summed["n"] - 460) < 0.1
    np.testing.assert_allclose(summed["sum"], expected["sum"], atol=0.1)
    np.testing.assert_allclose(summed["sumsq"], expected["sumsq"], rtol=1e-9, atol=0.1)
    # What reached the server: encrypted vectors and layouts, no site's numbers.
    answers = [m for m in seen_by_server if "sum" in m.content.array_records]
    assert len(answers) == 3 and all(not m.content.metric_records for m in answers)
    # A second secure sum (a new decryption number) works; a site whose layout
    # differs is dropped and named.
    apps[3] = _stats_app(90, 700.0, layout_twist=True)
    grid._nodes[3] = apps[3]
    with caplog.at_level(logging.WARNING):
        summed, count = strategy.secure_sum(
            grid, ConfigRecord({"query": "feature-stats"})
        )
    assert (
        count == 2 and "layout differs" in caplog.text and "hospital-3" in caplog.text
    )
