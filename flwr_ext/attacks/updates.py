"""Byzantine attacks as functions over model updates (and labels).

An *update* is a client's model minus the global model it started from, a float
vector of shape ``(d,)``; ``honest`` is the ``(n_honest, d)`` matrix of the honest
updates of the round. Omniscient attacks (ALIE, IPM) read ``honest``; the others
only transform the attacker's own update. Every function returns a new array.

References
----------
- ALIE: Baruch, Baruch and Goldberg, "A Little Is Enough: Circumventing Defenses
  For Distributed Learning", NeurIPS 2019.
- IPM: Xie, Koyejo and Gupta, "Fall of Empires: Breaking Byzantine-tolerant SGD by
  Inner Product Manipulation", UAI 2020.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

__all__ = [
    "alie",
    "alie_z",
    "gaussian_noise",
    "inflate_weight",
    "ipm",
    "label_flip",
    "non_finite",
    "scaling",
    "sign_flip",
]


def sign_flip(update: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Send ``-scale * update``: push the model against the honest direction."""
    return -scale * np.asarray(update, dtype=np.float64)


def scaling(update: np.ndarray, factor: float = 10.0) -> np.ndarray:
    """Send ``factor * update`` (a boosted, model-replacement style update)."""
    return factor * np.asarray(update, dtype=np.float64)


def gaussian_noise(
    update: np.ndarray, std: float = 1.0, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Replace the update by pure Gaussian noise of standard deviation ``std``."""
    rng = rng or np.random.default_rng()
    return rng.normal(0.0, std, size=np.shape(update))


def non_finite(update: np.ndarray, value: float = math.nan) -> np.ndarray:
    """Send NaN (or ``value=inf``) everywhere: a crashed or malicious client."""
    return np.full(np.shape(update), value, dtype=np.float64)


def alie_z(num_clients: int, num_byzantine: int) -> float:
    """ALIE's ``z_max`` for ``n`` clients of which ``f`` are Byzantine.

    ``s = floor(n/2 + 1) - f`` honest clients must be won over;
    ``z = Phi^-1((n - s) / n)``, clipped to at least 0.
    """
    s = math.floor(num_clients / 2 + 1) - num_byzantine
    p = (num_clients - s) / num_clients
    p = min(max(p, 1e-12), 1 - 1e-12)
    return max(0.0, NormalDist().inv_cdf(p))


def alie(honest: np.ndarray, num_byzantine: int, z: float | None = None) -> np.ndarray:
    """Return ALIE (A Little Is Enough): ``mean - z * std`` of the honest updates.

    Parameters
    ----------
    honest : np.ndarray
        ``(n_honest, d)`` honest updates of the round (the attacker is omniscient).
    num_byzantine : int
        ``f``; with ``z=None`` the paper's ``z_max`` for ``n = n_honest + f``.
    z : float, optional
        Override the number of standard deviations.
    """
    honest = np.asarray(honest, dtype=np.float64)
    if z is None:
        z = alie_z(honest.shape[0] + num_byzantine, num_byzantine)
    return honest.mean(axis=0) - z * honest.std(axis=0)


def ipm(honest: np.ndarray, epsilon: float = 0.1) -> np.ndarray:
    """Inner Product Manipulation: ``-epsilon * mean(honest)``.

    A small ``epsilon`` (0.1) hides inside the honest spread and makes the inner
    product of the aggregate with the true gradient negative once enough attackers
    agree; a large one (e.g. 100) is a blunt, easily filtered attack.
    """
    return -epsilon * np.asarray(honest, dtype=np.float64).mean(axis=0)


def inflate_weight(num_examples: float, factor: float = 100.0) -> float:
    """Claim ``factor`` times the real number of examples."""
    return float(num_examples) * factor


def label_flip(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Map label ``y`` to ``num_classes - 1 - y`` (data poisoning, before training)."""
    labels = np.asarray(labels)
    return (num_classes - 1) - labels
