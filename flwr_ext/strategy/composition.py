"""Which strategy wrappers may wrap which: unsound compositions fail at construction.

flwr-ext's wrappers (robust rules, DP, homomorphic aggregation) compose with any
plain Flower strategy, but not every *pair* of defences composes soundly. Each
wrapper declares a role; :func:`check_composition` walks the chain of wrapped
strategies (``wrapper.strategy``) and raises a ``ValueError`` that says why a pair
cannot work, before round 1.
"""

from __future__ import annotations

from enum import StrEnum

from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

__all__ = ["Role", "check_composition", "strategy_role"]


class Role(StrEnum):
    """What a strategy does to the replies before (or instead of) averaging."""

    ROBUST = "robust aggregation"
    DIFFERENTIAL_PRIVACY = "differential privacy"
    HOMOMORPHIC = "homomorphic encryption"


_FLOWER_ROLES: tuple[tuple[tuple[type, ...], Role], ...] = (
    ((Krum, MultiKrum, Bulyan, FedTrimmedAvg, FedMedian), Role.ROBUST),
    (
        (
            DifferentialPrivacyClientSideAdaptiveClipping,
            DifferentialPrivacyClientSideFixedClipping,
            DifferentialPrivacyServerSideAdaptiveClipping,
            DifferentialPrivacyServerSideFixedClipping,
        ),
        Role.DIFFERENTIAL_PRIVACY,
    ),
)

_DP_OVER_ROBUST = (
    "user-level DP needs every client's influence bounded by C/m; a robust rule "
    "inside selects or reweights updates depending on the other clients, which "
    "breaks that sensitivity bound"
)
# No user-level DP wrapper composes with a robust rule, in either order; what
# does is DP inside each client, which no server-side aggregation can undo.
_ROBUST_AND_PRIVATE = (
    "For robustness and privacy together, keep the robust rule on the server and "
    "make each site's training record-level private with DP-SGD "
    "(flwr_ext.privacy.make_private in the ClientApp; dp-sgd=true in the apps): "
    "each site's epsilon then holds whatever the server does with its update"
)

# (outer, inner) -> why the pair is refused.
_UNSOUND: dict[tuple[Role, Role], str] = {
    (Role.ROBUST, Role.ROBUST): (
        "two robust rules cannot be stacked: the outer one hands the inner one a "
        "single aggregate, so the inner rule has nothing to choose between. Use one "
        "rule, optionally with pre_aggregation='nnm'"
    ),
    (Role.ROBUST, Role.DIFFERENTIAL_PRIVACY): (
        "a DP wrapper inside a robust rule would clip and noise one synthetic "
        "aggregate instead of the clients' updates, so its sensitivity bound and "
        "its privacy accounting would be wrong (and the other order is refused "
        f"too: {_DP_OVER_ROBUST}). {_ROBUST_AND_PRIVATE}"
    ),
    (Role.ROBUST, Role.HOMOMORPHIC): (
        "a robust rule must compare individual updates, but under homomorphic "
        "encryption the server holds only ciphertexts"
    ),
    (Role.DIFFERENTIAL_PRIVACY, Role.ROBUST): (
        f"{_DP_OVER_ROBUST}. {_ROBUST_AND_PRIVATE}"
    ),
    (Role.HOMOMORPHIC, Role.ROBUST): (
        "a robust rule must compare individual updates, but under homomorphic "
        "encryption the server holds only ciphertexts"
    ),
    (Role.DIFFERENTIAL_PRIVACY, Role.DIFFERENTIAL_PRIVACY): (
        "two DP wrappers would clip twice and add noise twice while each accounts "
        "only for its own noise; use one"
    ),
    (Role.HOMOMORPHIC, Role.DIFFERENTIAL_PRIVACY): (
        "a DP wrapper inside homomorphic aggregation would have to clip and noise "
        "updates the server cannot see (or, after decryption, one aggregate "
        "instead of the clients' updates). Put the DP wrapper outside, with "
        "clients adding their noise share before encrypting"
    ),
    (Role.DIFFERENTIAL_PRIVACY, Role.HOMOMORPHIC): (
        "central DP clips and noises each client's plaintext update on the server, "
        "but under homomorphic encryption the server holds only ciphertexts. Use "
        "DistributedDP (clients clip and add their noise share with "
        "distributed_dp_mod before encrypting)"
    ),
    (Role.HOMOMORPHIC, Role.HOMOMORPHIC): (
        "updates are encrypted once, by the client mod; a second homomorphic "
        "wrapper would expect ciphertexts of ciphertexts"
    ),
}


# (outer wrapper class name, inner role) -> why a pair the table above refuses is
# sound for that particular wrapper.
_SOUND_EXCEPTIONS: dict[tuple[str, Role], str] = {
    ("DistributedDP", Role.HOMOMORPHIC): (
        "clients clip and add their noise share before encrypting "
        "(distributed_dp_mod); DistributedDP only counts replies and never reads "
        "their arrays"
    ),
}


def strategy_role(strategy: Strategy) -> Role | None:
    """Return the role of ``strategy`` (ours declare ``flwr_ext_role``), or None."""
    role = getattr(strategy, "flwr_ext_role", None)
    if isinstance(role, Role):
        return role
    for classes, flower_role in _FLOWER_ROLES:
        if isinstance(strategy, classes):
            return flower_role
    return None


def check_composition(outer_name: str, outer_role: Role, inner: Strategy) -> None:
    """Raise ``ValueError`` if wrapping ``inner`` in ``outer_name`` is unsound.

    Walks ``inner``, ``inner.strategy``, ... so a conflict deeper in the chain
    (e.g. ``Robust(SomeWrapper(DP(FedAvg)))``) is found too.
    """
    if not isinstance(inner, Strategy):
        raise TypeError(
            f"{outer_name} wraps a Flower Strategy (e.g. FedAvg()), "
            f"got {type(inner).__name__}"
        )
    current: object = inner
    seen: set[int] = set()
    while isinstance(current, Strategy) and id(current) not in seen:
        seen.add(id(current))
        role = strategy_role(current)
        reason = None if role is None else _UNSOUND.get((outer_role, role))
        if reason is not None and (outer_name, role) not in _SOUND_EXCEPTIONS:
            raise ValueError(
                f"{outer_name} cannot wrap {type(current).__name__}: {reason}."
            )
        current = getattr(current, "strategy", None)
