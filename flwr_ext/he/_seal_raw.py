"""Add integer polynomials to SEAL ciphertexts (for flooding), through ``sealapi``.

``tenseal.sealapi`` can neither set a ciphertext's coefficients nor add a
coefficient-form polynomial, and it saves and loads only through file paths. To
add a noise polynomial ``G`` to the plaintext a ciphertext decrypts to, this
module writes SEAL's own (uncompressed) serialisation of two helper ciphertexts
in coefficient form, ``A = (G, 1)`` and ``B = (0, 1)``, loads them (SEAL validates
every coefficient against its prime), lets SEAL move them to NTT form, and
computes ``ct + A - B``, which decrypts to ``m + e + G`` (SEAL refuses to
transform a ciphertext whose second polynomial is zero, hence the ``1`` that
``B`` cancels again).

SEAL's serialisation, uncompressed: a 16-byte header (magic, header size,
version, compression mode, reserved, total size); for a ciphertext its
``parms_id`` (4 x u64), NTT flag (1 byte), size, ring degree and number of primes
(u64 each), scale (double), correction factor (u64); then the data array with its
own 16-byte header, its length (u64) and the ``uint64`` residues, polynomial by
polynomial and prime by prime. The version bytes are copied from an object SEAL
itself saved, so the header always matches the linked SEAL.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from .keys import SealHandles

__all__ = ["add_polynomial", "data_moduli", "load_ciphertext", "uncompressed"]

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_COMPR_ZSTD = 2


def data_moduli(seal: SealHandles) -> list[int]:
    """Return the data primes a fresh ciphertext lives in (SEAL's first level)."""
    parms = seal.context.first_context_data().parms()
    return [int(m.value()) for m in parms.coeff_modulus()]


def uncompressed(blob: bytes) -> bytes:
    """Return SEAL's serialisation ``blob`` uncompressed, if that is a plain copy.

    ``sealapi`` always saves with SEAL's default compression (zstd). A
    ciphertext's 60-bit residues do not compress, so zstd stores them as *raw
    blocks* - the bytes themselves, with a 3-byte header every 128 KiB - and SEAL
    still pays for a zstd pass on every load. When every block is raw, this
    returns the same object with compression ``none``: the same bytes minus the
    frame (SEAL loads it about twice as fast). Anything else - compressed or RLE
    blocks, a checksum, a frame SEAL would not write - is returned unchanged.
    """
    if len(blob) < 16 + 6 or blob[5] != _COMPR_ZSTD:
        return blob
    frame = memoryview(blob)[16:]
    if bytes(frame[:4]) != _ZSTD_MAGIC:
        return blob
    descriptor = frame[4]
    single_segment = (descriptor >> 5) & 1
    if (descriptor >> 2) & 1 or descriptor & 3:  # content checksum, dictionary id
        return blob
    pos = 5 + (0 if single_segment else 1)
    pos += (1 if single_segment else 0, 2, 4, 8)[descriptor >> 6]
    parts = []
    while True:
        if pos + 3 > len(frame):
            return blob
        block = int.from_bytes(frame[pos : pos + 3], "little")
        kind, size = (block >> 1) & 3, block >> 3
        if kind != 0 or pos + 3 + size > len(frame):
            return blob
        parts.append(frame[pos + 3 : pos + 3 + size])
        pos += 3 + size
        if block & 1:
            break
    if pos != len(frame):
        return blob
    body = b"".join(parts)
    return _header(bytes(blob[:16]), 16 + len(body)) + body


def _header_template(seal: SealHandles, scratch: Any) -> bytes:
    cached = getattr(seal, "_raw_header", None)
    if cached is None:
        probe = seal.sealapi.Plaintext()
        probe.save(scratch.path)
        cached = scratch.read()[:16]
        seal._raw_header = cached  # type: ignore[attr-defined]
    return cached


def _header(template: bytes, size: int) -> bytes:
    header = bytearray(template)
    header[5] = 0  # compr_mode_type::none
    header[8:16] = struct.pack("<Q", size)
    return bytes(header)


def load_ciphertext(
    seal: SealHandles, like: Any, polys: np.ndarray, scratch: Any, ntt_form: bool
) -> Any:
    """Load a 2-polynomial ciphertext with the residues ``polys`` (2, k, N).

    ``like`` supplies the level (``parms_id``) and the scale. The result is in
    NTT form: ``polys`` are taken as NTT values if ``ntt_form``, else as
    coefficients that SEAL then transforms.
    """
    template = _header_template(seal, scratch)
    _, primes, degree = polys.shape
    data = np.ascontiguousarray(polys, dtype="<u8")
    array = _header(template, 24 + data.nbytes) + struct.pack("<Q", data.size)
    members = (
        struct.pack("<4Q", *like.parms_id())
        + (b"\x01" if ntt_form else b"\x00")
        + struct.pack("<QQQdQ", 2, degree, primes, float(like.scale), 1)
        + array
    )
    size = 16 + len(members) + data.nbytes
    scratch.write(_header(template, size) + members + data.tobytes())
    ciphertext = seal.sealapi.Ciphertext()
    ciphertext.load(seal.context, scratch.path)
    if not ntt_form:
        seal.evaluator.transform_to_ntt_inplace(ciphertext)
    return ciphertext


def add_polynomial(
    seal: SealHandles, ciphertext: Any, residues: np.ndarray, scratch: Any
) -> None:
    """Add the polynomial ``residues`` (k, N) to what ``ciphertext`` decrypts to.

    ``ciphertext`` is a fresh-level SEAL ciphertext in NTT form (changed in
    place); ``residues`` holds the polynomial's coefficients mod each data prime,
    in ``[0, q_i)``; ``scratch`` is a :class:`~flwr_ext.he.wire._ScratchFile`.
    """
    primes, degree = residues.shape
    if primes != int(ciphertext.coeff_modulus_size()) or degree != int(
        ciphertext.poly_modulus_degree()
    ):
        raise ValueError(
            f"a ({primes}, {degree}) polynomial does not fit a ciphertext with "
            f"{ciphertext.coeff_modulus_size()} primes of degree "
            f"{ciphertext.poly_modulus_degree()}"
        )
    polys = np.zeros((2, primes, degree), dtype=np.uint64)
    polys[1, :, 0] = 1
    cache = seal.__dict__.setdefault("_raw_ones", {})
    level = (tuple(ciphertext.parms_id()), float(ciphertext.scale))
    one = cache.get(level)
    if one is None:
        one = cache[level] = load_ciphertext(seal, ciphertext, polys, scratch, False)
    polys[0] = residues
    shifted = load_ciphertext(seal, ciphertext, polys, scratch, False)
    seal.evaluator.add_inplace(ciphertext, shifted)
    seal.evaluator.sub_inplace(ciphertext, one)
