"""Property-based fuzzing of the CKKS protocol: hostile replies and instructions.

Every byte a message carries is hostile input, in both directions. Hypothesis
throws random and mutated *replies* at ``HomomorphicAggregation.aggregate_train``
(both modes) and random and mutated *instructions* at ``ckks_mod``, built from real
encrypted records (real TenSEAL/SEAL ciphertexts) and real Flower Messages. The
properties:

- no exception escapes the wrapper or the mod (a bad message costs its sender its
  reply, never the round, never the node);
- the server's result is a model of the original structure: encrypted under the
  run's key with the initial model's dtypes and finite values after decryption
  (``"encrypted"``), or a finite plaintext model with the initial dtypes
  (``"decrypt-aggregate"``), built from the two honest replies at least;
- the client never returns plaintext it should not: a train reply is an error or
  one encrypted update, any other reply holds no ArrayRecord but those the server
  sent itself (never a decrypted one), and a decryption for the server is only
  ever of an aggregate of at least two contributions, on a node that opted in;
  one update, or an aggregate of one, sent as the global model is refused.

The number of examples is bounded for CI (a few seconds per test on one core).
"""

from __future__ import annotations

import json

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
from flwr.serverapp.strategy import FedAvg
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flwr_ext.he import (
    SECRET_FILE,
    SERVER_FILE,
    CiphertextSum,
    decrypt_record,
    encrypt_record,
    is_encrypted,
    load_keys,
)
from flwr_ext.he.codec import META_KEY, STYPE_CIPHERTEXT, STYPE_META, EncryptedHeader
from flwr_ext.inprocess import InProcessGrid
from flwr_ext.mods import ckks_mod
from flwr_ext.strategy import HomomorphicAggregation

from .he_fixtures import toy_client_app, toy_model

NODES = (1, 2, 3)
FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # CI-stable: the same examples every run
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


def initial_model() -> ArrayRecord:
    return toy_model(b_dtype=np.float64)


def honest_app() -> ClientApp:
    def update(pid: int, msg: Message) -> dict:
        arrays = msg.content["arrays"]
        return {
            "w": (arrays["w"].numpy() + 0.5 * (pid + 1)).astype(np.float32),
            "b": (arrays["b"].numpy() - 0.25).astype(np.float64),
            "steps": np.asarray(arrays["steps"].numpy() + 1, np.int64),
        }

    return toy_client_app([ckks_mod], update)


# ------------------------------------------------------------ hostile values
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

#: JSON text no ``json.dumps`` produces: 1e400, NaN, huge integers, deep nesting.
raw_json = st.sampled_from(
    [b"1e400", b"NaN", b"-Infinity", b"9" * 5000, b"[" * 50_000 + b"]" * 50_000]
)

config_values = st.one_of(
    st.sampled_from(
        [float("inf"), float("-inf"), float("nan"), 1e308, 2**63 - 1, -1, 0, 0.5, ""]
    ),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.binary(max_size=12),
    st.booleans(),
    st.lists(st.integers(min_value=-5, max_value=5), max_size=3),
)

metric_values = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=3),
)


@st.composite
def mutated_meta(draw, good: bytes) -> bytes:
    """A ``ckks-meta`` derived from a good one, or random bytes."""
    how = draw(st.sampled_from(["field", "manifest", "raw", "bytes", "splice", "flip"]))
    data = json.loads(good)
    if how == "field":
        data[draw(st.sampled_from(sorted(data)))] = draw(json_values)
        return json.dumps(data).encode()
    if how == "manifest":
        field = draw(st.sampled_from(["keys", "dtypes", "ranks", "shapes"]))
        data["manifest"][field] = draw(json_values)
        return json.dumps(data).encode()
    if how == "raw":  # a field replaced by JSON that json.dumps never writes
        field = draw(st.sampled_from(sorted(data)))
        data[field] = "@@@"
        return json.dumps(data).encode().replace(b'"@@@"', draw(raw_json))
    if how == "bytes":
        return draw(st.binary(max_size=64))
    if how == "splice":
        return json.dumps(draw(json_values)).encode()
    position = draw(st.integers(min_value=0, max_value=len(good) - 1))
    flipped = bytearray(good)
    flipped[position] ^= draw(st.integers(min_value=1, max_value=255))
    return bytes(flipped)


@st.composite
def mutated_record(draw, record: ArrayRecord) -> ArrayRecord:
    """An encrypted record with its meta, names, chunks or array fields damaged."""
    arrays = dict(record.items())
    how = draw(
        st.sampled_from(
            ["meta", "rename", "drop", "extra", "chunk", "truncate", "stype", "fields"]
        )
    )
    chunk_names = [k for k in arrays if k != META_KEY]
    if how == "meta":
        meta = draw(mutated_meta(bytes(record[META_KEY].data)))
        arrays[META_KEY] = Array("uint8", (len(meta),), STYPE_META, meta)
    elif how == "rename":
        old = draw(st.sampled_from(sorted(arrays)))
        arrays[draw(st.text(min_size=1, max_size=12))] = arrays.pop(old)
    elif how == "drop":
        del arrays[draw(st.sampled_from(sorted(arrays)))]
    elif how == "extra":
        blob = draw(st.binary(max_size=32))
        arrays[draw(st.text(min_size=1, max_size=12))] = Array(
            "uint8", (len(blob),), STYPE_CIPHERTEXT, blob
        )
    elif how in ("chunk", "truncate"):  # checksums are not recomputed
        name = draw(st.sampled_from(chunk_names))
        data = bytearray(arrays[name].data)
        if how == "chunk":
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        else:
            data = data[: draw(st.integers(0, len(data) - 1))]
        arrays[name] = Array("uint8", (len(data),), STYPE_CIPHERTEXT, bytes(data))
    elif how == "stype":
        name = draw(st.sampled_from(sorted(arrays)))
        old = arrays[name]
        arrays[name] = Array(old.dtype, old.shape, draw(st.text(max_size=20)), old.data)
    else:  # dtype / shape strings of an array
        name = draw(st.sampled_from(sorted(arrays)))
        old = arrays[name]
        shape = tuple(
            draw(st.lists(st.integers(0, 2**31 - 1), max_size=3))
        )  # proto: int32
        arrays[name] = Array(draw(st.text(max_size=10)), shape, old.stype, old.data)
    return ArrayRecord(arrays)


# ---------------------------------------------------------------- the server
@pytest.fixture(scope="module", params=["encrypted", "decrypt-aggregate"])
def server(request, keys_dir):
    """A strategy configured for round 1 and the three honest replies."""
    InProcessGrid({1: lambda m, c: m})  # task identity for module-scoped set-up
    grid = InProcessGrid(
        dict.fromkeys(NODES, honest_app()),
        node_configs={
            n: {
                "partition-id": n - 1,
                "ckks-context": str(keys_dir / SECRET_FILE),
                "ckks-decrypt-for-server": n == 1,
            }
            for n in NODES
        },
    )
    strategy = HomomorphicAggregation(
        FedAvg(), keys_dir / SERVER_FILE, mode=request.param
    )
    messages = strategy.configure_train(1, initial_model(), ConfigRecord(), grid)
    replies = sorted(
        grid.send_and_receive(list(messages)), key=lambda r: r.metadata.src_node_id
    )
    assert not any(r.has_error() for r in replies)
    return strategy, replies


@st.composite
def hostile_reply(draw, honest: Message) -> Message:
    """Node 3's reply, damaged in its record, metrics or structure."""
    record = honest.content["arrays"]
    metrics = MetricRecord(dict(honest.content["metrics"]))
    how = draw(st.sampled_from(["record", "record", "record", "metrics", "records"]))
    content = {"arrays": record, "metrics": metrics}
    if how == "record":
        content["arrays"] = draw(mutated_record(record))
    elif how == "metrics":
        metrics[draw(st.sampled_from(["num-examples", "loss", "x"]))] = draw(
            metric_values
        )
        if draw(st.booleans()):
            del metrics["num-examples"]
    else:
        extra = draw(st.sampled_from(["second-arrays", "no-arrays", "no-metrics"]))
        if extra == "second-arrays":
            content["more"] = draw(mutated_record(record))
        elif extra == "no-arrays":
            del content["arrays"]
        else:
            del content["metrics"]
    return Message(RecordDict(content), metadata=honest.metadata)


def _check_model(arrays: ArrayRecord, secret, mode: str) -> None:
    initial = initial_model()
    if mode == "encrypted":
        assert is_encrypted(arrays)
        decrypted = decrypt_record(arrays, secret)
        assert decrypted.contributions in (2, 3)
        arrays = decrypted.arrays
    assert list(arrays.keys()) == list(initial.keys())
    for key in initial:
        values = arrays[key].numpy()
        assert values.dtype == initial[key].numpy().dtype, key
        assert values.shape == initial[key].numpy().shape, key
        assert np.isfinite(values).all(), key


@FUZZ
@given(data=st.data())
def test_no_reply_makes_aggregate_train_raise(server, secret, data):
    strategy, replies = server
    hostile = data.draw(hostile_reply(replies[2]))
    arrays, metrics = strategy.aggregate_train(1, [replies[0], replies[1], hostile])
    assert metrics is not None
    assert metrics["ckks-summed"] in (2, 3)
    event(f"summed {metrics['ckks-summed']}, model: {arrays is not None}")
    if strategy.mode == "encrypted":
        assert arrays is not None  # the two honest replies always make a sum
    if arrays is not None:
        _check_model(arrays, secret, strategy.mode)


# ---------------------------------------------------------------- the client
class EchoApp:
    """The worst ClientApp for privacy: it echoes every record it received."""

    def __init__(self) -> None:
        self.received: list[dict[str, bytes]] = []

    def __call__(self, msg: Message, context: Context) -> Message:
        records = list(msg.content.array_records.values())
        self.received = [_snapshot(record) for record in records]
        content = {f"a{i}": record for i, record in enumerate(records)}
        content["metrics"] = MetricRecord({"num-examples": 7})
        return Message(RecordDict(content), reply_to=msg)


def _snapshot(record: ArrayRecord) -> dict[str, bytes]:
    return {key: bytes(array.data) for key, array in record.items()}


@pytest.fixture(scope="module")
def encrypted_inputs(keys_dir, secret):
    """An honest aggregate of 3, an aggregate of 1, and a single update."""
    server_keys = load_keys(keys_dir / SERVER_FILE)
    out = {}
    for n in (1, 3):
        total = CiphertextSum(server_keys, None, "packed")
        for _ in range(n):
            total.add(encrypt_record(initial_model(), secret, 1.0, num_clients=n), "n")
        out[f"aggregate-{n}"] = total.result()
    out["update"] = encrypt_record(initial_model(), secret, 1.0)
    return out


def _announcement(keys_dir) -> dict:
    keys = load_keys(keys_dir / SERVER_FILE)
    return {
        "ckks-profile": keys.profile.name,
        "ckks-fingerprint": keys.fingerprint,
        "ckks-wire": "packed",
        "ckks-weight-unit": 1.0,
        "ckks-weight-key": "num-examples",
        "ckks-num-clients": 3,
        "ckks-model-contributions": 3,
        "ckks-model-weight": 3.0,
        "server-round": 2,
    }


@st.composite
def hostile_instruction(draw, keys_dir, encrypted_inputs) -> tuple[Message, str]:
    """An instruction to node 1 and the name of the record it carries."""
    message_type = draw(
        st.sampled_from(
            [MessageType.TRAIN, MessageType.EVALUATE, MessageType.QUERY, "train.x"]
        )
    )
    config = _announcement(keys_dir)
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from([*sorted(config), "ckks-decrypt-request"]))
        config[key] = draw(config_values | st.just(True))
    if draw(st.booleans()):
        del config[draw(st.sampled_from(sorted(config)))]
    source = draw(st.sampled_from(["plain", *sorted(encrypted_inputs)]))
    record = initial_model() if source == "plain" else encrypted_inputs[source]
    if source != "plain" and draw(st.booleans()):
        record = draw(mutated_record(record))
    content = RecordDict({"arrays": record, "config": ConfigRecord(config)})
    return Message(content, dst_node_id=1, message_type=message_type), source


@FUZZ
@given(data=st.data(), opted_in=st.booleans())
def test_no_instruction_makes_ckks_mod_raise_or_leak(
    keys_dir, encrypted_inputs, data, opted_in
):
    msg, source = data.draw(hostile_instruction(keys_dir, encrypted_inputs))
    # snapshot: the mod replaces a ciphertext by its decryption in place
    sent = [_snapshot(record) for record in msg.content.array_records.values()]
    is_train = msg.metadata.message_type.split(".")[0] == MessageType.TRAIN
    asked_to_decrypt = msg.content["config"].get("ckks-decrypt-request") is True
    context = Context(
        run_id=1,
        node_id=1,
        node_config={
            "ckks-context": str(keys_dir / SECRET_FILE),
            "ckks-decrypt-for-server": opted_in,
        },
        state=RecordDict(),
        run_config={},
    )
    app = EchoApp()
    reply = ckks_mod(msg, context, app)
    decrypted = any(record not in sent for record in app.received)
    # Only an aggregate of at least two contributions is ever decrypted.
    assert not decrypted or source == "aggregate-3"
    event("error reply" if reply.has_error() else f"{msg.metadata.message_type} reply")
    if reply.has_error():
        return
    records = list(reply.content.array_records.values())
    if asked_to_decrypt:
        assert opted_in
        assert reply.content["metrics"]["ckks-contributions"] >= 2
    elif is_train:
        assert len(records) == 1 and is_encrypted(records[0])
        assert EncryptedHeader.from_record(records[0]).kind == "update"
    else:  # nothing decrypted goes back: at most what the server itself sent
        assert all(_snapshot(record) in sent for record in records)


# ------------------------------------------------- the decrypting node's answer
class Decryptor:
    """Node 1: trains honestly, answers decryption requests with ``answer``."""

    def __init__(self) -> None:
        self.app = honest_app()
        self.answer: RecordDict | None = None

    def __call__(self, msg: Message, context: Context) -> Message:
        config = msg.content.config_records.get("config", {})
        if not config.get("ckks-decrypt-request") or self.answer is None:
            return self.app(msg, context)
        return Message(self.answer, reply_to=msg)


def _npy(values: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


@st.composite
def hostile_answer(draw) -> RecordDict:
    """A decryption answer with forged arrays and counts."""
    arrays = {}
    for key, array in initial_model().items():
        how = draw(st.sampled_from(["honest", "dtype", "shape", "data", "npy"]))
        values = array.numpy()
        if how == "honest":
            arrays[key] = Array(values)
        elif how == "dtype":
            dtype = draw(st.sampled_from(["no-such", "object", "<U3", "float16"]))
            arrays[key] = Array(dtype, tuple(values.shape), "numpy.ndarray", b"\0" * 8)
        elif how == "shape":
            shape = tuple(
                draw(st.lists(st.integers(0, 2**31 - 1), max_size=3))
            )  # proto: int32
            arrays[key] = Array(str(values.dtype), shape, "numpy.ndarray", _npy(values))
        elif how == "data":
            blob = draw(st.binary(max_size=64))
            arrays[key] = Array(str(values.dtype), tuple(values.shape),
                                "numpy.ndarray", blob)  # fmt: skip
        else:  # a valid .npy whose header declares another shape or NaN values
            other = draw(
                st.sampled_from(
                    [np.full(values.shape, np.nan, values.dtype)
                     if values.dtype.kind == "f" else values,
                     np.zeros((2, 2), values.dtype), np.zeros(0, values.dtype)]
                )
            )  # fmt: skip
            arrays[key] = Array(str(values.dtype), tuple(values.shape),
                                "numpy.ndarray", _npy(other))  # fmt: skip
    if draw(st.booleans()):
        del arrays[draw(st.sampled_from(sorted(arrays)))]
    count = draw(st.one_of(st.just(3), metric_values))
    weight = draw(st.one_of(st.just(60 / 1024), metric_values))
    return RecordDict(
        {
            "arrays": ArrayRecord(arrays),
            "metrics": MetricRecord(
                {"ckks-contributions": count, "ckks-total-weight": weight}
            ),
        }
    )


@pytest.fixture(scope="module")
def decrypt_server(keys_dir):
    InProcessGrid({1: lambda m, c: m})
    decryptor = Decryptor()
    honest = honest_app()
    grid = InProcessGrid(
        {1: decryptor, 2: honest, 3: honest},
        node_configs={
            n: {
                "partition-id": n - 1,
                "ckks-context": str(keys_dir / SECRET_FILE),
                "ckks-decrypt-for-server": n == 1,
            }
            for n in NODES
        },
    )
    strategy = HomomorphicAggregation(
        FedAvg(), keys_dir / SERVER_FILE, mode="decrypt-aggregate"
    )
    messages = strategy.configure_train(1, initial_model(), ConfigRecord(), grid)
    replies = list(grid.send_and_receive(list(messages)))
    assert not any(r.has_error() for r in replies)
    return strategy, replies, decryptor


@FUZZ
@given(answer=hostile_answer())
def test_no_decryption_answer_makes_aggregate_train_raise(
    decrypt_server, secret, answer
):
    strategy, replies, decryptor = decrypt_server
    decryptor.answer = answer
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics is not None and metrics["ckks-summed"] == 3
    event(f"model: {arrays is not None}")
    if arrays is not None:
        _check_model(arrays, secret, "decrypt-aggregate")
