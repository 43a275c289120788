"""SEAL objects to and from numpy residue arrays, through SEAL's own byte format.

``tenseal.sealapi`` objects save and load only through files, always compressed,
and expose no buffer. The multiparty protocol needs to read a ciphertext's two
polynomials and to build a public key SEAL can encrypt with, so this module reads
and writes SEAL's serialization directly (SEAL 4, little-endian):

- every object: a 16-byte header (magic ``0xA15E``, header size 16, SEAL version
  major/minor, compression mode 0 none / 1 zlib / 2 zstd, reserved, total size),
  then the body, compressed as the header says;
- ``Ciphertext`` body: ``parms_id`` (4 x u64), ``is_ntt_form`` (u8), ``size``,
  ``poly_modulus_degree``, ``coeff_modulus_size`` (u64 each), ``scale`` (f64),
  ``correction_factor`` (u64), then a ``DynArray`` (its own header, ``u64`` count,
  the residues: ``size x coeff_modulus_size x N`` ``uint64``);
- ``Plaintext`` body: ``parms_id``, ``coeff_count`` (u64), ``scale`` (f64),
  ``DynArray``;
- ``PublicKey``: a ``Ciphertext`` at the key level.

What this module writes is uncompressed (or zstd-compressed as SEAL's own save,
:func:`zstd_compressed`); SEAL validates it on load (``load`` runs
``is_valid_for``), so a malformed object is refused by SEAL, never half-used. What it
reads is parsed with every length checked against the expected shape before any
array is built, and decompressed to at most that shape's size (the bytes may come
from a hostile peer); :mod:`flwr_ext.he.residue_sum` adds the checks SEAL's
``is_valid_for`` makes on the values.
"""

from __future__ import annotations

import functools
import struct
import zlib
from dataclasses import dataclass

import numpy as np

__all__ = [
    "RawCiphertext",
    "SealFormatError",
    "ciphertext_bytes",
    "ciphertext_parts",
    "parse_ciphertext",
    "plaintext_bytes",
    "uncompressed",
    "zstd_compressed",
]

_MAGIC = 0xA15E
_HEADER = struct.Struct("<HBBBBHQ")
_CIPHERTEXT_META = struct.Struct("<BQQQdQ")
_PLAINTEXT_META = struct.Struct("<Qd")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_MAX_DECOMPRESSED = 1 << 28  # 256 MiB: far above one N=32768 ciphertext


class SealFormatError(ValueError):
    """Bytes that are not the SEAL object this module expects."""


@dataclass(frozen=True)
class RawCiphertext:
    """A ciphertext's metadata and residues.

    Attributes
    ----------
    parms_id : tuple[int, int, int, int]
        SEAL's hash of the parameters at the ciphertext's level.
    ntt_form : bool
        Whether the polynomials are in NTT form (CKKS ciphertexts always are).
    scale : float
        The CKKS scale the message was encoded with.
    polys : numpy.ndarray
        ``(size, k, N)`` ``uint64`` residues: ``polys[0]`` is ``c0``, ``polys[1]``
        is ``c1``. Parsed from bytes, a read-only view into them (not necessarily
        8-byte aligned: SEAL's header puts the residues at an odd offset).
    correction_factor : int
        SEAL's correction factor (BGV only; SEAL requires 1 for CKKS).
    """

    parms_id: tuple[int, int, int, int]
    ntt_form: bool
    scale: float
    polys: np.ndarray
    correction_factor: int = 1


@functools.lru_cache(maxsize=1)
def _seal_version() -> tuple[int, int]:
    """Return the installed SEAL version, read from a real save.

    SEAL refuses objects whose header names another major version.
    """
    import tenseal.sealapi as sealapi

    from flwr_ext.he.wire import _scratch_file

    parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
    with _scratch_file() as scratch:
        parms.save(scratch.path)
        data = scratch.read()
    return data[3], data[4]


def _header(body_size: int) -> bytes:
    major, minor = _seal_version()
    return _HEADER.pack(_MAGIC, 16, major, minor, 0, 0, 16 + body_size)


def _dynarray(residues: np.ndarray) -> tuple[bytes, bytes, memoryview]:
    flat = np.ascontiguousarray(residues, dtype="<u8").ravel()
    return _header(8 + flat.nbytes), struct.pack("<Q", flat.size), flat.data


def _object(meta: bytes, array: tuple[bytes, bytes, memoryview]) -> bytes:
    """Header, metadata and data array joined in one copy of the residues."""
    size = len(meta) + sum(len(part) for part in array[:2]) + array[2].nbytes
    return b"".join([_header(size), meta, *array])


def ciphertext_bytes(
    parms_id: tuple[int, ...] | list[int],
    polys: np.ndarray,
    *,
    scale: float = 1.0,
    ntt_form: bool = True,
) -> bytes:
    """SEAL ``Ciphertext`` (or ``PublicKey``) bytes for ``(size, k, N)`` residues."""
    return b"".join(ciphertext_parts(parms_id, polys, scale=scale, ntt_form=ntt_form))


def ciphertext_parts(
    parms_id: tuple[int, ...] | list[int],
    polys: np.ndarray,
    *,
    scale: float = 1.0,
    ntt_form: bool = True,
) -> list[bytes | memoryview]:
    """:func:`ciphertext_bytes` as buffers whose concatenation is the object.

    The last is a view of the residues themselves: written with one
    ``os.pwritev``, several megabytes reach SEAL without an extra copy.
    """
    size, k, n = polys.shape
    meta = struct.pack("<4Q", *parms_id) + _CIPHERTEXT_META.pack(
        int(ntt_form), size, n, k, float(scale), 1
    )
    array = _dynarray(polys)
    body = len(meta) + sum(len(part) for part in array[:2]) + array[2].nbytes
    return [_header(body), meta, *array]


def plaintext_bytes(
    parms_id: tuple[int, ...] | list[int], residues: np.ndarray, *, scale: float
) -> bytes:
    """SEAL ``Plaintext`` bytes for ``(k, N)`` NTT-form residues at ``parms_id``."""
    meta = struct.pack("<4Q", *parms_id) + _PLAINTEXT_META.pack(
        residues.size, float(scale)
    )
    return _object(meta, _dynarray(residues))


def _body(
    data: bytes | memoryview, what: str, limit: int = _MAX_DECOMPRESSED
) -> bytes | memoryview:
    """Return the body of one SEAL object, decompressed to at most ``limit`` bytes."""
    if len(data) < _HEADER.size:
        raise SealFormatError(f"{what}: {len(data)} bytes, shorter than a SEAL header")
    magic, header_size, _major, _minor, compression, _reserved, total = (
        _HEADER.unpack_from(data)
    )
    if magic != _MAGIC or header_size != 16:
        raise SealFormatError(f"{what}: not a SEAL object (bad magic or header)")
    if total != len(data):
        raise SealFormatError(f"{what}: header says {total} bytes, got {len(data)}")
    payload = memoryview(data)[16:]  # no copy of the residues
    try:
        if compression == 0:
            return payload
        if compression == 1:
            inflater = zlib.decompressobj()
            body = inflater.decompress(payload, limit)
            if inflater.unconsumed_tail:
                raise SealFormatError(f"{what}: decompresses beyond the size limit")
            return body
        if compression == 2:
            stored = _zstd_raw_blocks(payload)
            if stored is not None:
                if len(stored) > limit:
                    raise SealFormatError(f"{what}: beyond the size limit")
                return stored
            return _zstd_bounded(payload, limit, what)
    except (zlib.error, ValueError) as err:
        if isinstance(err, SealFormatError):
            raise
        raise SealFormatError(f"{what}: does not decompress ({err})") from err
    except Exception as err:  # zstandard.ZstdError is not a ValueError
        raise SealFormatError(f"{what}: does not decompress ({err})") from err
    raise SealFormatError(f"{what}: unknown compression mode {compression}")


def _zstd_bounded(payload: bytes | memoryview, limit: int, what: str) -> bytes:
    """Decompress a zstd frame, refusing (without allocating) more than ``limit``."""
    import zstandard  # the one module that needs it: SEAL's default format

    declared = zstandard.frame_content_size(payload)
    if declared > limit:
        raise SealFormatError(f"{what}: decompresses beyond the size limit")
    if declared >= 0:  # SEAL writes it: one call, exactly that much allocated
        body = zstandard.ZstdDecompressor().decompress(payload)
        if len(body) != declared:
            raise SealFormatError(f"{what}: does not decompress to its declared size")
        return body
    reader = zstandard.ZstdDecompressor().stream_reader(bytes(payload))
    parts: list[bytes] = []
    size = 0
    while True:
        part = reader.read(min(1 << 20, limit + 1 - size))
        if not part:
            return b"".join(parts)
        parts.append(part)
        size += len(part)
        if size > limit:
            raise SealFormatError(f"{what}: decompresses beyond the size limit")


def _zstd_raw_blocks(frame: bytes | memoryview) -> bytes | None:
    """Return the content of a zstd frame of *raw* (stored) blocks only, else None.

    A ciphertext's 60-bit residues do not compress, so SEAL's zstd output is a
    frame header followed by raw blocks: 3-byte block headers (last-block bit,
    type 0 = raw, size) each followed by that many bytes of content. Reading them
    is a copy; a frame with a checksum or dictionary, or any other block type,
    returns ``None`` (the caller then runs the zstd decoder). Every length is
    checked against the bytes present; nothing is allocated beyond the input.
    """
    frame = memoryview(frame)
    if len(frame) < 6 or bytes(frame[:4]) != _ZSTD_MAGIC:
        return None
    descriptor = frame[4]
    if descriptor & 0b111 or descriptor & 0b1000:  # checksum, dictionary, reserved
        return None
    single_segment = (descriptor >> 5) & 1
    position = 5 + (0 if single_segment else 1)  # window descriptor
    position += (single_segment, 2, 4, 8)[descriptor >> 6]  # content size field
    parts = []
    while True:
        if position + 3 > len(frame):
            return None
        block = int.from_bytes(frame[position : position + 3], "little")
        kind, size = (block >> 1) & 3, block >> 3
        if kind != 0 or position + 3 + size > len(frame):
            return None
        parts.append(frame[position + 3 : position + 3 + size])
        position += 3 + size
        if block & 1:
            break
    if position != len(frame):
        return None
    return b"".join(parts)


def uncompressed(data: bytes) -> bytes:
    """Return a SEAL object saved with zstd as the same object, compression none.

    ``sealapi`` always saves with zstd, which stores ciphertext residues as raw
    blocks; SEAL still runs the zstd decoder on every load. Dropping the frame
    (a copy, :func:`_zstd_raw_blocks`) gives bytes SEAL loads faster and that are
    a few bytes shorter. Anything that is not a zstd object of raw blocks is
    returned unchanged.
    """
    if len(data) < _HEADER.size + 6:
        return data
    magic, header_size, major, minor, compression, reserved, total = (
        _HEADER.unpack_from(data)
    )
    if magic != _MAGIC or header_size != 16 or compression != 2 or total != len(data):
        return data
    body = _zstd_raw_blocks(memoryview(data)[16:])
    if body is None:
        return data
    return _HEADER.pack(_MAGIC, 16, major, minor, 0, reserved, 16 + len(body)) + body


def zstd_compressed(data: bytes) -> bytes:
    """Return an uncompressed SEAL object compressed as SEAL does (mode 2, zstd).

    For residues narrower than the 64-bit words that hold them (profile
    ``compact``'s 47-bit primes): SEAL's own save shrinks those by about 15 %.
    """
    import zstandard

    magic, header_size, major, minor, compression, reserved, total = (
        _HEADER.unpack_from(data)
    )
    if magic != _MAGIC or header_size != 16 or compression != 0 or total != len(data):
        raise SealFormatError("not an uncompressed SEAL object")
    body = zstandard.ZstdCompressor(level=1).compress(memoryview(data)[16:])
    return _HEADER.pack(_MAGIC, 16, major, minor, 2, reserved, 16 + len(body)) + body


def parse_ciphertext(
    data: bytes | memoryview,
    *,
    expected_k: int,
    expected_n: int,
    expected_size: int = 2,
    what: str = "ciphertext",
) -> RawCiphertext:
    """Parse SEAL ``Ciphertext`` bytes of ``expected_size`` polynomials.

    At the expected level (``expected_k`` primes) and degree; anything else raises
    :class:`SealFormatError`. ``polys`` is ``(expected_size, k, N)``.
    """
    head = 32 + _CIPHERTEXT_META.size
    expected = expected_size * expected_k * expected_n
    # What a ciphertext of the expected shape takes: no decompression beyond it.
    limit = head + _HEADER.size + 8 + 8 * expected
    body = _body(data, what, limit)
    if len(body) < head + 16 + 8:
        raise SealFormatError(f"{what}: body too short")
    parms_id = struct.unpack_from("<4Q", body)
    ntt, size, n, k, scale, correction = _CIPHERTEXT_META.unpack_from(body, 32)
    if (size, k, n) != (expected_size, expected_k, expected_n):
        raise SealFormatError(
            f"{what}: shape (size={size}, primes={k}, N={n}), expected "
            f"({expected_size}, {expected_k}, {expected_n})"
        )
    array = _body(memoryview(body)[head:], f"{what} data", limit)
    (count,) = struct.unpack_from("<Q", array) if len(array) >= 8 else (-1,)
    if count != expected or len(array) != 8 + 8 * expected:
        raise SealFormatError(f"{what}: {count} residues, expected {expected}")
    polys = np.frombuffer(array, dtype="<u8", offset=8).astype(np.uint64, copy=False)
    return RawCiphertext(
        parms_id=parms_id,
        ntt_form=bool(ntt),
        scale=float(scale),
        polys=polys.reshape(expected_size, expected_k, expected_n),
        correction_factor=int(correction),
    )
