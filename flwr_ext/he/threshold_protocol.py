"""Threshold CKKS over Flower messages: what the server and the sites send each other.

Every exchange is a Flower *train* message that ``ckks_mod`` answers itself (the
ClientApp sees only ordinary training rounds). The ConfigRecord of each
instruction carries ``ckks-threshold-op``:

============  ===============================================  ======================
op            server -> site                                   site -> server
============  ===============================================  ======================
``keygen``    key-set id, 32-byte public seed                  ``p_i`` (key level,
                                                               ``(k+1, N)`` uint64)
``train``     key-set id, collective public key, weight unit,  the update encrypted
              weight key, number of clients; the plaintext     with the public key
              global model                                     (:func:`encrypt_update`)
``decrypt``   key-set id, request number, number of             ``h_i`` per chunk and
              contributions, ``c1`` of each aggregate chunk    the digest of each
                                                               ``c1`` it answered
``sum``       (a *query*) key-set id, public key, scale; the   the app's MetricRecord
              app's own query config                           encrypted as one vector
                                                               plus its layout
============  ===============================================  ======================

Sizes (N = 8192, two 60-bit data primes, packed two reals per slot): an encrypted
update is 32 B/param (SEAL's format, 64-bit words), each ``c1`` down and each share
up 15 B/param per site (residues packed at 60 bits, :func:`pack_residues`).

Everything parsed here comes from the other side of a trust boundary: every parser
checks types, counts and sizes before anything sized by the message is allocated,
and raises only :class:`~flwr_ext.he.threshold.ThresholdError`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from .threshold import ThresholdContext, ThresholdError, check_residues

__all__ = [
    "KEY_OP",
    "EncryptedUpdate",
    "TrainAnnouncement",
    "decode_update",
    "encode_update",
    "read_residue_record",
    "residue_record",
]

KEY_OP = "ckks-threshold-op"
KEY_KEYSET = "ckks-threshold-keyset"
KEY_SEED = "ckks-threshold-seed"
KEY_PUBLIC_KEY = "ckks-threshold-public-key"
KEY_WEIGHT_UNIT = "ckks-threshold-weight-unit"
KEY_WEIGHT_KEY = "ckks-threshold-weight-key"
KEY_NUM_CLIENTS = "ckks-threshold-num-clients"
KEY_ROUND = "ckks-threshold-round"
KEY_CONTRIBUTIONS = "ckks-threshold-contributions"
KEY_DIGESTS = "ckks-threshold-digests"
KEY_SITE_NAME = "ckks-threshold-site"

KEY_SCALE_BITS = "ckks-threshold-scale-bits"
KEY_LAYOUT = "ckks-threshold-layout"

OP_KEYGEN = "keygen"
OP_TRAIN = "train"
OP_DECRYPT = "decrypt"
OP_SUM = "sum"
OPS = (OP_KEYGEN, OP_TRAIN, OP_DECRYPT, OP_SUM)
#: Most values a secure sum of metrics may hold.
MAX_SUM_VALUES = 1_000_000

#: Name of the ArrayRecord entry holding an encrypted update's metadata.
META = "ckks-threshold-meta"
#: ArrayRecord entries of an encrypted update: ``ct-00000``, ``ct-00001``...
_CHUNK = re.compile(r"ct-(\d{5})")
#: Most ciphertext chunks one message may carry (8.2e8 parameters at N=8192).
MAX_CHUNKS = 100_000
#: Largest serialized SEAL ciphertext accepted (a full N=8192, 3-prime one is
#: ~393 KB uncompressed).
MAX_CIPHERTEXT_BYTES = 1 << 20

_KEYSET = re.compile(r"[0-9a-f]{32}")


def check_keyset(value: object) -> str:
    """Return a key-set id (32 lowercase hex characters) or raise."""
    if not isinstance(value, str) or not _KEYSET.fullmatch(value):
        raise ThresholdError("malformed threshold key-set id")
    return value


def read_op(config: ConfigRecord | None) -> str | None:
    """Return the threshold operation an instruction asks for, or ``None``."""
    if config is None or KEY_OP not in config:
        return None
    op = config[KEY_OP]
    if op not in OPS:
        raise ThresholdError(f"unknown threshold operation {op!r}")
    return str(op)


def _int(config: ConfigRecord, key: str, low: int, high: int) -> int:
    value = config.get(key)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not low <= value <= high
    ):
        raise ThresholdError(f"'{key}' must be an integer in [{low}, {high}]")
    return int(value)


@dataclass(frozen=True)
class TrainAnnouncement:
    """What a site needs to encrypt its update in one round."""

    keyset: str
    public_key: bytes
    weight_unit: float
    weight_key: str
    num_clients: int

    def write(self, config: ConfigRecord) -> None:
        """Add the announcement to a train ConfigRecord."""
        config[KEY_OP] = OP_TRAIN
        config[KEY_KEYSET] = self.keyset
        config[KEY_PUBLIC_KEY] = self.public_key
        config[KEY_WEIGHT_UNIT] = float(self.weight_unit)
        config[KEY_WEIGHT_KEY] = self.weight_key
        config[KEY_NUM_CLIENTS] = int(self.num_clients)

    @classmethod
    def read(cls, config: ConfigRecord) -> TrainAnnouncement:
        """Parse and check the announcement in a train instruction."""
        public_key = config.get(KEY_PUBLIC_KEY)
        if not isinstance(public_key, bytes) or not 0 < len(public_key) <= 1 << 22:
            raise ThresholdError("the train instruction carries no public key")
        unit = config.get(KEY_WEIGHT_UNIT)
        if (
            isinstance(unit, bool)
            or not isinstance(unit, int | float)
            or not math.isfinite(unit)
            or unit <= 0
        ):
            raise ThresholdError("the weight unit must be a finite number > 0")
        weight_key = config.get(KEY_WEIGHT_KEY)
        if not isinstance(weight_key, str) or not 0 < len(weight_key) <= 128:
            raise ThresholdError("malformed weight key")
        return cls(
            keyset=check_keyset(config.get(KEY_KEYSET)),
            public_key=public_key,
            weight_unit=float(unit),
            weight_key=weight_key,
            num_clients=_int(config, KEY_NUM_CLIENTS, 1, 1 << 20),
        )


#: Bits per residue on the wire: every prime of the profile is below 2**60.
RESIDUE_BITS = 60
_LOW60 = np.uint64((1 << 60) - 1)


def _windows(buffer: np.ndarray, offset: int, count: int) -> np.ndarray:
    """``count`` little-endian uint64 words at ``offset + 15 i`` of a byte buffer."""
    return np.ndarray(
        (count,), dtype="<u8", buffer=buffer, offset=offset, strides=(15,)
    )


def pack_residues(values: np.ndarray) -> np.ndarray:
    """Pack residues below ``2**60`` into 60 bits each: 15 bytes per pair.

    ``(k, N)`` uint64 (``k N`` even) to ``7.5 k N`` uint8, little-endian: the pair
    ``(a, b)`` is the 120-bit number ``a + b 2**60``, bytes ``15 i .. 15 i + 14``.
    A residue is 60 bits of entropy; the 64-bit layout wasted 6.25% of the
    partial-decryption traffic. (Written as overlapping unaligned 64-bit words:
    first the high words at ``15 i + 8``, then the low words at ``15 i``, which
    overwrite the byte each high word spilled into the next pair.)
    """
    flat = np.ascontiguousarray(values, dtype=np.uint64).ravel()
    if flat.size % 2 or (flat.size and int(flat.max()) >> RESIDUE_BITS):
        raise ThresholdError("only an even count of residues below 2**60 packs")
    pairs = flat.size // 2
    if pairs == 0:
        return np.empty(0, dtype=np.uint8)
    first, second = flat[0::2], flat[1::2]
    out = np.zeros(15 * pairs + 1, dtype=np.uint8)
    _windows(out, 8, pairs)[:] = second >> np.uint64(4)  # 56 bits
    _windows(out, 0, pairs)[:] = first | (second << np.uint64(60))
    return out[: 15 * pairs]


def unpack_residues(data: bytes | memoryview, count: int) -> np.ndarray:
    """Inverse of :func:`pack_residues`: ``7.5 count`` bytes to ``count`` values.

    Exactly that many bytes, else :class:`ThresholdError`; the uint64 values are
    below ``2**60`` (the caller checks them against the primes).
    """
    if count < 0 or count % 2 or len(data) != count * RESIDUE_BITS // 8:
        raise ThresholdError(
            f"{len(data)} bytes do not hold {count} packed 60-bit residues"
        )
    pairs = count // 2
    if pairs == 0:
        return np.empty(0, dtype=np.uint64)
    buffer = np.frombuffer(data, dtype=np.uint8)
    low = _windows(buffer, 0, pairs)
    high = _windows(buffer, 7, pairs)  # bytes 7..14: the top 56 bits after >> 8
    out = np.empty(count, dtype=np.uint64)
    out[0::2] = low & _LOW60
    out[1::2] = (low >> np.uint64(60)) | ((high >> np.uint64(8)) << np.uint64(4))
    return out


def residue_record(prefix: str, rows: list[np.ndarray]) -> ArrayRecord:
    """``(k, N)`` residue arrays as ``prefix-00000``, ``prefix-00001``...

    Each packed at 60 bits per residue (:func:`pack_residues`): 15 B/param for a
    two-prime chunk of ``N`` values, where 64-bit words cost 16.
    """
    return ArrayRecord(
        {f"{prefix}-{i:05d}": Array(pack_residues(r)) for i, r in enumerate(rows)}
    )


def read_residue_record(
    context: ThresholdContext,
    record: ArrayRecord,
    prefix: str,
    *,
    expected: int,
    key_level: bool = False,
) -> list[np.ndarray]:
    """Inverse of :func:`residue_record`, every array checked before it is built.

    The record must hold exactly ``prefix-00000`` ... ``prefix-{expected-1}``, each
    a 1-D uint8 array of ``(k, N)`` (``(k+1, N)`` at the key level) residues
    packed at 60 bits, every residue below its prime.
    """
    names = [f"{prefix}-{i:05d}" for i in range(expected)]
    if sorted(record.keys()) != names:
        raise ThresholdError(
            f"expected {expected} arrays '{prefix}-NNNNN', got {len(record)}"
        )
    moduli = context.key_moduli if key_level else context.data_moduli
    shape = (len(moduli), context.n)
    nbytes = shape[0] * shape[1] * RESIDUE_BITS // 8
    out = []
    for name in names:
        array = record[name]
        if array.stype != "numpy.ndarray":
            raise ThresholdError(f"'{name}' is not a numpy array")
        payload = _bytes_of(record[name], nbytes, name)
        if len(payload) != nbytes:
            raise ThresholdError(f"'{name}' is not {shape} packed residues")
        values = unpack_residues(payload, shape[0] * shape[1]).reshape(shape)
        if np.any(values >= np.array(moduli, dtype=np.uint64)[:, None]):
            raise ThresholdError(f"'{name}' holds residues out of range")
        out.append(values)
    return out


@dataclass(frozen=True)
class EncryptedUpdate:
    """An update encrypted under the collective public key.

    Attributes
    ----------
    keyset : str
        The key set it is encrypted under.
    num_values : int
        Length of the encrypted vector (model values plus the weight and count
        slots).
    ciphertexts : list[bytes | memoryview]
        SEAL ciphertext bytes, ``N`` values each (as parsed: read-only views
        into the received message, not copies).
    """

    keyset: str
    num_values: int
    ciphertexts: Sequence[bytes | memoryview]


def encode_update(update: EncryptedUpdate) -> ArrayRecord:
    """Encode an :class:`EncryptedUpdate` as an ArrayRecord (meta + chunks)."""
    meta = json.dumps(
        {
            "keyset": update.keyset,
            "num_values": update.num_values,
            "chunks": len(update.ciphertexts),
        }
    ).encode()
    arrays = {META: Array(np.frombuffer(meta, dtype=np.uint8).copy())}
    for i, blob in enumerate(update.ciphertexts):
        arrays[f"ct-{i:05d}"] = Array(np.frombuffer(blob, dtype=np.uint8).copy())
    return ArrayRecord(arrays)


def is_threshold_update(record: ArrayRecord) -> bool:
    """Whether ``record`` is an :func:`encode_update` record."""
    return META in record


def decode_update(
    context: ThresholdContext, record: ArrayRecord, *, expected_values: int
) -> EncryptedUpdate:
    """Parse an encrypted update; every field checked before use.

    ``expected_values`` is what the server expects (the model's size plus two
    slots); the chunk count follows from it, so a reply cannot make the server
    allocate more than the model needs.
    """
    if META not in record:
        raise ThresholdError("the update is not threshold-encrypted")
    expected_chunks = max(1, math.ceil(expected_values / context.n))
    if len(record) != expected_chunks + 1:
        raise ThresholdError(
            f"expected {expected_chunks} ciphertexts, got {len(record) - 1} arrays"
        )
    meta = _bytes_of(record[META], 4096, "metadata")
    try:
        parsed: Any = json.loads(bytes(meta).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ThresholdError("the update's metadata is not JSON") from err
    if not isinstance(parsed, dict) or set(parsed) != {
        "keyset",
        "num_values",
        "chunks",
    }:
        raise ThresholdError("the update's metadata has the wrong fields")
    keyset = check_keyset(parsed["keyset"])
    num_values, chunks = parsed["num_values"], parsed["chunks"]
    if num_values != expected_values or chunks != expected_chunks:
        raise ThresholdError(
            f"the update holds {num_values!r} values in {chunks!r} chunks, expected "
            f"{expected_values} in {expected_chunks}"
        )
    ciphertexts = []
    for i in range(expected_chunks):
        name = f"ct-{i:05d}"
        if name not in record:
            raise ThresholdError(f"the update has no '{name}'")
        ciphertexts.append(_bytes_of(record[name], MAX_CIPHERTEXT_BYTES, name))
    return EncryptedUpdate(keyset, expected_values, ciphertexts)


def _bytes_of(array: Array, limit: int, what: str) -> memoryview:
    """Return the raw bytes of a 1-D uint8 ``Array`` of at most ``limit`` bytes.

    A read-only view into the message's payload (no copy of a ciphertext).
    """
    if array.dtype not in ("|u1", "uint8") or len(array.shape) != 1:
        raise ThresholdError(f"'{what}' must be a 1-D uint8 array")
    length = array.shape[0]
    if (
        isinstance(length, bool)
        or not isinstance(length, int)
        or not 0 < length <= limit
    ):
        raise ThresholdError(f"'{what}' must hold 1..{limit} bytes")
    data = bytes(array.data)
    if len(data) < length or data[:6] != b"\x93NUMPY":
        raise ThresholdError(f"'{what}' payload is malformed")
    payload = memoryview(data)[len(data) - length :]
    if len(data) - length > 256:  # an .npy header is at most a few hundred bytes
        raise ThresholdError(f"'{what}' payload is malformed")
    return payload


def check_chunk_residues(context: ThresholdContext, values: np.ndarray) -> None:
    """Alias kept small for the mod: raise unless ``values`` are ``(k, N)``."""
    check_residues(context, values, "c1")


def metrics_to_vector(record: Any) -> tuple[list[tuple[str, int]], np.ndarray]:
    """Flatten a MetricRecord's numbers into one float64 vector, keys sorted.

    Returns the layout ``[(key, length), ...]`` (a scalar has length 0) and the
    vector. Every value must be a finite number or a list of them.
    """
    layout: list[tuple[str, int]] = []
    parts: list[np.ndarray] = []
    for key in sorted(record):
        value = record[key]
        if isinstance(value, list):
            if not value or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in value
            ):
                raise ThresholdError(f"metric '{key}' is not a list of numbers")
            array = np.asarray(value, dtype=np.float64)
            layout.append((str(key), len(value)))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            array = np.asarray([value], dtype=np.float64)
            layout.append((str(key), 0))
        else:
            raise ThresholdError(f"metric '{key}' is not a number or a list of them")
        if not np.isfinite(array).all():
            raise ThresholdError(f"metric '{key}' holds NaN or Inf")
        parts.append(array)
    vector = np.concatenate(parts) if parts else np.zeros(0)
    return layout, vector


def read_layout(text: object) -> list[tuple[str, int]]:
    """Parse a layout sent by a site (JSON ``[[key, length], ...]``), totally."""
    if not isinstance(text, str) or len(text) > 65536:
        raise ThresholdError("malformed layout")
    try:
        parsed: Any = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise ThresholdError("malformed layout") from err
    if not isinstance(parsed, list) or not parsed:
        raise ThresholdError("malformed layout")
    layout = []
    total = 0
    for entry in parsed:
        if (
            not isinstance(entry, list)
            or len(entry) != 2
            or not isinstance(entry[0], str)
            or not 0 < len(entry[0]) <= 128
            or isinstance(entry[1], bool)
            or not isinstance(entry[1], int)
            or not 0 <= entry[1] <= MAX_SUM_VALUES
        ):
            raise ThresholdError("malformed layout")
        total += max(entry[1], 1)
        layout.append((entry[0], entry[1]))
    if total > MAX_SUM_VALUES or len({k for k, _ in layout}) != len(layout):
        raise ThresholdError("malformed layout")
    return layout


def vector_to_metrics(
    layout: list[tuple[str, int]], vector: np.ndarray
) -> MetricRecord:
    """Inverse of :func:`metrics_to_vector` (floats; lists stay lists)."""
    out: dict[str, Any] = {}
    position = 0
    for key, length in layout:
        if length == 0:
            out[key] = float(vector[position])
            position += 1
        else:
            out[key] = [float(v) for v in vector[position : position + length]]
            position += length
    return MetricRecord(out)


def layout_size(layout: list[tuple[str, int]]) -> int:
    """Return the number of values a layout describes."""
    return sum(max(length, 1) for _, length in layout)
