"""Residue-number-system polynomial arithmetic that matches SEAL, in numpy.

A CKKS polynomial of ring degree ``N`` modulo ``q = q_0 * ... * q_{k-1}`` is held,
as SEAL holds it, as a ``(k, N)`` array of ``uint64`` residues, one row per prime,
usually in *NTT form* (the negacyclic number-theoretic transform, values in SEAL's
bit-reversed order). In NTT form a product of polynomials is a coefficient-wise
product, which is all the threshold protocol needs: ``a * s_i``, ``c1 * s_i``.

Why not SEAL? ``tenseal.sealapi`` exposes no way to multiply a ciphertext by a
*secret* polynomial of our own, nor to sample noise into an NTT-form polynomial. So
the few operations the multiparty protocol needs are done here, and every result is
checked against SEAL in the tests (``tests/test_he_threshold.py``): the forward NTT
is SEAL's ``transform_to_ntt`` to the bit, with the same root SEAL picks (the
smallest primitive ``2N``-th root of unity modulo each prime).

Exact 60-bit modular products. ``a * b mod q`` with ``a, b < q < 2**61`` is computed
with an 80-bit extended-precision quotient estimate (``numpy.longdouble`` on x86-64,
a 64-bit mantissa): the estimate is off by at most one, the remainder is formed in
wrapping ``uint64`` arithmetic (exact modulo ``2**64``) and corrected once. On a
platform whose ``longdouble`` is narrower, a slower exact path over Python integers
is used instead (:func:`modmul` decides once).
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np

__all__ = [
    "NttTables",
    "add_mod",
    "centered",
    "modmul",
    "neg_mod",
    "reduce_signed",
    "sample_gaussian",
    "sample_gaussian_residues",
    "sample_ternary",
    "sub_mod",
]

_EXTENDED = np.finfo(np.longdouble).nmant >= 63


def modmul(a: np.ndarray, b: np.ndarray | int | np.integer, q: int) -> np.ndarray:
    """Return ``a * b mod q`` elementwise for residues below ``q < 2**61``."""
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    if not _EXTENDED:  # pragma: no cover - x86-64 has 80-bit long double
        out = (a.astype(object) * b.astype(object)) % q
        return out.astype(np.uint64)
    quotient = np.floor(
        a.astype(np.longdouble) * b.astype(np.longdouble) / np.longdouble(q)
    ).astype(np.uint64)
    with np.errstate(over="ignore"):
        remainder = (a * b - quotient * np.uint64(q)).view(np.int64)
    remainder = np.where(remainder < 0, remainder + np.int64(q), remainder)
    remainder = np.where(remainder >= q, remainder - np.int64(q), remainder)
    return remainder.astype(np.uint64)


def add_mod(a: np.ndarray, b: np.ndarray, q: int) -> np.ndarray:
    """Return ``a + b mod q`` for residues below ``q < 2**63``.

    ``min(t, t - q)`` with wrapping ``uint64`` subtraction: when ``t < q`` the
    difference wraps above ``t``; otherwise it is the reduced value.
    """
    total = np.add(a, b, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return np.minimum(total, total - np.uint64(q))


def sub_mod(a: np.ndarray, b: np.ndarray, q: int) -> np.ndarray:
    """Return ``a - b mod q`` for residues below ``q``."""
    return np.where(a >= b, a - b, a + (np.uint64(q) - b))


def neg_mod(a: np.ndarray, q: int) -> np.ndarray:
    """Return ``-a mod q`` for residues below ``q``."""
    return np.where(a == 0, a, np.uint64(q) - a)


def reduce_signed(values: np.ndarray, q: int) -> np.ndarray:
    """Signed integers (``int64``) to residues modulo ``q``."""
    return np.mod(values.astype(np.int64), np.int64(q)).astype(np.uint64)


def centered(residues: np.ndarray, q: int) -> np.ndarray:
    """Residues modulo ``q`` to their centred representatives in ``(-q/2, q/2]``."""
    signed = residues.astype(np.int64)
    return np.where(residues > np.uint64(q // 2), signed - np.int64(q), signed)


def sample_ternary(n: int) -> np.ndarray:
    """Sample ``n`` coefficients uniform in ``{-1, 0, 1}`` from the OS's CSPRNG.

    The distribution of SEAL's secret keys.
    """
    out = np.empty(0, dtype=np.int64)
    while out.shape[0] < n:  # rejection sampling: bytes < 255 are uniform mod 3
        raw = np.frombuffer(os.urandom(2 * n), dtype=np.uint8)
        raw = raw[raw < 255]
        out = np.concatenate([out, raw.astype(np.int64) % 3 - 1])
    return out[:n]


def sample_gaussian(n: int, sigma: float) -> np.ndarray:
    """``n`` integer Gaussian samples of standard deviation ``sigma``, CSPRNG-seeded.

    The normal deviates come from numpy's PCG64 generator seeded with 256 bits from
    the OS's CSPRNG for each call (the project's noise convention: never
    ``np.random``'s global state). A float64 carries 53 bits, so for a large
    ``sigma`` (up to ``2**59``) ``sigma * z`` is only known to a
    grid of ``step = 2**(bits(sigma) - 45)``; every sample is therefore rounded to
    that grid and dithered by an independent uniform integer in
    ``[-step/2, step/2)``. The result has full integer resolution (no residue
    class modulo ``step`` is favoured: the low bits of a flooded value reveal
    nothing) and a density within a factor ``1 + O(step |x| / sigma^2)`` of the
    Gaussian's, negligible for ``step <= sigma / 2**40``.
    """
    if not sigma >= 0 or not np.isfinite(sigma):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    if sigma > 2.0**59:
        raise ValueError(f"sigma={sigma!r} is above 2**59: samples could overflow")
    seed = int.from_bytes(os.urandom(32), "little")
    generator = np.random.Generator(np.random.PCG64(seed))
    step_bits = max(0, math.ceil(math.log2(sigma)) - 45) if sigma > 0 else 0
    step = 1 << step_bits
    values = generator.normal(0.0, sigma / step, size=n)
    out = np.rint(values).astype(np.int64) * np.int64(step)
    if step > 1:
        out += generator.integers(-(step // 2), step // 2, size=n, dtype=np.int64)
    return out


def sample_gaussian_residues(
    n: int, sigma: float, moduli: tuple[int, ...], count: int | None = None
) -> np.ndarray:
    """Integer Gaussian samples of any ``sigma``, as residues modulo ``moduli``.

    Returns ``(k, n)`` residues, or ``(count, k, n)`` for ``count`` independent
    polynomials drawn at once (the flooding of many chunks in a few vector
    operations rather than a Python loop).

    Flooding noise can exceed what ``int64`` holds (``sigma`` up to ``2**70``
    here), so a sample is never formed as one integer. With ``step = 2**t``,
    ``t = bits(sigma) - 45``, it is ``f = step * j + d``: ``j = rint(sigma z /
    step)`` on the float64 grid, ``d`` a uniform dither in ``[-step/2, step/2)``
    (full integer resolution). Written as ``f = (2j - 1) * step/2 + d'`` with
    ``d' = d + step/2`` uniform in ``[0, step)``, and with ``b = bits(min(moduli))
    - 2`` (so ``2**b + step`` is below every prime), it splits exactly as
    ``f = h * 2**b + l``: ``h = (2j - 1) >> (b - t + 1)``, a small signed integer,
    and ``l = ((2j - 1) mod 2**(b-t+1)) * step/2 + d'`` in ``[0, 2**b + step)``,
    already a residue. ``f mod q`` is then a table entry ``h * 2**b mod q`` (exact
    Python integers, one per distinct ``h``) plus ``l``, with one conditional
    subtraction. (For ``step = 1``: ``f = j``, ``l = j mod 2**b``.) Integer
    operations only, no extended-precision product. Same distribution as
    :func:`sample_gaussian`.
    """
    if not sigma >= 0 or not np.isfinite(sigma) or sigma > 2.0**70:
        raise ValueError(f"sigma must be a finite number in [0, 2**70], got {sigma!r}")
    if not moduli:
        raise ValueError("no moduli to reduce the samples to")
    shape = (n,) if count is None else (int(count), n)
    seed = int.from_bytes(os.urandom(32), "little")
    generator = np.random.Generator(np.random.PCG64(seed))
    step_bits = max(0, math.ceil(math.log2(sigma)) - 45) if sigma > 0 else 0
    base = min(moduli).bit_length() - 2
    if step_bits > base:
        raise ValueError(f"sigma={sigma!r} is too large for primes of {base + 2} bits")
    grid = generator.normal(0.0, sigma / (1 << step_bits), size=shape)
    value = np.rint(grid, out=grid).astype(np.int64)  # j
    if step_bits:
        value <<= np.int64(1)
        value -= np.int64(1)  # 2j - 1, in units of step/2
        unit_bits = step_bits - 1
    else:
        unit_bits = 0
    split = base - unit_bits  # value = high * 2**split + (value mod 2**split)
    high = value >> np.int64(split)
    value &= np.int64((1 << split) - 1)
    value <<= np.int64(unit_bits)
    if step_bits:
        value += generator.integers(0, 1 << step_bits, size=shape, dtype=np.int64)
    low = value.view(np.uint64)  # l in [0, 2**b + step): a residue of every prime
    first = int(high.min()) if high.size else 0
    last = int(high.max()) if high.size else 0
    high -= np.int64(first)
    out = np.empty((*shape[:-1], len(moduli), n), dtype=np.uint64)
    for j, q in enumerate(moduli):
        table = np.array(
            [(h << base) % q for h in range(first, last + 1)], dtype=np.uint64
        )
        row = out[..., j, :]
        np.add(table[high], low, out=row)
        with np.errstate(over="ignore"):
            np.minimum(row, row - np.uint64(q), out=row)  # add_mod, in place
    return out


def _bit_reverse(values: np.ndarray, bits: int) -> np.ndarray:
    out = np.zeros_like(values)
    for bit in range(bits):
        out |= ((values >> bit) & 1) << (bits - 1 - bit)
    return out


def _minimal_primitive_root(degree: int, q: int) -> int:
    """Return the smallest primitive ``degree``-th root of unity modulo ``q``.

    SEAL's ``try_minimal_primitive_root``: the root its NTT tables use.
    """
    if (q - 1) % degree:
        raise ValueError(f"{q} is not 1 mod {degree}: no NTT for this ring")
    exponent = (q - 1) // degree
    root = None
    for candidate in range(2, 1 << 20):
        r = pow(candidate, exponent, q)
        if pow(r, degree // 2, q) == q - 1:  # primitive: r^(degree/2) = -1
            root = r
            break
    if root is None:  # pragma: no cover - a prime this size always has one
        raise ValueError(f"no primitive {degree}-th root of unity modulo {q}")
    square = root * root % q
    best, current = root, root
    for _ in range(degree // 2):  # every primitive root is an odd power of `root`
        best = min(best, current)
        current = current * square % q
    return best


class NttTables:
    """Negacyclic NTT tables of ring degree ``n`` for the primes ``moduli``.

    :meth:`forward` equals SEAL's ``ntt_negacyclic_harvey`` (Cooley-Tukey, roots in
    bit-reversed order, output in SEAL's order); :meth:`inverse` undoes it.

    Parameters
    ----------
    n : int
        Ring degree N (a power of two).
    moduli : tuple[int, ...]
        The primes, each ``1 mod 2N``.
    """

    def __init__(self, n: int, moduli: tuple[int, ...]) -> None:
        if n < 2 or n & (n - 1):
            raise ValueError(f"ring degree must be a power of two >= 2, got {n}")
        self.n = n
        self.moduli = tuple(int(q) for q in moduli)
        self.log_n = n.bit_length() - 1
        reverse = _bit_reverse(np.arange(n, dtype=np.int64), self.log_n)
        self._roots: list[np.ndarray] = []
        self._inverse_roots: list[np.ndarray] = []
        self._n_inverse: list[int] = []
        for q in self.moduli:
            psi = _minimal_primitive_root(2 * n, q)
            powers = _powers(psi, n, q)
            roots = np.empty(n, dtype=np.uint64)
            roots[reverse] = powers  # roots[bitrev(i)] = psi^i
            self._roots.append(roots)
            inverse_powers = _powers(pow(psi, -1, q), n, q)
            inverse_roots = np.empty(n, dtype=np.uint64)
            inverse_roots[reverse] = inverse_powers
            self._inverse_roots.append(inverse_roots)
            self._n_inverse.append(pow(n, -1, q))

    def forward(self, coefficients: np.ndarray) -> np.ndarray:
        """``(k, n)`` residues in coefficient form to NTT form (a new array)."""
        out = np.array(coefficients, dtype=np.uint64, copy=True)
        for j, q in enumerate(self.moduli):
            out[j] = self._forward_one(out[j], self._roots[j], q)
        return out

    def inverse(self, values: np.ndarray) -> np.ndarray:
        """``(k, n)`` residues in NTT form back to coefficient form."""
        out = np.array(values, dtype=np.uint64, copy=True)
        for j, q in enumerate(self.moduli):
            out[j] = self._inverse_one(out[j], j, q)
        return out

    def _forward_one(self, a: np.ndarray, roots: np.ndarray, q: int) -> np.ndarray:
        n = self.n
        m, gap = 1, n // 2
        while m < n:
            blocks = a.reshape(m, 2, gap)
            w = roots[m : 2 * m].reshape(m, 1)
            x = blocks[:, 0, :]
            y = modmul(blocks[:, 1, :], np.broadcast_to(w, x.shape), q)
            blocks = np.stack([add_mod(x, y, q), sub_mod(x, y, q)], axis=1)
            a = blocks.reshape(n)
            m, gap = 2 * m, gap // 2
        return a

    def _inverse_one(self, a: np.ndarray, j: int, q: int) -> np.ndarray:
        # Gentleman-Sande, the exact reverse of _forward_one's stages.
        n = self.n
        inverse_roots = self._inverse_roots[j]
        m, gap = n // 2, 1
        while m >= 1:
            blocks = a.reshape(m, 2, gap)
            w = inverse_roots[m : 2 * m].reshape(m, 1)
            x = blocks[:, 0, :]
            y = blocks[:, 1, :]
            total = add_mod(x, y, q)
            diff = modmul(sub_mod(x, y, q), np.broadcast_to(w, x.shape), q)
            a = np.stack([total, diff], axis=1).reshape(n)
            m, gap = m // 2, 2 * gap
        return modmul(a, np.uint64(self._n_inverse[j]), q)


def _powers(base: int, count: int, q: int) -> np.ndarray:
    out = np.empty(count, dtype=np.uint64)
    value = 1
    for i in range(count):
        out[i] = value
        value = value * base % q
    return out


@functools.lru_cache(maxsize=8)
def ntt_tables(n: int, moduli: tuple[int, ...]) -> NttTables:
    """Return cached :class:`NttTables` (building them costs a few ms per prime)."""
    return NttTables(n, moduli)
