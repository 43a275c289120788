"""CKKS parameter profiles: ring size, coefficient moduli, scale and magnitude bound.

A profile is fixed when the keys are created (``flwr-ext keys create --profile``) and
travels with every encrypted message, so a client and a server with different
parameters fail with a clear error instead of producing garbage.

Both profiles are *add-only*: the server never multiplies a ciphertext, so no prime
is ever consumed by rescaling. SEAL's last prime in ``coeff_mod_bit_sizes`` is the
special prime used for key switching (unused here) and not part of a ciphertext;
the others are the *data primes*, whose product ``q`` a ciphertext lives in. A
fresh ciphertext carries ``poly_modulus_degree / 2`` complex slots at
``2**scale_bits`` fixed-point precision.

Two data primes and a scale of 2^100 (default) are there for *flooding*
(:mod:`flwr_ext.he.flooding`): every decryption that leaves a data owner adds
integer noise of standard deviation up to ~2^57 to the plaintext's coefficients
(sized for 30-bit statistical security over the profile's ``flood_releases``
decryptions), and a scale far above that noise keeps the released values precise
(about 1e-11 for a 1M-parameter model of 10 clients). With one 60-bit prime the
noise would swamp every value.

Magnitude bound. A slot holds ``value * 2**scale_bits`` modulo ``q``; once the
*aggregate* (sum over all clients) exceeds ``q / 2**(scale_bits + 1)`` it wraps
around and decrypts to garbage, silently. Each profile therefore declares
``bound`` - half that capacity, a factor of 2 of headroom for encoding and noise -
and clients check ``|weight * value| <= bound / num_clients`` for every value
*before* anything is encrypted (see :func:`check_bound`).

==========  =====  ============  =====  =========  =========================
profile     N      moduli        scale  bound      uplink (packed / tenseal)
==========  =====  ============  =====  =========  =========================
default     8192   [60, 60, 60]  2^100  2^18       ~32 / ~64 B/param
compact     4096   [47, 46, 16]  2^83   2^8 = 256  ~24 / ~48 B/param
==========  =====  ============  =====  =========  =========================

Both meet 128-bit security for these ring sizes and modulus sizes (SEAL's
``CoeffModulus.MaxBitCount``, the HE standard's table: 218 bits for N=8192,
109 bits for N=4096); ``compact``'s 47- and 46-bit primes compress (SEAL's zstd).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "PROFILES",
    "BoundExceededError",
    "Profile",
    "check_bound",
    "get_profile",
]


@dataclass(frozen=True)
class Profile:
    """CKKS parameters of one key set.

    Attributes
    ----------
    name : str
        ``"default"`` or ``"compact"``.
    poly_modulus_degree : int
        Ring dimension N; a ciphertext holds ``N / 2`` real slots.
    coeff_mod_bit_sizes : tuple[int, ...]
        Bit sizes of SEAL's coefficient primes; the first is the data prime, the
        last the special (key-switching) prime.
    scale_bits : int
        Fixed-point scale ``2**scale_bits``: the precision of every slot.
    flood_security_bits : int
        Statistical security (bits) of the flooding noise added to every
        decryption that leaves a data owner (:mod:`flwr_ext.he.flooding`).
    flood_releases : int
        Number of released decryptions the flooding is sized for, over the key
        set's lifetime (sites also cap the releases per run).
    """

    name: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    flood_security_bits: int = 30
    flood_releases: int = 2**20

    @property
    def slots(self) -> int:
        """Real values per ciphertext (``N / 2``)."""
        return self.poly_modulus_degree // 2

    @property
    def scale(self) -> float:
        """The CKKS scale ``2**scale_bits``."""
        return float(2**self.scale_bits)

    @property
    def data_prime_bits(self) -> int:
        """Bits of ``q``, the product of the data primes a ciphertext lives in."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def bound(self) -> float:
        """Largest ``|value|`` the *aggregate* may hold (half the capacity)."""
        return float(2 ** (self.data_prime_bits - self.scale_bits - 2))

    def describe(self) -> str:
        """One line, e.g. ``default (N=8192, moduli [60, 40], scale 2^40, ...)``."""
        return (
            f"{self.name} (N={self.poly_modulus_degree}, moduli "
            f"{list(self.coeff_mod_bit_sizes)}, scale 2^{self.scale_bits}, "
            f"|aggregate| <= {self.bound:g})"
        )

    def to_dict(self) -> dict[str, object]:
        """Plain-JSON description (stored in key files and messages)."""
        return {
            "name": self.name,
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
            "flood_security_bits": self.flood_security_bits,
            "flood_releases": self.flood_releases,
        }


PROFILES: dict[str, Profile] = {
    "default": Profile("default", 8192, (60, 60, 60), 100),
    "compact": Profile("compact", 4096, (47, 46, 16), 83),
}


def get_profile(name: str) -> Profile:
    """Return the profile called ``name``; ``ValueError`` lists the valid names."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown CKKS profile {name!r}; choose one of {sorted(PROFILES)}"
        ) from None


class BoundExceededError(ValueError):
    """A client's pre-scaled values would overflow the profile's capacity."""


def check_bound(
    values: np.ndarray, weight: float, profile: Profile, num_clients: int
) -> None:
    """Raise :class:`BoundExceededError` if ``weight * values`` may overflow.

    Parameters
    ----------
    values : np.ndarray
        The client's flat model vector (before pre-scaling), any float dtype.
    weight : float
        The client's weight (its share of the weighted average, in weight units).
    profile : Profile
        Parameters of the key set.
    num_clients : int
        Number of replies the server sums this round: each client may use
        ``1 / num_clients`` of the profile's bound, so the sum cannot wrap around.

    Notes
    -----
    Runs on the client, before encryption: a value that is too large is never
    sent. The weight slot itself (``weight``) must fit the same budget.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    budget = profile.bound / num_clients
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    if not math.isfinite(peak):
        raise BoundExceededError(
            "the model holds NaN or Inf values; refusing to encrypt them "
            "(they would corrupt the aggregate of every client)"
        )
    largest = max(abs(weight) * peak, abs(weight))
    if largest > budget:
        raise BoundExceededError(
            f"the pre-scaled update does not fit CKKS profile {profile.describe()}: "
            f"max |weight * value| = {weight:g} * {peak:g} = {largest:g} exceeds the "
            f"per-client budget {budget:g} (= bound {profile.bound:g} / "
            f"{num_clients} clients). The aggregate would wrap around and decrypt to "
            "garbage, so nothing was encrypted or sent. Fix: pass a larger "
            "HomomorphicAggregation(weight_unit=...) so that weights shrink, or "
            "create keys with the 'default' profile (bound 2^18)."
        )
