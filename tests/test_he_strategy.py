"""HomomorphicAggregation + ckks_mod with real Flower strategies, apps and Messages.

Every federation here is an :class:`~flwr_ext.inprocess.InProcessGrid`: Flower's real
``Strategy.start()`` loop, real ``ClientApp`` objects with their mods, messages
serialised through Flower's protobuf, real TenSEAL ciphertexts.
"""

from __future__ import annotations

import logging
import os
import sys
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
from flwr.app.message_type import MessageType
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Krum,
    QFedAvg,
)

from flwr_ext.he import (
    SECRET_FILE,
    SERVER_FILE,
    CiphertextSum,
    decrypt_record,
    encrypt_record,
    is_encrypted,
    load_keys,
)
from flwr_ext.he.codec import EncryptedHeader, chunks, pack
from flwr_ext.mods import ckks_mod
from flwr_ext.strategy import HomomorphicAggregation, TrimmedMean
from flwr_ext.strategy.round_report import NoModelError

from .he_fixtures import grid_for, secret_config, toy_client_app, toy_model

NODES = (1, 2, 3)


def initial_model() -> ArrayRecord:
    return toy_model()


def make_app(mods: list, value_of=None) -> ClientApp:
    """Noisy local steps: w += N(0.5, 0.2), b -= 0.1 * (pid + 1), steps += 1."""

    def update(pid: int, msg: Message) -> dict:
        arrays = msg.content["arrays"]
        rng = np.random.default_rng(
            1000 * pid + int(msg.content["config"]["server-round"])
        )
        w = arrays["w"].numpy() + rng.normal(0.5, 0.2, size=(4, 3))
        if value_of is not None:
            w = w * 0 + value_of(pid)
        return {
            "w": w.astype(np.float32),
            "b": (arrays["b"].numpy() - 0.1 * (pid + 1)).astype(np.float32),
            "steps": np.asarray(arrays["steps"].numpy() + 1, dtype=np.int64),
        }

    return toy_client_app(
        mods, update, train_metrics=lambda pid: {"loss": float(pid)},
        evaluate_examples=5,
    )  # fmt: skip


def run(strategy, apps, rounds=3, **grid_kwargs):
    grid = grid_for(apps, **grid_kwargs)
    return strategy.start(grid=grid, initial_arrays=initial_model(), num_rounds=rounds)


def assert_models_close(a: ArrayRecord, b: ArrayRecord, atol: float) -> None:
    """Same keys, shapes and values; ``a`` keeps the initial model's dtypes.

    (Flower's own FedAvg turns the int64 ``steps`` into float64; flwr-ext keeps
    every array's dtype, so only the values of ``b`` are compared.)
    """
    assert list(a.keys()) == list(b.keys())
    initial = initial_model()
    for key in a:
        x, y = a[key].numpy(), b[key].numpy()
        assert x.shape == y.shape, key
        assert x.dtype == initial[key].numpy().dtype, key
        np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=key)


# ---------------------------------------------------------------- equivalence
@pytest.mark.parametrize("wire", ["packed", "tenseal", "seeded"])
@pytest.mark.parametrize("inner", [FedAvg, lambda: FedProx(proximal_mu=0.1)])
def test_encrypted_fedavg_equals_plaintext_fedavg(keys_dir, wire, inner):
    plain = run(inner(), {n: make_app([]) for n in NODES})
    strategy = HomomorphicAggregation(inner(), keys_dir / SERVER_FILE, wire=wire)
    encrypted = run(
        strategy,
        {n: make_app([ckks_mod]) for n in NODES},
        node_config=secret_config(keys_dir),
    )
    # The global model stays encrypted at the server ...
    assert is_encrypted(encrypted.arrays)
    # ... and a key holder decrypts it to the plaintext FedAvg result.
    decrypted = decrypt_record(encrypted.arrays, load_keys(keys_dir / SECRET_FILE))
    assert decrypted.contributions == 3
    assert_models_close(decrypted.arrays, plain.arrays, atol=1e-5)
    # Client-side evaluation saw the decrypted model every round.
    for rnd in (1, 2, 3):
        assert encrypted.evaluate_metrics_clientapp[rnd]["w-sum"] == pytest.approx(
            plain.evaluate_metrics_clientapp[rnd]["w-sum"], abs=1e-4
        )
        metrics = encrypted.train_metrics_clientapp[rnd]
        assert metrics["ckks-summed"] == 3 and metrics["ckks-dropped"] == 0
        assert metrics["loss"] == pytest.approx(
            plain.train_metrics_clientapp[rnd]["loss"]
        )


def test_global_model_sent_to_clients_is_ciphertext_from_round_2(keys_dir):
    seen: list[tuple[int, bool]] = []

    def spy(msg, context, call_next):  # sits *outside* ckks_mod: sees the wire
        if msg.metadata.message_type == "train":
            round_ = int(msg.content["config"]["server-round"])
            seen.append((round_, is_encrypted(msg.content["arrays"])))
            reply = call_next(msg, context)
            assert is_encrypted(reply.content["arrays"])  # what leaves the node
            return reply
        return call_next(msg, context)

    strategy = HomomorphicAggregation(FedAvg(), keys_dir / SERVER_FILE)
    run(strategy, {n: make_app([spy, ckks_mod]) for n in NODES},
        node_config=secret_config(keys_dir))  # fmt: skip
    assert sorted(set(seen)) == [(1, False), (2, True), (3, True)]


def test_decrypt_aggregate_mode_runs_fedadam_and_server_side_evaluation(keys_dir):
    evaluated: list[int] = []

    def evaluate_fn(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        assert not is_encrypted(arrays)
        evaluated.append(rnd)
        return MetricRecord({"w-mean": float(arrays["w"].numpy().mean())})

    plain = FedAdam(eta=0.1).start(
        grid=grid_for({n: make_app([]) for n in NODES}),
        initial_arrays=initial_model(),
        num_rounds=3,
        evaluate_fn=evaluate_fn,
    )
    strategy = HomomorphicAggregation(
        FedAdam(eta=0.1), keys_dir / SERVER_FILE, mode="decrypt-aggregate"
    )
    result = strategy.start(
        grid=grid_for(
            {n: make_app([ckks_mod]) for n in NODES},
            node_config=secret_config(keys_dir),
            per_node={2: {"ckks-decrypt-for-server": True}},
        ),
        initial_arrays=initial_model(),
        num_rounds=3,
        evaluate_fn=evaluate_fn,
    )
    assert not is_encrypted(result.arrays)
    # Adam moves the int64 step counter by fractions: Flower's FedAdam turns it
    # into float64, flwr-ext casts it back to int64, so compare the float arrays.
    for key in ("w", "b"):
        np.testing.assert_allclose(
            result.arrays[key].numpy(), plain.arrays[key].numpy(), atol=1e-5
        )
        assert result.arrays[key].numpy().dtype == np.float32
    assert result.arrays["steps"].numpy().dtype == np.int64
    assert evaluated == [0, 1, 2, 3, 0, 1, 2, 3]


def test_decrypt_aggregate_without_an_opted_in_node_keeps_the_model(keys_dir, caplog):
    strategy = HomomorphicAggregation(
        FedAvg(), keys_dir / SERVER_FILE, mode="decrypt-aggregate"
    )
    with (
        caplog.at_level(logging.WARNING, logger="flwr"),
        pytest.raises(NoModelError, match="none of the 1 rounds produced a model"),
    ):
        run(strategy, {n: make_app([ckks_mod]) for n in NODES}, rounds=1,
            node_config=secret_config(keys_dir))  # fmt: skip
    assert "no replying node has opted in" in caplog.text


# ------------------------------------------------------- the server's keys
def test_server_never_opens_the_secret_context(keys_dir):
    """Audit every file the server-side code opens during a whole run."""
    secret = str((keys_dir / SECRET_FILE).resolve())
    opened: list[str] = []
    state = {"server": False}

    def audit(event: str, args: tuple) -> None:
        if state["server"] and event == "open" and isinstance(args[0], (str, Path)):
            opened.append(os.path.realpath(args[0]))

    sys.addaudithook(audit)  # hooks cannot be removed; `state` switches it off

    class ServerSide(HomomorphicAggregation):
        """Marks every server-side call so the hook only sees the server."""

    for name in ("configure_train", "aggregate_train", "configure_evaluate",
                 "aggregate_evaluate"):  # fmt: skip
        method = getattr(HomomorphicAggregation, name)

        def marked(self, *args, _method=method, **kwargs):
            state["server"] = True
            try:
                return _method(self, *args, **kwargs)
            finally:
                state["server"] = False

        setattr(ServerSide, name, marked)

    state["server"] = True
    server_keys = load_keys(keys_dir / SERVER_FILE)
    strategy = ServerSide(FedAvg(), server_keys)
    state["server"] = False
    assert not server_keys.context.is_private()
    result = run(strategy, {n: make_app([ckks_mod]) for n in NODES},
                 node_config=secret_config(keys_dir))  # fmt: skip
    assert is_encrypted(result.arrays)
    assert secret not in opened
    # the ckks_mod on the clients did open it (the hook does work)
    assert load_keys(secret).has_secret


def test_server_refuses_a_secret_context(keys_dir):
    with pytest.raises(ValueError, match="server must never have it"):
        HomomorphicAggregation(FedAvg(), keys_dir / SECRET_FILE)


# ------------------------------------------------------------- bad replies
def _tamper(how: str):
    """A mod *outside* ckks_mod that damages the encrypted reply."""

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type != "train" or reply.has_error():
            return reply
        record = reply.content["arrays"]
        header = EncryptedHeader.from_record(record)
        blobs = chunks(record, header)
        if how == "truncate":  # re-packed: the checksum matches, SEAL must refuse
            blobs[-1] = blobs[-1][: len(blobs[-1]) // 3]
            reply.content["arrays"] = pack(header, blobs)
        elif how == "flip":  # transport-style corruption: checksum mismatch
            data = bytearray(record["ckks-00000"].data)
            data[len(data) // 2] ^= 0x40
            arrays = dict(record.items())
            arrays["ckks-00000"] = Array(
                "uint8", (len(data),), record["ckks-00000"].stype, bytes(data)
            )
            reply.content["arrays"] = ArrayRecord(arrays)
        elif how == "drop-chunk":
            arrays = dict(record.items())
            del arrays["ckks-00000"]
            reply.content["arrays"] = ArrayRecord(arrays)
        return reply

    return mod


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("truncate", "does not load"),
        ("flip", "digest mismatch"),
        ("drop-chunk", "expected arrays"),
    ],
)
def test_damaged_ciphertext_is_dropped_and_the_round_continues(
    keys_dir, caplog, how, reason
):
    apps = {1: make_app([ckks_mod]), 2: make_app([ckks_mod]),
            3: make_app([_tamper(how), ckks_mod])}  # fmt: skip
    strategy = HomomorphicAggregation(FedAvg(), keys_dir / SERVER_FILE)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = run(strategy, apps, rounds=2, node_config=secret_config(keys_dir))
    drops = [
        r.getMessage() for r in caplog.records if "dropped reply" in r.getMessage()
    ]
    assert len(drops) == 2 and all("node 3" in d and reason in d for d in drops), drops
    assert result.train_metrics_clientapp[2]["ckks-summed"] == 2
    # The aggregate is FedAvg over nodes 1 and 2 only.
    plain = run(FedAvg(), {1: make_app([]), 2: make_app([])}, rounds=2)
    decrypted = decrypt_record(result.arrays, load_keys(keys_dir / SECRET_FILE))
    assert_models_close(decrypted.arrays, plain.arrays, atol=1e-5)


def test_client_with_another_key_set_fails_naming_both_fingerprints(
    keys_dir, other_keys_dir, caplog
):
    strategy = HomomorphicAggregation(FedAvg(), keys_dir / SERVER_FILE)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = run(
            strategy,
            {n: make_app([ckks_mod]) for n in NODES},
            rounds=1,
            node_config=secret_config(keys_dir),
            per_node={3: secret_config(other_keys_dir)},
        )
    ours = (keys_dir / "fingerprint.txt").read_text().strip()
    theirs = (other_keys_dir / "fingerprint.txt").read_text().strip()
    drops = [
        r.getMessage() for r in caplog.records if "dropped reply" in r.getMessage()
    ]
    assert len(drops) == 1 and "node 3" in drops[0]
    assert ours in drops[0] and theirs in drops[0]
    assert result.train_metrics_clientapp[1]["ckks-summed"] == 2


def test_values_beyond_the_bound_fail_on_the_client_before_sending(keys_dir, caplog):
    sent: list[str] = []

    def wire_spy(msg, context, call_next):  # outside ckks_mod: sees what leaves
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train":
            sent.append(
                f"error: {reply.error.reason}" if reply.has_error() else "content"
            )
        return reply

    huge = {1: make_app([ckks_mod]), 2: make_app([ckks_mod]),
            3: make_app([wire_spy, ckks_mod], value_of=lambda pid: 1e9)}  # fmt: skip
    strategy = HomomorphicAggregation(FedAvg(), keys_dir / SERVER_FILE)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = run(strategy, huge, rounds=1, node_config=secret_config(keys_dir))
    assert len(sent) == 1 and sent[0].startswith("error: ckks_mod")  # no update
    assert "per-client budget" in sent[0]
    assert "per-client budget" in caplog.text and "node 3" in caplog.text
    assert result.train_metrics_clientapp[1]["ckks-summed"] == 2


def test_plaintext_reply_is_dropped_unread(keys_dir, caplog):
    apps = {1: make_app([ckks_mod]), 2: make_app([ckks_mod]), 3: make_app([])}
    strategy = HomomorphicAggregation(FedAvg(), keys_dir / SERVER_FILE)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        run(strategy, apps, rounds=1, node_config=secret_config(keys_dir))
    assert "node 3: the update is not encrypted" in caplog.text


def test_too_few_valid_replies_keep_the_previous_model(keys_dir, caplog):
    apps = {1: make_app([ckks_mod]), 2: make_app([])}
    strategy = HomomorphicAggregation(FedAvg(), keys_dir / SERVER_FILE)
    with (
        caplog.at_level(logging.WARNING, logger="flwr"),
        pytest.raises(NoModelError) as err,
    ):
        run(strategy, apps, rounds=1, node_config=secret_config(keys_dir))
    assert "fewer than min_replies=2" in caplog.text
    result = err.value.result  # the run failed: no round produced a model
    assert len(result.arrays) == 0
    assert result.train_metrics_clientapp[1]["ckks-summed"] == 1


# --------------------------------------------------------------- the mod
def _one_train_message(strategy_or_none, keys_dir, node_config, app):
    grid = grid_for({1: app}, node_config=node_config)
    if strategy_or_none is None:
        strategy_or_none = FedAvg(min_train_nodes=1, min_available_nodes=1)
    messages = list(
        strategy_or_none.configure_train(1, initial_model(), ConfigRecord(), grid)
    )
    return grid.send_and_receive(messages)


def test_mod_fails_closed_against_a_plaintext_server(keys_dir):
    replies = list(
        _one_train_message(
            None, keys_dir, secret_config(keys_dir), make_app([ckks_mod])
        )
    )
    assert replies[0].has_error()
    assert "refusing to send the update in plaintext" in replies[0].error.reason


def test_mod_without_a_context_says_how_to_configure_it(keys_dir, monkeypatch):
    monkeypatch.delenv("FLWR_EXT_CKKS_CONTEXT", raising=False)
    strategy = HomomorphicAggregation(
        FedAvg(min_train_nodes=1, min_available_nodes=1), keys_dir / SERVER_FILE
    )
    replies = list(_one_train_message(strategy, keys_dir, {}, make_app([ckks_mod])))
    assert replies[0].has_error()
    assert "ckks-context" in replies[0].error.reason
    assert "FLWR_EXT_CKKS_CONTEXT" in replies[0].error.reason


def test_mod_reads_the_context_path_from_the_environment(keys_dir, monkeypatch):
    monkeypatch.setenv("FLWR_EXT_CKKS_CONTEXT", str(keys_dir / SECRET_FILE))
    strategy = HomomorphicAggregation(
        FedAvg(min_train_nodes=1, min_available_nodes=1),
        keys_dir / SERVER_FILE,
        min_replies=1,
    )
    replies = list(_one_train_message(strategy, keys_dir, {}, make_app([ckks_mod])))
    assert not replies[0].has_error()
    assert is_encrypted(replies[0].content["arrays"])


def test_evaluate_reply_cannot_leak_the_decrypted_model(keys_dir):
    app = ClientApp(mods=[ckks_mod])

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:  # echoes the model
        return Message(
            RecordDict({"arrays": msg.content["arrays"],
                        "metrics": MetricRecord({"num-examples": 1})}),
            reply_to=msg,
        )  # fmt: skip

    secret = load_keys(keys_dir / SECRET_FILE)
    total = CiphertextSum(load_keys(keys_dir / SERVER_FILE), None, "packed")
    for _ in range(2):
        total.add(encrypt_record(initial_model(), secret, 1.0, num_clients=2), "n")
    strategy = FedAvg(min_evaluate_nodes=1, min_available_nodes=1)
    grid = grid_for({1: app}, node_config=secret_config(keys_dir))
    messages = strategy.configure_evaluate(1, total.result(), ConfigRecord(), grid)
    reply = next(iter(grid.send_and_receive(messages)))
    assert not reply.has_error()
    assert not reply.content.array_records
    assert reply.content["metrics"]["num-examples"] == 1


def test_decryption_requests_need_opt_in_and_enough_contributions(keys_dir):
    secret = load_keys(keys_dir / SECRET_FILE)

    def aggregate_of(n: int) -> ArrayRecord:
        total = CiphertextSum(load_keys(keys_dir / SERVER_FILE), None, "packed")
        for _ in range(n):
            total.add(encrypt_record(initial_model(), secret, 1.0, num_clients=n), "n")
        return total.result()

    def ask(record: ArrayRecord, node_config: dict) -> Message:
        grid = grid_for({1: make_app([ckks_mod])}, node_config=node_config)
        request = Message(
            RecordDict({"arrays": record,
                        "config": ConfigRecord({"ckks-decrypt-request": True})}),
            dst_node_id=1,
            message_type=MessageType.TRAIN,
        )  # fmt: skip
        return next(iter(grid.send_and_receive([request])))

    opted_in = {**secret_config(keys_dir), "ckks-decrypt-for-server": True}
    assert "not opted in" in ask(aggregate_of(3), secret_config(keys_dir)).error.reason
    assert "at least 2" in ask(aggregate_of(1), opted_in).error.reason
    single_update = encrypt_record(initial_model(), secret, 1.0)
    assert "only aggregates" in ask(single_update, opted_in).error.reason
    answer = ask(aggregate_of(3), opted_in)
    assert not answer.has_error()
    assert answer.content["metrics"]["ckks-contributions"] == 3
    assert_models_close(answer.content["arrays"], initial_model(), atol=1e-6)


# ---------------------------------------------------------- composition
@pytest.mark.parametrize(
    ("inner", "match"),
    [
        (lambda: FedAdam(), "plaintext aggregate"),
        (lambda: FedYogi(), "plaintext aggregate"),
        (lambda: FedAvgM(), "plaintext aggregate"),
        (lambda: QFedAvg(client_learning_rate=0.1), "plaintext aggregate"),
        (lambda: Krum(), "ciphertexts"),
        (lambda: DifferentialPrivacyServerSideFixedClipping(FedAvg(), 1.0, 1.0, 3),
         "DP wrapper inside homomorphic"),
    ],
)  # fmt: skip
def test_compositions_needing_plaintext_are_refused(keys_dir, inner, match):
    with pytest.raises(ValueError, match=match):
        HomomorphicAggregation(inner(), keys_dir / SERVER_FILE)


def test_custom_aggregation_is_refused_unless_decrypt_aggregate(keys_dir):
    class Custom(FedAvg):
        def aggregate_train(self, server_round, replies):
            return super().aggregate_train(server_round, replies)

    with pytest.raises(ValueError, match="never calls the inner"):
        HomomorphicAggregation(Custom(), keys_dir / SERVER_FILE)
    HomomorphicAggregation(Custom(), keys_dir / SERVER_FILE, mode="decrypt-aggregate")
    HomomorphicAggregation(FedAdam(), keys_dir / SERVER_FILE, mode="decrypt-aggregate")


def test_robust_rules_refuse_to_wrap_homomorphic_aggregation(keys_dir):
    with pytest.raises(ValueError, match="ciphertexts"):
        TrimmedMean(HomomorphicAggregation(FedAvg(), keys_dir / SERVER_FILE))


def test_server_side_evaluation_is_refused_when_encrypted(keys_dir):
    strategy = HomomorphicAggregation(FedAvg(), keys_dir / SERVER_FILE)
    with pytest.raises(ValueError, match="server-side evaluation"):
        strategy.start(
            grid=grid_for({n: make_app([ckks_mod]) for n in NODES}),
            initial_arrays=initial_model(),
            num_rounds=1,
            evaluate_fn=lambda rnd, arrays: None,
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "magic"}, "mode must be one of"),
        ({"wire": "zip"}, "unknown CKKS wire format"),
        ({"weight_unit": 0.0}, "weight_unit"),
        ({"weight_unit": float("nan")}, "weight_unit"),
        ({"min_replies": 0}, "min_replies"),
        ({"decrypt_timeout": -1.0}, "decrypt_timeout"),
    ],
)
def test_config_typos_fail_at_construction(keys_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        HomomorphicAggregation(FedAvg(), keys_dir / SERVER_FILE, **kwargs)


def test_a_fixed_weight_unit_gives_the_same_average(keys_dir):
    plain = run(FedAvg(), {n: make_app([]) for n in NODES}, rounds=2)
    strategy = HomomorphicAggregation(
        FedAvg(), keys_dir / SERVER_FILE, weight_unit=1000.0
    )
    encrypted = run(strategy, {n: make_app([ckks_mod]) for n in NODES}, rounds=2,
                    node_config=secret_config(keys_dir))  # fmt: skip
    decrypted = decrypt_record(encrypted.arrays, load_keys(keys_dir / SECRET_FILE))
    assert decrypted.total_weight == pytest.approx(0.06, rel=1e-6)
    assert_models_close(decrypted.arrays, plain.arrays, atol=1e-5)
