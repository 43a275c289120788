"""The CKKS codec: an ArrayRecord <-> an encrypted ArrayRecord that a server can add.

Encoding (data owner, secret key)
---------------------------------
1. Flatten every array of the record into one float64 vector in the record's own
   order (:func:`flwr_ext.records.flatten`; the :class:`~flwr_ext.records.Manifest`
   keeps names, shapes and dtypes, so the key holder rebuilds the exact structure).
2. Pre-scale by the client's weight ``w`` and append two slots:
   ``[w * x_1, ..., w * x_d, w, 1]``. Summing such vectors over clients gives
   ``[sum w_i x_i, sum w_i, n]``; the key holder divides by the weight slot to get
   the weighted average (FedAvg) and reads the number of contributions from the
   last slot. The server never multiplies, so no prime is consumed by rescaling.
3. Check ``|w * x| <= bound / num_clients`` (the profile's magnitude bound, see
   :func:`flwr_ext.he.profiles.check_bound`) before anything is encrypted.
4. Encrypt chunk by chunk (:mod:`flwr_ext.he.wire`) and put the ciphertext bytes in
   an ArrayRecord: ``"ckks-meta"`` (JSON: kind, profile, key fingerprint, wire
   format, manifest, number of values and chunks) and ``"ckks-00000"``,
   ``"ckks-00001"``, ... (one ciphertext each). The context is never sent.

Ciphertext arrays use their own ``stype`` (:data:`STYPE_CIPHERTEXT`), so code that
mistakes them for plaintext - e.g. Flower's FedAvg averaging them - fails loudly
(``Array.numpy()`` refuses unknown stypes) instead of averaging bytes.

Decoding (key holder) reverses this: check the fingerprint, decrypt, divide by the
weight slot, and :func:`flwr_ext.records.unflatten` to the original dtypes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from flwr.app import Array, ArrayRecord

from ..records import Manifest, flatten, unflatten
from ._seal_raw import data_moduli
from .flooding import (
    FRESH_ERROR_BOUND,
    NoiseStream,
    flooding_noise,
    flooding_std,
    noise_residues,
    release_grid,
    round_to_grid,
)
from .keys import CkksKeys
from .meta import parse_meta
from .profiles import check_bound
from .wire import CiphertextError, get_wire

__all__ = [
    "META_KEY",
    "STYPE_CIPHERTEXT",
    "STYPE_META",
    "DecryptedModel",
    "EncryptedHeader",
    "InvalidCiphertextError",
    "decrypt_average",
    "decrypt_record",
    "encrypt_record",
    "is_encrypted",
]

META_KEY = "ckks-meta"
CHUNK_PREFIX = "ckks-"
STYPE_META = "flwr-ext.ckks.meta"
STYPE_CIPHERTEXT = "flwr-ext.ckks.ciphertext"
#: 2: per-chunk ``digest`` (:func:`chunk_digest`) instead of format 1's ``crc32``.
FORMAT_VERSION = 2
#: Extra slots after the model values: the weight and the contribution count.
EXTRA_SLOTS = 2

Kind = Literal["update", "model"]


class InvalidCiphertextError(ValueError):
    """An encrypted record that is malformed, truncated, or made for other keys."""


@dataclass(frozen=True)
class EncryptedHeader:
    """What an encrypted ArrayRecord declares about itself (its ``ckks-meta``).

    Attributes
    ----------
    kind : {"update", "model"}
        ``"update"``: one client's pre-scaled model; ``"model"``: a sum (the
        encrypted global model).
    profile : str
        Name of the CKKS profile.
    fingerprint : str
        Fingerprint of the key set that encrypted it.
    wire : str
        Wire format (``"packed"``, ``"seeded"`` or ``"tenseal"``).
    manifest : Manifest
        Names, shapes and dtypes of the plaintext arrays.
    num_chunks : int
        Number of ciphertexts.
    decryptor : bool
        On an update: the sending node has opted in to decrypt aggregates for the
        server (``HomomorphicAggregation(mode="decrypt-aggregate")``).
    checksums : tuple[int, ...]
        The integrity digest of each ciphertext's bytes (:func:`chunk_digest`),
        set by :func:`pack`. A CKKS ciphertext has no integrity of its own: a
        flipped bit inside a coefficient still loads and silently corrupts the
        whole sum, so every chunk is checked against its digest before it is
        used. It detects accidental damage only: a hostile sender writes any
        digest it likes.
    """

    kind: Kind
    profile: str
    fingerprint: str
    wire: str
    manifest: Manifest
    num_chunks: int
    decryptor: bool = False
    checksums: tuple[int, ...] = ()

    @property
    def num_values(self) -> int:
        """Encrypted values: the model's parameters plus the weight and count slots."""
        return self.manifest.size + EXTRA_SLOTS

    def to_bytes(self) -> bytes:
        """JSON encoding stored in the ``ckks-meta`` array."""
        return json.dumps(
            {
                "format": FORMAT_VERSION,
                "kind": self.kind,
                "profile": self.profile,
                "fingerprint": self.fingerprint,
                "wire": self.wire,
                "manifest": self.manifest.to_dict(),
                "num_chunks": self.num_chunks,
                "decryptor": self.decryptor,
                "digest": list(self.checksums),
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_record(cls, record: ArrayRecord) -> EncryptedHeader:
        """Parse and check the structure of an encrypted record (no key needed).

        Raises :class:`InvalidCiphertextError` naming what is wrong.
        """
        if META_KEY not in record:
            raise InvalidCiphertextError(
                f"not an encrypted record (no '{META_KEY}' array); is ckks_mod in "
                "the ClientApp's mods?"
            )
        meta = record[META_KEY]
        if meta.stype != STYPE_META:
            raise InvalidCiphertextError(f"'{META_KEY}' has stype {meta.stype!r}")
        try:
            parsed = parse_meta(meta.data, FORMAT_VERSION)
            manifest = Manifest.from_dict(parsed.manifest)
        except ValueError as err:  # MetaError, or the manifest's own check
            raise InvalidCiphertextError(f"'{META_KEY}' is corrupted: {err}") from None
        header = cls(
            kind=parsed.kind,  # type: ignore[arg-type]  # checked by parse_meta
            profile=parsed.profile,
            fingerprint=parsed.fingerprint,
            wire=parsed.wire,
            manifest=manifest,
            num_chunks=parsed.num_chunks,
            decryptor=parsed.decryptor,
            checksums=parsed.checksums,
        )
        try:
            get_wire(header.wire)
        except ValueError as err:
            raise InvalidCiphertextError(str(err)[:200]) from None
        # Compare counts before building any list sized by the header.
        if len(record) != header.num_chunks + 1 or sorted(record.keys()) != sorted(
            [META_KEY, *chunk_keys(header.num_chunks)]
        ):
            raise InvalidCiphertextError(
                f"expected arrays {META_KEY} and {header.num_chunks} chunks "
                f"({CHUNK_PREFIX}00000...), got {len(record)} arrays"
            )
        for key in chunk_keys(header.num_chunks):
            if record[key].stype != STYPE_CIPHERTEXT:
                raise InvalidCiphertextError(
                    f"array '{key}' has stype {record[key].stype!r}, expected "
                    f"{STYPE_CIPHERTEXT!r}"
                )
        return header

    def check_keys(self, keys: CkksKeys, what: str) -> None:
        """Check fingerprint, profile and chunk count against ``keys``."""
        keys.check_matches(self.profile, self.fingerprint, what)
        expected = get_wire(self.wire).num_chunks(keys, self.num_values)
        if self.num_chunks != expected:
            raise InvalidCiphertextError(
                f"{what} declares {self.num_chunks} ciphertexts, but "
                f"{self.num_values} values in wire format {self.wire!r} need {expected}"
            )


def chunk_keys(num_chunks: int) -> list[str]:
    """Names of the ciphertext arrays, in order."""
    return [f"{CHUNK_PREFIX}{i:05d}" for i in range(num_chunks)]


def is_encrypted(record: ArrayRecord) -> bool:
    """Whether ``record`` is an encrypted record (has a ``ckks-meta`` array)."""
    return META_KEY in record and record[META_KEY].stype == STYPE_META


#: The digest's word weights repeat with this period (2^18 words: 2 MiB of chunk,
#: more than a ciphertext of N = 32768 with four data primes takes).
_DIGEST_PERIOD = 1 << 18


@functools.lru_cache(maxsize=1)
def _digest_weights() -> np.ndarray:
    return 2 * np.arange(_DIGEST_PERIOD, dtype=np.uint64) + np.uint64(1)


def chunk_digest(blob: bytes | memoryview) -> int:
    """Integrity digest of one chunk: a position-weighted sum of its 64-bit words.

    ``D = (len(blob) + sum_i (2 i + 1) x_i) mod 2^64`` where ``x_i`` are the
    chunk's little-endian 64-bit words (the last one zero-padded) and ``i`` counts
    modulo 2^18. The weights are odd, hence invertible modulo 2^64, so ``D``
    changes for *every* damage confined to one 64-bit word (any pattern of bit
    flips in it), for every burst of up to 32 bits anywhere (as CRC-32), for
    every change of length, and for two different words less than 2^18 words
    apart exchanging places unless their difference is divisible by 2^46; random
    damage to several words goes unnoticed with probability 2^-64. It does not
    detect deliberate changes (anyone can recompute it), nor damage whose
    weighted changes cancel out.

    Why not CRC-32: it is about 2.5 times slower here (``zlib.crc32`` 15 ms,
    this 6 ms for one 1M-parameter update, 32 MB), and it ran on every chunk of
    every reply, half of the server's time per client (docs/secure-aggregation.md).
    """
    data = memoryview(blob).cast("B") if isinstance(blob, memoryview) else blob
    words, rest = divmod(len(data), 8)
    weights = _digest_weights()
    total = len(data)
    for start in range(0, words, _DIGEST_PERIOD):
        count = min(_DIGEST_PERIOD, words - start)
        x = np.frombuffer(data, dtype="<u8", count=count, offset=8 * start)
        total += int(np.dot(x, weights[:count]))  # wraps modulo 2^64
    if rest:
        tail = int.from_bytes(bytes(data[8 * words :]), "little")
        total += tail * (2 * (words % _DIGEST_PERIOD) + 1)
    return total % 2**64


def pack(header: EncryptedHeader, blobs: list[bytes]) -> ArrayRecord:
    """Put the header (with each chunk's digest) and the ciphertexts in a record."""
    if len(blobs) != header.num_chunks:
        raise ValueError(f"{len(blobs)} ciphertexts for {header.num_chunks} chunks")
    header = replace(header, checksums=tuple(chunk_digest(blob) for blob in blobs))
    meta = header.to_bytes()
    arrays = {META_KEY: Array("uint8", (len(meta),), STYPE_META, meta)}
    for key, blob in zip(chunk_keys(header.num_chunks), blobs, strict=True):
        arrays[key] = Array("uint8", (len(blob),), STYPE_CIPHERTEXT, bytes(blob))
    return ArrayRecord(arrays)


def check_chunk_bytes(
    record: ArrayRecord, header: EncryptedHeader, keys: CkksKeys, what: str
) -> None:
    """Refuse chunks too short or too long to be ciphertexts of ``keys``' profile.

    Runs before anything is loaded or allocated for the chunks: a decryption
    allocates ``N`` float64 values per ciphertext, so a record of many one-byte
    "ciphertexts" (a hostile server's global model, say) must not get that far.
    A ciphertext has two polynomials of ``N`` coefficients in each of the
    profile's ``k`` data primes (8 bytes each); the seeded form ships one, and
    SEAL's zstd compresses 60-bit words little, so ``2 N`` bytes is far below the
    smallest and ``16 N k`` + 64 KiB above the largest in every wire format.
    """
    degree = keys.profile.poly_modulus_degree
    data_primes = max(1, len(keys.profile.coeff_mod_bit_sizes) - 1)
    low, high = 2 * degree, 16 * degree * data_primes + 65536
    for index, key in enumerate(chunk_keys(header.num_chunks)):
        size = len(record[key].data)
        if not low <= size <= high:
            raise InvalidCiphertextError(
                f"{what}: ciphertext {index} has {size} bytes, outside the "
                f"[{low}, {high}] a ciphertext of profile {keys.profile.name!r} takes"
            )


def iter_chunks(
    record: ArrayRecord, header: EncryptedHeader, verify: bool = True
) -> Iterator[bytes]:
    """Yield the ciphertext bytes of ``record`` in order, each checked on the way.

    Checking chunk by chunk lets a consumer stream: a corrupted chunk raises when
    it is reached (:class:`InvalidCiphertextError`), not before the first one.
    """
    for index, key in enumerate(chunk_keys(header.num_chunks)):
        blob = record[key].data
        if verify and chunk_digest(blob) != header.checksums[index]:
            raise InvalidCiphertextError(
                f"ciphertext {index} is corrupted or truncated ({len(blob)} bytes, "
                "digest mismatch)"
            )
        yield blob


def chunks(record: ArrayRecord, header: EncryptedHeader) -> list[bytes]:
    """Return the ciphertext bytes of ``record`` in order, checked (digests)."""
    return list(iter_chunks(record, header))


def encrypt_record(
    record: ArrayRecord,
    keys: CkksKeys,
    weight: float,
    *,
    num_clients: int = 1,
    wire: str = "packed",
    decryptor: bool = False,
) -> ArrayRecord:
    """Encrypt a client's model, pre-scaled by its weight (data owner side).

    Parameters
    ----------
    record : ArrayRecord
        The plaintext model (float or integer arrays).
    keys : CkksKeys
        A context with the secret key.
    weight : float
        The client's weight in weight units (e.g. ``num-examples / weight_unit``);
        finite and > 0.
    num_clients : int (default: 1)
        Replies the server will sum: each client may use ``1 / num_clients`` of the
        profile's magnitude bound.
    wire : {"packed", "seeded", "tenseal"}
        Wire format (see :mod:`flwr_ext.he.wire`).
    decryptor : bool (default: False)
        Announce that this node decrypts aggregates for the server on request.

    Returns
    -------
    ArrayRecord
        ``ckks-meta`` plus one ``ckks-NNNNN`` array per ciphertext.

    Raises
    ------
    flwr_ext.he.profiles.BoundExceededError
        If ``|weight * value|`` exceeds the per-client budget (nothing encrypted).
    ValueError
        If the weight is not finite and positive, or the record has non-numeric
        arrays.
    """
    keys.require_secret()
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
        raise ValueError(f"the client weight must be finite and > 0, got {weight!r}")
    wire_format = get_wire(wire)
    manifest = Manifest.from_arrayrecord(record)
    vector = np.empty(manifest.size + EXTRA_SLOTS, dtype=np.float64)
    flatten(record, manifest, out=vector[: manifest.size])
    check_bound(vector[: manifest.size], float(weight), keys.profile, num_clients)
    vector[: manifest.size] *= weight
    vector[manifest.size] = weight
    vector[manifest.size + 1] = 1.0
    blobs = wire_format.encrypt(keys, vector)
    header = EncryptedHeader(
        "update",
        keys.profile.name,
        keys.fingerprint,
        wire,
        manifest,
        len(blobs),
        decryptor=decryptor,
    )
    return pack(header, blobs)


@dataclass(frozen=True)
class DecryptedModel:
    """A decrypted record: the weighted average and what it was made of.

    Every value here is *released*: flooded and rounded
    (:func:`decrypt_record`), safe to hand to the server or to publish.

    Attributes
    ----------
    arrays : ArrayRecord
        ``sum(w_i x_i) / sum(w_i)``, shaped and typed like the original model.
    total_weight : float
        ``sum(w_i)`` (the weight slot).
    contributions : int
        Number of client updates in the sum (the count slot).
    noise_std : float
        Standard deviation of the flooding noise on every decrypted *sum* slot
        (value units); the average's is about ``noise_std / total_weight``.
    """

    arrays: ArrayRecord
    total_weight: float
    contributions: int
    noise_std: float = 0.0


#: Largest count slot a decryption accepts (it sizes the flooding noise).
MAX_CONTRIBUTIONS = 2**20


def decrypt_record(
    record: ArrayRecord, keys: CkksKeys, what: str = "the encrypted model"
) -> DecryptedModel:
    """Decrypt an encrypted record with the secret key, flooded (data owner side).

    Every decryption is *flooded* (:mod:`flwr_ext.he.flooding`): integer noise
    sized from the profile's error bound is added to the plaintext before it is
    decoded, so the result does not reveal the secret-dependent decryption
    error (which would give away the key), and the average and the total weight
    are then rounded to a power-of-two grid below the noise. See
    :func:`decrypt_average` for the steps; this function shapes the average
    like the original model (names, shapes, dtypes).

    Raises
    ------
    KeyMismatchError
        If it was encrypted under another key set or profile (names both).
    InvalidCiphertextError
        If it is malformed, a ciphertext does not load, or its weight or count
        slot is out of range.
    """
    average, total_weight, contributions, noise_std, manifest = _release(
        record, keys, what
    )
    return DecryptedModel(
        unflatten(average, manifest), total_weight, contributions, noise_std
    )


def decrypt_average(
    record: ArrayRecord, keys: CkksKeys, what: str = "the encrypted model"
) -> tuple[np.ndarray, float, int, float]:
    """Return the released weighted average as a flat float64 vector.

    What :func:`decrypt_record` releases, before the cast to the model's dtypes
    (for measurements). Steps:

    1. decrypt the last ciphertext exactly, locally, to read the count slot
       ``n`` (the error of a sum of ``n`` fresh ciphertexts is at most
       ``21 n`` per coefficient);
    2. ``tau = flooding_std(21 n, ciphertexts x N, profile.flood_releases,
       profile.flood_security_bits)``;
    3. draw the noise from SHAKE-256 seeded with a hash of the secret key and of
       the ciphertexts, so the same ciphertext always releases the same value,
       whoever decrypts it and however often;
    4. decrypt every ciphertext with its noise polynomial added, divide by the
       weight slot, round.

    Returns
    -------
    tuple
        ``(average, total_weight, contributions, noise_std)``: see
        :class:`DecryptedModel`.
    """
    average, total_weight, contributions, noise_std, _ = _release(record, keys, what)
    return average, total_weight, contributions, noise_std


def _release(
    record: ArrayRecord, keys: CkksKeys, what: str
) -> tuple[np.ndarray, float, int, float, Manifest]:
    keys.require_secret()
    header = EncryptedHeader.from_record(record)
    header.check_keys(keys, what)
    wire = get_wire(header.wire)
    blobs = chunks(record, header)
    sizes = wire.chunk_sizes(keys, header.num_values)
    profile = keys.profile
    degree = profile.poly_modulus_degree
    try:
        last = wire.decrypt(keys, blobs[-1:], sizes[-1], None)  # local, never released
        count = float(last[-1])
        if not (math.isfinite(count) and 0.5 <= count <= MAX_CONTRIBUTIONS):
            raise InvalidCiphertextError(
                f"{what} decrypts to a contribution count of {count:g}; the "
                "aggregate overflowed the profile's bound or was made with another key"
            )
        tau = flooding_std(
            FRESH_ERROR_BOUND * round(count),
            len(blobs) * degree,
            profile.flood_releases,
            profile.flood_security_bits,
        )
        seed = hashlib.blake2b(keys.seal().flood_key(), digest_size=32)
        seed.update(keys.fingerprint.encode())
        for blob in blobs:
            seed.update(hashlib.blake2b(blob, digest_size=32).digest())
        noise = flooding_noise(len(blobs) * degree, tau, NoiseStream(seed.digest()))
        residues = noise_residues(
            noise.reshape(len(blobs), degree), data_moduli(keys.seal())
        ).transpose(1, 0, 2)
        values = wire.decrypt(keys, blobs, header.num_values, residues)
    except (CiphertextError, InvalidCiphertextError) as err:
        raise InvalidCiphertextError(f"{what}: {err}") from err
    except ValueError as err:  # the flooding does not fit the sampler
        raise InvalidCiphertextError(f"{what}: {err}") from err
    # The noise on each decoded real value: tau * sqrt(N / 2) / scale.
    noise_std = tau * math.sqrt(degree / 2) / profile.scale
    size = header.manifest.size
    total_weight = float(values[size])
    if not math.isfinite(total_weight) or total_weight <= 0:
        raise InvalidCiphertextError(
            f"{what} decrypts to a total weight of {total_weight:g}; the aggregate "
            "overflowed the profile's bound or was made with another key"
        )
    average = round_to_grid(
        values[:size] / total_weight, release_grid(noise_std / total_weight)
    )
    total_weight = float(round_to_grid(total_weight, release_grid(noise_std)))
    return (
        average,
        total_weight,
        round(float(values[size + 1])),
        noise_std,
        (header.manifest),
    )
