"""The one secure-sum primitive: SEAL ciphertexts added as numpy residues.

A server that only adds CKKS ciphertexts needs no SEAL object: a ciphertext in
NTT form is two polynomials, each ``k`` rows of ``N`` residues modulo the data
primes ``q_j``, and adding ciphertexts is adding residues modulo ``q_j``.
:class:`ResidueSum` reads every uploaded ciphertext straight from its SEAL bytes
(:func:`flwr_ext.he.seal_raw.parse_ciphertext`, a view, no copy), checks
everything SEAL's ``load`` and the profile checks checked before, and adds it
into one ``uint64`` accumulator of shape ``(chunks, 2, k, N)``. It serves every
encrypted sum of flwr-ext: the single-key model rounds and statistics rounds
(:class:`flwr_ext.he.CiphertextSum`, wire ``packed``) and the threshold
strategy's model rounds and secure sums
(:class:`flwr_ext.strategy.ThresholdHomomorphicAggregation`).

What is checked, per ciphertext, before it may touch the sum
------------------------------------------------------------
- SEAL's object header (magic, sizes; at most the expected size decompressed);
- ``parms_id`` equal to the data level's (SEAL's hash of the parameters: ring
  degree, the data primes, the scheme), two polynomials, degree ``N``, ``k``
  primes, NTT form, the expected scale, SEAL's correction factor 1 (CKKS);
- every residue below its prime: SEAL's ``is_valid_for`` checked this on load. A
  residue ``>= q_j`` is not an element of ``Z_q``: added anyway it would shift
  the aggregate by a multiple of ``2^64 mod q_j`` the key holders cannot tell
  from a real update.

Lazy reduction
--------------
Residues are below ``q_j < 2^60``; a ``uint64`` holds ``t`` unreduced terms as long
as ``t (q_j - 1) < 2^64`` (16 terms for 60-bit primes), so a chunk is reduced
modulo ``q_j`` (numpy's ``%``, measured faster here than repeated conditional
subtractions) only once every ``t - 1`` additions, and once at the end.

All or nothing
--------------
:meth:`ResidueSum.add` adds one update chunk by chunk; if a chunk fails (or the
iterator that yields the chunks raises, e.g. on a digest mismatch), the chunks of
that update already added are subtracted again, exactly (modulo ``q_j``), and the
error propagates: the sum is as before. Peak memory: the accumulator, one
aligned chunk of scratch, and the chunk being read (a view into the message).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .seal_raw import (
    RawCiphertext,
    SealFormatError,
    ciphertext_bytes,
    parse_ciphertext,
)
from .wire import CiphertextError

__all__ = ["CiphertextLevel", "ResidueSum"]


@dataclass(frozen=True)
class CiphertextLevel:
    """What every ciphertext of one sum must be: SEAL level, primes, degree, scale.

    Attributes
    ----------
    parms_id : tuple[int, int, int, int]
        SEAL's ``parms_id`` of the data level fresh ciphertexts live at.
    moduli : tuple[int, ...]
        The data primes ``q_j`` (each below ``2^60``).
    degree : int
        Ring degree ``N``.
    scale : float
        The CKKS scale every ciphertext must carry.
    """

    parms_id: tuple[int, int, int, int]
    moduli: tuple[int, ...]
    degree: int
    scale: float

    @classmethod
    def of_context(cls, context: Any, scale: float) -> CiphertextLevel:
        """Return the first data level of a keyless ``sealapi.SEALContext``."""
        data = context.first_context_data()
        parms = data.parms()
        return cls(
            parms_id=tuple(int(x) for x in context.first_parms_id()),  # type: ignore[arg-type]
            moduli=tuple(int(m.value()) for m in parms.coeff_modulus()),
            degree=int(parms.poly_modulus_degree()),
            scale=float(scale),
        )


class ResidueSum:
    """Running sum of ciphertexts of ``num_chunks`` chunks each, as residues.

    Parameters
    ----------
    level : CiphertextLevel
        The level, primes and scale every added ciphertext must have.
    num_chunks : int
        Ciphertexts per update (the accumulator is allocated for them here:
        the caller bounds ``num_chunks`` by the bytes it really received).
    """

    def __init__(self, level: CiphertextLevel, num_chunks: int) -> None:
        if max(level.moduli) >= 2**60:
            raise ValueError("ResidueSum needs data primes below 2^60")
        self.level = level
        self.num_chunks = num_chunks
        k, n = len(level.moduli), level.degree
        self._acc = np.zeros((num_chunks, 2, k, n), dtype=np.uint64)
        self._scratch = np.empty((2, k, n), dtype=np.uint64)
        self._q = np.array(level.moduli, dtype=np.uint64)
        #: Unreduced terms each chunk of the accumulator may hold.
        self._max_terms = (2**64 - 1) // (max(level.moduli) - 1)
        #: Terms each chunk holds now: ``acc[i][:, j] <= terms[i] (q_j - 1)``.
        self._terms = [0] * num_chunks
        #: Updates added.
        self.count = 0

    # ---------------------------------------------------------------- adding
    def add(self, blobs: Iterable[bytes | memoryview]) -> None:
        """Add one update (its SEAL ciphertext bytes, in order): all or nothing.

        Raises :class:`~flwr_ext.he.wire.CiphertextError` naming the chunk (or
        whatever the iterator raises) with the sum unchanged.
        """
        added: list[bytes | memoryview] = []
        try:
            for index, blob in enumerate(blobs):
                if index >= self.num_chunks:
                    raise CiphertextError(
                        f"more than the {self.num_chunks} ciphertexts of an update"
                    )
                residues = self.check(blob, f"ciphertext {index}")
                self._add_chunk(index, residues)
                added.append(blob)
            if len(added) != self.num_chunks:
                raise CiphertextError(
                    f"{len(added)} ciphertexts, an update has {self.num_chunks}"
                )
        except Exception:
            self._subtract(added)
            raise
        self.count += 1

    def check(self, blob: bytes | memoryview, what: str) -> np.ndarray:
        """Parse and check one ciphertext; its residues ``(2, k, N)``.

        The result is this sum's scratch buffer (aligned, overwritten by the next
        call). Raises :class:`~flwr_ext.he.wire.CiphertextError`.
        """
        level = self.level
        k, n = len(level.moduli), level.degree
        try:
            raw = parse_ciphertext(blob, expected_k=k, expected_n=n, what=what)
        except SealFormatError as err:
            raise CiphertextError(f"a ciphertext does not load ({err})") from None
        problems = []
        if raw.parms_id != level.parms_id:
            problems.append("parms_id is not the data level's")
        if not raw.ntt_form:
            problems.append("not in NTT form")
        if raw.scale != level.scale:
            problems.append(f"scale {raw.scale:g} != {level.scale:g}")
        if raw.correction_factor != 1:
            problems.append(f"correction factor {raw.correction_factor} != 1")
        if problems:
            raise CiphertextError(
                f"{what} does not fit the key set's parameters: {'; '.join(problems)}"
            )
        residues = self._scratch
        np.copyto(residues, raw.polys)  # aligned from here on, and in cache
        for j, q in enumerate(level.moduli):
            if int(residues[:, j, :].max()) >= q:
                raise CiphertextError(
                    f"{what} holds residues out of range for prime {j}"
                )
        return residues

    def _add_chunk(self, index: int, residues: np.ndarray) -> None:
        if self._terms[index] >= self._max_terms:
            self._reduce(index)
        target = self._acc[index]
        np.add(target, residues, out=target)
        self._terms[index] += 1

    def _reduce(self, index: int) -> None:
        """Reduce chunk ``index`` of the accumulator to ``[0, q_j)``."""
        if self._terms[index] <= 1:
            return
        chunk = self._acc[index]
        for j, q in enumerate(self._q):
            row = chunk[:, j, :]
            np.remainder(row, q, out=row)
        self._terms[index] = 1

    def _subtract(self, blobs: list[bytes | memoryview]) -> None:
        """Subtract the first ``len(blobs)`` chunks again (they passed before)."""
        for index, blob in enumerate(blobs):
            residues = self.check(blob, f"ciphertext {index}")
            self._reduce(index)
            chunk = self._acc[index]
            for j, q in enumerate(self._q):
                # (a + q - x) in [1, 2q): minus q where that does not wrap
                row = chunk[:, j, :]
                row += q - residues[:, j, :]
                np.minimum(row, row - q, out=row)
            self._terms[index] = 1

    # ---------------------------------------------------------------- result
    def residues(self) -> np.ndarray:
        """Return the reduced sum ``(chunks, 2, k, N)`` (this sum's own array)."""
        for index in range(self.num_chunks):
            self._reduce(index)
        return self._acc

    def raw(self) -> list[RawCiphertext]:
        """Return the summed ciphertexts as :class:`RawCiphertext` views (no copy)."""
        level = self.level
        return [
            RawCiphertext(level.parms_id, True, level.scale, polys)
            for polys in self.residues()
        ]

    def ciphertexts(self) -> list[bytes]:
        """Return the summed ciphertexts as SEAL bytes (uncompressed)."""
        level = self.level
        return [
            ciphertext_bytes(level.parms_id, polys, scale=level.scale)
            for polys in self.residues()
        ]
