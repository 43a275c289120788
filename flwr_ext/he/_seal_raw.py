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

SEAL's byte format (read and written without compression) lives in
:mod:`flwr_ext.he.seal_raw`, which the threshold protocol uses too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .keys import SealHandles
from .seal_raw import ciphertext_bytes

__all__ = ["add_polynomial", "data_moduli", "load_ciphertext"]


def data_moduli(seal: SealHandles) -> list[int]:
    """Return the data primes a fresh ciphertext lives in (SEAL's first level)."""
    parms = seal.context.first_context_data().parms()
    return [int(m.value()) for m in parms.coeff_modulus()]


def load_ciphertext(
    seal: SealHandles, like: Any, polys: np.ndarray, scratch: Any, ntt_form: bool
) -> Any:
    """Load a 2-polynomial ciphertext with the residues ``polys`` (2, k, N).

    ``like`` supplies the level (``parms_id``) and the scale. The result is in
    NTT form: ``polys`` are taken as NTT values if ``ntt_form``, else as
    coefficients that SEAL then transforms.
    """
    scratch.write(
        ciphertext_bytes(
            tuple(like.parms_id()), polys, scale=float(like.scale), ntt_form=ntt_form
        )
    )
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
