"""Add encrypted updates as they arrive: one accumulator plus one reply in flight.

The server holds a context without any key: it can load ciphertexts and add them,
nothing else. :class:`CiphertextSum` keeps the running sum as deserialised
ciphertexts. Each reply is first checked and loaded *completely* (header, every
chunk's CRC32, SEAL's validation of every ciphertext), and only then added chunk by
chunk in place, so a reply whose 100th chunk is corrupted is rejected without
having touched the sum. Should SEAL still refuse an addition half-way (a
well-formed ciphertext at another level or scale), the chunks already added are
subtracted again - exact in modular arithmetic - and the reply is rejected. Peak
memory is one accumulator plus one deserialised reply, whatever the number of
clients.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord

from ..records import Manifest
from .codec import EncryptedHeader, InvalidCiphertextError, chunks, pack
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
        if self.manifest is not None and header.manifest != self.manifest:
            raise InvalidCiphertextError(
                f"{what} encrypts a model with a different structure than the "
                f"global model ({_manifest_difference(header.manifest, self.manifest)})"
            )
        # The first reply becomes the accumulator: check its metadata explicitly.
        loaded = self._load_all(record, header, what, full_check=self._sum is None)
        if self._sum is None:
            self._sum = loaded
            self.manifest = header.manifest
        else:
            self._add_or_roll_back(loaded, what)
        self.count += 1
        return header

    def _add_or_roll_back(self, loaded: list[Any], what: str) -> None:
        assert self._sum is not None
        done = 0
        try:
            for accumulator, ciphertext in zip(self._sum, loaded, strict=True):
                self.wire.add_inplace(self.keys, accumulator, ciphertext)
                done += 1
        except (ValueError, RuntimeError, TypeError) as err:
            for accumulator, ciphertext in zip(
                self._sum[:done], loaded[:done], strict=True
            ):
                self.wire.sub_inplace(self.keys, accumulator, ciphertext)
            raise InvalidCiphertextError(
                f"{what}: ciphertext {done} cannot be added to the sum ({err})"
            ) from err

    def _load_all(
        self, record: ArrayRecord, header: EncryptedHeader, what: str, full_check: bool
    ) -> list[Any]:
        sizes = self.wire.chunk_sizes(self.keys, header.num_values)
        try:
            blobs = chunks(record, header)
            return self.wire.load_many(self.keys, blobs, sizes, full_check=full_check)
        except (CiphertextError, InvalidCiphertextError) as err:
            raise InvalidCiphertextError(f"{what}: {err}") from err

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
