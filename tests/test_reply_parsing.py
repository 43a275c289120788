"""Hostile train replies against the plaintext wrappers (issue 10, item 2).

Every field of a reply is the client's to choose: the ``Array``'s declared
``dtype``/``shape``/``stype``, its ``.npy`` payload (header and bytes), record
names, the MetricRecord and the error. Each attack below is a real Flower
``Message`` thrown at :func:`flwr_ext.records.validate_train_reply` and at the
``aggregate_train`` of every robust wrapper and of ``DPFedAvg``, mixed with honest
replies: the hostile reply must be dropped with one log line naming its node and
the round must go on with the honest ones.

Before the fix, the attacks marked ``# escaped:`` made ``aggregate_train`` raise
(the exception named), i.e. one reply stopped the ServerApp.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)

from flwr_ext import records
from flwr_ext.aggregation import (
    AdaptiveRobustClipping,
    Bucketing,
    MedianNormEqualization,
    NearestNeighborMixing,
    PreAggregationChain,
)
from flwr_ext.records import (
    InvalidReplyError,
    Manifest,
    flatten,
    validate_train_reply,
)
from flwr_ext.strategy import (
    CenteredClipping,
    DPFedAvg,
    GeometricMedian,
    Krum,
    Median,
    MultiKrum,
    TrimmedMean,
)

from .conftest import StaticGrid, instructions, model, reply_to
from .hostile_messages import arrayrecord, forged_array, npy_bytes, smuggle

HONEST = list(range(101, 108))  # 7 honest nodes
HOSTILE = 108
NUMPY = "numpy.ndarray"
W_BYTES = Array(np.ones((3, 2), np.float32)).data


def w_payload(header: str, payload: bytes = b"", version: int = 1) -> bytes:
    return npy_bytes(header, payload, version)


def good_header(
    descr: str = "<f4", fortran: str = "False", shape: str = "(3, 2)"
) -> str:
    return f"{{'descr': {descr!r}, 'fortran_order': {fortran}, 'shape': {shape}, }}"


ONES_W = np.ones((3, 2), np.float32).tobytes()


def with_w(array: Array) -> ArrayRecord:
    """A model whose ``w`` is ``array`` and whose ``b`` is honest."""
    return arrayrecord({"w": array, "b": Array(np.ones(2, np.float32))})


def declared(**fields) -> Array:
    """An Array that declares ``fields`` over honest defaults for ``w``."""
    base = {"dtype": "float32", "shape": (3, 2), "stype": NUMPY, "data": W_BYTES}
    base.update(fields)
    return forged_array(**base)


# (id, arrays of the hostile reply, text the reason must contain)
ARRAY_ATTACKS = [
    # escaped: TypeError (np.dtype in the mismatch description)
    ("unknown-dtype", with_w(declared(dtype="float33")), "has dtype float33,"),
    # escaped: TypeError
    ("dtype-not-a-str", with_w(declared(dtype=5)), "dtype"),
    # escaped: TypeError
    ("dtype-10k-chars", with_w(declared(dtype="f" * 10_000)), "dtype"),
    ("dtype-object", with_w(declared(dtype="object")), "has dtype object,"),
    ("dtype-subarray", with_w(declared(dtype="(3,2)f4")), "dtype"),
    ("dtype-structured", with_w(declared(dtype="[('a', '<f4')]")), "dtype"),
    ("dtype-float64", with_w(declared(dtype="float64")), "has dtype float64,"),
    # escaped: TypeError (int() of None)
    ("shape-none", with_w(declared(shape=None)), "shape"),
    # escaped: ValueError, not the project's error
    ("shape-strings", with_w(declared(shape=("a", "b"))), "shape"),
    ("shape-negative", with_w(declared(shape=(-3, -2))), "shape"),
    ("shape-huge", with_w(declared(shape=(2**70, 2**70))), "shape"),
    ("shape-floats", with_w(declared(shape=(3.0, 2.0))), "shape"),
    ("shape-bools", with_w(declared(shape=(True, True))), "shape"),
    ("shape-rank-100", with_w(declared(shape=(1,) * 100)), "shape"),
    ("stype-torch", with_w(declared(stype="torch.Tensor")), "serialization"),
    ("stype-not-a-str", with_w(declared(stype=None)), "serialization"),
    ("data-not-bytes", with_w(declared(data="abc")), "payload"),
    ("data-empty", with_w(declared(data=b"")), "payload"),
    ("data-no-magic", with_w(declared(data=b"\x00" * 200)), "payload"),
    # escaped: MemoryError (np.load allocates what the header declares)
    (
        "header-huge-shape",
        with_w(declared(data=w_payload(good_header(shape="(100000, 100000, 100000)")))),
        "shape",
    ),
    # escaped: tokenize.TokenError (np.load's header parser)
    (
        "header-unbalanced",
        with_w(declared(data=w_payload("{'descr': '<f4', " + "(" * 150))),
        "header",
    ),
    (
        "header-not-a-dict",
        with_w(declared(data=w_payload("[1, 2, 3]", ONES_W))),
        "header",
    ),
    (
        "header-extra-key",
        with_w(
            declared(
                data=w_payload(
                    "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), 'x': 1}",
                    ONES_W,
                )
            )
        ),
        "header",
    ),
    (
        "header-descr-bogus",
        with_w(declared(data=w_payload(good_header(descr="zz"), ONES_W))),
        "descr",
    ),
    (
        "header-descr-object",
        with_w(declared(data=w_payload(good_header(descr="|O"), ONES_W))),
        "descr",
    ),
    (
        "header-descr-float64",
        with_w(declared(data=w_payload(good_header(descr="<f8"), ONES_W + ONES_W))),
        "descr",
    ),
    (
        "header-fortran-not-bool",
        with_w(declared(data=w_payload(good_header(fortran="'yes'"), ONES_W))),
        "fortran",
    ),
    (
        "header-shape-disagrees",
        with_w(declared(data=w_payload(good_header(shape="(2, 3)"), ONES_W))),
        "shape",
    ),
    (
        "header-shape-negative",
        with_w(declared(data=w_payload(good_header(shape="(-3, -2)"), ONES_W))),
        "shape",
    ),
    (
        "header-version-9",
        with_w(declared(data=w_payload(good_header(), ONES_W, version=9))),
        "version",
    ),
    (
        "header-length-beyond-data",
        with_w(declared(data=b"\x93NUMPY\x02\x00\xff\xff\xff\x7f{'descr'")),
        "header",
    ),
    (
        "payload-truncated",
        with_w(declared(data=w_payload(good_header(), ONES_W[:-4]))),
        "bytes",
    ),
    (
        "payload-trailing-bytes",
        with_w(declared(data=w_payload(good_header(), ONES_W + b"\x00" * 64))),
        "bytes",
    ),
    ("nan", with_w(Array(np.full((3, 2), np.nan, np.float32))), "non-finite"),
    ("not-an-array", with_w(7), "w"),
]


# (id, reply builder(instruction) -> Message, text the reason must contain)
def _metrics(num_examples=10, extra=None, smuggled=None):
    def build(instruction: Message) -> Message:
        msg = reply_to(instruction, model(1.0), num_examples, extra)
        for key, value in (smuggled or {}).items():
            smuggle(msg.content["metrics"], key, value)
        return msg

    return build


METRIC_ATTACKS = [
    # escaped: OverflowError (float() of the weight)
    ("weight-huge-int", _metrics(10**400), "num-examples"),
    ("weight-above-max", _metrics(2**60), "num-examples"),
    ("weight-inf", _metrics(math.inf), "num-examples"),
    ("weight-nan", _metrics(math.nan), "num-examples"),
    ("weight-negative", _metrics(-1), "num-examples"),
    ("weight-bool", _metrics(smuggled={"num-examples": True}), "num-examples"),
    ("weight-str", _metrics(smuggled={"num-examples": "10"}), "num-examples"),
    ("weight-list", _metrics([1.0, 2.0]), "num-examples"),
    # escaped: OverflowError (float() of a metric)
    ("metric-huge-int", _metrics(extra={"loss": 10**400}), "loss"),
    ("metric-list-huge-int", _metrics(extra={"acc": [1, 10**400]}), "acc"),
    ("metric-nan-list", _metrics(extra={"acc": [1.0, math.nan]}), "acc"),
    ("metric-none", _metrics(smuggled={"loss": None}), "loss"),
    ("metric-nested", _metrics(smuggled={"loss": [[1.0]]}), "loss"),
    (
        "metric-key-newline",
        _metrics(extra={"loss\nINFO: all good": math.nan}),
        "loss\\nINFO",
    ),
]


def _error_reply(reason: object):
    def build(instruction: Message) -> Message:
        return Message(Error(code=0, reason=reason), reply_to=instruction)  # type: ignore[arg-type]

    return build


def _many_array_records(instruction: Message) -> Message:
    extra = {f"r{i}-" + "x" * 1000: model() for i in range(200)}
    return reply_to(instruction, model(1.0), extra_records=extra)


def _no_metrics(instruction: Message) -> Message:
    msg = reply_to(instruction, model(1.0))
    del msg.content["metrics"]
    return msg


def _two_metric_records(instruction: Message) -> Message:
    return reply_to(
        instruction, model(1.0), extra_records={"m2": MetricRecord({"a": 1})}
    )


def _long_key(instruction: Message) -> Message:
    arrays = model(1.0)
    arrays["k" * 100_000] = Array(np.ones(2, np.float32))
    return reply_to(instruction, arrays)


STRUCTURE_ATTACKS = [
    ("error-multiline-reason", _error_reply("boom\nWARNING: forged line"), "boom\\n"),
    ("error-reason-not-str", _error_reply(12345), "client error"),
    ("error-reason-huge", _error_reply("y" * 1_000_000), "client error"),
    ("200-array-records", _many_array_records, "exactly one ArrayRecord"),
    ("no-metric-record", _no_metrics, "MetricRecord"),
    ("two-metric-records", _two_metric_records, "MetricRecord"),
    ("100k-char-array-name", _long_key, "unexpected arrays"),
]


def all_attacks():
    for name, arrays, reason in ARRAY_ATTACKS:
        yield pytest.param(
            lambda m, a=arrays: reply_to(m, a), reason, id=f"array-{name}"
        )
    for name, build, reason in METRIC_ATTACKS + STRUCTURE_ATTACKS:
        yield pytest.param(build, reason, id=name)


def wrappers():
    # DPFedAvg divides by a fixed m: with m = the honest count, the honest
    # replies alone average to 1.0.
    n = len(HONEST)
    return [
        pytest.param(lambda: Krum(num_byzantine=1), id="Krum"),
        pytest.param(lambda: MultiKrum(num_byzantine=1), id="MultiKrum"),
        pytest.param(lambda: TrimmedMean(beta=0.2), id="TrimmedMean"),
        pytest.param(lambda: Median(), id="Median"),
        pytest.param(lambda: GeometricMedian(), id="GeometricMedian"),
        pytest.param(lambda: CenteredClipping(), id="CenteredClipping"),
        pytest.param(
            lambda: Median(pre_aggregation="nnm", num_byzantine=1), id="Median-NNM"
        ),
        # The issue-13 steps: a stateful rule (primed, so the hostile round
        # clips around a kept centre), ARC, bucketing and a chain of steps.
        pytest.param(
            lambda: _primed(
                CenteredClipping(
                    centre="previous",
                    radius_quantile=0.4,
                    pre_aggregation=AdaptiveRobustClipping(1),
                )
            ),
            id="CC-previous-ARC",
        ),
        pytest.param(
            lambda: Median(pre_aggregation=Bucketing(2, seed=0)), id="Median-Bucketing"
        ),
        pytest.param(
            lambda: TrimmedMean(
                beta=0.2,
                pre_aggregation=PreAggregationChain(
                    [AdaptiveRobustClipping(1), NearestNeighborMixing(1)]
                ),
            ),
            id="TrimmedMean-ARC-NNM",
        ),
        pytest.param(
            lambda: TrimmedMean(
                beta=0.2,
                pre_aggregation=PreAggregationChain(
                    [MedianNormEqualization(), NearestNeighborMixing(1)]
                ),
            ),
            id="TrimmedMean-NormEq-NNM",
        ),
        pytest.param(
            lambda: DPFedAvg(
                num_clients=n,
                clipping_norm=10.0,
                noise_multiplier=1e-6,
                accountant="rdp",
            ),
            id="DPFedAvg",
        ),
    ]


def _primed(strategy):
    """Run one honest round (every update 0.5) so a stateful rule holds a centre."""
    msgs = instructions(strategy, model(0.0), HONEST)
    arrays, _ = strategy.aggregate_train(1, [reply_to(m, model(0.5)) for m in msgs])
    assert arrays is not None
    assert strategy.rule_state is not None
    np.testing.assert_allclose(strategy.rule_state, 0.5, atol=1e-6)
    return strategy


def manifest_and_instruction() -> tuple[Manifest, Message]:
    strategy = Median()
    global_model = model(0.0)
    msgs = instructions(strategy, global_model, [HOSTILE, HOSTILE + 1])
    return Manifest.from_arrayrecord(global_model), msgs[0]


# --------------------------------------------------- validate_train_reply alone
@pytest.mark.parametrize(("build", "reason"), list(all_attacks()))
def test_validate_raises_only_invalid_reply_error_with_a_short_one_line_reason(
    build, reason
):
    manifest, instruction = manifest_and_instruction()
    reply = build(instruction)
    with pytest.raises(InvalidReplyError) as info:
        validate_train_reply(reply, manifest)
    assert info.value.node_id == HOSTILE
    assert reason in info.value.reason
    assert "\n" not in info.value.reason
    assert len(info.value.reason) < 600


# ------------------------------------------- every wrapper, mixed with honest
@pytest.mark.parametrize("make", wrappers())
@pytest.mark.parametrize(("build", "reason"), list(all_attacks()))
def test_hostile_reply_costs_only_itself(make, build, reason, caplog):
    strategy = make()
    msgs = instructions(strategy, model(0.0), [*HONEST, HOSTILE])
    replies = [reply_to(m, model(1.0)) for m in msgs[:-1]]
    replies.append(build(msgs[-1]))
    before = [_snapshot(r) for r in replies]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert list(arrays.keys()) == ["w", "b"]
    for key, shape in (("w", (3, 2)), ("b", (2,))):
        value = arrays[key].numpy()
        assert value.dtype == np.float32
        assert value.shape == shape
        # Every honest reply sent 1.0: every rule (one step of centered
        # clipping, a DP noise of std 1e-6 * 10 / 8) lands near it.
        np.testing.assert_allclose(value, 1.0, atol=1e-3)
    assert [_snapshot(r) for r in replies] == before  # inputs untouched
    lines = [
        r.getMessage() for r in caplog.records if "dropped reply" in r.getMessage()
    ]
    assert len(lines) == 1, lines
    assert f"node {HOSTILE}:" in lines[0]
    assert reason in lines[0]
    assert "\n" not in lines[0]


def _snapshot(message: Message) -> object:
    if message.has_error():
        return ("error", message.error.code, message.error.reason)
    out = []
    for name, record in message.content.items():
        if isinstance(record, ArrayRecord):
            items = record.__dict__["_data"].items()
            out.append(
                (
                    name,
                    [
                        (k, v.dtype, v.shape, v.stype, v.data)
                        if isinstance(v, Array)
                        else (k, v)
                        for k, v in items
                    ],
                )
            )
        else:
            out.append((name, repr(record.__dict__["_data"])))
    return out


# ---------------------------------------------- honest layouts keep working
@pytest.mark.parametrize(
    "value",
    [
        np.asfortranarray(np.arange(6, dtype=np.float32).reshape(3, 2)),
        np.arange(6, dtype=">f4").reshape(3, 2),
        np.asfortranarray(np.arange(6, dtype=">f4").reshape(3, 2)),
    ],
    ids=["fortran", "big-endian", "big-endian-fortran"],
)
def test_honest_fortran_and_big_endian_payloads_are_read_exactly(value):
    manifest, instruction = manifest_and_instruction()
    reply = reply_to(instruction, with_w(Array(value)))
    valid = validate_train_reply(reply, manifest)
    np.testing.assert_array_equal(
        valid.vector[:6], value.astype(np.float64).reshape(-1)
    )
    np.testing.assert_array_equal(valid.vector[6:], 1.0)


def test_extra_config_record_is_ignored_not_parsed():
    manifest, instruction = manifest_and_instruction()
    reply = reply_to(
        instruction, model(1.0), extra_records={"cfg": ConfigRecord({"x": b"\x00"})}
    )
    assert validate_train_reply(reply, manifest).weight == 10.0


def test_weight_up_to_the_bound_is_valid():
    manifest, instruction = manifest_and_instruction()
    reply = reply_to(instruction, model(1.0), records.MAX_WEIGHT)
    assert validate_train_reply(reply, manifest).weight == float(records.MAX_WEIGHT)


def test_zero_d_arrays_must_stay_zero_d():
    scalar = ArrayRecord({"s": Array(np.array(2.0, np.float32))})
    manifest = Manifest.from_arrayrecord(scalar)
    instruction = instructions(Median(), scalar, [HOSTILE, HOSTILE + 1])[0]
    ok = validate_train_reply(reply_to(instruction, scalar), manifest)
    assert ok.vector.tolist() == [2.0]
    one = ArrayRecord({"s": Array(np.array([2.0], np.float32))})
    with pytest.raises(InvalidReplyError, match="shape"):
        validate_train_reply(reply_to(instruction, one), manifest)
    lying = arrayrecord({"s": declared(shape=(), data=Array(np.array([2.0])).data)})
    with pytest.raises(InvalidReplyError):
        validate_train_reply(reply_to(instruction, lying), manifest)


def test_flatten_of_a_hostile_record_raises_value_error_only():
    # Client mods flatten the server's instruction with the same reader.
    _, manifest = flatten(model())
    for name, arrays, _ in ARRAY_ATTACKS:
        if name == "nan":  # well-formed: finiteness is the validator's check
            continue
        with pytest.raises(ValueError):
            flatten(arrays, manifest)


# ------------------------------------------------------- evaluate replies too
def _evaluate_reply(instruction: Message, metrics: dict | None, **records) -> Message:
    content = {} if metrics is None else {"metrics": MetricRecord(metrics)}
    content.update(records)
    return Message(RecordDict(content), reply_to=instruction)


EVALUATE_ATTACKS = [
    # escaped (DPFedAvg): InconsistentMessageReplies from the inner FedAvg
    ("other-metric-keys", {"num-examples": 10, "acc": 0.5, "zzz": 1.0}),
    ("no-weight", {"acc": 0.5}),
    ("huge-int-metric", {"num-examples": 10, "acc": 10**400}),
    ("huge-weight", {"num-examples": 10**400, "acc": 0.5}),
    ("nan-metric", {"num-examples": 10, "acc": math.nan}),
    ("no-metric-record", None),
]


@pytest.mark.parametrize("make", wrappers())
@pytest.mark.parametrize(
    "metrics", [p[1] for p in EVALUATE_ATTACKS], ids=[p[0] for p in EVALUATE_ATTACKS]
)
def test_hostile_evaluate_reply_costs_only_itself(make, metrics, caplog):
    strategy = make()
    global_model = model(0.0)
    msgs = strategy.configure_evaluate(
        1, global_model, ConfigRecord(), StaticGrid([*HONEST, HOSTILE])
    )
    msgs = sorted(msgs, key=lambda m: m.metadata.dst_node_id)
    replies = [_evaluate_reply(m, {"num-examples": 10, "acc": 0.5}) for m in msgs[:-1]]
    replies.append(_evaluate_reply(msgs[-1], metrics))
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = strategy.aggregate_evaluate(1, replies)
    assert result is not None
    assert result["acc"] == pytest.approx(0.5)
    assert f"node {HOSTILE}" in caplog.text
