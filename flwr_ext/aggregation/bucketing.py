"""Bucketing, a pre-aggregation step for heterogeneous data.

Karimireddy, He and Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via
Bucketing", ICLR 2022.

A pre-aggregation step for non-IID data: shuffle the rows at random, split them
into buckets of ``s`` rows, and average each bucket. Averaging shrinks the honest
spread (the heterogeneity an attacker such as ALIE or Mimic hides in) by up to
``sqrt(s)``, at the price of contaminating up to ``s`` times more buckets: the
rule after it must tolerate a Byzantine fraction of ``s f / n``, so ``s`` must
keep ``s f < n / 2`` (the paper uses ``s = 2``).

Every row is replaced by the mean of its bucket (rows of one bucket become equal),
so the step keeps the ``(n, d)`` shape of the
:class:`~flwr_ext.aggregation.base.PreAggregation` contract, like nearest-
neighbour mixing: for a coordinate-wise rule or the geometric median this is the
same as aggregating the bucket means weighted by bucket size. The shuffle uses a
fresh generator from OS entropy every call unless ``seed`` is given: an attacker
who could predict it could pick its bucket mates.
"""

from __future__ import annotations

import numpy as np

from .base import PreAggregation, check_int, check_updates

__all__ = ["Bucketing", "bucketing"]


def bucketing(
    updates: np.ndarray, bucket_size: int, rng: np.random.Generator
) -> np.ndarray:
    """Return a new ``(n, d)`` matrix: each row is the mean of its random bucket.

    The last bucket holds ``n mod s`` rows when ``s`` does not divide ``n``.
    Keeps a float input's dtype (float64 for integers), like NNM.
    """
    updates = np.asarray(updates)
    n = updates.shape[0]
    dtype = updates.dtype if updates.dtype.kind == "f" else np.dtype(np.float64)
    order = rng.permutation(n)
    mixing = np.zeros((n, n), dtype=dtype)
    for start in range(0, n, bucket_size):
        members = order[start : start + bucket_size]
        mixing[np.ix_(members, members)] = 1.0 / len(members)
    return mixing @ updates.astype(dtype, copy=False)


class Bucketing(PreAggregation):
    """Bucketing pre-aggregation.

    Parameters
    ----------
    bucket_size : int (default: 2)
        ``s``, rows per bucket (>= 1; 1 is a no-op).
    seed : int or None (default: None)
        Seed of the shuffle, for reproducible experiments only; ``None`` draws
        a fresh shuffle from OS entropy every round.
    """

    name = "bucketing"

    def __init__(self, bucket_size: int = 2, seed: int | None = None) -> None:
        self.bucket_size = check_int("bucket_size", bucket_size, 1)
        if seed is not None:
            seed = check_int("seed", seed, 0)
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def transform(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Average rows in random buckets of ``bucket_size`` (weights not used)."""
        updates, _ = check_updates(updates, weights, self.min_clients())
        return bucketing(updates, self.bucket_size, self._rng)

    def __repr__(self) -> str:
        seed = "" if self.seed is None else f", seed={self.seed}"
        return f"Bucketing(bucket_size={self.bucket_size}{seed})"
