"""Three wire formats for CKKS ciphertexts: packed SEAL, TenSEAL vectors, seeded SEAL.

All three encrypt one flat float vector, chunk by chunk, with the data owners'
secret key, and all let a keyless server add ciphertexts in place. They use the
same key files; the server chooses the format per run and announces it to the
clients.

``"packed"`` (default)
    Raw SEAL through the bindings TenSEAL ships (``tenseal.sealapi``): two reals per
    slot (the real and imaginary part of each complex slot, so ``N`` values per
    ciphertext) and full symmetric ciphertexts. About 32 B/param in both
    directions with the two data primes of profile ``default`` - half of
    ``"tenseal"`` - and half the ciphertexts for the server to add, which
    makes it the fastest format at the server. SEAL's zstd frame is unwrapped
    when it only holds raw blocks (random residues never compress), so the
    server reads the residues where they lie and adds them with numpy
    (:mod:`flwr_ext.he.residue_sum`, no SEAL object; :meth:`PackedWire.load`
    remains for key holders and tools).
``"tenseal"``
    One TenSEAL ``CKKSVector`` per ``N / 2`` values, serialised with
    ``CKKSVector.serialize()``: each chunk loads with plain TenSEAL
    (``ts.ckks_vector_from``), for tools that expect TenSEAL objects. About
    64 B/param (profile ``default``) and 55 B/param (``compact``) in both directions.
``"seeded"``
    ``"packed"`` with *seeded* uplink ciphertexts, whose second polynomial is
    replaced on the wire by the 64-byte seed that generates it: about 16 B/param up
    (the smallest), but the server pays for expanding every seed when it loads a
    reply. The summed model that goes back down is a full (unseeded) ciphertext,
    as in ``"packed"``.

``sealapi`` objects save and load only through file paths, so the raw-SEAL formats
use one private temporary file per call (in ``/dev/shm`` when available), deleted
afterwards.

Every ciphertext a server loads is checked against the profile (ring size, the
data primes, two polynomials, the profile's scale, the expected number of values)
before it may touch an aggregate: SEAL itself rejects truncated data and data whose
coefficients are out of range, and these checks reject well-formed ciphertexts made
with other parameters.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Generator, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from ._native import quiet_native_stdout, tenseal
from ._seal_raw import add_polynomial
from .keys import CkksKeys
from .seal_raw import uncompressed

__all__ = [
    "WIRES",
    "CiphertextError",
    "Wire",
    "get_wire",
]


class CiphertextError(ValueError):
    """A ciphertext that does not load or does not fit the profile."""


class Wire:
    """Interface of a wire format (one implementation per format)."""

    name: str = ""

    def values_per_ciphertext(self, keys: CkksKeys) -> int:
        """Float values one ciphertext carries."""
        raise NotImplementedError

    def encrypt(self, keys: CkksKeys, vector: np.ndarray) -> list[bytes]:
        """Encrypt ``vector`` (1-D float64) chunk by chunk; return the bytes."""
        raise NotImplementedError

    def load(
        self,
        keys: CkksKeys,
        blob: bytes,
        num_values: int,
        *,
        full_check: bool = True,
        quiet: bool = True,
    ) -> Any:
        """Deserialize and check one ciphertext that must carry ``num_values``.

        SEAL always validates the data against the parameters. ``full_check``
        also checks ring size, level, polynomial count and scale explicitly; a
        format where that costs a copy may skip it for ciphertexts that are only
        added (SEAL's ``add`` refuses mismatched levels and scales itself, and
        :class:`~flwr_ext.he.CiphertextSum` rolls a failed add back). ``quiet``
        redirects native stdout around the call (callers that load many
        ciphertexts redirect once around the loop instead).
        """
        raise NotImplementedError

    def iter_load(
        self,
        keys: CkksKeys,
        blobs: Iterable[bytes],
        sizes: Sequence[int],
        *,
        full_check: bool = True,
    ) -> Generator[Any, None, None]:
        """Load ciphertexts one at a time (see :meth:`load`), for streaming."""
        with quiet_native_stdout():
            for blob, size in zip(blobs, sizes, strict=True):
                yield self.load(keys, blob, size, full_check=full_check, quiet=False)

    def load_many(
        self,
        keys: CkksKeys,
        blobs: Sequence[bytes],
        sizes: Sequence[int],
        *,
        full_check: bool = True,
    ) -> list[Any]:
        """Load several ciphertexts (see :meth:`load`)."""
        return list(self.iter_load(keys, blobs, sizes, full_check=full_check))

    def add_inplace(self, keys: CkksKeys, accumulator: Any, other: Any) -> None:
        """``accumulator += other`` (both from :meth:`load`)."""
        raise NotImplementedError

    def sub_inplace(self, keys: CkksKeys, accumulator: Any, other: Any) -> None:
        """``accumulator -= other``: undoes :meth:`add_inplace` exactly (mod q)."""
        raise NotImplementedError

    def dump(self, keys: CkksKeys, ciphertexts: Sequence[Any]) -> list[bytes]:
        """Serialize loaded (e.g. summed) ciphertexts."""
        raise NotImplementedError

    def decrypt(
        self,
        keys: CkksKeys,
        blobs: Sequence[bytes],
        num_values: int,
        noise: np.ndarray | None,
    ) -> np.ndarray:
        """Decrypt ``blobs`` into the first ``num_values`` float64 values.

        ``noise`` holds one flooding polynomial per ciphertext, as residues mod
        each data prime, shape ``(len(blobs), k, N)`` (see
        :mod:`flwr_ext.he.flooding`): each is added to the plaintext before it is
        decoded. ``None`` decrypts exactly - only for values that never leave
        the data owner (:func:`flwr_ext.he.codec.decrypt_record` reads the count
        slot this way to size the noise).
        """
        keys.require_secret()
        sizes = self.chunk_sizes(keys, num_values)
        if len(blobs) != len(sizes):
            raise CiphertextError(
                f"expected {len(sizes)} ciphertexts, got {len(blobs)}"
            )
        if noise is not None and noise.shape[0] != len(blobs):
            raise ValueError(f"{noise.shape[0]} noise polynomials for {len(blobs)}")
        out = np.empty(num_values, dtype=np.float64)
        pos = 0
        with _scratch_file() as scratch, quiet_native_stdout():
            for index, (blob, size) in enumerate(zip(blobs, sizes, strict=True)):
                ciphertext = self.seal_ciphertext(keys, blob, size, scratch)
                if noise is not None:
                    add_polynomial(keys.seal(), ciphertext, noise[index], scratch)
                out[pos : pos + size] = self.decode(keys, ciphertext)[:size]
                pos += size
        return out

    def seal_ciphertext(
        self, keys: CkksKeys, blob: bytes, num_values: int, scratch: _ScratchFile
    ) -> Any:
        """Load ``blob`` (checked) as a raw SEAL ciphertext (native stdout quiet)."""
        raise NotImplementedError

    def decode(self, keys: CkksKeys, ciphertext: Any) -> np.ndarray:
        """Decrypt a raw SEAL ciphertext with the secret key; all its real values."""
        raise NotImplementedError

    def num_chunks(self, keys: CkksKeys, num_values: int) -> int:
        """Return the number of ciphertexts ``num_values`` need.

        Arithmetic only: the count may come from a hostile header, so no list
        sized by it is built.
        """
        return -(-num_values // self.values_per_ciphertext(keys))

    def chunk_sizes(self, keys: CkksKeys, num_values: int) -> list[int]:
        """Return the number of values in each ciphertext of ``num_values``."""
        per = self.values_per_ciphertext(keys)
        full, rest = divmod(num_values, per)
        return [per] * full + ([rest] if rest else [])


# --------------------------------------------------------------------- TenSEAL
class TensealWire(Wire):
    """One TenSEAL ``CKKSVector`` per ``N / 2`` values."""

    name = "tenseal"

    def values_per_ciphertext(self, keys: CkksKeys) -> int:
        """``N / 2`` real slots."""
        return keys.profile.slots

    def encrypt(self, keys: CkksKeys, vector: np.ndarray) -> list[bytes]:
        """Encrypt chunks of ``N / 2`` values with the secret key."""
        keys.require_secret()
        ts = tenseal()
        per = self.values_per_ciphertext(keys)
        with quiet_native_stdout():
            return [
                ts.ckks_vector(keys.context, vector[i : i + per]).serialize()
                for i in range(0, vector.shape[0], per)
            ]

    def load(
        self,
        keys: CkksKeys,
        blob: bytes,
        num_values: int,
        *,
        full_check: bool = True,
        quiet: bool = True,
    ) -> Any:
        """``ckks_vector_from`` plus the profile checks.

        The explicit metadata check needs ``CKKSVector.ciphertext()``, which
        copies the ciphertext; ``full_check=False`` skips it (see :meth:`Wire.load`).
        """
        ts = tenseal()
        try:
            with quiet_native_stdout() if quiet else contextlib.nullcontext():
                vector = ts.ckks_vector_from(keys.context, blob)
        except (ValueError, RuntimeError, TypeError, MemoryError) as err:
            # MemoryError: a crafted size field in SEAL's own header
            raise CiphertextError(f"ciphertext does not load ({err})") from err
        if vector.size() != num_values:
            raise CiphertextError(
                f"ciphertext carries {vector.size()} values, expected {num_values}"
            )
        if not full_check:
            return vector
        parts = vector.ciphertext()
        if len(parts) != 1:
            raise CiphertextError(f"expected 1 SEAL ciphertext, got {len(parts)}")
        _check_seal_ciphertext(parts[0], keys)
        return vector

    def add_inplace(self, keys: CkksKeys, accumulator: Any, other: Any) -> None:
        """TenSEAL's in-place ``add_``."""
        accumulator.add_(other)

    def sub_inplace(self, keys: CkksKeys, accumulator: Any, other: Any) -> None:
        """TenSEAL's in-place ``sub_``."""
        accumulator.sub_(other)

    def dump(self, keys: CkksKeys, ciphertexts: Sequence[Any]) -> list[bytes]:
        """``CKKSVector.serialize()`` for each."""
        return [c.serialize() for c in ciphertexts]

    def seal_ciphertext(
        self, keys: CkksKeys, blob: bytes, num_values: int, scratch: _ScratchFile
    ) -> Any:
        """Return the SEAL ciphertext inside a checked TenSEAL vector (via ``save``)."""
        vector = self.load(keys, blob, num_values, quiet=False)
        vector.ciphertext()[0].save(scratch.path)
        ciphertext = keys.seal().sealapi.Ciphertext()
        ciphertext.load(keys.seal().context, scratch.path)
        return ciphertext

    def decode(self, keys: CkksKeys, ciphertext: Any) -> np.ndarray:
        """Decrypt and decode the ``N / 2`` real slots."""
        seal = keys.seal()
        plain = seal.sealapi.Plaintext()
        assert seal.decryptor is not None  # a data owner's context
        seal.decryptor.decrypt(ciphertext, plain)
        return np.asarray(seal.encoder.decode_double(plain), dtype=np.float64)


# ------------------------------------------------------------- raw SEAL
class PackedWire(Wire):
    """Full symmetric SEAL ciphertexts with two reals per complex slot."""

    name = "packed"
    #: Send seeded ciphertexts (second polynomial replaced by its seed).
    seeded = False

    def values_per_ciphertext(self, keys: CkksKeys) -> int:
        """``N`` reals: ``N / 2`` complex slots, real and imaginary parts."""
        return keys.profile.poly_modulus_degree

    def encrypt(self, keys: CkksKeys, vector: np.ndarray) -> list[bytes]:
        """Encode each chunk as complex slots and save symmetric ciphertexts."""
        keys.require_secret()
        seal = keys.seal()
        half = keys.profile.slots
        per = 2 * half
        scale = keys.profile.scale
        blobs: list[bytes] = []
        with _scratch_file() as scratch, quiet_native_stdout():
            for start in range(0, vector.shape[0], per):
                chunk = vector[start : start + per]
                slots = np.zeros(half, dtype=np.complex128)
                slots.real[: min(half, chunk.shape[0])] = chunk[:half]
                if chunk.shape[0] > half:
                    slots.imag[: chunk.shape[0] - half] = chunk[half:]
                plain = seal.sealapi.Plaintext()
                seal.encoder.encode(slots.tolist(), scale, plain)
                assert seal.encryptor is not None  # a data owner's context
                if self.seeded:
                    seal.encryptor.encrypt_symmetric(plain).save(scratch.path)
                else:
                    ciphertext = seal.sealapi.Ciphertext()
                    seal.encryptor.encrypt_symmetric(plain, ciphertext)
                    ciphertext.save(scratch.path)
                blobs.append(uncompressed(scratch.read()))
        return blobs

    def load(
        self,
        keys: CkksKeys,
        blob: bytes,
        num_values: int,
        *,
        full_check: bool = True,
        quiet: bool = True,
    ) -> Any:
        """``Ciphertext.load`` (SEAL validates the data) plus the profile checks.

        The checks read SEAL's metadata without a copy, so they always run.
        """
        with _scratch_file() as scratch:
            return self._load_from(keys, blob, scratch, quiet)

    def _load_from(
        self, keys: CkksKeys, blob: bytes, scratch: _ScratchFile, quiet: bool
    ) -> Any:
        seal = keys.seal()
        scratch.write(blob)
        ciphertext = seal.sealapi.Ciphertext()
        try:
            with quiet_native_stdout() if quiet else contextlib.nullcontext():
                ciphertext.load(seal.context, scratch.path)
        except (ValueError, RuntimeError, TypeError, MemoryError) as err:
            # MemoryError: a crafted size field in SEAL's own header
            raise CiphertextError(f"ciphertext does not load ({err})") from err
        _check_seal_ciphertext(ciphertext, keys)
        return ciphertext

    def iter_load(
        self,
        keys: CkksKeys,
        blobs: Iterable[bytes],
        sizes: Sequence[int],
        *,
        full_check: bool = True,
    ) -> Generator[Any, None, None]:
        """Load ciphertexts one at a time through one scratch file."""
        with _scratch_file() as scratch, quiet_native_stdout():
            for blob in blobs:
                yield self._load_from(keys, blob, scratch, False)

    def add_inplace(self, keys: CkksKeys, accumulator: Any, other: Any) -> None:
        """SEAL's ``Evaluator.add_inplace``."""
        keys.seal().evaluator.add_inplace(accumulator, other)

    def sub_inplace(self, keys: CkksKeys, accumulator: Any, other: Any) -> None:
        """SEAL's ``Evaluator.sub_inplace``."""
        keys.seal().evaluator.sub_inplace(accumulator, other)

    def dump(self, keys: CkksKeys, ciphertexts: Sequence[Any]) -> list[bytes]:
        """Save each ciphertext (full size: a sum is no longer seeded)."""
        out = []
        with _scratch_file() as scratch:
            for ciphertext in ciphertexts:
                ciphertext.save(scratch.path)
                out.append(uncompressed(scratch.read()))
        return out

    def seal_ciphertext(
        self, keys: CkksKeys, blob: bytes, num_values: int, scratch: _ScratchFile
    ) -> Any:
        """``Ciphertext.load`` plus the profile checks."""
        return self._load_from(keys, blob, scratch, False)

    def decode(self, keys: CkksKeys, ciphertext: Any) -> np.ndarray:
        """Decrypt, decode the complex slots and unpack real/imaginary halves."""
        seal = keys.seal()
        plain = seal.sealapi.Plaintext()
        assert seal.decryptor is not None  # a data owner's context
        seal.decryptor.decrypt(ciphertext, plain)
        slots = np.asarray(seal.encoder.decode_complex(plain))
        return np.concatenate([slots.real, slots.imag])


class SeededWire(PackedWire):
    """:class:`PackedWire` with seeded uplink ciphertexts (half the bytes)."""

    name = "seeded"
    seeded = True


def _check_seal_ciphertext(ciphertext: Any, keys: CkksKeys) -> None:
    """Reject ciphertexts that SEAL accepts but that do not fit the profile."""
    profile = keys.profile
    problems = []
    if int(ciphertext.poly_modulus_degree()) != profile.poly_modulus_degree:
        problems.append(
            f"ring size {ciphertext.poly_modulus_degree()} != "
            f"{profile.poly_modulus_degree}"
        )
    primes = len(profile.coeff_mod_bit_sizes) - 1
    if int(ciphertext.coeff_modulus_size()) != primes:
        problems.append(f"{ciphertext.coeff_modulus_size()} primes instead of {primes}")
    if int(ciphertext.size()) != 2:
        problems.append(f"{ciphertext.size()} polynomials instead of 2")
    if float(ciphertext.scale) != profile.scale:
        problems.append(f"scale {ciphertext.scale:g} != 2^{profile.scale_bits}")
    if ciphertext.is_ntt_form() is not True:
        problems.append("not in NTT form")
    if problems:
        raise CiphertextError(
            f"ciphertext does not fit profile {profile.name!r}: {'; '.join(problems)}"
        )


class _ScratchFile:
    """A private temporary file (mode 0600) that ``sealapi`` saves to and loads from.

    The descriptor stays open between calls, so moving one ciphertext's bytes in
    or out costs one or two system calls, not an ``open`` per ciphertext.
    """

    def __init__(self) -> None:
        directory = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        # The pid in the name lets a process find its own scratch files (tests
        # check that none is left behind while other processes run beside them).
        self.fd, self.path = tempfile.mkstemp(
            prefix=f"flwr-ext-ckks-{os.getpid()}-", dir=directory
        )

    def write(self, blob: bytes) -> None:
        """Make the file hold exactly ``blob``."""
        os.ftruncate(self.fd, len(blob))
        written = os.pwrite(self.fd, blob, 0)
        if written != len(blob):  # pragma: no cover - full disk
            raise OSError(f"wrote {written} of {len(blob)} bytes to {self.path}")

    def read(self) -> bytes:
        """Return what SEAL saved to the file (SEAL rewrites the same inode)."""
        return os.pread(self.fd, os.fstat(self.fd).st_size, 0)

    def close(self) -> None:
        """Close and delete the file."""
        os.close(self.fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


@contextlib.contextmanager
def _scratch_file() -> Iterator[_ScratchFile]:
    """Yield a :class:`_ScratchFile`, closed and removed afterwards."""
    scratch = _ScratchFile()
    try:
        yield scratch
    finally:
        scratch.close()


WIRES: dict[str, Wire] = {
    wire.name: wire for wire in (PackedWire(), TensealWire(), SeededWire())
}


def get_wire(name: str) -> Wire:
    """Return the wire format called ``name``."""
    try:
        return WIRES[name]
    except KeyError:
        raise ValueError(
            f"unknown CKKS wire format {name!r}; choose one of {sorted(WIRES)}"
        ) from None
