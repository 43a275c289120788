"""Multiparty (N-of-N threshold) CKKS: no party ever holds the secret key.

The design of Mouchet, Troncoso-Pastoriza, Bossuat and Hubaux, "Multiparty
Homomorphic Encryption from Ring-Learning-with-Errors" (PoPETs 2021), on SEAL
through ``tenseal.sealapi`` plus numpy (:mod:`flwr_ext.he.rns`,
:mod:`flwr_ext.he.seal_raw`). Who holds what:

==============  =========================================================
site ``i``      its secret share ``s_i`` (ternary, sampled locally, file 0600)
server          the public seed, the collective public key, ciphertexts, the
                partial decryptions it receives; never an ``s_i``
nobody          ``s = sum_i s_i``, the key every ciphertext is encrypted under
==============  =========================================================

Protocol, step by step (all polynomials in SEAL's NTT form, residues per prime):

1. **Setup.** The server announces a fresh 32-byte public seed. Every party derives
   the same uniform polynomial ``a`` from it (:func:`common_polynomial`; SHAKE-256,
   rejection-sampled per prime) at SEAL's key level (data primes + special prime).
2. **Collective key generation** (dealer-free). Site ``i`` samples ``s_i`` and a
   fresh error ``e_i`` (rounded Gaussian, sigma 3.2 as SEAL), and sends
   ``p_i = -a * s_i + e_i`` (:meth:`SecretShare.public_share`). The server sums
   the shares: ``(sum_i p_i, a)`` is an ordinary SEAL ``PublicKey`` for ``s``
   (:func:`collective_public_key`), which it sends back to every site.
3. **Encryption.** Clients encrypt with SEAL's own public-key encryption
   (:func:`encryptor`); the server adds ciphertexts exactly as in single-key mode.
4. **Collective decryption** of the aggregate ``(c0, c1)`` only. Site ``i``
   returns ``h_i = c1 * s_i + f_i`` (:meth:`SecretShare.partial_decrypt`) where
   ``f_i`` is *flooding* noise (below). The server computes
   ``c0 + sum_i h_i = m + e + sum_i f_i`` and decodes it (:func:`combine`).
   With fewer than all shares the sum is ``m + e - c1 * s_j + ...``: uniformly
   random, i.e. nothing (tested).

Flooding. The decryption error ``e`` depends on the secret (``u * e_pk + e0 +
e1 * s``); released exactly, it lets a curious server recover keys
(Li and Micciancio, EUROCRYPT 2021). Every site adds Gaussian noise of standard
deviation ``sigma_f`` to its partial decryption, so that the released value is
statistically close to one that does not depend on ``e``. For a Gaussian shift the
Kullback-Leibler divergence per coefficient is ``e^2 / (2 sigma_f^2)``; over ``N``
coefficients and ``Q`` decryptions, Pinsker's inequality bounds the statistical
distance by ``B sqrt(N Q) / (2 sigma_f)`` where ``B`` bounds ``|e|``. Requiring
``2**-lambda``:

    sigma_f = B * sqrt(N * Q) * 2**(lambda - 1)

with ``lambda`` >= 30 bits. Each honest site's own noise meets the bound alone (the
other sites may collude with the server). ``B`` is ten standard deviations of the
encryption error for the profile's maximum number of clients and sites
(:meth:`ThresholdProfile.error_bound`). The flooding noise is what limits
precision; the scale is chosen so that it stays below ``1e-5`` for 1M values
(:meth:`ThresholdProfile.value_noise_std`).
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flwr_ext.he.rns import (
    add_mod,
    modmul,
    neg_mod,
    ntt_tables,
    reduce_signed,
    sample_gaussian,
    sample_gaussian_residues,
    sample_ternary,
)
from flwr_ext.he.seal_raw import (
    RawCiphertext,
    ciphertext_bytes,
    ciphertext_parts,
    parse_ciphertext,
    plaintext_bytes,
    uncompressed,
)

__all__ = [
    "THRESHOLD_PROFILE",
    "PartialDecryption",
    "SecretShare",
    "ThresholdContext",
    "ThresholdError",
    "ThresholdProfile",
    "check_residues",
    "collective_public_key",
    "combine",
    "common_polynomial",
    "digest",
    "encrypt_values",
    "encryptor",
    "split_ciphertext",
    "unpack",
]

_SHARE_MAGIC = b"flwr-ext threshold secret share v1\n"
#: Chunks one SEAL ciphertext carries through a partial decryption (SEAL's
#: largest ciphertext size).
_BATCH = 16


class ThresholdError(ValueError):
    """A threshold-CKKS input that is malformed, mismatched or replayed."""


@dataclass(frozen=True)
class ThresholdProfile:
    """Parameters of a multiparty CKKS key set.

    Attributes
    ----------
    poly_modulus_degree : int
        Ring degree N; a ciphertext carries N reals with the packed encoding.
    coeff_mod_bit_sizes : tuple[int, ...]
        SEAL primes: the data primes, then the special prime. 180 bits at
        N=8192 is below the HE standard's 218-bit bound for 128-bit security.
    scale_bits : int
        Fixed-point scale of the encoded values, ``2**scale_bits``.
    key_error_sigma : float
        Standard deviation of the key-generation and encryption errors (SEAL's 3.2).
    security_bits : int
        Statistical security ``lambda`` of the flooding.
    max_decryptions : int
        ``Q``: the most ciphertexts a site helps decrypt over one key set's life
        (the flooding is sized for it; :class:`SecretShare` refuses more). One
        round of a 1M-parameter model is 123 ciphertexts at N=8192, so the default
        2**16 covers about 500 rounds.
    max_parties : int
        Most sites (key shares) and most clients per aggregate the bound assumes.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 60, 60)
    scale_bits: int = 91
    key_error_sigma: float = 3.2
    security_bits: int = 30
    max_decryptions: int = 65536
    max_parties: int = 64

    def error_bound(self) -> float:
        """``B``: ten standard deviations of the aggregate's decryption error.

        Each client's fresh encryption contributes ``u * e_pk + e0 + e1 * s``;
        ``u`` ternary (variance 2/3 per coefficient), ``e_pk`` the sum of the sites'
        key errors (variance ``n sigma^2``), ``s`` the sum of ternary shares
        (variance ``2n/3``). Per coefficient and client the variance is about
        ``2 N/3 * n sigma^2 * 2`` + ``sigma^2``; summed over ``max_parties``
        clients with ``n = max_parties`` sites.
        """
        n = self.max_parties
        sigma2 = self.key_error_sigma**2
        per_client = 2 * (2 * self.poly_modulus_degree / 3) * n * sigma2 + sigma2
        return 10.0 * math.sqrt(per_client * self.max_parties)

    def flooding_sigma(self) -> float:
        """``sigma_f = B sqrt(N Q) 2**(lambda-1)``, each site's flooding noise."""
        return (
            self.error_bound()
            * math.sqrt(self.poly_modulus_degree * self.max_decryptions)
            * 2.0 ** (self.security_bits - 1)
        )

    def value_noise_std(self, num_sites: int) -> float:
        """Return the flooding noise's standard deviation on one decoded real value.

        Decoding sums ``N`` coefficients against unit roots; the real (or
        imaginary) part of a slot therefore has variance ``N/2`` times the
        coefficient variance ``num_sites sigma_f^2``, divided by the scale squared.
        """
        return (
            self.flooding_sigma()
            * math.sqrt(num_sites * self.poly_modulus_degree / 2)
            / 2.0**self.scale_bits
        )


THRESHOLD_PROFILE = ThresholdProfile()


class ThresholdContext:
    """The public half of a threshold key set: SEAL context, primes, NTT tables.

    Every party builds the same one from the profile; it holds no key material.
    """

    def __init__(self, profile: ThresholdProfile = THRESHOLD_PROFILE) -> None:
        from tenseal import sealapi

        self.profile = profile
        self.sealapi = sealapi
        n = profile.poly_modulus_degree
        parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(n)
        parms.set_coeff_modulus(
            sealapi.CoeffModulus.Create(n, list(profile.coeff_mod_bit_sizes))
        )
        self.context = sealapi.SEALContext(parms, True, sealapi.SEC_LEVEL_TYPE.TC128)
        if not self.context.parameters_set():
            raise ThresholdError(
                "SEAL refuses the threshold profile: "
                f"{self.context.parameters_error_message()}"
            )
        self.n = n
        self.key_moduli = tuple(
            int(m.value())
            for m in self.context.key_context_data().parms().coeff_modulus()
        )
        self.data_moduli = tuple(
            int(m.value())
            for m in self.context.first_context_data().parms().coeff_modulus()
        )
        if max(self.key_moduli) >> 60:
            raise ThresholdError("the wire format packs residues in 60 bits")
        self.key_parms_id = tuple(self.context.key_parms_id())
        self.data_parms_id = tuple(self.context.first_parms_id())
        self.key_ntt = ntt_tables(n, self.key_moduli)
        self.data_ntt = ntt_tables(n, self.data_moduli)
        self.encoder = sealapi.CKKSEncoder(self.context)
        self.scale = float(2**profile.scale_bits)

    @property
    def k(self) -> int:
        """Number of data primes (a ciphertext polynomial has ``k`` residue rows)."""
        return len(self.data_moduli)


def common_polynomial(context: ThresholdContext, seed: bytes) -> np.ndarray:
    """Derive the uniform public polynomial ``a`` (NTT form, key level) from ``seed``.

    SHAKE-256 of ``seed`` and the prime's index is read as little-endian 64-bit
    words, masked to the prime's bit length and rejection-sampled below it: every
    residue is uniform modulo its prime, and every party derives the same ``a``.
    (Uniform values are uniform in either NTT or coefficient form.)
    """
    if not isinstance(seed, bytes | bytearray) or len(seed) != 32:
        raise ThresholdError("the public seed must be exactly 32 bytes")
    rows = []
    for index, q in enumerate(context.key_moduli):
        mask = np.uint64((1 << q.bit_length()) - 1)
        found = np.empty(0, dtype=np.uint64)
        counter = 0
        while found.shape[0] < context.n:
            xof = hashlib.shake_256(
                bytes(seed)
                + index.to_bytes(2, "little")
                + counter.to_bytes(4, "little")
            )
            words = np.frombuffer(xof.digest(16 * context.n), dtype="<u8") & mask
            found = np.concatenate([found, words[words < np.uint64(q)]])
            counter += 1
        rows.append(found[: context.n])
    return np.stack(rows).astype(np.uint64)


@dataclass(frozen=True)
class PartialDecryption:
    """One site's share of a collective decryption.

    Attributes
    ----------
    ciphertext_digest : bytes
        SHA-256 of the ``c1`` it was computed for: a share for another ciphertext
        is detected, never silently combined.
    share : numpy.ndarray
        ``(k, N)`` residues ``c1 * s_i + f_i`` in NTT form.
    """

    ciphertext_digest: bytes
    share: np.ndarray


def digest(c1: np.ndarray) -> bytes:
    """SHA-256 of ``c1``'s residues: binds a partial decryption to its ciphertext."""
    return hashlib.sha256(np.ascontiguousarray(c1, dtype="<u8").tobytes()).digest()


class SecretShare:
    """A site's secret share ``s_i``: created, used and stored at that site only.

    Parameters
    ----------
    context : ThresholdContext
        The public parameters.
    coefficients : numpy.ndarray
        ``(N,)`` ternary coefficients of ``s_i``.
    decryptions_used : int
        Collective decryptions already answered with this share (persisted, so
        the flooding budget ``max_decryptions`` holds across restarts).
    """

    def __init__(
        self,
        context: ThresholdContext,
        coefficients: np.ndarray,
        decryptions_used: int = 0,
        last_round: int = -1,
    ) -> None:
        coefficients = np.asarray(coefficients, dtype=np.int64)
        if coefficients.shape != (context.n,) or np.any(np.abs(coefficients) > 1):
            raise ThresholdError("a secret share is N ternary coefficients")
        self.context = context
        self._coefficients = coefficients
        key_rows = np.stack(
            [reduce_signed(coefficients, q) for q in context.key_moduli]
        )
        self._ntt = context.key_ntt.forward(key_rows)
        self.decryptions_used = int(decryptions_used)
        self.last_round = int(last_round)
        self._path: Path | None = None
        self._plain_share: Any = None
        self._evaluator: Any = None

    def __repr__(self) -> str:  # never print the share itself
        return (
            f"SecretShare(N={self.context.n}, decryptions_used={self.decryptions_used})"
        )

    @classmethod
    def generate(cls, context: ThresholdContext) -> SecretShare:
        """Sample a fresh ternary share from the OS's CSPRNG."""
        return cls(context, sample_ternary(context.n))

    # ------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the share to a new file, mode 0600.

        Never over an existing file, never through a symlink.
        """
        target = Path(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(target, flags, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(self._serialize())
        self._path = target

    def _serialize(self) -> bytes:
        header = (
            f"{self.context.n} {self.decryptions_used} {self.last_round}\n".encode()
        )
        return _SHARE_MAGIC + header + self._coefficients.astype(np.int8).tobytes()

    @classmethod
    def load(
        cls, context: ThresholdContext, path: str | os.PathLike[str]
    ) -> SecretShare:
        """Read a share written by :meth:`save`; refuses group/world-readable files."""
        target = Path(path)
        fd = os.open(target, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ThresholdError(
                    f"{target} is readable by others (mode {oct(mode & 0o777)}); "
                    "a secret share must be 0600"
                )
            data = handle.read()
        if not data.startswith(_SHARE_MAGIC):
            raise ThresholdError(f"{target} is not a flwr-ext threshold secret share")
        rest = data[len(_SHARE_MAGIC) :]
        line, _, body = rest.partition(b"\n")
        try:
            n_text, used_text, round_text = line.decode("ascii").split(" ")
            n, used, last_round = int(n_text), int(used_text), int(round_text)
        except (UnicodeDecodeError, ValueError) as err:
            raise ThresholdError(f"{target}: malformed share header") from err
        if n != context.n or len(body) != n or used < 0:
            raise ThresholdError(f"{target}: share does not fit the profile")
        share = cls(context, np.frombuffer(body, dtype=np.int8), used, last_round)
        share._path = target
        return share

    def _persist_counter(self) -> None:
        if self._path is None:
            return
        temporary = self._path.with_name(f".{self._path.name}.{os.urandom(8).hex()}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(temporary, flags, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(self._serialize())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self._path)

    def claim_round(self, server_round: int) -> None:
        """Record that this share answers decryption request ``server_round``, once.

        The server numbers its collective decryptions 1, 2, 3... (the statistics
        round, then one per training round); a request whose number is not above
        the last one answered is a replay and raises. The claim is persisted
        before any share is computed, so a restart does not reset it.
        """
        if server_round <= self.last_round:
            raise ThresholdError(
                f"refusing decryption request {server_round}: this share already "
                f"answered request {self.last_round} (a replay)"
            )
        self.last_round = int(server_round)
        self._persist_counter()

    # -------------------------------------------------------------- protocol
    def public_share(self, a: np.ndarray) -> np.ndarray:
        """``p_i = -a * s_i + e_i`` at the key level, NTT form, ``(k+1, N)``."""
        context = self.context
        if a.shape != (len(context.key_moduli), context.n):
            raise ThresholdError("the common polynomial has the wrong shape")
        error = sample_gaussian(context.n, context.profile.key_error_sigma)
        error_ntt = context.key_ntt.forward(
            np.stack([reduce_signed(error, q) for q in context.key_moduli])
        )
        rows = []
        for j, q in enumerate(context.key_moduli):
            product = modmul(a[j], self._ntt[j], q)
            rows.append(add_mod(neg_mod(product, q), error_ntt[j], q))
        return np.stack(rows)

    def partial_decrypt(self, c1: np.ndarray) -> PartialDecryption:
        """``h_i = c1 * s_i + f_i`` for one aggregate ciphertext's ``c1``.

        See :meth:`partial_decrypt_all`, which this calls with one ``c1``.
        """
        return self.partial_decrypt_all([c1])[0]

    def partial_decrypt_all(self, c1s: list[np.ndarray]) -> list[PartialDecryption]:
        """``h_i = c1 * s_i + f_i`` for each aggregate chunk's ``c1``.

        ``c1`` is the ``(k, N)`` NTT-form second polynomial of an aggregate
        ciphertext (the server sends only ``c1``, 15 B/param packed at 60 bits).
        ``f_i`` is this site's flooding noise
        (:meth:`ThresholdProfile.flooding_sigma`), fresh for every chunk. Each
        chunk spends one of the share's ``max_decryptions``; the whole batch is
        claimed and persisted before any share is computed, and a batch beyond
        the budget is refused (the flooding would no longer give ``lambda``
        bits). SEAL computes the shares 16 chunks at a time (:meth:`_seal_shares`).
        """
        context = self.context
        profile = context.profile
        checked = [check_residues(context, c1, "c1") for c1 in c1s]
        if self.decryptions_used + len(checked) > profile.max_decryptions:
            raise ThresholdError(
                f"this secret share has helped decrypt {self.decryptions_used} "
                f"ciphertexts; {len(checked)} more would exceed the most its "
                f"flooding is sized for ({profile.max_decryptions}); create a new "
                "key set"
            )
        self.decryptions_used += len(checked)
        self._persist_counter()
        from flwr_ext.he.wire import _scratch_file

        out: list[Any] = []
        with _scratch_file() as scratch:
            for start in range(0, len(checked), _BATCH):
                batch = np.stack(checked[start : start + _BATCH])
                floods = sample_gaussian_residues(
                    context.n,
                    profile.flooding_sigma(),
                    context.data_moduli,
                    count=batch.shape[0],
                )
                shares = self._seal_shares(batch, floods, scratch)
                out.extend(
                    PartialDecryption(digest(c1), share)
                    for c1, share in zip(batch, shares, strict=True)
                )
        return out

    def _seal_shares(
        self, c1s: np.ndarray, floods: np.ndarray, scratch: Any
    ) -> np.ndarray:
        """``c1_j * s_i + NTT(flood_j)`` for up to 16 chunks, computed by SEAL.

        ``c1s`` and ``floods`` are ``(m, k, N)``, ``1 <= m <= 16``. SEAL holds them
        as two ciphertexts of ``m`` polynomials each (a ciphertext may have up to
        16): the floods in coefficient form, which SEAL transforms to NTT form;
        the ``c1``s in NTT form, which ``multiply_plain`` by the plaintext ``s_i``
        multiplies polynomial by polynomial. ``add_inplace`` sums the two; one
        save and one parse return all ``m`` shares. Four SEAL calls and two file
        round trips per 16 chunks instead of per chunk; the residues are the
        numpy ``modmul`` and ``NttTables.forward`` results exactly (tested).

        SEAL refuses a *transparent* result (every polynomial after the first
        zero), which a single chunk or ``c1``s of zeros (a hostile request) would
        give: such a batch gets a padding polynomial of ones whose result is
        dropped (a full batch is split in two first, to leave room for it).
        """
        context = self.context
        sealapi = context.sealapi
        count = c1s.shape[0]
        if count < 2 or not np.any(c1s[1:]):
            if count == _BATCH:
                half = count // 2
                return np.concatenate(
                    [
                        self._seal_shares(c1s[:half], floods[:half], scratch),
                        self._seal_shares(c1s[half:], floods[half:], scratch),
                    ]
                )
            pad = np.ones((1, context.k, context.n), dtype=np.uint64)
            c1s = np.concatenate([c1s, pad])
            floods = np.concatenate([floods, pad])
        if self._plain_share is None:
            self._plain_share = sealapi.Plaintext()
            scratch.write(
                plaintext_bytes(
                    context.data_parms_id, self._ntt[: context.k], scale=1.0
                )
            )
            self._plain_share.load(context.context, scratch.path)
            self._evaluator = sealapi.Evaluator(context.context)
        noise = sealapi.Ciphertext()
        _write_parts(
            scratch, ciphertext_parts(context.data_parms_id, floods, ntt_form=False)
        )
        noise.load(context.context, scratch.path)
        self._evaluator.transform_to_ntt_inplace(noise)
        product = sealapi.Ciphertext()
        _write_parts(scratch, ciphertext_parts(context.data_parms_id, c1s))
        product.load(context.context, scratch.path)
        self._evaluator.multiply_plain_inplace(product, self._plain_share)
        self._evaluator.add_inplace(product, noise)
        product.save(scratch.path)
        raw = parse_ciphertext(
            scratch.read(),
            expected_k=context.k,
            expected_n=context.n,
            expected_size=c1s.shape[0],
        )
        return raw.polys[:count]


def _write_parts(scratch: Any, parts: list[bytes | memoryview]) -> None:
    """Make the scratch file hold the concatenation of ``parts`` (one syscall)."""
    size = sum(memoryview(part).nbytes for part in parts)
    os.ftruncate(scratch.fd, size)
    written = os.pwritev(scratch.fd, parts, 0)
    if written != size:  # pragma: no cover - full disk
        raise OSError(f"wrote {written} of {size} bytes to {scratch.path}")


def check_residues(context: ThresholdContext, values: object, what: str) -> np.ndarray:
    """Return ``values`` as ``(k, N)`` uint64 residues below each data prime.

    Anything else (another shape or dtype, a residue out of range) raises
    :class:`ThresholdError` naming ``what``: these arrays cross the network.
    """
    if not isinstance(values, np.ndarray) or values.dtype != np.uint64:
        raise ThresholdError(f"{what} must be a uint64 array")
    if values.shape != (context.k, context.n):
        raise ThresholdError(
            f"{what} has shape {values.shape}, expected {(context.k, context.n)}"
        )
    if np.any(values >= np.array(context.data_moduli, dtype=np.uint64)[:, None]):
        raise ThresholdError(f"{what} holds residues out of range")
    return values


def split_ciphertext(context: ThresholdContext, ciphertext: bytes) -> RawCiphertext:
    """Parse an aggregate ciphertext (SEAL bytes) at this key set's data level."""
    raw = parse_ciphertext(ciphertext, expected_k=context.k, expected_n=context.n)
    if raw.parms_id != context.data_parms_id or not raw.ntt_form:
        raise ThresholdError("the ciphertext is not at this key set's data level")
    check_residues(context, raw.polys[0], "c0")
    check_residues(context, raw.polys[1], "c1")
    return raw


def collective_public_key(
    context: ThresholdContext, a: np.ndarray, public_shares: list[np.ndarray]
) -> bytes:
    """SEAL ``PublicKey`` bytes ``(sum_i p_i, a)`` from every site's public share."""
    if not public_shares:
        raise ThresholdError("no public shares to combine")
    shape = (len(context.key_moduli), context.n)
    total = np.zeros(shape, dtype=np.uint64)
    for share in public_shares:
        share = np.asarray(share)
        if share.shape != shape or share.dtype != np.uint64:
            raise ThresholdError(f"a public share must be {shape} uint64 residues")
        for j, q in enumerate(context.key_moduli):
            if np.any(share[j] >= np.uint64(q)):
                raise ThresholdError("a public share holds residues out of range")
            total[j] = add_mod(total[j], share[j], q)
    return ciphertext_bytes(context.key_parms_id, np.stack([total, a]))


def load_public_key(context: ThresholdContext, key: bytes) -> Any:
    """Load :func:`collective_public_key`'s bytes as a SEAL ``PublicKey``.

    SEAL validates it on load.
    """
    from flwr_ext.he.wire import _scratch_file

    public_key = context.sealapi.PublicKey()
    with _scratch_file() as scratch:
        scratch.write(key)
        try:
            public_key.load(context.context, scratch.path)
        except Exception as err:
            raise ThresholdError(
                f"the collective public key does not load ({err})"
            ) from err
    return public_key


def combine(
    context: ThresholdContext,
    aggregate: RawCiphertext,
    partials: list[PartialDecryption],
    *,
    expected_sites: int,
) -> np.ndarray:
    """Decrypt ``aggregate`` from every site's partial decryption.

    Returns the ``N/2`` complex slots (:func:`unpack` gives the reals). Refuses a
    share count other than ``expected_sites`` (N-of-N), a share computed for
    another ciphertext, and two identical shares (a replay).
    """
    expected_digest = digest(aggregate.polys[1])
    if len(partials) != expected_sites:
        raise ThresholdError(
            f"{len(partials)} partial decryptions for {expected_sites} sites: every "
            "site's share is needed"
        )
    seen: set[bytes] = set()
    total = aggregate.polys[0].copy()
    for index, partial in enumerate(partials):
        if partial.ciphertext_digest != expected_digest:
            raise ThresholdError(
                f"partial decryption {index} was computed for another ciphertext"
            )
        share = check_residues(context, partial.share, f"partial decryption {index}")
        fingerprint = hashlib.sha256(share.tobytes()).digest()
        if fingerprint in seen:
            raise ThresholdError(f"partial decryption {index} is a duplicate (replay)")
        seen.add(fingerprint)
        for j, q in enumerate(context.data_moduli):
            total[j] = add_mod(total[j], share[j], q)
    return _decode(context, total, aggregate.scale)


def _decode(
    context: ThresholdContext, residues: np.ndarray, scale: float
) -> np.ndarray:
    from flwr_ext.he.wire import _scratch_file

    plain = context.sealapi.Plaintext()
    with _scratch_file() as scratch:
        scratch.write(plaintext_bytes(context.data_parms_id, residues, scale=scale))
        plain.load(context.context, scratch.path)
    return np.asarray(context.encoder.decode_complex(plain))


def encryptor(context: ThresholdContext, public_key: bytes) -> Any:
    """Return a SEAL ``Encryptor`` for the collective public key."""
    return context.sealapi.Encryptor(
        context.context, load_public_key(context, public_key)
    )


def encrypt_values(
    context: ThresholdContext,
    encryptor_: Any,
    values: np.ndarray,
    *,
    scale_bits: int | None = None,
) -> list[bytes]:
    """Encrypt a float vector, ``N`` reals per ciphertext (two per complex slot).

    ``scale_bits`` (default: the profile's) sets the fixed-point scale: a smaller
    scale leaves room for larger sums (e.g. feature statistics) at the price of
    absolute precision (the flooding noise does not depend on the scale).

    Each ciphertext is SEAL's serialization without its zstd frame
    (:func:`~flwr_ext.he.seal_raw.uncompressed`): residues do not compress, and
    the server loads an uncompressed ciphertext about three times faster.
    """
    scale = context.scale if scale_bits is None else float(2**scale_bits)
    from flwr_ext.he.wire import _scratch_file

    half = context.n // 2
    per = context.n
    out: list[bytes] = []
    with _scratch_file() as scratch:
        for start in range(0, values.shape[0], per):
            chunk = values[start : start + per]
            slots = np.zeros(half, dtype=np.complex128)
            slots.real[: min(half, chunk.shape[0])] = chunk[:half]
            if chunk.shape[0] > half:
                slots.imag[: chunk.shape[0] - half] = chunk[half:]
            plain = context.sealapi.Plaintext()
            context.encoder.encode(slots.tolist(), scale, plain)
            ciphertext = context.sealapi.Ciphertext()
            encryptor_.encrypt(plain, ciphertext)
            ciphertext.save(scratch.path)
            out.append(uncompressed(scratch.read()))
    return out


def unpack(slots: np.ndarray, count: int) -> np.ndarray:
    """Real then imaginary halves of decoded slots, the first ``count`` values."""
    return np.concatenate([slots.real, slots.imag])[:count]
