import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from flwr_ext.records import (
    InvalidReplyError,
    Manifest,
    conform_to_manifest,
    flatten,
    unflatten,
    validate_train_reply,
)
from flwr_ext.strategy import TrimmedMean

from .conftest import instructions, model, reply_to


def mixed_record() -> ArrayRecord:
    return ArrayRecord(
        {
            "conv": Array(np.arange(24, dtype=np.float32).reshape(2, 3, 4)),
            "bias": Array(np.array([0.5, -1.5], dtype=np.float64)),
            "steps": Array(np.array(7, dtype=np.int64)),
        }
    )


def test_flatten_unflatten_round_trip_keeps_keys_order_shapes_dtypes():
    record = mixed_record()
    vector, manifest = flatten(record)
    assert vector.shape == (24 + 2 + 1,)
    assert vector.dtype == np.float64
    back = unflatten(vector, manifest)
    assert list(back.keys()) == ["conv", "bias", "steps"]
    for key in record:
        np.testing.assert_array_equal(back[key].numpy(), record[key].numpy())
        assert back[key].numpy().dtype == record[key].numpy().dtype


def test_flatten_copies_and_unflatten_rounds_integers():
    record = mixed_record()
    vector, manifest = flatten(record)
    vector[:] = 0.0
    assert record["conv"].numpy().sum() == sum(range(24))  # source untouched
    vector[-1] = 2.6
    assert unflatten(vector, manifest)["steps"].numpy() == 3


def test_manifest_dict_round_trip_and_bad_dict():
    manifest = Manifest.from_arrayrecord(mixed_record())
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    broken = manifest.to_dict()
    broken["shapes"] = broken["shapes"][:-1]
    with pytest.raises(ValueError, match="do not line up"):
        Manifest.from_dict(broken)


def test_manifest_rejects_non_numeric_arrays():
    record = ArrayRecord({"s": Array(np.array(["a"]))})
    with pytest.raises(TypeError, match="float and integer"):
        Manifest.from_arrayrecord(record)


def test_unflatten_wrong_length_is_an_error():
    _, manifest = flatten(model())
    with pytest.raises(ValueError, match="does not match the manifest"):
        unflatten(np.zeros(3), manifest)


def test_flatten_detects_payload_that_lies_about_its_shape():
    honest = Array(np.zeros((3, 2), dtype=np.float32))
    liar = Array(
        dtype=honest.dtype, shape=(3, 2), stype=honest.stype,
        data=Array(np.zeros((4, 2), dtype=np.float32)).data,
    )  # fmt: skip
    _, manifest = flatten(model())
    record = ArrayRecord({"w": liar, "b": Array(np.zeros(2, dtype=np.float32))})
    with pytest.raises(ValueError, match="holds float32"):
        flatten(record, manifest)


@pytest.fixture
def setup():
    strategy = TrimmedMean(beta=0.2)
    global_model = model(0.0)
    msgs = instructions(strategy, global_model, [11, 12, 13, 14, 15])
    return Manifest.from_arrayrecord(global_model), msgs[0]


def test_valid_reply_is_flattened(setup):
    manifest, instruction = setup
    valid = validate_train_reply(reply_to(instruction, model(1.5), 7), manifest)
    assert valid.node_id == 11
    assert valid.weight == 7.0
    np.testing.assert_array_equal(valid.vector, np.full(8, 1.5))


def bad_weight_cases():
    return [
        (-1, "finite and >= 0"),
        (float("nan"), "finite and >= 0"),
        (float("inf"), "finite and >= 0"),
        ([1, 2], "one number"),
        (None, "no weight key"),
    ]


@pytest.mark.parametrize(("weight", "reason"), bad_weight_cases())
def test_bad_weights_are_rejected_with_reason(setup, weight, reason):
    manifest, instruction = setup
    with pytest.raises(InvalidReplyError, match=reason):
        validate_train_reply(reply_to(instruction, model(), weight), manifest)


def test_zero_weight_is_valid(setup):
    manifest, instruction = setup
    assert validate_train_reply(reply_to(instruction, model(), 0), manifest).weight == 0


def wrong_models():
    w = np.zeros((3, 2), dtype=np.float32)
    b = np.zeros(2, dtype=np.float32)
    return [
        (ArrayRecord({"w": Array(w)}), "missing arrays \\['b'\\]"),
        (
            ArrayRecord({"w": Array(w), "b": Array(b), "x": Array(b)}),
            "unexpected arrays \\['x'\\]",
        ),
        (ArrayRecord({"w": Array(w.T.copy()), "b": Array(b)}), "has shape \\(2, 3\\)"),
        (
            ArrayRecord({"w": Array(w.astype(np.float64)), "b": Array(b)}),
            "dtype float64, expected float32",
        ),
        (
            ArrayRecord(
                {"w": Array(np.full((3, 2), np.nan, np.float32)), "b": Array(b)}
            ),
            "non-finite values .* \\['w'\\]",
        ),
        (
            ArrayRecord({"w": Array(w), "b": Array(np.array([np.inf, 0], np.float32))}),
            "non-finite values .* \\['b'\\]",
        ),
    ]


@pytest.mark.parametrize(("arrays", "reason"), wrong_models())
def test_wrong_models_are_rejected_with_reason(setup, arrays, reason):
    manifest, instruction = setup
    with pytest.raises(InvalidReplyError, match=reason):
        validate_train_reply(reply_to(instruction, arrays), manifest)


def test_record_structure_errors(setup):
    manifest, instruction = setup
    with pytest.raises(InvalidReplyError, match="exactly one ArrayRecord, got 0"):
        validate_train_reply(reply_to(instruction, None), manifest)
    with pytest.raises(InvalidReplyError, match="exactly one ArrayRecord, got 2"):
        validate_train_reply(
            reply_to(instruction, model(), extra_records={"more": model()}), manifest
        )
    with pytest.raises(InvalidReplyError, match="exactly one MetricRecord, got 2"):
        validate_train_reply(
            reply_to(
                instruction, model(), extra_records={"m2": MetricRecord({"a": 1})}
            ),
            manifest,
        )
    with pytest.raises(InvalidReplyError, match="metric 'loss' is not finite"):
        validate_train_reply(
            reply_to(instruction, model(), extra_metrics={"loss": float("nan")}),
            manifest,
        )
    with pytest.raises(InvalidReplyError, match="stored under 'weights'"):
        validate_train_reply(
            Message(
                RecordDict(
                    {"weights": model(), "m": MetricRecord({"num-examples": 1})}
                ),
                reply_to=instruction,
            ),
            manifest,
            arrayrecord_key="arrays",
        )
    assert ConfigRecord  # imported for symmetry with Flower's own tests


# ------------------------------------------------- reading Array payloads in place
@pytest.mark.parametrize(
    "value",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.array(3.5, dtype=np.float64),  # 0-d
        np.arange(5, dtype=np.int16),
        np.arange(6, dtype=">f4").reshape(2, 3),  # big-endian
        np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        np.zeros((0, 3), dtype=np.float32),
    ],
    ids=["float32-2d", "0-d", "int16", "big-endian", "fortran", "empty"],
)
def test_flatten_reads_payloads_exactly_like_numpy_load(value):
    record = ArrayRecord({"a": Array(value)})
    vector, _ = flatten(record)
    np.testing.assert_array_equal(vector, record["a"].numpy().reshape(-1))
    # A second reply with the same header takes the cached layout.
    vector2, _ = flatten(ArrayRecord({"a": Array(np.asarray(value + 1))}))
    np.testing.assert_array_equal(vector2, vector + 1)


def test_flatten_of_a_truncated_payload_is_a_clear_error_and_never_a_view():
    good = Array(np.arange(10, dtype=np.float32))
    truncated = Array(
        dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[:-8]
    )
    with pytest.raises(ValueError, match="array 'a' does not deserialize"):
        flatten(ArrayRecord({"a": truncated}))
    vector, _ = flatten(ArrayRecord({"a": good}))
    vector[0] = 99.0  # a private copy: the payload is untouched
    assert good.numpy()[0] == 0.0


def test_conform_to_manifest_restores_keys_shapes_and_dtypes(caplog):
    # What every wrapper (robust, DP, HE) does with its inner strategy's result.
    manifest = Manifest.from_arrayrecord(
        ArrayRecord(
            {
                "w": Array(np.zeros((2, 2), dtype=np.float32)),
                "scale": Array(np.array(0.0, dtype=np.float32)),
                "steps": Array(np.zeros(2, dtype=np.int8)),
            }
        )
    )
    inner = ArrayRecord(
        {
            "w": Array(np.full((2, 2), 0.5)),  # float64, as FedAdam returns
            "scale": Array(np.array(2.0)),
            "steps": Array(np.array([3.6, 500.0])),
        }
    )
    out = conform_to_manifest(inner, manifest, "Test", 1)
    assert out["w"].numpy().dtype == np.float32
    assert out["scale"].numpy().shape == ()
    np.testing.assert_array_equal(out["steps"].numpy(), np.array([4, 127], np.int8))
    missing = ArrayRecord({"w": inner["w"], "scale": inner["scale"]})
    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert conform_to_manifest(missing, manifest, "Test", 2) is None
        nan = ArrayRecord({**dict(inner.items()), "w": Array(np.full((2, 2), np.nan))})
        assert conform_to_manifest(nan, manifest, "Test", 3) is None
    assert "[Test] round 2: the inner strategy dropped array 'steps'" in caplog.text
    assert "[Test] round 3: the inner strategy returned a non-finite" in caplog.text


@pytest.mark.parametrize(
    "change",
    [
        {"dtypes": ["float33", "<f4", "<i8"]},  # numpy does not know it
        {"dtypes": ["|O", "<f4", "<i8"]},  # not a number
        {"dtypes": ["float32", "<f8", "<i8"]},  # not numpy's .str form
        {"shapes": [2, -3, 4, 2]},  # negative dimension
        {"ranks": [3, 1, "x"]},  # not an int
        {"keys": None},
    ],
)
def test_manifest_from_hostile_dict_raises_value_error_only(change):
    # A manifest travels in messages (the HE header, DP instructions).
    data = {**Manifest.from_arrayrecord(mixed_record()).to_dict(), **change}
    with pytest.raises(ValueError, match="Malformed manifest"):
        Manifest.from_dict(data)
