"""Noise flooding: what a data owner releases from a CKKS decryption hides the key.

Why
---
A CKKS ciphertext ``(c0, c1)`` decrypts to ``c0 + c1 * s = m + e`` (mod q): the
plaintext polynomial ``m`` plus the sum ``e`` of the encryption errors, which
depends on the secret key ``s``. Whoever learns ``m + e`` exactly solves
``s = (m + e - c0) / c1`` - one released decryption of one ciphertext gives away
the key (Li and Micciancio, EUROCRYPT 2021; ``tests/test_he_key_recovery.py``).
So every decryption whose result leaves a data owner adds *flooding* noise ``G``
to the plaintext's integer coefficients before decoding, large enough that
``m + e + G`` is statistically indistinguishable from ``m + G``, whatever ``e``
is - the released value is (statistically) independent of the secret-dependent
error - and is then rounded (:func:`release_grid`).

The bound
---------
``G`` is a discrete Gaussian of standard deviation ``tau`` on every coefficient
(independent coefficients). For one coefficient shifted by ``|e| <= B`` the
Kullback-Leibler divergence is exactly ``KL(D_tau + e || D_tau) = e**2 / (2 tau**2)``;
KL adds up over independent coefficients and over decryptions (chain rule, also for
adaptively chosen ciphertexts), so ``Q`` releases of ``M`` coefficients each give
``KL <= Q M B**2 / (2 tau**2)``, and by Pinsker's inequality the statistical
distance between what the server sees and what it would see without ``e`` is
``SD <= sqrt(KL / 2) = B sqrt(Q M) / (2 tau)``. Statistical security ``kappa`` bits
(``SD <= 2**-kappa``) therefore needs::

    tau = 2**(kappa - 1) * B * sqrt(Q * M)                       (flooding_std)

- ``B``: per-coefficient bound of the secret-dependent error of the ciphertext to
  release. A fresh symmetric SEAL encryption has ``|e| <= 21`` per coefficient
  (SEAL's centred binomial error of width 42, or its clipped Gaussian with
  ``6 * 3.2 = 19.2``; :data:`FRESH_ERROR_BOUND`, checked by a test); a sum of
  ``n`` fresh ciphertexts (the server only adds) has ``B = 21 n``.
- ``M``: coefficients released per decryption (ciphertexts x ring size ``N``).
- ``Q``: decryptions released over the key set's lifetime (the profile's
  ``flood_releases``); the per-run budget that sites enforce is much smaller
  (:func:`charge_release`).

This is the Gaussian flooding argument of Li, Micciancio, Schultz and Sorrell,
"Securing Approximate Homomorphic Encryption Using Differential Privacy",
CRYPTO 2022, with KL instead of Renyi divergence.

The sampler
-----------
The noise comes from a CSPRNG - SHAKE-256 keyed with 32 secret bytes
(:class:`NoiseStream`) - and Box-Muller on 192 random bits per pair of normals
(the tails reach ``|Z| > 13``, far beyond what ``Q M <= 2**60`` samples ever
visit). A float64 Gaussian of standard deviation ``2**55`` only takes multiples of
8 far out, so the integer noise is built as ``G = Y0 + K * Y1`` with
``K = 2**20``, ``Y0 = round(8 K Z0)`` and ``Y1 = round(s1 Z1)``: every part is
sampled where float64 resolves far below one unit, and ``Y0`` (standard
deviation ``8 K``, far above the smoothing parameter of ``K Z``) makes the sum a
(near-)discrete Gaussian of standard deviation
``sqrt((8 K)**2 + K**2 s1**2) >= tau`` (the convolution lemma; Peikert, CRYPTO 2010).

The API serves every decryption site, including partial decryptions of a
threshold scheme (which flood their share the same way):

- :func:`flooding_std` - the formula above;
- :func:`flooding_noise` / :func:`flood` - sample ``G`` (as ``int64``, or as
  residues mod each prime with :func:`noise_residues`) and add it;
- :func:`release_grid` / :func:`round_to_grid` - the rounding before release;
- :func:`charge_release` - a per-run counter that refuses decryptions beyond the
  site's budget.

For a threshold scheme, a party floods its partial decryption ``c1 * s_i + e_i``
the same way before it leaves the party: ``B`` is that party's error bound,
``M`` the coefficients it releases, ``Q`` the partial decryptions it will release;
draw ``flooding_noise(M, flooding_std(B, M, Q, kappa), NoiseStream())``, reduce
it with :func:`noise_residues` and add it in coefficient form (on SEAL objects:
:func:`flwr_ext.he._seal_raw.add_polynomial`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence

import numpy as np
from flwr.app import ConfigRecord, RecordDict

__all__ = [
    "FRESH_ERROR_BOUND",
    "MAX_STD",
    "BudgetExhaustedError",
    "NoiseStream",
    "charge_release",
    "flood",
    "flooding_noise",
    "flooding_std",
    "noise_residues",
    "release_grid",
    "releases_used",
    "round_to_grid",
]

#: Bound on ``|e|`` per coefficient of one fresh symmetric SEAL encryption.
FRESH_ERROR_BOUND = 21
#: Largest flooding standard deviation :func:`flooding_noise` samples (int64 range:
#: ``|G| < 14 * MAX_STD < 2**63``).
MAX_STD = float(2**59)
#: ``G = Y0 + K * Y1``: the lattice step of the coarse part and ``Y0``'s std.
_STEP = 2**20
_FINE_STD = 8.0 * _STEP
#: Where :func:`charge_release` keeps its counter in ``context.state``.
_STATE_KEY = "flwr-ext-ckks-releases"


class BudgetExhaustedError(ValueError):
    """A site refused a decryption: its per-run release budget is spent."""


def flooding_std(
    error_bound: float,
    num_coefficients: int,
    num_decryptions: int,
    security_bits: int = 30,
) -> float:
    """Return ``tau``, the flooding noise's standard deviation per coefficient.

    Parameters
    ----------
    error_bound : float
        ``B``: bound on ``|e|`` per coefficient of the secret-dependent error
        (coefficient units, i.e. before dividing by the scale).
    num_coefficients : int
        ``M``: coefficients released by one decryption.
    num_decryptions : int
        ``Q``: decryptions released in all (the guarantee covers ``Q`` of them).
    security_bits : int (default: 30)
        ``kappa``: the statistical distance from a release independent of ``e``
        stays ``<= 2**-kappa`` over all ``Q`` releases.

    Returns
    -------
    float
        ``tau = 2**(kappa - 1) * B * sqrt(Q * M)``.
    """
    for name, value in (
        ("error_bound", error_bound),
        ("num_coefficients", num_coefficients),
        ("num_decryptions", num_decryptions),
        ("security_bits", security_bits),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {value!r}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return (
        2.0 ** (security_bits - 1)
        * float(error_bound)
        * math.sqrt(float(num_decryptions) * float(num_coefficients))
    )


class NoiseStream:
    """A CSPRNG: SHAKE-256 keyed with ``seed`` (>= 32 bytes; random if None).

    A data owner seeds it with a secret derived from its key and the ciphertext
    it decrypts (:func:`flwr_ext.he.codec.decrypt_record`), so decrypting the
    same ciphertext again - at another site, or the same file twice - releases
    the same value and averaging repeated releases gains nothing.
    """

    def __init__(self, seed: bytes | None = None) -> None:
        seed = os.urandom(32) if seed is None else bytes(seed)
        if len(seed) < 32:
            raise ValueError("a NoiseStream needs a seed of at least 32 bytes")
        self._seed = seed
        self._counter = 0

    def words(self, count: int) -> np.ndarray:
        """``count`` uniformly random ``uint64`` values (fresh ones every call)."""
        block = hashlib.shake_256(
            b"flwr-ext flooding v1\x00"
            + self._counter.to_bytes(8, "little")
            + self._seed
        ).digest(8 * count)
        self._counter += 1
        return np.frombuffer(block, dtype="<u8").astype(np.uint64)


def _normals(stream: NoiseStream, count: int) -> np.ndarray:
    """``count`` standard normals (Box-Muller on 192 bits per pair)."""
    pairs = (count + 1) // 2
    words = stream.words(3 * pairs).reshape(3, pairs)
    # u1 in (0, 1] from 128 bits: fine near 0, where the tails come from.
    u1 = words[0] * 2.0**-64 + (words[1] + 0.5) * 2.0**-128
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = (2.0 * np.pi * 2.0**-64) * words[2]
    out = np.empty(2 * pairs)
    out[:pairs] = radius * np.cos(angle)
    out[pairs:] = radius * np.sin(angle)
    return out[:count]


def flooding_noise(count: int, std: float, stream: NoiseStream) -> np.ndarray:
    """``count`` independent integer flooding samples of standard deviation ``>= std``.

    Returns ``int64`` values ``G = Y0 + K * Y1`` (see the module docstring).

    Raises
    ------
    ValueError
        If ``std`` exceeds :data:`MAX_STD` (the samples would leave int64).
    """
    if not (math.isfinite(std) and 0 < std <= MAX_STD):
        raise ValueError(
            f"flooding standard deviation {std:g} is outside (0, 2^59]: the "
            "decryption releases too many coefficients of too large a sum for this "
            "flooding sampler"
        )
    coarse_std = math.sqrt(max(std * std - _FINE_STD * _FINE_STD, 0.0)) / _STEP
    fine = np.rint(_FINE_STD * _normals(stream, count)).astype(np.int64)
    if coarse_std == 0.0:
        return fine
    coarse = np.rint(coarse_std * _normals(stream, count)).astype(np.int64)
    return fine + coarse * np.int64(_STEP)


def flood(
    coefficients: np.ndarray,
    error_bound: float,
    num_decryptions: int,
    security_bits: int = 30,
    *,
    stream: NoiseStream | None = None,
) -> np.ndarray:
    """Return integer ``coefficients`` plus flooding noise sized for them.

    ``M`` is ``coefficients.size``: the caller passes everything one decryption
    releases (e.g. one party's partial decryption of every ciphertext of a
    model). Works on ``int64`` arrays (values must stay in range) and on Python
    ``object`` arrays; use :func:`noise_residues` for values mod primes.
    """
    values = np.asarray(coefficients)
    std = flooding_std(error_bound, values.size, num_decryptions, security_bits)
    noise = flooding_noise(values.size, std, stream or NoiseStream())
    return values + noise.reshape(values.shape).astype(values.dtype)


def noise_residues(noise: np.ndarray, moduli: Sequence[int]) -> np.ndarray:
    """``noise`` (int64, any shape) mod each prime: shape ``(len(moduli), *shape)``."""
    out = np.empty((len(moduli), *noise.shape), dtype=np.uint64)
    for i, modulus in enumerate(moduli):
        if not 1 < int(modulus) < 2**62:
            raise ValueError(f"modulus {modulus} is outside (1, 2^62)")
        out[i] = np.mod(noise, np.int64(modulus)).astype(np.uint64)
    return out


def release_grid(std: float) -> float:
    """Return the power of two a released value is rounded to: ``<= std``.

    Rounding to the grid costs at most half a grid step - at most ``std / 2`` on
    top of the flooding noise - and removes the low-order bits of the decoding,
    which carry nothing the noise does not already hide.
    """
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"std must be finite and > 0, got {std!r}")
    return 2.0 ** math.floor(math.log2(std))


def round_to_grid(values: np.ndarray | float, grid: float) -> np.ndarray:
    """Round ``values`` to the nearest multiple of ``grid`` (float64)."""
    return np.rint(np.asarray(values, dtype=np.float64) / grid) * grid


def releases_used(state: RecordDict) -> int:
    """Decryptions this node released in this run (from ``context.state``)."""
    record = state.config_records.get(_STATE_KEY)
    if record is None:
        return 0
    used = record.get("used", 0)
    return used if isinstance(used, int) and not isinstance(used, bool) else 0


def charge_release(state: RecordDict, budget: int) -> int:
    """Count one released decryption against this run's budget; refuse beyond it.

    Parameters
    ----------
    state : RecordDict
        The node's ``context.state`` (persists for the whole run).
    budget : int
        Most decryptions this node releases per run.

    Returns
    -------
    int
        Releases used so far, this one included.

    Raises
    ------
    BudgetExhaustedError
        If ``budget`` releases were already made (nothing is counted then).
    """
    used = releases_used(state)
    if used >= budget:
        raise BudgetExhaustedError(
            f"this node's decryption budget of {budget} releases per run is spent "
            "(node config ckks-decrypt-budget): refusing to decrypt more for the "
            "server"
        )
    state[_STATE_KEY] = ConfigRecord({"used": used + 1})
    return used + 1
