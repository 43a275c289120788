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

__all__ = ["add_polynomial", "data_moduli"]


def data_moduli(seal: SealHandles) -> list[int]:
    """The data primes a fresh ciphertext lives in (SEAL's first data level)."""
    parms = seal.context.first_context_data().parms()
    return [int(m.value()) for m in parms.coeff_modulus()]


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


def _load_coefficient_form(
    seal: SealHandles, like: Any, polys: np.ndarray, scratch: Any
) -> Any:
    """Load a 2-polynomial ciphertext with ``polys`` (2, k, N) in coefficient form."""
    template = _header_template(seal, scratch)
    _, primes, degree = polys.shape
    data = np.ascontiguousarray(polys, dtype="<u8")
    array = _header(template, 24 + data.nbytes) + struct.pack("<Q", data.size)
    members = (
        struct.pack("<4Q", *like.parms_id())
        + b"\x00"  # coefficient form
        + struct.pack("<QQQdQ", 2, degree, primes, float(like.scale), 1)
        + array
    )
    size = 16 + len(members) + data.nbytes
    scratch.write(_header(template, size) + members + data.tobytes())
    ciphertext = seal.sealapi.Ciphertext()
    ciphertext.load(seal.context, scratch.path)
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
    one = _load_coefficient_form(seal, ciphertext, polys, scratch)
    polys[0] = residues
    shifted = _load_coefficient_form(seal, ciphertext, polys, scratch)
    seal.evaluator.add_inplace(ciphertext, shifted)
    seal.evaluator.sub_inplace(ciphertext, one)
