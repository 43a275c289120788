"""Attacks on the CKKS protocol (issue 10, items 2, 3, 4 and 6), each written first.

Real Flower strategies, ClientApps and Messages (:class:`InProcessGrid`), real
TenSEAL/SEAL ciphertexts. Every test here failed on the code before the fix
(b2482d6), except the guard that one false refusal does not trigger a rollback:

- item 2: a ``ckks-meta`` that is a list, ``null``, a string, ``1e400`` in a count,
  deeply nested, or that declares a huge shape crashed ``aggregate_train`` (or
  ``ckks_mod``) instead of costing the sender its reply; a decryptor's answer
  with a dtype numpy does not know crashed the server in ``decrypt-aggregate``;
- item 3: one plaintext claim of 1e300 examples moved the weight unit and bricked
  the federation for good; a reply encrypted under another key set that claims
  the right fingerprint poisoned the global model (or bricked the federation);
- item 4: ``DistributedDP`` released (and accounted) a round whose HE sum held
  fewer than t contributions;
- item 6: ``ckks_mod`` decrypted one client's update sent as the global model and
  returned evaluation metrics computed on it;
- and: 8,192 one-byte "ciphertexts" made a client allocate 512 MiB before
  failing; one client with an extra evaluate metric crashed ``start()``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.app.message_type import MessageType
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from flwr_ext.he import (
    SECRET_FILE,
    SERVER_FILE,
    CiphertextSum,
    decrypt_record,
    encrypt_record,
    is_encrypted,
    load_keys,
)
from flwr_ext.he.codec import META_KEY, STYPE_META, EncryptedHeader, chunks, pack
from flwr_ext.inprocess import InProcessGrid
from flwr_ext.mods import ckks_mod, distributed_dp_mod
from flwr_ext.records import unflatten
from flwr_ext.strategy import DistributedDP, HomomorphicAggregation
from flwr_ext.strategy.round_report import NoModelError

from .conftest import StaticGrid
from .he_fixtures import grid_for as he_grid_for
from .he_fixtures import secret_config, toy_client_app, toy_model

NODES = (1, 2, 3)


def initial_model() -> ArrayRecord:
    return toy_model(steps=False)


def make_app(mods: list) -> ClientApp:
    """Deterministic: w += 0.1 * (pid + 1), b -= 0.1; 10 * (pid + 1) examples."""

    def update(pid: int, msg: Message) -> dict:
        arrays = msg.content["arrays"]
        return {
            "w": (arrays["w"].numpy() + 0.1 * (pid + 1)).astype(np.float32),
            "b": (arrays["b"].numpy() - 0.1).astype(np.float32),
        }

    return toy_client_app(mods, update)


def grid_for(apps: dict, keys_dir, per_node: dict | None = None) -> InProcessGrid:
    return he_grid_for(apps, secret_config(keys_dir), per_node)


def plain_fedavg(rounds: int) -> ArrayRecord:
    """The honest federation's model after ``rounds`` effective rounds."""
    grid = InProcessGrid(
        {n: make_app([]) for n in NODES},
        node_configs={n: {"partition-id": n - 1} for n in NODES},
    )
    return (
        FedAvg(fraction_evaluate=0.0)
        .start(grid=grid, initial_arrays=initial_model(), num_rounds=rounds)
        .arrays
    )


def assert_close(a: ArrayRecord, b: ArrayRecord, atol: float = 1e-5) -> None:
    assert list(a.keys()) == list(b.keys())
    for key in a:
        np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), atol=atol, rtol=0)


def train_replies(keys_dir, strategy, nodes=NODES) -> list[Message]:
    """Honest encrypted replies (via the real ckks_mod) to ``strategy``'s round 1."""
    grid = grid_for({n: make_app([ckks_mod]) for n in nodes}, keys_dir)
    messages = list(
        strategy.configure_train(1, initial_model(), ConfigRecord(), StaticGrid(nodes))
    )
    return list(grid.send_and_receive(messages))


def with_meta(reply: Message, meta: bytes) -> Message:
    """``reply`` with its ``ckks-meta`` bytes replaced (chunks untouched)."""
    record = reply.content["arrays"]
    arrays = dict(record.items())
    arrays[META_KEY] = Array("uint8", (len(meta),), STYPE_META, meta)
    content = RecordDict({"arrays": ArrayRecord(arrays),
                          "metrics": reply.content["metrics"]})  # fmt: skip
    return Message(content, metadata=reply.metadata)


def meta_of(reply: Message) -> dict:
    return json.loads(reply.content["arrays"][META_KEY].data)


def _hostile_metas(good: dict) -> dict[str, bytes]:
    def edit(**changes) -> bytes:
        data = json.loads(json.dumps(good))
        for key, value in changes.items():
            if key.startswith("manifest."):
                data["manifest"][key.split(".", 1)[1]] = value
            else:
                data[key] = value
        return json.dumps(data).encode()

    n = good["num_chunks"]
    return {
        "list": b"[]",
        "null": b"null",
        "string": b'"ckks"',
        "number": b"7",
        "num_chunks 1e400": edit().replace(
            f'"num_chunks": {n}'.encode(), b'"num_chunks": 1e400'
        ),
        "digest 1e400": edit().replace(b'"digest": [', b'"digest": [1e400, '),
        "ranks 1e400": edit().replace(b'"ranks": [', b'"ranks": [1e400, '),
        "NaN num_chunks": edit().replace(
            f'"num_chunks": {n}'.encode(), b'"num_chunks": NaN'
        ),
        "deep nesting": b'{"format": 1, "kind": '
        + b"[" * 100_000
        + b"]" * 100_000
        + b"}",
        "huge shape": edit(
            **{"manifest.shapes": [2**62, 3, 3], "manifest.ranks": [2, 1]}
        ),
        "negative shape": edit(**{"manifest.shapes": [-4, 3, 3]}),
        "unknown dtype": edit(**{"manifest.dtypes": ["float-ish", "<f4"]}),
        "object dtype": edit(**{"manifest.dtypes": ["|O", "<f4"]}),
        "kind is a list": edit(kind=["update"]),
        "manifest is a list": edit(manifest=[1, 2]),
        "keys are numbers": edit(**{"manifest.keys": [1, 2]}),
        "digest negative": edit(digest=[-1] * n),
        "digest 2^64": edit(digest=[2**64] * n),
        "num_chunks bool": edit(num_chunks=True),
        "huge int": edit().replace(
            f'"num_chunks": {n}'.encode(), b'"num_chunks": ' + b"9" * 5000
        ),
        "not utf-8": b"\xff\xfe{",
    }


# ------------------------------------------------------------------ item 2
@pytest.mark.parametrize("mode", ["encrypted", "decrypt-aggregate"])
def test_hostile_meta_costs_the_sender_its_reply_never_the_round(keys_dir, mode):
    strategy = HomomorphicAggregation(
        FedAvg(), keys_dir / SERVER_FILE, mode=mode, min_replies=2
    )
    opt_in = {1: {"ckks-decrypt-for-server": True}}
    grid = grid_for({n: make_app([ckks_mod]) for n in NODES}, keys_dir, opt_in)
    messages = list(strategy.configure_train(1, initial_model(), ConfigRecord(), grid))
    replies = sorted(
        grid.send_and_receive(messages), key=lambda r: r.metadata.src_node_id
    )
    assert not any(r.has_error() for r in replies)
    failures = []
    for name, meta in _hostile_metas(meta_of(replies[2])).items():
        try:
            arrays, metrics = strategy.aggregate_train(
                1, [replies[0], replies[1], with_meta(replies[2], meta)]
            )
        except BaseException as err:
            failures.append(f"{name}: {type(err).__name__}")
            continue
        if metrics["ckks-summed"] != 2 or metrics["ckks-dropped"] != 1:
            failures.append(f"{name}: accepted")
        if arrays is None:
            failures.append(f"{name}: no model")
    assert not failures, failures


def test_hostile_meta_in_the_global_model_is_an_error_reply_on_the_client(keys_dir):
    secret = load_keys(keys_dir / SECRET_FILE)
    total = CiphertextSum(load_keys(keys_dir / SERVER_FILE), None, "packed")
    for _ in range(2):
        total.add(encrypt_record(initial_model(), secret, 1.0, num_clients=2), "n")
    good = total.result()
    grid = grid_for({1: make_app([ckks_mod])}, keys_dir)
    failures = []
    for name, meta in _hostile_metas(json.loads(good[META_KEY].data)).items():
        arrays = dict(good.items())
        arrays[META_KEY] = Array("uint8", (len(meta),), STYPE_META, meta)
        instruction = Message(
            RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord()}),
            dst_node_id=1,
            message_type=MessageType.EVALUATE,
        )
        try:
            reply = next(iter(grid.send_and_receive([instruction])))
        except BaseException as err:
            failures.append(f"{name}: {type(err).__name__}")
            continue
        # The mod's own error reply, not an exception turned into one by Flower.
        if not (reply.has_error() and reply.error.reason.startswith("ckks_mod")):
            failures.append(f"{name}: {reply.error if reply.has_error() else 'ok'}")
    assert not failures, failures


def test_many_tiny_chunks_are_refused_before_anything_is_allocated(keys_dir):
    """A global model declaring 2^26 values in 8,192 one-byte "ciphertexts".

    Decrypting it would allocate 8,192 x 8,192 float64 (512 MiB) before the first
    chunk fails to load; it is refused on the byte counts alone.
    """
    from flwr_ext.he.codec import FORMAT_VERSION, chunk_digest, chunk_keys

    keys = load_keys(keys_dir / SERVER_FILE)
    chunks_ = [bytes([i % 256]) for i in range(8192)]
    manifest = {"keys": ["w"], "dtypes": ["<f4"], "ranks": [1],
                "shapes": [8192 * 8192 - 2]}  # fmt: skip
    meta = json.dumps({"format": FORMAT_VERSION, "kind": "model",
                       "profile": keys.profile.name, "fingerprint": keys.fingerprint,
                       "wire": "packed", "manifest": manifest, "num_chunks": 8192,
                       "decryptor": False,
                       "digest": [chunk_digest(c) for c in chunks_],
                       }).encode()  # fmt: skip
    arrays = {META_KEY: Array("uint8", (len(meta),), STYPE_META, meta)}
    for key, blob in zip(chunk_keys(8192), chunks_, strict=True):
        arrays[key] = Array("uint8", (1,), "flwr-ext.ckks.ciphertext", blob)
    reply = _evaluate(keys_dir, ArrayRecord(arrays))
    assert reply.has_error() and "has 1 bytes" in reply.error.reason


def test_hostile_decryption_answer_is_dropped_not_raised(keys_dir, caplog):
    """A decryptor node's answer is hostile input too (decrypt-aggregate)."""
    honest = make_app([ckks_mod])

    def liar(msg: Message, context: Context) -> Message:
        config = msg.content.config_records.get("config", {})
        if not config.get("ckks-decrypt-request"):
            return honest(msg, context)  # trains honestly, opted in to decrypt
        bogus = ArrayRecord(
            {
                "w": Array("no-such-dtype", (4, 3), "numpy.ndarray", b"\x00" * 8),
                "b": Array("float32", (3,), "numpy.ndarray", b"\x00" * 8),
            }
        )
        metrics = MetricRecord({"ckks-total-weight": 6.0, "ckks-contributions": 3})
        return Message(RecordDict({"arrays": bogus, "metrics": metrics}),
                       reply_to=msg)  # fmt: skip

    grid = grid_for({1: liar, 2: honest, 3: honest}, keys_dir,
                    per_node={1: {"ckks-decrypt-for-server": True}})  # fmt: skip
    strategy = HomomorphicAggregation(
        FedAvg(fraction_evaluate=0.0), keys_dir / SERVER_FILE, mode="decrypt-aggregate"
    )
    # A one-round run whose only round produced no model is a failed run
    # (round_report.NoModelError), not a completed one - and nothing else raised.
    with (
        caplog.at_level(logging.WARNING, logger="flwr"),
        pytest.raises(NoModelError) as failed,
    ):
        strategy.start(grid=grid, initial_arrays=initial_model(), num_rounds=1)
    result = failed.value.result
    assert "did not decrypt the aggregate" in caplog.text
    assert len(result.arrays) == 0  # the round kept the previous model


# ------------------------------------------------------------------ item 3
def _lie_in_round(round_: int, how: str, other_keys_dir=None):
    """A mod *outside* ckks_mod on a malicious client (it holds the key too)."""

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if (
            msg.metadata.message_type != MessageType.TRAIN
            or reply.has_error()
            or int(msg.content["config"]["server-round"]) != round_
        ):
            return reply
        if how == "claim":  # plaintext claim only; the ciphertext is honest
            reply.content["metrics"]["num-examples"] = 1e300
        elif how == "foreign-key":  # encrypted under another key set, our fingerprint
            record = reply.content["arrays"]
            header = EncryptedHeader.from_record(record)
            other = load_keys(other_keys_dir / SECRET_FILE)
            zeros = unflatten(np.zeros(header.manifest.size), header.manifest)
            forged = encrypt_record(zeros, other, 1.0, num_clients=3)
            forged_header = EncryptedHeader.from_record(forged)
            reply.content["arrays"] = pack(
                replace(forged_header, fingerprint=header.fingerprint),
                chunks(forged, forged_header),
            )
        return reply

    return mod


def test_one_huge_weight_claim_cannot_brick_the_federation(keys_dir, caplog):
    apps = {1: make_app([ckks_mod]), 2: make_app([ckks_mod]),
            3: make_app([_lie_in_round(1, "claim"), ckks_mod])}  # fmt: skip
    strategy = HomomorphicAggregation(FedAvg(fraction_evaluate=0.0),
                                      keys_dir / SERVER_FILE)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = strategy.start(
            grid=grid_for(apps, keys_dir), initial_arrays=initial_model(), num_rounds=4
        )
    for rnd in (2, 3, 4):
        assert result.train_metrics_clientapp[rnd]["ckks-summed"] == 3, rnd
    decrypted = decrypt_record(result.arrays, load_keys(keys_dir / SECRET_FILE))
    assert decrypted.contributions == 3
    assert 0 < decrypted.total_weight < 1  # honest weights, not moved by the liar


@pytest.mark.parametrize("liar_round", [1, 2])
def test_foreign_key_reply_costs_only_its_round_encrypted_mode(
    keys_dir, other_keys_dir, caplog, liar_round
):
    apps = {1: make_app([ckks_mod]), 2: make_app([ckks_mod]),
            3: make_app([_lie_in_round(liar_round, "foreign-key", other_keys_dir),
                         ckks_mod])}  # fmt: skip
    strategy = HomomorphicAggregation(FedAvg(fraction_evaluate=0.0),
                                      keys_dir / SERVER_FILE)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = strategy.start(
            grid=grid_for(apps, keys_dir), initial_arrays=initial_model(), num_rounds=4
        )
    # The clients refused the corrupted aggregate in the next round, the server
    # rolled back (saying which round and why), and the federation went on.
    rollback = [r.getMessage() for r in caplog.records
                if "rolled back" in r.getMessage().lower()]  # fmt: skip
    assert len(rollback) == 1, caplog.text
    assert f"round {liar_round + 1}" in rollback[0]
    assert f"aggregate of round {liar_round}" in rollback[0]
    assert "weight" in rollback[0] or "contributions" in rollback[0]
    # The detecting round was re-run at once on the last good model ...
    detecting = result.train_metrics_clientapp[liar_round + 1]
    assert detecting["ckks-rolled-back"] == 1 and detecting["ckks-summed"] == 3
    assert result.train_metrics_clientapp[4]["ckks-summed"] == 3
    decrypted = decrypt_record(result.arrays, load_keys(keys_dir / SECRET_FILE))
    # ... so only the lie's own round was lost: 3 effective rounds of 4.
    assert_close(decrypted.arrays, plain_fedavg(3))


def test_one_false_refusal_does_not_undo_the_previous_round(keys_dir, caplog):
    """A client that claims the aggregate failed its check, when it did not."""

    def false_refusal(msg, context, call_next):
        if (
            msg.metadata.message_type == MessageType.TRAIN
            and int(msg.content["config"]["server-round"]) == 2
        ):
            return Message(
                Error(code=0, reason="ckks_mod: the aggregate failed the check: no"),
                reply_to=msg,
            )
        return call_next(msg, context)

    apps = {1: make_app([ckks_mod]), 2: make_app([ckks_mod]),
            3: make_app([false_refusal, ckks_mod])}  # fmt: skip
    strategy = HomomorphicAggregation(
        FedAvg(fraction_evaluate=0.0), keys_dir / SERVER_FILE, min_replies=3
    )
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = strategy.start(
            grid=grid_for(apps, keys_dir), initial_arrays=initial_model(), num_rounds=3
        )
    assert "rolled back" not in caplog.text.lower()
    decrypted = decrypt_record(result.arrays, load_keys(keys_dir / SECRET_FILE))
    # Round 2 kept the round-1 model (too few replies); round 3 trained on it.
    assert_close(decrypted.arrays, plain_fedavg(2))


def test_foreign_key_reply_costs_only_its_round_decrypt_aggregate(
    keys_dir, other_keys_dir, caplog
):
    apps = {1: make_app([ckks_mod]), 2: make_app([ckks_mod]),
            3: make_app([_lie_in_round(2, "foreign-key", other_keys_dir),
                         ckks_mod])}  # fmt: skip
    strategy = HomomorphicAggregation(
        FedAvg(fraction_evaluate=0.0), keys_dir / SERVER_FILE, mode="decrypt-aggregate"
    )
    grid = grid_for(apps, keys_dir, per_node={1: {"ckks-decrypt-for-server": True}})
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = strategy.start(grid=grid, initial_arrays=initial_model(), num_rounds=3)
    assert "round 2" in caplog.text and "failed the check" in caplog.text
    # Only round 2 was lost: rounds 1 and 3 trained.
    assert_close(result.arrays, plain_fedavg(2))


# ------------------------------------------------------------------ item 4
def _flip_in_round(round_: int):
    def mod(msg, context, call_next):  # outside ckks_mod: transport corruption
        reply = call_next(msg, context)
        if (
            msg.metadata.message_type == MessageType.TRAIN
            and not reply.has_error()
            and int(msg.content["config"]["server-round"]) == round_
        ):
            record = reply.content["arrays"]
            data = bytearray(record["ckks-00000"].data)
            data[len(data) // 2] ^= 0x40
            arrays = dict(record.items())
            arrays["ckks-00000"] = Array(
                "uint8", (len(data),), record["ckks-00000"].stype, bytes(data)
            )
            reply.content["arrays"] = ArrayRecord(arrays)  # fmt: skip
        return reply

    return mod


def test_distributed_dp_releases_only_what_the_he_layer_summed(keys_dir, caplog):
    """t = 3, one damaged ciphertext: HE sums 2 < t, so nothing is released."""
    apps = {1: make_app([ckks_mod, distributed_dp_mod]),
            2: make_app([ckks_mod, distributed_dp_mod]),
            3: make_app([_flip_in_round(1), ckks_mod, distributed_dp_mod])}  # fmt: skip
    strategy = DistributedDP(
        HomomorphicAggregation(FedAvg(fraction_evaluate=0.0), keys_dir / SERVER_FILE),
        clipping_norm=1.0,
        min_clients=3,
        noise_multiplier=1.0,
    )
    with (
        caplog.at_level(logging.WARNING, logger="flwr"),
        pytest.raises(NoModelError) as failed,  # the only round released nothing
    ):
        strategy.start(
            grid=grid_for(apps, keys_dir), initial_arrays=initial_model(), num_rounds=1
        )
    result = failed.value.result
    metrics = result.train_metrics_clientapp[1]
    assert metrics["ckks-summed"] == 2 if "ckks-summed" in metrics else True
    assert metrics["dp-discarded"] == 1
    assert metrics["dp-releases"] == 0
    assert strategy.privacy_spent().epsilon == 0
    assert len(result.arrays) == 0 or not is_encrypted(result.arrays)


def test_distributed_dp_over_he_recovers_from_a_corrupted_aggregate(
    keys_dir, other_keys_dir, caplog
):
    """DistributedDP discards the refusal round itself; HE still rolls back."""
    apps = {1: make_app([ckks_mod, distributed_dp_mod]),
            2: make_app([ckks_mod, distributed_dp_mod]),
            3: make_app([_lie_in_round(2, "foreign-key", other_keys_dir), ckks_mod,
                         distributed_dp_mod])}  # fmt: skip
    strategy = DistributedDP(
        HomomorphicAggregation(FedAvg(fraction_evaluate=0.0), keys_dir / SERVER_FILE),
        clipping_norm=1.0,
        min_clients=3,
        noise_multiplier=1.0,
    )
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = strategy.start(
            grid=grid_for(apps, keys_dir), initial_arrays=initial_model(), num_rounds=4
        )
    assert "rolled back" in caplog.text.lower() and "round 3" in caplog.text
    metrics = result.train_metrics_clientapp
    assert [metrics[r]["dp-discarded"] for r in (1, 2, 3, 4)] == [0, 0, 1, 0]
    # Rounds 1, 2 and 4 were released (2 with the forged sum: it left the server
    # encrypted and the clients refused it); round 3 re-sent an accounted model.
    assert metrics[4]["dp-releases"] == 3
    decrypted = decrypt_record(result.arrays, load_keys(keys_dir / SECRET_FILE))
    assert decrypted.contributions == 3
    assert decrypted.total_weight == pytest.approx(3.0, abs=1e-6)  # unit 1 (DDP)


# ------------------------------------------------------------------ item 6
def _aggregate_of(keys_dir, n: int) -> ArrayRecord:
    secret = load_keys(keys_dir / SECRET_FILE)
    total = CiphertextSum(load_keys(keys_dir / SERVER_FILE), None, "packed")
    for _ in range(n):
        total.add(encrypt_record(initial_model(), secret, 1.0, num_clients=n), "n")
    return total.result()


def _evaluate(keys_dir, record: ArrayRecord, node_config: dict | None = None):
    grid = grid_for({1: make_app([ckks_mod])}, keys_dir,
                    per_node={1: node_config or {}})  # fmt: skip
    instruction = Message(
        RecordDict({"arrays": record, "config": ConfigRecord()}),
        dst_node_id=1,
        message_type=MessageType.EVALUATE,
    )
    return next(iter(grid.send_and_receive([instruction])))


def test_client_refuses_one_update_sent_as_the_global_model(keys_dir):
    secret = load_keys(keys_dir / SECRET_FILE)
    single = encrypt_record(initial_model(), secret, 1.0)
    reply = _evaluate(keys_dir, single)
    assert reply.has_error() and "update" in reply.error.reason


def test_client_refuses_an_aggregate_of_one(keys_dir):
    reply = _evaluate(keys_dir, _aggregate_of(keys_dir, 1))
    assert reply.has_error()
    assert "policy-min-contributions" in reply.error.reason


def test_site_can_raise_its_minimum_number_of_contributions(keys_dir):
    policy = {"policy-min-contributions": 3}
    refused = _evaluate(keys_dir, _aggregate_of(keys_dir, 2), policy)
    assert refused.has_error() and "at least 3" in refused.error.reason
    accepted = _evaluate(keys_dir, _aggregate_of(keys_dir, 3), policy)
    assert not accepted.has_error(), accepted.error.reason
    assert accepted.content["metrics"]["w-sum"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("value", [1, 0, -3, "two", 2.5, True])
def test_a_bad_site_minimum_is_a_clear_error(keys_dir, value):
    reply = _evaluate(keys_dir, _aggregate_of(keys_dir, 3),
                      {"policy-min-contributions": value})  # fmt: skip
    assert reply.has_error()
    assert "policy-min-contributions" in reply.error.reason
    assert repr(value) in reply.error.reason or str(value) in reply.error.reason


# ------------------------------------------------ item 2: evaluate replies
def test_a_client_with_other_metric_keys_cannot_crash_evaluation(keys_dir, caplog):
    """Flower's FedAvg raises on MetricRecords with different keys."""

    def extra_metric(msg, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type == MessageType.EVALUATE and not reply.has_error():
            reply.content["metrics"]["surprise"] = 1.0
        return reply

    apps = {1: make_app([ckks_mod]), 2: make_app([ckks_mod]),
            3: make_app([extra_metric, ckks_mod])}  # fmt: skip
    strategy = HomomorphicAggregation(FedAvg(), keys_dir / SERVER_FILE)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = strategy.start(
            grid=grid_for(apps, keys_dir), initial_arrays=initial_model(), num_rounds=2
        )
    assert result.train_metrics_clientapp[2]["ckks-summed"] == 3
    # The two clients that agree are aggregated; the odd one is named.
    assert "surprise" not in result.evaluate_metrics_clientapp[2]
    assert result.evaluate_metrics_clientapp[2]["w-sum"] == pytest.approx(
        float(plain_fedavg(2)["w"].numpy().sum()), abs=1e-4
    )
    assert "node 3" in caplog.text


def test_a_refusal_carries_no_decrypted_value(keys_dir, caplog):
    """Exact decryptions leak the key: the slots' values stay on the node."""
    secret = load_keys(keys_dir / SECRET_FILE)
    total = CiphertextSum(load_keys(keys_dir / SERVER_FILE), None, "packed")
    for _ in range(3):
        total.add(encrypt_record(initial_model(), secret, 0.7125, num_clients=3), "n")
    grid = grid_for({1: make_app([ckks_mod])}, keys_dir)
    config = ConfigRecord({"ckks-model-contributions": 3, "ckks-model-weight": 3.0})
    instruction = Message(
        RecordDict({"arrays": total.result(), "config": config}),
        dst_node_id=1,
        message_type=MessageType.EVALUATE,
    )
    with caplog.at_level(logging.ERROR, logger="flwr"):
        reply = next(iter(grid.send_and_receive([instruction])))
    assert reply.has_error() and "failed the check" in reply.error.reason
    assert "2.137" not in reply.error.reason  # the weight slot: 3 x 0.7125
    assert "2.137" in caplog.text  # ... is in the node's own log
