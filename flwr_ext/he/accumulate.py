"""Add encrypted updates as they arrive: one accumulator, one ciphertext in flight.

The server holds a context without any key: it can load ciphertexts and add them,
nothing else. :class:`CiphertextSum` keeps the running sum as deserialised
ciphertexts. A reply's header is checked first (kind, wire format, key fingerprint,
profile, model structure, chunk count); then its chunks are streamed: each one's
CRC32 is verified, SEAL loads and validates it, and it is added in place. If a
chunk fails - corrupted, truncated, or a well-formed ciphertext at another level or
scale that SEAL refuses to add - the chunks of that reply already added are
subtracted again (exact in modular arithmetic) and the reply is rejected, leaving
the sum as it was. Peak memory is one accumulator plus one ciphertext in flight
(the replies themselves are held by Flower), whatever the number of clients.
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
        self._sum: list[Any] | None = None
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
        sizes = self.wire.chunk_sizes(self.keys, header.num_values)
        if self._sum is None:
            self._sum = self._first(record, header, sizes, what)
            self.manifest = header.manifest
        else:
            self._add_streaming(record, header, sizes, what)
        self.count += 1
        return header

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
        if self._sum is None or self.manifest is None:
            return None
        blobs = self.wire.dump(self.keys, self._sum)
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
