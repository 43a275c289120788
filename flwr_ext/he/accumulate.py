"""Add encrypted updates as they arrive: one accumulator, one ciphertext in flight.

The server holds a context without any key: it can add ciphertexts, nothing else.
A reply's header is checked first (kind, wire format, key fingerprint, profile,
model structure, chunk count, chunk sizes); then its chunks are streamed: each
one's integrity digest is verified (:func:`flwr_ext.he.codec.iter_chunks`), then
it is checked and added in place. If a chunk fails - corrupted, truncated, a
residue out of range, or a well-formed ciphertext at another level or scale - the
chunks of that reply already added are subtracted again (exact in modular
arithmetic) and the reply is rejected, leaving the sum as it was. Peak memory is
one accumulator plus one ciphertext in flight (the replies themselves are held by
Flower), whatever the number of clients.

Two back ends, by wire format:

- ``"packed"`` (the default): no SEAL object at all. The chunks are SEAL
  ciphertext bytes; :class:`~flwr_ext.he.residue_sum.ResidueSum` (the one
  secure-sum primitive, shared with the threshold strategy) parses them in place,
  checks what SEAL's ``load`` and the profile checks checked (level, NTT form,
  size, degree, primes, scale, correction factor, every residue below its prime)
  and adds the residues with numpy. :meth:`CiphertextSum.result` writes SEAL bytes,
  which SEAL validates again when a key holder loads them.
- ``"seeded"`` and ``"tenseal"``: SEAL (or TenSEAL) loads each chunk (a seeded
  ciphertext's second polynomial must be expanded from its seed, a TenSEAL vector
  has its own format) and adds it with its evaluator, as before.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

from flwr.app import ArrayRecord

from ..records import Manifest
from .codec import (
    EncryptedHeader,
    InvalidCiphertextError,
    check_chunk_bytes,
    iter_chunks,
    pack,
)
from .keys import CkksKeys
from .residue_sum import CiphertextLevel, ResidueSum
from .seal_raw import zstd_compressed
from .wire import CiphertextError, get_wire

__all__ = ["CiphertextSum"]


class CiphertextSum:
    """Running homomorphic sum of encrypted updates of one model.

    Parameters
    ----------
    keys : CkksKeys
        The server's context (no secret key needed).
    manifest : Manifest or None
        The plaintext model every update must match; ``None`` accepts the first
        update's manifest and then requires it of all others.
    wire : str
        Wire format every update must use.
    """

    def __init__(self, keys: CkksKeys, manifest: Manifest | None, wire: str) -> None:
        self.keys = keys
        self.manifest = manifest
        self.wire = get_wire(wire)
        #: Back end of ``"seeded"`` and ``"tenseal"``: loaded ciphertexts.
        self._sum: list[Any] | None = None
        #: Back end of ``"packed"``: the residue sum.
        self._residues: ResidueSum | None = None
        #: Number of updates added so far.
        self.count = 0

    def add(self, record: ArrayRecord, what: str) -> EncryptedHeader:
        """Check ``record`` completely, then add it to the sum in place.

        Returns the record's header. Raises :class:`InvalidCiphertextError` (or
        :class:`~flwr_ext.he.keys.KeyMismatchError`) without changing the sum.
        ``what`` names the sender in error messages.
        """
        header = EncryptedHeader.from_record(record)
        if header.kind != "update":
            raise InvalidCiphertextError(f"{what} is a {header.kind!r}, not an update")
        if header.wire != self.wire.name:
            raise InvalidCiphertextError(
                f"{what} uses wire format {header.wire!r}, this round uses "
                f"{self.wire.name!r}"
            )
        header.check_keys(self.keys, what)
        check_chunk_bytes(record, header, self.keys, what)
        if self.manifest is not None and header.manifest != self.manifest:
            raise InvalidCiphertextError(
                f"{what} encrypts a model with a different structure than the "
                f"global model ({_manifest_difference(header.manifest, self.manifest)})"
            )
        if self.wire.name == "packed":
            self._add_residues(record, header, what)
            self.count += 1
            return header
        sizes = self.wire.chunk_sizes(self.keys, header.num_values)
        if self._sum is None:
            self._sum = self._first(record, header, sizes, what)
            self.manifest = header.manifest
        else:
            self._add_streaming(record, header, sizes, what)
        self.count += 1
        return header

    def _add_residues(
        self, record: ArrayRecord, header: EncryptedHeader, what: str
    ) -> None:
        """Add a ``packed`` reply to the residue sum (all or nothing)."""
        first = self._residues is None
        if self._residues is None:
            # Sized by a header whose chunk count and chunk byte lengths were
            # checked against the bytes really received.
            level = CiphertextLevel.of_context(
                self.keys.seal().context, self.keys.profile.scale
            )
            self._residues = ResidueSum(level, header.num_chunks)
        try:
            self._residues.add(iter_chunks(record, header))
        except (CiphertextError, InvalidCiphertextError) as err:
            if first:
                self._residues = None  # nothing was summed: free the accumulator
            raise InvalidCiphertextError(f"{what}: {err}") from err
        if first:
            self.manifest = header.manifest

    def _first(
        self, record: ArrayRecord, header: EncryptedHeader, sizes: list[int], what: str
    ) -> list[Any]:
        """Load the first reply completely; it becomes the accumulator."""
        try:
            blobs = iter_chunks(record, header)
            return list(self.wire.iter_load(self.keys, blobs, sizes, full_check=True))
        except (CiphertextError, InvalidCiphertextError) as err:
            raise InvalidCiphertextError(f"{what}: {err}") from err

    def _add_streaming(
        self, record: ArrayRecord, header: EncryptedHeader, sizes: list[int], what: str
    ) -> None:
        """Add chunk by chunk; on any failure subtract what was added and raise."""
        assert self._sum is not None
        done = 0
        blobs = iter_chunks(record, header)
        loaded = self.wire.iter_load(self.keys, blobs, sizes, full_check=False)
        try:
            # closing(): a suspended loader holds the native-stdout redirect (and
            # its lock) and a scratch file; release them before any rollback.
            with contextlib.closing(loaded):
                for accumulator, ciphertext in zip(self._sum, loaded, strict=True):
                    self.wire.add_inplace(self.keys, accumulator, ciphertext)
                    done += 1
        except (CiphertextError, InvalidCiphertextError) as err:
            self._roll_back(record, header, sizes, done)
            raise InvalidCiphertextError(f"{what}: {err}") from err
        except (
            ValueError,
            RuntimeError,
            TypeError,
            MemoryError,
        ) as err:  # SEAL refused
            self._roll_back(record, header, sizes, done)
            raise InvalidCiphertextError(
                f"{what}: ciphertext {done} cannot be added to the sum ({err})"
            ) from err

    def _roll_back(
        self, record: ArrayRecord, header: EncryptedHeader, sizes: list[int], done: int
    ) -> None:
        """Subtract the first ``done`` chunks again (they loaded before)."""
        if not done:
            return
        assert self._sum is not None
        blobs = itertools.islice(iter_chunks(record, header, verify=False), done)
        loaded = self.wire.iter_load(self.keys, blobs, sizes[:done], full_check=False)
        with contextlib.closing(loaded):
            for accumulator, ciphertext in zip(self._sum[:done], loaded, strict=True):
                self.wire.sub_inplace(self.keys, accumulator, ciphertext)

    def result(self) -> ArrayRecord | None:
        """Return the encrypted sum (kind ``"model"``), or None if nothing was added."""
        if self.manifest is None:
            return None
        if self._residues is not None:
            blobs = self._residues.ciphertexts()
            if max(self._residues.level.moduli).bit_length() <= 56:
                # >= 8 zero bits in every word: compress as SEAL's save did
                blobs = [zstd_compressed(blob) for blob in blobs]
        elif self._sum is not None:
            blobs = self.wire.dump(self.keys, self._sum)
        else:
            return None
        header = EncryptedHeader(
            "model",
            self.keys.profile.name,
            self.keys.fingerprint,
            self.wire.name,
            self.manifest,
            len(blobs),
        )
        return pack(header, blobs)


def _manifest_difference(got: Manifest, expected: Manifest) -> str:
    if got.keys != expected.keys:
        return f"arrays {list(got.keys)} instead of {list(expected.keys)}"
    for a, b in zip(got.specs, expected.specs, strict=True):
        if a != b:
            return (
                f"array '{a.key}' is {a.dtype}{list(a.shape)}, expected "
                f"{b.dtype}{list(b.shape)}"
            )
    return "different manifest"
