"""Random generators for DP noise and sampling, seeded from the OS's CSPRNG.

Why not ``np.random`` / ``torch.manual_seed``: a simulation that seeds the global
generators for reproducibility (``np.random.seed(0)``, ``flwr`` examples do) would
then reproduce the "secret" noise exactly, and anyone who knows the seed can
subtract it from the released model. flwr-ext therefore draws DP noise and client
sampling decisions only from generators created here, each seeded with 256 bits
(numpy) or 64 bits (torch) from :mod:`secrets` (the operating system's CSPRNG),
never from a user-supplied seed. A new generator is made for each release, so
even knowledge of one round's generator state says nothing about the next.

Limitations, stated plainly: the streams themselves come from numpy's PCG64 and
torch's Mersenne Twister, which are statistical (not cryptographic) generators;
and Gaussian samples in floating point are subject to the precision attacks of
Mironov (CCS 2012). Neither is exploitable from a released, aggregated model in
any known way, but a deployment that needs protection against them needs a
discrete (or snapped) Gaussian from a CSPRNG, which no maintained Python DP
library offers for PyTorch today (Opacus's ``secure_mode`` needs the unmaintained
``torchcsprng``).
"""

from __future__ import annotations

import secrets

import numpy as np
import torch

from .validation import check_positive

__all__ = ["add_gaussian_noise", "secure_generator", "secure_torch_generator"]


def secure_generator() -> np.random.Generator:
    """Return a fresh numpy Generator seeded with 256 bits from the OS's CSPRNG."""
    return np.random.Generator(
        np.random.PCG64DXSM(np.random.SeedSequence(secrets.randbits(256)))
    )


def secure_torch_generator() -> torch.Generator:
    """Return a fresh CPU torch Generator seeded with 63 bits from the OS's CSPRNG."""
    generator = torch.Generator()
    generator.manual_seed(secrets.randbits(63))
    return generator


def add_gaussian_noise(
    vector: np.ndarray, stddev: float, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Add i.i.d. N(0, stddev**2) noise to a float vector in place; return it.

    Parameters
    ----------
    vector : np.ndarray
        1-D float array (the aggregate, or a client's clipped update).
    stddev : float
        Standard deviation of the noise per coordinate, > 0.
    rng : np.random.Generator, optional
        Defaults to a fresh :func:`secure_generator`. Pass one only to draw
        several noise vectors from one secure generator.
    """
    stddev = check_positive("stddev", stddev)
    if vector.dtype.kind != "f":
        raise TypeError(f"noise is added to float vectors, got dtype {vector.dtype}")
    rng = secure_generator() if rng is None else rng
    vector += rng.normal(0.0, stddev, size=vector.shape).astype(
        vector.dtype, copy=False
    )
    return vector
