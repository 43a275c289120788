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
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from logging import WARNING
from numbers import Real

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.common.constant import SType
from flwr.supercore import log

__all__ = [
    "ArraySpec",
    "InvalidReplyError",
    "Manifest",
    "ValidReply",
    "conform_to_manifest",
    "flatten",
    "unflatten",
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
        except (KeyError, TypeError) as err:
            raise ValueError(f"Malformed manifest: {err!r}") from err
        if not len(keys) == len(dtypes) == len(ranks) or sum(ranks) != len(dims):
            raise ValueError(
                "Malformed manifest: keys, dtypes, ranks and shapes do not line up "
                f"({len(keys)} keys, {len(dtypes)} dtypes, {len(ranks)} ranks, "
                f"{len(dims)} dims for a total rank of {sum(ranks)})."
            )
        specs, pos = [], 0
        for key, dtype, rank in zip(keys, dtypes, ranks, strict=True):
            specs.append(ArraySpec(key, tuple(dims[pos : pos + rank]), dtype))
            pos += rank
        return cls(tuple(specs))

    def describe_mismatch(self, record: ArrayRecord) -> str | None:
        """Say how ``record`` differs from this manifest, or None if it matches."""
        expected = self.keys
        got = tuple(record.keys())
        missing = [k for k in expected if k not in record]
        extra = [k for k in got if k not in set(expected)]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing arrays {missing}")
            if extra:
                parts.append(f"unexpected arrays {extra}")
            return "; ".join(parts)
        for spec in self.specs:
            array = record[spec.key]
            shape = tuple(int(s) for s in array.shape)
            if shape != spec.shape:
                return f"array '{spec.key}' has shape {shape}, expected {spec.shape}"
            if np.dtype(array.dtype).str != spec.dtype:
                return (
                    f"array '{spec.key}' has dtype {np.dtype(array.dtype)}, "
                    f"expected {np.dtype(spec.dtype)}"
                )
        return None


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
    """Copy ``record`` (already checked against ``manifest``) into one vector."""
    if out is None:
        out = np.empty(manifest.size, dtype=dtype)
    elif out.shape != (manifest.size,):
        raise ValueError(f"out has shape {out.shape}, expected ({manifest.size},)")
    pos = 0
    for spec in manifest.specs:
        try:
            array = _values(record[spec.key])
        except (TypeError, ValueError, OSError, EOFError) as err:
            raise ValueError(f"array '{spec.key}' does not deserialize: {err}") from err
        if array.shape != spec.shape or array.dtype.str != spec.dtype:
            raise ValueError(
                f"array '{spec.key}' holds {array.dtype}{list(array.shape)} but "
                f"declares {np.dtype(spec.dtype)}{list(spec.shape)}"
            )
        out[pos : pos + spec.size] = array.reshape(-1)
        pos += spec.size
    return out


#: Parsed ``.npy`` headers: header bytes -> (shape, dtype, data offset), or None
#: for layouts read by ``Array.numpy()``. The replies of a run share a handful of
#: headers, and parsing one costs more than copying a small array. Bounded, so
#: distinct headers sent by a client cannot grow it without limit.
_NPY_HEADERS: dict[bytes, tuple[tuple[int, ...], np.dtype, int] | None] = {}
_NPY_HEADERS_MAX = 512
_NPY_MAGIC = b"\x93NUMPY"


def _values(array: Array) -> np.ndarray:
    """Return an Array's values; a read-only view of its bytes when possible.

    ``Array.numpy()`` (``np.load``) copies the payload in 256 KiB chunks into a
    new array and re-parses the header each time; for a numpy-serialised Array
    the values can be viewed in place (the caller copies them where they go).
    Anything unusual (another serialisation, Fortran order, object dtype, a
    truncated payload) takes ``Array.numpy()``, with its errors.
    """
    data = array.data
    if array.stype != SType.NUMPY or not isinstance(data, bytes):
        return array.numpy()
    layout = _npy_layout(data)
    if layout is None:
        return array.numpy()
    shape, dtype, offset = layout
    count = math.prod(shape)
    if len(data) - offset < count * dtype.itemsize:
        return array.numpy()
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def _npy_layout(data: bytes) -> tuple[tuple[int, ...], np.dtype, int] | None:
    """Shape, dtype and data offset of ``.npy`` bytes (None: use np.load)."""
    if data[:6] != _NPY_MAGIC or len(data) < 12:
        return None
    if data[6] == 1:
        offset = 10 + int.from_bytes(data[8:10], "little")
        read_header = np.lib.format.read_array_header_1_0
    elif data[6] == 2:
        offset = 12 + int.from_bytes(data[8:12], "little")
        read_header = np.lib.format.read_array_header_2_0
    else:
        return None
    header = data[:offset]
    if header in _NPY_HEADERS:
        return _NPY_HEADERS[header]
    try:
        stream = io.BytesIO(header)
        np.lib.format.read_magic(stream)
        shape, fortran_order, dtype = read_header(stream)
    except (ValueError, TypeError, SyntaxError):
        layout = None
    else:
        ok = not fortran_order and not dtype.hasobject
        layout = (tuple(int(s) for s in shape), dtype, offset) if ok else None
    if len(_NPY_HEADERS) < _NPY_HEADERS_MAX:
        _NPY_HEADERS[header] = layout
    return layout


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


def _is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def validate_metrics(
    message: Message, weight_key: str, node_id: int
) -> tuple[MetricRecord, float]:
    """Check that a reply carries exactly one well-formed MetricRecord.

    Returns the MetricRecord and the claimed weight. Raises :class:`InvalidReplyError`
    when there is not exactly one MetricRecord, the weight key is missing, not a
    single number, negative or not finite, or any metric value is not finite.
    """
    metric_records = message.content.metric_records
    if len(metric_records) != 1:
        raise InvalidReplyError(
            node_id,
            f"expected exactly one MetricRecord, got {len(metric_records)} "
            f"({sorted(metric_records)})",
        )
    metrics = next(iter(metric_records.values()))
    if weight_key not in metrics:
        raise InvalidReplyError(
            node_id, f"MetricRecord has no weight key '{weight_key}'"
        )
    weight = metrics[weight_key]
    if not _is_number(weight):
        raise InvalidReplyError(
            node_id, f"weight '{weight_key}' must be one number, got {weight!r}"
        )
    weight = float(weight)  # type: ignore[arg-type]
    if not math.isfinite(weight) or weight < 0:
        raise InvalidReplyError(
            node_id, f"weight '{weight_key}' must be finite and >= 0, got {weight}"
        )
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(_is_number(v) and math.isfinite(float(v)) for v in values):
            raise InvalidReplyError(node_id, f"metric '{key}' is not finite: {value!r}")
    return metrics, weight


def validate_train_reply(
    message: Message,
    manifest: Manifest,
    weight_key: str = "num-examples",
    arrayrecord_key: str | None = None,
    out: np.ndarray | None = None,
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

    Returns
    -------
    ValidReply

    Raises
    ------
    InvalidReplyError
        With a one-line ``reason`` for: an error reply, not exactly one ArrayRecord
        (or one under the wrong key), missing or extra arrays, a wrong shape or
        dtype, non-finite values, or a bad MetricRecord (see
        :func:`validate_metrics`).
    """
    node_id = int(message.metadata.src_node_id)
    if message.has_error():
        raise InvalidReplyError(
            node_id,
            f"client error {message.error.code}: {message.error.reason}",
            proves_faulty=False,
        )
    array_records = message.content.array_records
    if len(array_records) != 1:
        raise InvalidReplyError(
            node_id,
            f"expected exactly one ArrayRecord, got {len(array_records)} "
            f"({sorted(array_records)})",
        )
    key, record = next(iter(array_records.items()))
    if arrayrecord_key is not None and key != arrayrecord_key:
        raise InvalidReplyError(
            node_id, f"ArrayRecord stored under '{key}', expected '{arrayrecord_key}'"
        )
    mismatch = manifest.describe_mismatch(record)
    if mismatch is not None:
        raise InvalidReplyError(node_id, mismatch)
    metrics, weight = validate_metrics(message, weight_key, node_id)
    try:
        vector = _fill(record, manifest, out=out)
    except ValueError as err:  # e.g. a payload that does not deserialize
        raise InvalidReplyError(node_id, f"arrays could not be read: {err}") from err
    if not np.isfinite(vector).all():
        bad = [
            spec.key
            for spec, ok in zip(
                manifest.specs, _finite_per_array(vector, manifest), strict=True
            )
            if not ok
        ]
        raise InvalidReplyError(node_id, f"non-finite values (NaN/Inf) in arrays {bad}")
    return ValidReply(node_id, vector, weight, metrics, message)


def _finite_per_array(vector: np.ndarray, manifest: Manifest) -> list[bool]:
    result, pos = [], 0
    for spec in manifest.specs:
        result.append(bool(np.isfinite(vector[pos : pos + spec.size]).all()))
        pos += spec.size
    return result
