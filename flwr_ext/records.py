"""ArrayRecord <-> one flat float vector, and validation of clients' train replies.

Every server-side defence in flwr-ext works on one matrix of shape
``(n_clients, n_params)``. This module is the single place where Flower's
:class:`~flwr.app.ArrayRecord` (an ordered mapping of named arrays) becomes such a
row and back again, and where a client's reply is checked before it may touch the
global model.

A :class:`Manifest` records the order, names, shapes and dtypes of the arrays, so a
flat vector can be turned back into an ArrayRecord that is identical in structure to
the global model (same keys, same order, same dtypes). Flattening always copies:
nothing a caller gets from here aliases a client's reply.

Every field of a reply is hostile input (see ``docs/security.md``): the record
names and counts, each ``Array``'s declared ``dtype``/``shape``/``stype``, its
``.npy`` header and bytes, the metric keys and values, the error reason. The
parsers here never raise anything but :class:`InvalidReplyError` (a ``ValueError``)
on them, compare every declared size with the global model's manifest before
reading a byte, and never allocate anything sized by the reply: a payload is
viewed in place only once its header, declared fields and byte length all agree
with the manifest. Client text quoted in a reason is one line and bounded.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SType
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore import log

__all__ = [
    "MAX_WEIGHT",
    "ArraySpec",
    "InvalidReplyError",
    "Manifest",
    "ValidReply",
    "aggregate_client_metrics",
    "check_no_error",
    "conform_to_manifest",
    "flatten",
    "node_of",
    "unflatten",
    "validate_evaluate_replies",
    "validate_metrics",
    "validate_train_reply",
]


@dataclass(frozen=True)
class ArraySpec:
    """Name, shape and dtype of one array in an ArrayRecord."""

    key: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        """Number of elements (product of the shape; 1 for a scalar)."""
        return math.prod(self.shape)

    @cached_property
    def _accepted(self) -> _Accepted:
        """What a reply may declare and send for this array (see _Accepted)."""
        return _Accepted.of(self)


@dataclass(frozen=True)
class Manifest:
    """Order, names, shapes and dtypes of the arrays of a model.

    Two records with equal manifests can be stacked into one matrix and
    averaged element by element.
    """

    specs: tuple[ArraySpec, ...]

    @classmethod
    def from_arrayrecord(cls, record: ArrayRecord) -> Manifest:
        """Describe ``record`` (keys in insertion order)."""
        specs = []
        for key, array in record.items():
            dtype = np.dtype(array.dtype)
            if dtype.kind not in "fiu":
                raise TypeError(
                    f"Array '{key}' has dtype {dtype}; flwr-ext aggregates only "
                    "float and integer arrays. Keep other data out of the model's "
                    "ArrayRecord (put it in a ConfigRecord instead)."
                )
            specs.append(ArraySpec(key, tuple(int(s) for s in array.shape), dtype.str))
        return cls(tuple(specs))

    @property
    def keys(self) -> tuple[str, ...]:
        """Array names in order."""
        return tuple(spec.key for spec in self.specs)

    @property
    def size(self) -> int:
        """Total number of parameters (length of the flat vector)."""
        return sum(spec.size for spec in self.specs)

    def to_dict(self) -> dict[str, list[str] | list[int]]:
        """Encode as lists that fit a Flower ConfigRecord.

        Shapes are flattened into ``shapes`` with their ranks in ``ranks`` so that
        every value is a flat list of str or int (what ConfigRecord accepts).
        """
        return {
            "keys": [spec.key for spec in self.specs],
            "dtypes": [spec.dtype for spec in self.specs],
            "ranks": [len(spec.shape) for spec in self.specs],
            "shapes": [dim for spec in self.specs for dim in spec.shape],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Manifest:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on inconsistent data."""
        try:
            keys = [str(k) for k in data["keys"]]  # type: ignore[attr-defined]
            dtypes = [str(d) for d in data["dtypes"]]  # type: ignore[attr-defined]
            ranks = [int(r) for r in data["ranks"]]  # type: ignore[attr-defined]
            dims = [int(s) for s in data["shapes"]]  # type: ignore[attr-defined]
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise ValueError(f"Malformed manifest: {err!r}") from err
        if not len(keys) == len(dtypes) == len(ranks) or sum(ranks) != len(dims):
            raise ValueError(
                "Malformed manifest: keys, dtypes, ranks and shapes do not line up "
                f"({len(keys)} keys, {len(dtypes)} dtypes, {len(ranks)} ranks, "
                f"{len(dims)} dims for a total rank of {sum(ranks)})."
            )
        if any(r < 0 for r in ranks) or any(d < 0 for d in dims):
            raise ValueError("Malformed manifest: negative rank or dimension.")
        specs, pos = [], 0
        for key, dtype, rank in zip(keys, dtypes, ranks, strict=True):
            try:
                parsed = np.dtype(dtype)
            except Exception as err:  # numpy raises TypeError, SyntaxError...
                raise ValueError(f"Malformed manifest: dtype {dtype!r:.40}") from err
            if parsed.kind not in "fiu" or parsed.str != dtype:
                raise ValueError(f"Malformed manifest: dtype {dtype!r:.40}")
            specs.append(ArraySpec(key, tuple(dims[pos : pos + rank]), dtype))
            pos += rank
        return cls(tuple(specs))

    def describe_mismatch(self, record: ArrayRecord) -> str | None:
        """Say how ``record`` differs from this manifest, or None if it matches.

        Checks the keys and each Array's *declared* fields (type, ``stype``,
        ``dtype``, ``shape``) against the manifest; the payload bytes are checked
        when they are read. Never raises: every field may hold any object.
        """
        expected = self.keys
        expected_set = set(expected)
        got = list(record.keys())
        missing = [k for k in expected if k not in record]
        extra = [k for k in got if k not in expected_set]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing arrays {_names(missing)}")
            if extra:
                parts.append(f"unexpected arrays {_names(extra)}")
            return "; ".join(parts)
        for spec in self.specs:
            problem = _declared_mismatch(record[spec.key], spec)
            if problem is not None:
                return f"array '{_text(spec.key)}' {problem}"
        return None


def _declared_mismatch(array: object, spec: ArraySpec) -> str | None:
    """How an Array's declared fields differ from ``spec`` (None: they agree)."""
    if type(array) is not Array:
        return f"is not an Array ({_text(array)})"
    stype = getattr(array, "stype", None)
    if type(stype) is not str or stype != SType.NUMPY:
        return f"uses serialization {_text(stype)}, expected {SType.NUMPY}"
    dtype = getattr(array, "dtype", None)
    accepted = spec._accepted
    if type(dtype) is not str or dtype not in accepted.names:
        return f"has dtype {_text(dtype)}, expected {accepted.dtype}"
    shape = getattr(array, "shape", None)
    if not _same_shape(shape, spec.shape):
        return f"has shape {_shape_text(shape)}, expected {spec.shape}"
    return None


def _same_shape(shape: object, expected: tuple[int, ...]) -> bool:
    """Tell whether ``shape`` is a tuple/list of plain ints equal to ``expected``."""
    if type(shape) not in (tuple, list):
        return False
    dims: tuple | list = shape  # type: ignore[assignment]
    return len(dims) == len(expected) and all(
        type(d) is int and d == e for d, e in zip(dims, expected, strict=True)
    )


def flatten(
    record: ArrayRecord,
    manifest: Manifest | None = None,
    dtype: np.dtype | type = np.float64,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, Manifest]:
    """Concatenate the arrays of ``record`` into one new 1-D vector.

    Parameters
    ----------
    record : ArrayRecord
        The arrays, e.g. a model's state dict.
    manifest : Manifest, optional
        Order in which to concatenate. Defaults to the record's own order.
        The record must match it (see :meth:`Manifest.describe_mismatch`).
    dtype : numpy dtype (default: float64)
        dtype of the returned vector. float64 keeps integer buffers exact up to
        2**53 and makes sums of float32 models exact enough for robust rules.
        Ignored when ``out`` is given.
    out : np.ndarray, optional
        A 1-D buffer of length ``manifest.size`` to write into (e.g. one row of a
        pre-allocated update matrix), which saves a copy per client.

    Returns
    -------
    tuple[np.ndarray, Manifest]
        The vector, shape ``(manifest.size,)``, and the manifest used.
    """
    manifest = manifest or Manifest.from_arrayrecord(record)
    mismatch = manifest.describe_mismatch(record)
    if mismatch is not None:
        raise ValueError(f"Cannot flatten ArrayRecord: {mismatch}.")
    return _fill(record, manifest, dtype, out), manifest


def _fill(
    record: ArrayRecord,
    manifest: Manifest,
    dtype: np.dtype | type = np.float64,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Copy ``record`` (already checked against ``manifest``) into one vector.

    Raises ``ValueError`` (only) naming the array whose payload does not hold
    what the manifest says.
    """
    if out is None:
        out = np.empty(manifest.size, dtype=dtype)
    elif out.shape != (manifest.size,):
        raise ValueError(f"out has shape {out.shape}, expected ({manifest.size},)")
    pos = 0
    for spec in manifest.specs:
        try:
            array = _values(record[spec.key], spec)
        except _PayloadError as err:
            raise ValueError(
                f"array '{_text(spec.key)}' does not deserialize: {err}"
            ) from None
        out[pos : pos + spec.size] = array.reshape(-1)
        pos += spec.size
    return out


class _PayloadError(ValueError):
    """An Array's ``.npy`` payload does not hold what its spec says."""


@dataclass(frozen=True)
class _Accepted:
    """What a reply may declare and send for one array of the manifest.

    Attributes
    ----------
    dtype : np.dtype
        The manifest's dtype.
    names : frozenset[str]
        Declared ``Array.dtype`` strings that mean it: what Flower's
        ``Array(ndarray)`` writes (``str(ndarray.dtype)``) for the manifest's
        dtype in either byte order, and its numpy ``.str`` form.
    descrs : dict[str, np.dtype]
        ``.npy`` header ``descr`` values that mean it, in either byte order (a
        big-endian host is honest), with the dtype to read the bytes as.
    nbytes : int
        Exact length of the values after the header.
    """

    dtype: np.dtype
    names: frozenset[str]
    descrs: dict[str, np.dtype]
    nbytes: int

    @classmethod
    def of(cls, spec: ArraySpec) -> _Accepted:
        dtype = np.dtype(spec.dtype)
        swapped = dtype.newbyteorder()
        names = frozenset(
            {spec.dtype, dtype.str, str(dtype), dtype.name, swapped.str, str(swapped)}
        )
        descrs = {dtype.str: dtype, swapped.str: swapped}
        return cls(dtype, names, descrs, spec.size * dtype.itemsize)


#: ``.npy`` headers already parsed: header bytes -> (descr, fortran_order,
#: shape). The replies of a run share a handful of headers, and parsing one
#: costs more than copying a small array. Only well-formed headers are kept,
#: and the cache is emptied when full, so distinct headers sent by a client
#: cannot grow it without limit.
_NPY_HEADERS: dict[bytes, tuple[str, bool, tuple[int, ...]]] = {}
_NPY_HEADERS_MAX = 512
_NPY_MAGIC = b"\x93NUMPY"
#: numpy's own limit on a header's length (``np.load``'s ``max_header_size``).
_NPY_MAX_HEADER = 10_000
_NPY_KEYS = frozenset({"descr", "fortran_order", "shape"})


def _values(array: Array, spec: ArraySpec) -> np.ndarray:
    """Return an Array's values as a read-only view of its bytes.

    The Array's declared fields must already match ``spec``
    (:meth:`Manifest.describe_mismatch`). The ``.npy`` header is parsed here,
    without numpy's loader (which allocates the shape the header declares and
    raises a dozen exception types), and its descr, order and shape, and the
    exact byte length of the values, are checked against ``spec`` before the
    bytes are viewed. Raises :class:`_PayloadError` only.
    """
    data = getattr(array, "data", None)
    if type(data) is not bytes:
        raise _PayloadError(f"payload is not bytes ({_text(data)})")
    descr, fortran, shape, offset = _npy_header(data)
    accepted = spec._accepted
    dtype = accepted.descrs.get(descr)
    if dtype is None:
        raise _PayloadError(
            f"header descr {_text(descr)} is not {accepted.dtype} in either byte order"
        )
    if shape != spec.shape:
        raise _PayloadError(
            f"holds {accepted.dtype} of shape {_shape_text(shape)} but declares "
            f"{accepted.dtype} of shape {spec.shape}"
        )
    if len(data) - offset != accepted.nbytes:
        raise _PayloadError(
            f"payload has {len(data) - offset} bytes of values, but shape "
            f"{spec.shape} of {accepted.dtype} needs {accepted.nbytes} bytes"
        )
    if accepted.nbytes == 0:
        return np.empty(spec.shape, dtype=dtype)
    values = np.frombuffer(data, dtype=dtype, count=spec.size, offset=offset)
    return values.reshape(spec.shape, order="F" if fortran else "C")


def _npy_header(data: bytes) -> tuple[str, bool, tuple[int, ...], int]:
    """Parse the header of ``.npy`` bytes: (descr, fortran_order, shape, offset).

    Follows numpy's format (NEP 1): magic, version (1: 2-byte header length,
    latin-1; 2: 4-byte, latin-1; 3: 4-byte, UTF-8), then a Python dict literal
    with exactly ``descr``, ``fortran_order`` and ``shape``. The literal is at
    most 10,000 bytes and read with :func:`ast.literal_eval` (which evaluates no
    code); every failure is a :class:`_PayloadError`.
    """
    if len(data) < 10 or data[:6] != _NPY_MAGIC:
        raise _PayloadError("payload is not .npy data (no numpy magic)")
    major = data[6]
    if major == 1:
        start, length = 10, int.from_bytes(data[8:10], "little")
    elif major in (2, 3) and len(data) >= 12:
        start, length = 12, int.from_bytes(data[8:12], "little")
    else:
        raise _PayloadError(f"unsupported .npy format version {major}")
    if length > _NPY_MAX_HEADER or start + length > len(data):
        raise _PayloadError(
            f".npy header of {length} bytes is longer than {_NPY_MAX_HEADER} "
            "or than the payload"
        )
    offset = start + length
    header = data[:offset]
    cached = _NPY_HEADERS.get(header)
    if cached is None:
        cached = _parse_npy_dict(data[start:offset], "utf8" if major == 3 else "latin1")
        if len(_NPY_HEADERS) >= _NPY_HEADERS_MAX:
            _NPY_HEADERS.clear()
        _NPY_HEADERS[header] = cached
    return (*cached, offset)


def _parse_npy_dict(raw: bytes, encoding: str) -> tuple[str, bool, tuple[int, ...]]:
    try:
        literal = ast.literal_eval(raw.decode(encoding))
    except Exception:  # SyntaxError, ValueError, MemoryError, RecursionError...
        raise _PayloadError(".npy header is not a Python literal") from None
    if type(literal) is not dict or set(literal) != _NPY_KEYS:
        raise _PayloadError(
            ".npy header is not a dict of exactly 'descr', 'fortran_order', 'shape'"
        )
    descr, fortran, shape = (
        literal["descr"],
        literal["fortran_order"],
        literal["shape"],
    )
    if type(descr) is not str:
        raise _PayloadError(f".npy header descr is not a string ({_text(descr)})")
    if type(fortran) is not bool:
        raise _PayloadError(".npy header fortran_order is not True or False")
    if (
        type(shape) is not tuple
        or len(shape) > 64
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        raise _PayloadError(
            f".npy header shape {_shape_text(shape)} is not a tuple of "
            "non-negative ints"
        )
    return descr, fortran, shape


def unflatten(vector: np.ndarray, manifest: Manifest) -> ArrayRecord:
    """Split a flat vector back into an ArrayRecord shaped like ``manifest``.

    Each array is cast back to its original dtype; integer arrays are rounded to
    the nearest integer and clipped to the dtype's range first.
    """
    vector = np.asarray(vector)
    if vector.ndim != 1 or vector.shape[0] != manifest.size:
        raise ValueError(
            f"Vector of shape {vector.shape} does not match the manifest "
            f"({manifest.size} parameters)."
        )
    arrays: dict[str, Array] = {}
    pos = 0
    for spec in manifest.specs:
        chunk = vector[pos : pos + spec.size].reshape(spec.shape)
        pos += spec.size
        arrays[spec.key] = _as_spec(chunk, spec)
    return ArrayRecord(arrays)


def _as_spec(values: np.ndarray, spec: ArraySpec) -> Array:
    """Return ``values`` as an Array of ``spec``'s dtype (ints: rounded, clipped)."""
    dtype = np.dtype(spec.dtype)
    if dtype.kind in "iu" and values.dtype.kind == "f":
        info = np.iinfo(dtype)
        values = np.clip(np.rint(values), info.min, info.max)
    # np.array, not np.ascontiguousarray: the latter turns 0-d arrays (e.g.
    # BatchNorm's num_batches_tracked) into shape (1,).
    return Array(np.array(values, dtype=dtype, order="C"))


def conform_to_manifest(
    arrays: ArrayRecord, manifest: Manifest, who: str, server_round: int
) -> ArrayRecord | None:
    """Return a strategy's new model with the global model's keys, shapes and dtypes.

    Wrappers hand their aggregate to an inner Flower strategy, whose step may
    drop arrays, change dtypes (FedAdam returns float64 for a float32 model) or
    produce NaN. Returns None, with one log line naming ``who`` and the array,
    when the result cannot be the next global model (missing array, wrong shape,
    non-finite value): the caller then keeps the previous one.
    """
    out: dict[str, Array] = {}
    for spec in manifest.specs:
        if spec.key not in arrays:
            log(
                WARNING,
                "[%s] round %d: the inner strategy dropped array '%s': keeping the "
                "previous global model",
                who,
                server_round,
                spec.key,
            )
            return None
        value = arrays[spec.key].numpy()
        if value.shape != spec.shape or not np.isfinite(value).all():
            log(
                WARNING,
                "[%s] round %d: the inner strategy returned a non-finite or "
                "reshaped '%s': keeping the previous global model",
                who,
                server_round,
                spec.key,
            )
            return None
        out[spec.key] = _as_spec(value, spec)
    return ArrayRecord(out)


class InvalidReplyError(ValueError):
    """A client reply that must not be aggregated; ``reason`` says why.

    ``proves_faulty`` is True when the reply's own content shows its sender did not
    follow the protocol (NaN, a wrong shape, a missing weight...), and False when an
    honest node could have sent it (an error reply: the ClientApp crashed). Robust
    strategies use it to lower the number of Byzantine clients still to tolerate
    among the valid replies.
    """

    def __init__(
        self, node_id: int, reason: str, *, proves_faulty: bool = True
    ) -> None:
        super().__init__(f"reply from node {node_id}: {reason}")
        self.node_id = node_id
        self.reason = reason
        self.proves_faulty = proves_faulty


@dataclass(frozen=True)
class ValidReply:
    """A train reply that passed :func:`validate_train_reply`.

    Attributes
    ----------
    node_id : int
        The node that sent it.
    vector : np.ndarray
        Its model, flattened in the global model's manifest order, shape
        ``(n_params,)``: a private copy (float64), or a view of the ``out``
        buffer passed to :func:`validate_train_reply`.
    weight : float
        The weight the client claimed (e.g. ``num-examples``), finite and >= 0.
        Robust rules do not trust it blindly: see
        :class:`flwr_ext.strategy.RobustAggregation`.
    metrics : MetricRecord
        The reply's MetricRecord (all values finite).
    message : Message
        The original reply, untouched.
    """

    node_id: int
    vector: np.ndarray
    weight: float
    metrics: MetricRecord
    message: Message


#: The largest client weight (e.g. ``num-examples``) accepted: 2**53, the
#: largest integer a float64 holds exactly. No silo holds more examples, and the
#: sum of a round's weights stays finite and exact enough for any weighting.
MAX_WEIGHT = 2**53

#: Bounds on client text quoted in a reason: a reason is one log line.
_TEXT_LIMIT = 60
_REASON_LIMIT = 200
_NAMES_SHOWN = 5


def _text(value: object, limit: int = _TEXT_LIMIT) -> str:
    """Show a client-chosen value in a reason: one line, bounded, never raising.

    Strings are cut to ``limit`` characters with non-printable characters
    escaped (a newline cannot forge a second log line); small numbers, bools and
    None are shown as they are; anything else by its type name only (its
    ``repr`` is client code in-process, and a huge int's ``repr`` raises).
    """
    kind = type(value)
    if kind is str:
        text: str = value  # type: ignore[assignment]
        shown = "".join(
            c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
            for c in text[:limit]
        )
        return shown + ("..." if len(text) > limit else "")
    if kind is int:
        number: int = value  # type: ignore[assignment]
        if -(10**18) < number < 10**18:
            return str(number)
        return f"<int of {number.bit_length()} bits>"
    if kind is float or kind is bool or value is None:
        return repr(value)
    if kind is list and len(value) <= 4:  # type: ignore[arg-type]
        return "[" + ", ".join(_text(v, 20) for v in value) + "]"  # type: ignore[attr-defined]
    return f"<{kind.__name__}>"


def _names(names: Iterable[object]) -> str:
    """Show a few client-chosen names (record or array keys), bounded."""
    items = list(names)
    shown = ", ".join(f"'{_text(n, 40)}'" for n in items[:_NAMES_SHOWN])
    more = (
        f", ... {len(items) - _NAMES_SHOWN} more" if len(items) > _NAMES_SHOWN else ""
    )
    return f"[{shown}{more}]"


def _shape_text(shape: object) -> str:
    """Show a declared shape: as a tuple when it is a short tuple/list of ints."""
    if type(shape) in (tuple, list) and len(shape) <= 8:  # type: ignore[arg-type]
        dims: tuple | list = shape  # type: ignore[assignment]
        if all(type(d) is int for d in dims):
            inner = ", ".join(_text(d) for d in dims)
            return f"({inner},)" if len(dims) == 1 else f"({inner})"
    return _text(shape)


def _metric_scalar(value: object) -> int | float | None:
    """``value`` as a plain int or finite float, or None if it is not one.

    Accepts what a MetricRecord carries over the wire: an int (not a bool) of
    at most 64 bits, or a finite float. Never raises, whatever ``value`` is.
    """
    try:
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            number = int(value)
            return number if -(2**63) <= number < 2**64 else None
        if isinstance(value, float):
            real = float(value)
            return real if math.isfinite(real) else None
    except Exception:  # a subclass whose __int__/__float__ raises
        return None
    return None


def _metric_value(value: object) -> int | float | list[int] | list[float] | None:
    """Return a clean copy of one metric value (scalar or list of one type) or None."""
    if isinstance(value, list):
        items = [_metric_scalar(v) for v in value]
        if any(v is None for v in items) or len({type(v) for v in items}) > 1:
            return None
        return items  # type: ignore[return-value]
    return _metric_scalar(value)


def node_of(message: Message) -> int:
    """Return the sender's node id (set by Flower, not the client); 0 if unreadable."""
    try:
        return int(message.metadata.src_node_id)
    except Exception:
        return 0


def check_no_error(message: Message, node_id: int) -> None:
    """Raise :class:`InvalidReplyError` if ``message`` is an error reply.

    The error's code and reason are the client's text: the reason quotes them
    on one line, bounded. ``proves_faulty`` is False (an honest ClientApp can
    crash).
    """
    if message.has_error():
        error = message.error
        code = getattr(error, "code", None)
        reason = getattr(error, "reason", None)
        raise InvalidReplyError(
            node_id,
            f"client error {_text(code)}: {_text(reason, _REASON_LIMIT)}",
            proves_faulty=False,
        )


def validate_metrics(
    message: Message, weight_key: str, node_id: int
) -> tuple[MetricRecord, float]:
    """Check that a reply carries exactly one well-formed MetricRecord.

    Returns a clean copy of the MetricRecord (plain ints and floats, nothing
    that aliases the reply) and the claimed weight. Raises
    :class:`InvalidReplyError` (only) when there is not exactly one
    MetricRecord, the weight key is missing, not a single number, negative, not
    finite or above :data:`MAX_WEIGHT`, or any metric is not an int of at most
    64 bits, a finite float, or a list of one of them.
    """
    metric_records = message.content.metric_records
    if len(metric_records) != 1:
        raise InvalidReplyError(
            node_id,
            f"expected exactly one MetricRecord, got {len(metric_records)} "
            f"({_names(metric_records)})",
        )
    metrics = next(iter(metric_records.values()))
    if weight_key not in metrics:
        raise InvalidReplyError(
            node_id, f"MetricRecord has no weight key '{_text(weight_key)}'"
        )
    raw = metrics[weight_key]
    if not isinstance(raw, int | float) or isinstance(raw, bool):
        raise InvalidReplyError(
            node_id, f"weight '{weight_key}' must be one number, got {_text(raw)}"
        )
    weight = _metric_scalar(raw)
    if (weight is None and isinstance(raw, int)) or (
        weight is not None and abs(weight) > MAX_WEIGHT
    ):
        raise InvalidReplyError(
            node_id,
            f"weight '{weight_key}' must be within [0, 2**53], got {_text(raw)}",
        )
    if weight is None or weight < 0:
        raise InvalidReplyError(
            node_id, f"weight '{weight_key}' must be finite and >= 0, got {_text(raw)}"
        )
    clean: dict[str, int | float | list[int] | list[float]] = {}
    for key, value in metrics.items():
        if type(key) is not str:
            raise InvalidReplyError(node_id, f"metric key {_text(key)} is not a str")
        parsed = _metric_value(value)
        if parsed is None:
            raise InvalidReplyError(
                node_id, f"metric '{_text(key)}' is not finite: {_text(value)}"
            )
        clean[key] = parsed
    return MetricRecord(clean), float(weight)


def validate_train_reply(
    message: Message,
    manifest: Manifest,
    weight_key: str = "num-examples",
    arrayrecord_key: str | None = None,
    out: np.ndarray | None = None,
    reference: np.ndarray | None = None,
) -> ValidReply:
    """Check a train reply against the current global model and flatten it.

    Parameters
    ----------
    message : Message
        A reply from a ClientApp's ``train`` function.
    manifest : Manifest
        Manifest of the global model sent in this round.
    weight_key : str (default: "num-examples")
        Key of the client's weight in its MetricRecord.
    arrayrecord_key : str, optional
        If set, the reply's single ArrayRecord must be stored under this key.
    out : np.ndarray, optional
        Buffer of length ``manifest.size`` for the flattened model (see
        :func:`flatten`); by default a new float64 vector.
    reference : np.ndarray, optional
        The global model, flattened like ``out``. When given, the returned
        vector is the *update* ``model - reference``, and a reply whose update
        overflows the vector's dtype (two finite values, a difference that is
        not) is invalid.

    Returns
    -------
    ValidReply

    Raises
    ------
    InvalidReplyError
        Only this, with a one-line bounded ``reason``, for: an error reply, not
        exactly one ArrayRecord (or one under the wrong key), missing or extra
        arrays, an array whose declared serialisation, dtype or shape, ``.npy``
        header or byte length disagrees with the manifest, non-finite values or
        update, or a bad MetricRecord (see :func:`validate_metrics`). Nothing
        sized by the reply is allocated before the sizes it declares match the
        manifest.
    """
    node_id = node_of(message)
    check_no_error(message, node_id)
    array_records = message.content.array_records
    if len(array_records) != 1:
        raise InvalidReplyError(
            node_id,
            f"expected exactly one ArrayRecord, got {len(array_records)} "
            f"({_names(array_records)})",
        )
    key, record = next(iter(array_records.items()))
    if arrayrecord_key is not None and key != arrayrecord_key:
        raise InvalidReplyError(
            node_id,
            f"ArrayRecord stored under '{_text(key)}', expected '{arrayrecord_key}'",
        )
    mismatch = manifest.describe_mismatch(record)
    if mismatch is not None:
        raise InvalidReplyError(node_id, mismatch)
    metrics, weight = validate_metrics(message, weight_key, node_id)
    try:
        vector = _fill(record, manifest, out=out)
    except ValueError as err:  # a payload that disagrees with its declaration
        raise InvalidReplyError(node_id, f"arrays could not be read: {err}") from None
    if not np.isfinite(vector).all():
        bad = [
            spec.key
            for spec, ok in zip(
                manifest.specs, _finite_per_array(vector, manifest), strict=True
            )
            if not ok
        ]
        raise InvalidReplyError(
            node_id, f"non-finite values (NaN/Inf) in arrays {_names(bad)}"
        )
    if reference is not None:
        # Both terms are finite, so only an overflow can make the difference
        # non-finite, and the floating-point status flag catches that without
        # another pass over the vector.
        try:
            with np.errstate(over="raise"):
                np.subtract(vector, reference, out=vector)
        except FloatingPointError:
            raise InvalidReplyError(
                node_id, f"update (model - global model) overflows {vector.dtype}"
            ) from None
    return ValidReply(node_id, vector, weight, metrics, message)


def validate_evaluate_replies(
    replies: Iterable[Message], weight_key: str, who: str, server_round: int
) -> list[ValidReply]:
    """Return the evaluate replies with one well-formed MetricRecord.

    Error replies and malformed MetricRecords (see :func:`validate_metrics`) are
    dropped with one log line each, naming ``who``, the round and the node. The
    returned :class:`ValidReply` objects carry an empty vector.
    """
    valid: list[ValidReply] = []
    for reply in replies:
        node_id = node_of(reply)
        try:
            check_no_error(reply, node_id)
            metrics, weight = validate_metrics(reply, weight_key, node_id)
        except InvalidReplyError as err:
            log(
                WARNING,
                "[%s] round %d: dropped evaluate reply from node %d: %s",
                who,
                server_round,
                node_id,
                err.reason,
            )
            continue
        valid.append(ValidReply(node_id, np.empty(0), weight, metrics, reply))
    return valid


def aggregate_client_metrics(
    valid: list[ValidReply],
    weights: Iterable[float],
    weight_key: str,
    aggr_fn: object,
    who: str,
    server_round: int,
) -> MetricRecord:
    """Aggregate validated clients' metrics with the wrapper's ``weights``.

    Flower's metric functions (``aggregate_metricrecords``) need every record to
    carry the same keys, and a user's ``aggr_fn`` may raise on anything. So the
    replies whose metric keys differ from the round's most common key set are
    left out (one log line each: the reply's model still counts), and an
    exception from the function costs only the round's client metrics (an empty
    MetricRecord, with one log line), never the run.

    Parameters
    ----------
    valid : list[ValidReply]
        Replies that passed :func:`validate_metrics`.
    weights : iterable of float
        One weight per reply (the wrapper's policy, not necessarily the claims);
        stored under ``weight_key`` for the function.
    weight_key : str
        The key the function weighs by.
    aggr_fn : callable or None
        ``fn(records, weight_key) -> MetricRecord``; Flower's
        ``aggregate_metricrecords`` if not callable.
    who, server_round : str, int
        Named in the log lines.
    """
    if not valid:
        return MetricRecord()
    key_sets = [frozenset(reply.metrics.keys()) for reply in valid]
    counts: dict[frozenset[str], int] = {}
    for key_set in key_sets:
        counts[key_set] = counts.get(key_set, 0) + 1
    common = max(counts, key=counts.__getitem__)  # ties: the first seen
    records = []
    for reply, key_set, weight in zip(valid, key_sets, weights, strict=True):
        if key_set != common:
            log(
                WARNING,
                "[%s] round %d: metrics of node %d left out of the aggregate: "
                "keys %s differ from the round's %s",
                who,
                server_round,
                reply.node_id,
                _names(sorted(key_set)),
                _names(sorted(common)),
            )
            continue
        metrics = MetricRecord({**reply.metrics, weight_key: float(weight)})
        records.append(RecordDict({"metrics": metrics}))
    fn = aggr_fn if callable(aggr_fn) else aggregate_metricrecords
    try:
        return fn(records, weight_key)
    except Exception as err:  # a client's metrics never crash the server
        log(
            WARNING,
            "[%s] round %d: client metrics could not be aggregated (%s: %s)",
            who,
            server_round,
            type(err).__name__,
            _text(str(err), _REASON_LIMIT),
        )
        return MetricRecord()


def _finite_per_array(vector: np.ndarray, manifest: Manifest) -> list[bool]:
    result, pos = [], 0
    for spec in manifest.specs:
        result.append(bool(np.isfinite(vector[pos : pos + spec.size]).all()))
        pos += spec.size
    return result
