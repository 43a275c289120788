"""Hostile Flower Messages: builders and reusable hypothesis strategies.

A client (or a server, for client-side mods) controls every field of the
messages it sends: record names and counts, each ``Array``'s declared
``dtype``/``shape``/``stype`` and its ``.npy`` bytes (header and payload), metric
keys and values, the error code and reason. Over the wire Flower's own
deserialisation fixes a few types (``Array.shape`` is a tuple of ``int``,
metric values are int/float or lists of one of them); in-process nothing does.
These helpers build the wire-possible forgeries with Flower's own constructors
and, where noted, "smuggle" values past Flower's type checks so that parsers are
tested against any Python object.

Usage in a fuzz test::

    @given(data=st.data())
    def test_x(data):
        msgs = instructions(strategy, global_arrays, nodes)
        reply = data.draw(hostile_reply(msgs[0], global_arrays))
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from hypothesis import strategies as st

__all__ = [
    "arrayrecord",
    "forged_array",
    "hostile_array",
    "hostile_metric_value",
    "hostile_reply",
    "honest_reply",
    "npy_bytes",
    "npy_header",
    "random_reply",
    "smuggle",
    "snapshot",
]

NUMPY = "numpy.ndarray"


# ----------------------------------------------------------------- builders
def forged_array(dtype: Any, shape: Any, stype: Any, data: Any) -> Array:
    """An Array holding exactly these four fields, whatever their types.

    Flower's constructor checks the types of the declared fields; assigning them
    afterwards does not, which is how a buggy or hostile in-process component
    could hand one over.
    """
    array = Array(np.zeros(1, np.float32))
    array.dtype = dtype
    array.shape = shape
    array.stype = stype
    array.data = data
    return array


def npy_bytes(header: str | bytes, payload: bytes = b"", version: int = 1) -> bytes:
    """``.npy`` bytes with this header text (padded like numpy) and payload.

    Versions 1 has a 2-byte header length, every other version a 4-byte one.
    """
    raw = header.encode("latin1") if isinstance(header, str) else header
    prefix = 8 + (2 if version == 1 else 4)
    raw += b" " * (-(prefix + len(raw) + 1) % 64) + b"\n"
    length = len(raw).to_bytes(2 if version == 1 else 4, "little")
    return b"\x93NUMPY" + bytes([version % 256, 0]) + length + raw + payload


def arrayrecord(arrays: dict[str, Any]) -> ArrayRecord:
    """An ArrayRecord holding these very objects (``ArrayRecord(dict)`` would
    rebuild each Array through its type-checking constructor)."""
    record = ArrayRecord()
    for key, value in arrays.items():
        if isinstance(value, Array):
            record[key] = value
        else:
            smuggle(record, key, value)
    return record


def smuggle(record: Any, key: str, value: Any) -> Any:
    """Put ``value`` under ``key`` in a Flower record, past its type check."""
    record.__dict__["_data"][key] = value
    return record


def honest_reply(
    instruction: Message, arrays: ArrayRecord, num_examples: int = 10
) -> Message:
    """The reply an honest ClientApp sends (``arrays`` + ``num-examples``)."""
    return Message(
        RecordDict(
            {
                "arrays": arrays,
                "metrics": MetricRecord({"num-examples": num_examples}),
            }
        ),
        reply_to=instruction,
    )


# ------------------------------------------------------------- strategies
_DTYPE_TEXT = [
    "float32", "float64", "float16", "int64", "int8", "uint8", "bool", "object",
    "O", "V8", "<U3", "S4", "complex64", "<f4", ">f4", "|f4", "=f4", "f", "d",
    "float33", "(3,2)f4", "(2147483647,2147483647)f8", "[('a', '<f4')]",
    "datetime64[s]", "m8", "", " float32", "float32\x00", "f" * 300,
]  # fmt: skip

_DESCR_TEXT = [
    "<f4", ">f4", "<f8", "<i8", "|i1", "|u1", "|b1", "|O", "<U3", "|V8", "<c8",
    "zz", "", "<f4 ", "[('a', '<f4')]", "('<f4', (3, 2))",
]  # fmt: skip

_HUGE_INTS = [2**31, 2**32, 2**53, 2**63 - 1, 2**63, 2**64, 2**70, 10**400]


def any_int() -> st.SearchStrategy[int]:
    """Small, negative, boundary and astronomically large integers."""
    return st.one_of(
        st.integers(-3, 8),
        st.sampled_from(_HUGE_INTS),
        st.sampled_from([-(2**63), -(10**400)]),
        st.integers(),
    )


def any_shape() -> st.SearchStrategy[Any]:
    """Declared shapes: plausible, hostile, and not shapes at all."""
    entries = st.one_of(
        any_int(), st.booleans(), st.floats(), st.text(max_size=3), st.none()
    )
    return st.one_of(
        st.tuples(st.integers(0, 4), st.integers(0, 4)),
        st.lists(any_int(), max_size=4).map(tuple),
        st.lists(entries, max_size=4).map(tuple),
        st.lists(entries, max_size=4),
        st.just((1,) * 100),
        st.none(),
        st.integers(),
        st.text(max_size=8),
    )


def npy_header(shape: tuple[int, ...] = (3, 2)) -> st.SearchStrategy[str]:
    """Header dict texts: near the honest one, hostile values, and garbage."""
    descr = st.one_of(st.sampled_from(_DESCR_TEXT), st.text(max_size=12))
    fortran = st.sampled_from(["False", "True", "'yes'", "1", "None", "0.5"])
    shapes = st.one_of(
        st.just(repr(tuple(shape))),
        st.lists(any_int(), max_size=4).map(lambda s: repr(tuple(s))),
        st.sampled_from(
            ["()", "(-1,)", "(3.0, 2.0)", "'3,2'", "None", "[3, 2]", "(1e400,)"]
        ),
    )
    dict_text = st.builds(
        lambda d, f, s: f"{{'descr': {d!r}, 'fortran_order': {f}, 'shape': {s}, }}",
        descr,
        fortran,
        shapes,
    )
    garbage = st.one_of(
        st.text(max_size=80),
        st.sampled_from(
            [
                "{'descr': '<f4', " + "(" * 150,
                "[" * 5000,
                "{}",
                "[1, 2]",
                "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), 'x': 1}",
                "{'descr': '<f4', 'fortran_order': False}",
                "__import__('os')",
                "{'descr': '<f4', 'fortran_order': False, 'shape': (9"
                + "9" * 5000
                + ",)}",
            ]
        ),
    )
    return st.one_of(dict_text, garbage)


@st.composite
def npy_payload(draw: st.DrawFn, honest: np.ndarray) -> bytes:
    """``.npy`` bytes: the honest ones mutated, or a hostile header + payload."""
    buffer = io.BytesIO()
    np.save(buffer, honest, allow_pickle=False)
    data = bytearray(buffer.getvalue())
    kind = draw(st.sampled_from(["flip", "cut", "extend", "header", "random"]))
    if kind == "flip" and data:
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "cut":
        return bytes(data[: draw(st.integers(0, max(len(data) - 1, 0)))])
    if kind == "extend":
        return bytes(data) + draw(st.binary(min_size=1, max_size=64))
    if kind == "header":
        version = draw(st.sampled_from([1, 2, 3, 0, 9]))
        header = draw(npy_header(honest.shape))
        payload = draw(
            st.one_of(
                st.just(honest.tobytes()),
                st.binary(max_size=64),
                st.just(honest.astype(">f4").tobytes()),
            )
        )
        try:
            raw = header.encode("latin1")
        except UnicodeEncodeError:
            raw = header.encode("utf8")
        return npy_bytes(raw, payload, version)
    return draw(st.binary(max_size=128))


@st.composite
def hostile_array(draw: st.DrawFn, honest: np.ndarray) -> Array:
    """An Array meant to stand where ``honest`` should: each field may lie."""
    good = Array(honest)
    dtype = draw(
        st.one_of(
            st.just(good.dtype),
            st.sampled_from(_DTYPE_TEXT),
            st.text(max_size=12),
            st.integers(),
            st.none(),
        )
    )
    shape = draw(st.one_of(st.just(good.shape), any_shape()))
    stype = draw(
        st.one_of(
            st.just(NUMPY),
            st.sampled_from(["torch.Tensor", "", NUMPY + " "]),
            st.none(),
        )
    )
    data = draw(
        st.one_of(
            st.just(good.data),
            npy_payload(honest),
            st.sampled_from([b"", None, "abc", bytearray(good.data)]),
        )
    )
    return forged_array(dtype, shape, stype, data)


def finite_values(honest: np.ndarray) -> st.SearchStrategy[np.ndarray]:
    """Well-formed arrays like ``honest`` with any finite values (even extreme)."""
    if honest.dtype.kind in "iu":
        info = np.iinfo(honest.dtype)
        return st.integers(int(info.min), int(info.max)).map(
            lambda v: np.full(honest.shape, v, honest.dtype)
        )
    big = float(np.finfo(honest.dtype).max)
    value = st.one_of(
        st.floats(-10, 10),
        st.sampled_from([0.0, -0.0, big, -big, 1e-45, float(np.float32(1e30))]),
    )
    return st.builds(
        lambda v, noise: np.asarray(np.full(honest.shape, v) + noise, honest.dtype),
        value,
        st.sampled_from([0.0, 1e-3]),
    )


def hostile_metric_value() -> st.SearchStrategy[Any]:
    """Values a MetricRecord may carry (and, smuggled, ones it may not)."""
    scalars = st.one_of(
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([*_HUGE_INTS, -(10**400)]),
    )
    return st.one_of(
        scalars,
        st.lists(st.integers(), max_size=4),
        st.lists(st.floats(), max_size=4),
        st.lists(st.sampled_from([10**400, 1, 2]), max_size=3),
    )


_SMUGGLED = [True, False, None, "10", b"\x00", [[1.0]], {"a": 1}, [1, 2.5], object()]


@st.composite
def hostile_metrics(draw: st.DrawFn) -> MetricRecord:
    """A MetricRecord with a hostile or honest ``num-examples`` and extras."""
    weight = draw(
        st.one_of(st.integers(0, 1000), hostile_metric_value(), st.just(None))
    )
    metrics: dict[str, Any] = {}
    if weight is not None:
        metrics["num-examples"] = weight
    extras = draw(
        st.dictionaries(st.text(max_size=12), hostile_metric_value(), max_size=3)
    )
    for key, value in extras.items():
        metrics.setdefault(key, value)
    record = MetricRecord(metrics)
    if draw(st.booleans()):
        key = draw(st.sampled_from(["num-examples", "loss", "x\ny"]))
        smuggle(record, key, draw(st.sampled_from(_SMUGGLED)))
    return record


@st.composite
def hostile_arrayrecord(draw: st.DrawFn, global_arrays: ArrayRecord) -> ArrayRecord:
    """The global model's keys with honest, extreme or hostile arrays; keys may
    be dropped, added, renamed or reordered."""
    out: dict[str, Any] = {}
    for key, array in global_arrays.items():
        honest = array.numpy()
        choice = draw(st.sampled_from(["honest", "extreme", "hostile", "drop"]))
        if choice == "honest":
            out[key] = Array(np.asarray(honest + 1, honest.dtype))
        elif choice == "extreme":
            out[key] = Array(draw(finite_values(honest)))
        elif choice == "hostile":
            out[key] = draw(hostile_array(honest))
    for key in draw(st.lists(st.text(max_size=10), max_size=2)):
        out[key] = Array(np.zeros(2, np.float32))
    if draw(st.booleans()):
        out = dict(reversed(list(out.items())))
    record = arrayrecord(out)
    if draw(st.integers(0, 9)) == 0:
        smuggle(record, draw(st.sampled_from([*global_arrays.keys(), "z"])), 7)
    return record


@st.composite
def hostile_reply(
    draw: st.DrawFn, instruction: Message, global_arrays: ArrayRecord
) -> Message:
    """A reply to ``instruction`` that starts as a valid one and may lie anywhere.

    Each part is independently honest or hostile: the error, the number and
    names of ArrayRecords and MetricRecords, their contents, extra ConfigRecords.
    """
    if draw(st.integers(0, 7)) == 0:
        code = draw(st.one_of(st.integers(), st.none(), st.text(max_size=4)))
        reason = draw(
            st.one_of(
                st.text(max_size=40),
                st.just("line one\nWARNING: forged line"),
                st.just("y" * 100_000),
                st.none(),
                st.integers(),
            )
        )
        return Message(Error(code=code, reason=reason), reply_to=instruction)  # type: ignore[arg-type]
    content: dict[str, Any] = {}
    names = draw(
        st.one_of(
            st.just(["arrays"]),
            st.lists(st.text(max_size=8), max_size=3, unique=True),
        )
    )
    for name in names:
        content[name] = draw(hostile_arrayrecord(global_arrays))
    n_metrics = draw(st.sampled_from([1, 1, 1, 0, 2]))
    for i in range(n_metrics):
        content[f"metrics{i or ''}"] = draw(hostile_metrics())
    if draw(st.integers(0, 4)) == 0:
        content["config"] = ConfigRecord({"x": draw(st.binary(max_size=8))})
    return Message(RecordDict(content), reply_to=instruction)


_RANDOM_DTYPES = ["<f4", "<f8", "<f2", ">f4", "<i8", "|i1", "|u1", "|b1", "<c8"]


@st.composite
def random_reply(draw: st.DrawFn, instruction: Message) -> Message:
    """A reply with random records of random arrays and metrics, unrelated to
    the global model (a client running another app, or noise)."""
    content: dict[str, Any] = {}
    for name in draw(st.lists(st.text(max_size=6), max_size=3, unique=True)):
        kind = draw(st.sampled_from(["arrays", "metrics", "config"]))
        if kind == "arrays":
            arrays = {}
            for key in draw(st.lists(st.text(max_size=4), max_size=3, unique=True)):
                dtype = np.dtype(draw(st.sampled_from(_RANDOM_DTYPES)))
                shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
                raw = draw(st.binary(min_size=dtype.itemsize * math.prod(shape)))
                arrays[key] = Array(
                    np.frombuffer(raw[: dtype.itemsize * math.prod(shape)], dtype)
                    .reshape(shape)
                    .copy()
                )
            content[name] = ArrayRecord(arrays)
        elif kind == "metrics":
            content[name] = draw(hostile_metrics())
        else:
            content[name] = ConfigRecord({"k": draw(st.text(max_size=4))})
    return Message(RecordDict(content), reply_to=instruction)


def snapshot(message: Message) -> object:
    """Everything a reply holds, frozen, to check that no one modified it."""
    if message.has_error():
        return ("error", _freeze(message.error.code), _freeze(message.error.reason))
    out = []
    for name, record in message.content.items():
        items = []
        for key, value in record.__dict__["_data"].items():
            if type(value) is Array:
                fields = value.__dict__
                frozen = [_freeze(fields.get(f)) for f in ("dtype", "shape", "stype")]
                items.append((key, "Array", *frozen, _freeze(fields.get("data"))))
            else:
                items.append((key, _freeze(value)))
        out.append((name, type(record).__name__, tuple(items)))
    return out


def _freeze(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return (type(value).__name__, tuple(_freeze(v) for v in value))
    if isinstance(value, bytearray):
        return ("bytearray", bytes(value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _freeze(v)) for k, v in value.items()))
    return value


def is_finite_like(arrays: ArrayRecord, global_arrays: ArrayRecord) -> bool:
    """True when ``arrays`` has the global model's keys, order, shapes, dtypes
    and only finite values."""
    if list(arrays.keys()) != list(global_arrays.keys()):
        return False
    for key, array in global_arrays.items():
        want, got = array.numpy(), arrays[key].numpy()
        if got.dtype != want.dtype or got.shape != want.shape:
            return False
        if not np.isfinite(got).all():
            return False
    return True
