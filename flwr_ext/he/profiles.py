"""CKKS parameter profiles: ring size, coefficient moduli, scale and magnitude bound.

A profile is fixed when the keys are created (``flwr-ext keys create --profile``) and
travels with every encrypted message, so a client and a server with different
parameters fail with a clear error instead of producing garbage.

Both profiles are *add-only*: the server never multiplies a ciphertext, so one data
prime suffices (SEAL's last prime in ``coeff_mod_bit_sizes`` is the special prime
used for key switching, not part of a ciphertext). A fresh ciphertext carries
``poly_modulus_degree / 2`` real values at ``2**scale_bits`` fixed-point precision.

Magnitude bound. A slot holds ``value * 2**scale_bits`` modulo the data prime
``q0``; once the *aggregate* (sum over all clients) exceeds ``q0 / 2**(scale_bits + 1)``
it wraps around and decrypts to garbage, silently. Each profile therefore declares
``bound`` - half that capacity, a factor of 2 of headroom for encoding and noise -
and clients check ``|weight * value| <= bound / num_clients`` for every value
*before* anything is encrypted (see :func:`check_bound`).

==========  =====  ========  =====  =========  ==================================
profile     N      moduli    scale  bound      measured uplink (packed / tenseal)
==========  =====  ========  =====  =========  ==================================
default     8192   [60, 40]  2^40   2^18       ~16 / ~32 B/param
compact     4096   [45, 60]  2^35   2^8 = 256  ~13.5 / ~27 B/param
==========  =====  ========  =====  =========  ==================================

Both meet 128-bit security for these ring sizes and modulus sizes (SEAL's
``CoeffModulus.MaxBitCount``: 218 bits for N=8192, 109 bits for N=4096).
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
    """

    name: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int

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
        """Bits of the one data prime a fresh ciphertext lives in."""
        return self.coeff_mod_bit_sizes[0]

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
        }


PROFILES: dict[str, Profile] = {
    "default": Profile("default", 8192, (60, 40), 40),
    "compact": Profile("compact", 4096, (45, 60), 35),
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
