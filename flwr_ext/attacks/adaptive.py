"""Attacks that adapt to the honest updates, and to the defence, every round.

All are *omniscient*: they read ``honest``, the ``(h, d)`` matrix of the round's
honest updates (model minus global model), and return the one update every one of
the ``f`` colluding Byzantine clients sends. They stay close to the honest updates,
so no rule can drop them by their norm alone; what they exploit is the rule's
freedom inside the honest spread.

References
----------
- MinMax, MinSum: Shejwalkar and Houmansadr, "Manipulating the Byzantine:
  Optimizing Model Poisoning Attacks and Defenses for Federated Learning", NDSS 2021
  (the AGR-agnostic attacks with the ``-std`` perturbation, their strongest).
- Mimic: Karimireddy, He and Jaggi, "Byzantine-Robust Learning on Heterogeneous
  Datasets via Bucketing", ICLR 2022.
- Line-searched ("optimal") ALIE and IPM: the strength of ALIE (Baruch et al. 2019)
  and IPM (Xie et al. 2020) is chosen each round to push the deployed rule's
  aggregate farthest from the honest mean, as in ByzFL's ``Optimal_ALIE`` and
  ``Optimal_InnerProductManipulation`` (Allouah et al., "Fixing by Mixing",
  AISTATS 2023, and the ByzFL library).
- Evasive variants (``reference=`` of :func:`optimal_alie` and
  :func:`optimal_ipm`): every candidate is first moved onto the half-space
  ``{x : <x, r> >= 0}`` of the last server step ``r`` (which every client can
  compute from two consecutive global models), the counter-move to a server
  that drops updates opposing its previous aggregate
  (``CenteredClippingRule(max_opposed=f)``).
- Server-step-aware line search (``server_step=`` of :func:`line_search`,
  :func:`optimal_alie` and :func:`optimal_ipm`): when the server feeds the
  robust aggregate to an optimizer (Flower's FedAvgM, FedAdam, FedYogi,
  FedAdagrad), the attacker who knows that optimizer and its state measures
  each candidate by the *model step* it causes, not by the aggregate. For an
  affine step (FedAvgM, FedAvg with a server learning rate) this picks the
  same strength as the aggregate criterion; for an adaptive one (FedAdam) it
  does not, since the step is normalised per coordinate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "ALIE_FACTORS",
    "IPM_FACTORS",
    "Aggregator",
    "ServerStep",
    "evade_opposition",
    "line_search",
    "mimic",
    "mimic_direction",
    "minmax",
    "minsum",
    "optimal_alie",
    "optimal_ipm",
]

#: An aggregation rule as the attacker sees it: ``(n, d)`` updates -> ``(d,)``.
Aggregator = Callable[[np.ndarray], np.ndarray]
#: What the server does with an aggregate, as the attacker models it: the
#: aggregate update ``(d,)`` -> the model step ``(d,)`` the server would take
#: (its optimizer, with the state it has this round, read and never changed).
ServerStep = Callable[[np.ndarray], np.ndarray]

#: ALIE's ``z`` (standard deviations below the mean) tried by :func:`optimal_alie`:
#: 0 (the mean itself) and 40 values log-spaced from 0.05 to 50.
ALIE_FACTORS: tuple[float, ...] = (0.0, *np.geomspace(0.05, 50.0, 40).tolist())
#: IPM's ``epsilon`` tried by :func:`optimal_ipm`: 40 values from 0.01 to 100.
IPM_FACTORS: tuple[float, ...] = tuple(np.geomspace(0.01, 100.0, 40).tolist())


def _honest(honest: np.ndarray) -> np.ndarray:
    honest = np.asarray(honest, dtype=np.float64)
    if honest.ndim != 2 or honest.shape[0] < 1:
        raise ValueError(
            f"honest must be a (n_honest >= 1, d) matrix, got shape {honest.shape}"
        )
    return honest


def _largest_step(a: np.ndarray, p: np.ndarray, radius_sq: np.ndarray) -> float:
    """Largest ``g >= 0`` with ``|a_i + g p|^2 <= radius_sq_i`` for every row ``i``.

    Each constraint is a quadratic in ``g``, satisfied at ``g = 0`` (the caller
    guarantees it): its larger root bounds ``g``.
    """
    pp = float(p @ p)
    if pp == 0.0:
        return 0.0
    ap = a @ p
    aa = np.einsum("ij,ij->i", a, a)
    disc = np.maximum(ap**2 - pp * (aa - radius_sq), 0.0)
    return float(max(0.0, np.min((-ap + np.sqrt(disc)) / pp)))


def minmax(honest: np.ndarray) -> np.ndarray:
    """MinMax: ``mean - g * std`` with the largest ``g`` that hides the update.

    The Byzantine update is no farther from any honest update than the two
    farthest honest updates are from each other:
    ``max_i |b - h_i| <= max_{i,j} |h_i - h_j|``. ``g`` is the exact solution
    of that constraint (the paper finds it by bisection).
    """
    honest = _honest(honest)
    mean = honest.mean(axis=0)
    p = -honest.std(axis=0)
    sq = np.einsum("ij,ij->i", honest, honest)
    gram = honest @ honest.T
    pairwise = np.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0.0)
    a = mean - honest
    g = _largest_step(a, p, np.full(len(honest), pairwise.max()))
    return mean + g * p


def minsum(honest: np.ndarray) -> np.ndarray:
    """MinSum: ``mean - g * std``, sum of squared distances within the honest maximum.

    ``sum_i |b - h_i|^2 <= max_i sum_j |h_i - h_j|^2``: the Byzantine update looks
    no more isolated than the most isolated honest one. Since the deviations
    from the mean sum to zero, ``g`` has a closed form.
    """
    honest = _honest(honest)
    n = honest.shape[0]
    mean = honest.mean(axis=0)
    p = -honest.std(axis=0)
    a = mean - honest
    spread = float(np.einsum("ij,ij->", a, a))  # sum_i |mean - h_i|^2
    # sum_j |h_i - h_j|^2 = n |h_i - mean|^2 + spread
    most_isolated = float(n * np.einsum("ij,ij->i", a, a).max() + spread)
    pp = float(p @ p)
    if pp == 0.0:
        return mean
    g = np.sqrt(max(most_isolated - spread, 0.0) / (n * pp))
    return mean + g * p


def mimic_direction(honest: np.ndarray) -> np.ndarray:
    """Return the direction of largest honest variance, a unit ``(d,)`` vector.

    The top right-singular vector of the centred matrix, from its ``(h, h)`` Gram
    matrix (cheap for any ``d``).
    """
    honest = _honest(honest)
    centred = honest - honest.mean(axis=0)
    _, vectors = np.linalg.eigh(centred @ centred.T)
    z = vectors[:, -1] @ centred
    norm = float(np.linalg.norm(z))
    return z / norm if norm > 0 else np.zeros(honest.shape[1])


def mimic(honest: np.ndarray, direction: np.ndarray | None = None) -> int:
    """Mimic: the index of the honest client every Byzantine client copies.

    All Byzantine clients send a copy of honest client ``i* = argmax_i <h_i, z>``
    for the direction ``z`` of largest honest variance: that client's data is
    over-represented, a bias no filter can see since the copies are honest
    updates. Karimireddy et al. estimate ``z`` over the first rounds and then
    keep ``i*``; a caller does the same by keeping the returned *client* (see the
    robustness benchmark), or passes its own ``direction``.
    """
    honest = _honest(honest)
    z = mimic_direction(honest) if direction is None else np.asarray(direction)
    return int(np.argmax(honest @ z))


def line_search(
    honest: np.ndarray,
    num_byzantine: int,
    candidate: Callable[[float], np.ndarray],
    aggregate: Aggregator,
    factors: Sequence[float],
    server_step: ServerStep | None = None,
) -> tuple[float, np.ndarray]:
    """Pick the attack strength that moves ``aggregate`` farthest from the honest mean.

    For each factor ``s``, the round the server would see is the honest rows plus
    ``num_byzantine`` copies of ``candidate(s)``; the objective is
    ``|aggregate(round) - mean(honest)|`` (ByzFL's criterion). With
    ``server_step`` (the attacker models the server's optimizer) it is
    ``|server_step(aggregate(round)) - server_step(mean(honest))|``: the gap
    between the model step the server takes and the one it would take on the
    honest mean. Returns the best factor and its update. A factor whose
    aggregate or step raises or is not finite is skipped (the attacker would not
    send it).
    """
    honest = _honest(honest)
    mean = honest.mean(axis=0)
    reference = mean
    if server_step is not None:
        reference = np.asarray(server_step(mean), dtype=np.float64)
    best: tuple[float, float, np.ndarray] | None = None
    for s in factors:
        byz = candidate(float(s))
        rows = np.vstack([honest, np.tile(byz, (num_byzantine, 1))])
        try:
            value = np.asarray(aggregate(rows), dtype=np.float64)
            if server_step is not None and np.isfinite(value).all():
                value = np.asarray(server_step(value), dtype=np.float64)
        except ValueError:
            continue
        if not np.isfinite(value).all():
            continue
        gap = float(np.linalg.norm(value - reference))
        if best is None or gap > best[0]:
            best = (gap, float(s), byz)
    if best is None:
        s = float(factors[0])
        return s, candidate(s)
    return best[1], best[2]


def evade_opposition(update: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
    """Remove ``update``'s component against ``reference`` (if it has one).

    Returns ``update - min(0, <update, r>) r`` for the unit vector ``r`` of
    ``reference``: the closest vector to ``update`` whose inner product with
    the reference is not negative. A missing or zero reference changes nothing.
    """
    if reference is None:
        return update
    reference = np.asarray(reference, dtype=np.float64)
    norm = float(np.linalg.norm(reference))
    if not np.isfinite(norm) or norm == 0.0:
        return update
    r = reference / norm
    along = float(update @ r)
    return update - min(0.0, along) * r


def optimal_alie(
    honest: np.ndarray,
    num_byzantine: int,
    aggregate: Aggregator,
    factors: Sequence[float] = ALIE_FACTORS,
    reference: np.ndarray | None = None,
    server_step: ServerStep | None = None,
) -> np.ndarray:
    """ALIE ``mean - z * std`` with ``z`` line-searched against ``aggregate``.

    With ``reference`` (the last server step) every candidate is made
    non-opposing to it first (:func:`evade_opposition`); with ``server_step``
    candidates are compared by the model step they cause (:func:`line_search`).
    """
    honest = _honest(honest)
    mean, std = honest.mean(axis=0), honest.std(axis=0)
    return line_search(
        honest,
        num_byzantine,
        lambda z: evade_opposition(mean - z * std, reference),
        aggregate,
        factors,
        server_step,
    )[1]


def optimal_ipm(
    honest: np.ndarray,
    num_byzantine: int,
    aggregate: Aggregator,
    factors: Sequence[float] = IPM_FACTORS,
    reference: np.ndarray | None = None,
    server_step: ServerStep | None = None,
) -> np.ndarray:
    """IPM ``-epsilon * mean`` with ``epsilon`` line-searched against ``aggregate``.

    With ``reference`` (the last server step) every candidate is made
    non-opposing to it first (:func:`evade_opposition`); with ``server_step``
    candidates are compared by the model step they cause (:func:`line_search`).
    """
    honest = _honest(honest)
    mean = honest.mean(axis=0)
    return line_search(
        honest,
        num_byzantine,
        lambda e: evade_opposition(-e * mean, reference),
        aggregate,
        factors,
        server_step,
    )[1]
