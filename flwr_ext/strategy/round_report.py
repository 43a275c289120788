"""Fail loudly: what every flwr-ext wrapper does when a round aggregates nothing.

Flower's strategy loop (``Strategy.start``) keeps going when ``aggregate_train``
returns no model, and a run whose every round kept the initial model still ends
``completed``, with an empty ``Result.arrays``. For a federation that was never
configured right - the sites lack the CKKS secret context, hold another key set,
or miss a client mod; Krum sampled from 3 sites - that is a silent failure: the
user sees a "completed" run and saves an empty model. This module turns it into
loud ones, in three places:

1. **Per round** (:class:`RoundReport`): a wrapper's ``aggregate_train`` records
   every reply it drops (with the reason it already logs) and ends through
   :meth:`RoundReport.finish`. A round that produced no model logs one WARNING
   with the reason and the count of dropped replies per cause.
2. **A configuration error stops the run** at that round: when every reply of a
   round was dropped for the *same* configuration cause (see
   :data:`CONFIGURATION_CAUSES`), no later round can go better, so
   :class:`ConfigurationError` is raised with that cause and how to fix it. The
   ServerApp fails, so Flower marks the run ``failed`` and ``flwr-ext simulate``
   exits 1. A cause that may be transient or one site's fault (a crashed
   ClientApp, a NaN update) only costs its round.
3. **Per run** (:class:`RoundReporting`, the wrappers' base): if no round of
   ``start()`` produced a model, :class:`NoModelError` is raised instead of
   returning a Result whose ``arrays`` is empty (or the untouched initial
   model); the exception carries that Result (``err.result``) and the reason of
   every round.

:func:`cohort_problem` states, for a robust rule, why a sampled cohort of ``n``
nodes cannot give the rule its guarantee (Krum's ``2f + 3``, NNM's ``f + 1``, a
trimmed mean that trims nothing); ``RobustAggregation.configure_train`` checks it
against the cohort the inner strategy sampled.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import WARNING
from typing import TypeVar

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

__all__ = [
    "CONFIGURATION_CAUSES",
    "ConfigurationError",
    "DropCause",
    "NoModelError",
    "RoundFailedError",
    "RoundReport",
    "RoundReporting",
    "classify_drop",
    "cohort_problem",
]

_M = TypeVar("_M", bound=MetricRecord | None)


class RoundFailedError(RuntimeError):
    """Base of the errors that stop a run because it cannot train a model."""


class ConfigurationError(RoundFailedError):
    """The federation is misconfigured; no round can produce a model.

    Raised by a wrapper at the round where every reply was dropped for one
    configuration cause, or where the sampled cohort is too small for the rule.

    Attributes
    ----------
    server_round : int
        The round that showed the error.
    cause : str
        A short label of the cause, e.g. ``"no CKKS secret context on the node"``.
    """

    def __init__(self, message: str, *, server_round: int, cause: str) -> None:
        super().__init__(message)
        self.server_round = server_round
        self.cause = cause


class NoModelError(RoundFailedError):
    """No round of the run produced a model.

    Attributes
    ----------
    result : Result
        What Flower's strategy loop collected (metrics per round; ``arrays`` is
        empty), for whoever wants to write the per-round metrics anyway.
    rounds : dict[int, str]
        Why each round produced no model, by round number.
    """

    def __init__(self, message: str, *, result: Result, rounds: dict[int, str]):
        super().__init__(message)
        self.result = result
        self.rounds = rounds


@dataclass(frozen=True)
class DropCause:
    """Why a reply was dropped, reduced to a label that can be counted.

    Attributes
    ----------
    label : str
        Short, site-independent label (counted per round).
    configuration : bool
        True when the cause is a configuration error of the federation: when
        every reply of a round is dropped for it, the run stops.
    fix : str
        What to change, for configuration causes.
    """

    label: str
    configuration: bool = False
    fix: str = ""


#: (substring of a drop reason, the cause it reveals). The substrings are the
#: wording of flwr-ext's own mods and wrappers (tests/test_round_report.py
#: produces each with the real component, so a rewording fails a test).
CONFIGURATION_CAUSES: tuple[tuple[str, DropCause], ...] = (
    (
        "no secret context configured",
        DropCause(
            "no CKKS secret context on the node",
            True,
            "give every SuperNode its secret-context.ckks (node config "
            "ckks-context; in simulation, the environment variable "
            "FLWR_EXT_CKKS_CONTEXT, which must be set before Flower's managed "
            "local SuperLink starts: it keeps the environment it started with)",
        ),
    ),
    (
        "but this party holds key",
        DropCause(
            "wrong CKKS key set",
            True,
            "every data owner needs secret-context.ckks and the server "
            "server-context.ckks from the same `flwr-ext keys create` run",
        ),
    ),
    (
        "is the server's context (no secret key)",
        DropCause(
            "server context given to a data owner",
            True,
            "data owners need secret-context.ckks, not server-context.ckks",
        ),
    ),
    (
        "the update is not encrypted (is ckks_mod",
        DropCause(
            "ckks_mod missing on the node",
            True,
            "add flwr_ext.mods.ckks_mod to ClientApp(mods=[...]) on every node",
        ),
    ),
    (
        "did not announce homomorphic aggregation",
        DropCause(
            "ckks_mod on the node, no HomomorphicAggregation on the server",
            True,
            "wrap the server strategy in HomomorphicAggregation, or remove ckks_mod",
        ),
    ),
    (
        "was not clipped and noised by flwr_ext.mods.distributed_dp_mod",
        DropCause(
            "distributed_dp_mod missing on the node",
            True,
            "add flwr_ext.mods.distributed_dp_mod to ClientApp(mods=[...]) on "
            "every node",
        ),
    ),
    (
        "unexpected arrays ['ckks-meta'",
        DropCause(
            "distributed_dp_mod runs before ckks_mod (mod order)",
            True,
            "list ckks_mod after distributed_dp_mod: ClientApp(mods=[ckks_mod, "
            "distributed_dp_mod]) runs ckks_mod outermost, so the DP mod sees the "
            "decrypted model and its noised update is encrypted",
        ),
    ),
    (
        "Wrap the server strategy in flwr_ext.strategy.DistributedDP",
        DropCause(
            "distributed_dp_mod on the node, no DistributedDP on the server",
            True,
            "wrap the server strategy in DistributedDP, or remove distributed_dp_mod",
        ),
    ),
)


def classify_drop(reason: str) -> DropCause:
    """Reduce a drop reason (as the wrappers log it) to a countable cause."""
    for needle, cause in CONFIGURATION_CAUSES:
        if needle in reason:
            return cause
    if reason.startswith("client error"):
        code = reason.split(":", 1)[0]
        return DropCause(code)  # "client error 0": the ClientApp raised
    # The wrappers' reasons start with what is wrong ("array 'w' has NaN...");
    # the text before the first colon groups them without node-specific detail.
    head = reason.split(":", 1)[0].strip()
    return DropCause(head[:80] or "invalid reply")


@dataclass
class RoundReport:
    """One round of one wrapper: replies received, dropped (why), the outcome.

    Create it with :meth:`RoundReporting._round_report` at the start of
    ``aggregate_train``; call :meth:`drop` for every reply dropped and return
    through :meth:`finish`.
    """

    strategy: str
    server_round: int
    received: int
    drops: list[str] = field(default_factory=list)
    outcomes: dict[int, str | None] | None = None

    def drop(self, reason: str) -> None:
        """Record one dropped reply and the reason already logged for it."""
        self.drops.append(reason)

    def causes(self) -> Counter[DropCause]:
        """Count the dropped replies per cause."""
        return Counter(classify_drop(r) for r in self.drops)

    def finish(
        self, arrays: ArrayRecord | None, metrics: _M, why: str = ""
    ) -> tuple[ArrayRecord | None, _M]:
        """Return ``(arrays, metrics)``; log or raise if ``arrays`` is None.

        Parameters
        ----------
        arrays, metrics
            What ``aggregate_train`` returns.
        why : str
            Why no model was produced (e.g. "2 valid replies, Krum needs 5");
            used only when ``arrays`` is None.

        Raises
        ------
        ConfigurationError
            When every received reply was dropped for one configuration cause.
        """
        if arrays is not None:
            self._record(None)
            return arrays, metrics
        causes = self.causes()
        per_cause = ", ".join(f"{n} x {c.label}" for c, n in causes.most_common())
        summary = f"received {self.received} replies, dropped {len(self.drops)}" + (
            f" ({per_cause})" if per_cause else ""
        )
        reason = f"{why}; {summary}" if why else summary
        self._record(reason)
        self.check_configuration()
        log(
            WARNING,
            "[%s] round %d aggregated nothing, keeping the previous global model: %s",
            self.strategy,
            self.server_round,
            reason,
        )
        return None, metrics

    def check_configuration(self) -> None:
        """Raise ConfigurationError if every reply was dropped for one such cause.

        ``finish`` calls it for a round without a model; a wrapper that releases
        something even when no reply is valid (DPFedAvg releases noise) calls it
        itself before that release.
        """
        causes = self.causes()
        if not self.received or len(self.drops) != self.received or len(causes) != 1:
            return
        (cause,) = causes
        if cause.configuration:
            raise ConfigurationError(
                f"[{self.strategy}] round {self.server_round}: every reply "
                f"({self.received}) was dropped for one configuration error: "
                f"{cause.label}. Fix: {cause.fix}. First reason: "
                f"{self.drops[0]}. Stopping the run: no round can produce a "
                "model until this is fixed.",
                server_round=self.server_round,
                cause=cause.label,
            )

    def _record(self, reason: str | None) -> None:
        if self.outcomes is not None:
            self.outcomes[self.server_round] = reason


def cohort_problem(rule: object, pre_aggregation: object, sampled: int) -> str | None:
    """Say why ``sampled`` clients cannot give a robust rule its guarantee.

    Parameters
    ----------
    rule : AggregationRule
        The robust rule (its ``min_clients()`` is Krum's ``2f + 3``, say).
    pre_aggregation : PreAggregation or None
        E.g. NNM, which needs ``f + 1`` rows.
    sampled : int
        The number of nodes sampled for the round.

    Returns
    -------
    str or None
        One sentence naming the rule, what it needs and the sampled count; None
        when the cohort is large enough.
    """
    from ..aggregation.trimmed_mean import TrimmedMeanRule, num_trimmed

    needs = [(rule, rule.min_clients())]  # type: ignore[attr-defined]
    if pre_aggregation is not None:
        needs.append((pre_aggregation, pre_aggregation.min_clients()))  # type: ignore[attr-defined]
    for step, needed in needs:
        if sampled < needed:
            return (
                f"the round sampled {sampled} nodes, but {step!r} needs at least "
                f"{needed} replies ({_why_needed(step)}). Sample more nodes "
                "(min-nodes / min_train_nodes) or lower num_byzantine"
            )
    if (
        isinstance(rule, TrimmedMeanRule)
        and rule.beta > 0
        and num_trimmed(rule.beta, sampled) == 0
    ):
        smallest = next(n for n in range(1, 10_000) if num_trimmed(rule.beta, n))
        return (
            f"the round sampled {sampled} nodes, and {rule!r} trims floor(beta * n) "
            f"= 0 of them from each side: it would be a plain mean with no "
            f"robustness. Sample at least {smallest} nodes or raise beta"
        )
    return None


def _why_needed(step: object) -> str:
    name = type(step).__name__
    if name == "KrumRule":
        return "2f + 3: Krum's guarantee needs n > 2f + 2"
    if name == "NearestNeighborMixing":
        return "f + 1: each reply is mixed with its n - f nearest"
    return "its minimum number of clients"


class RoundReporting(Strategy):
    """Base of flwr-ext's wrappers: a run that trains nothing fails.

    Wrappers call :meth:`_round_report` in ``aggregate_train`` (see
    :class:`RoundReport`); :meth:`start` raises :class:`NoModelError` when no
    round produced a model, naming each round's reason, including those of the
    wrappers inside this one.
    """

    def _round_report(self, server_round: int, received: int) -> RoundReport:
        """Return the report of one ``aggregate_train`` call."""
        return RoundReport(
            type(self).__name__, server_round, received, outcomes=self._outcomes()
        )

    def _outcomes(self) -> dict[int, str | None]:
        outcomes: dict[int, str | None] | None = getattr(self, "_round_outcomes", None)
        if outcomes is None:
            outcomes = {}
            self._round_outcomes = outcomes
        return outcomes

    def models_produced(self) -> int:
        """How many rounds of this wrapper produced a model so far."""
        return sum(1 for reason in self._outcomes().values() if reason is None)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run Flower's strategy loop; raise NoModelError if nothing was trained.

        Raises
        ------
        NoModelError
            No round produced a model (``err.result`` holds what was collected).
        ConfigurationError
            A round showed a configuration error (see :class:`RoundReport`).
        """
        self._outcomes().clear()
        result = super().start(
            grid,
            initial_arrays,
            num_rounds=num_rounds,
            timeout=timeout,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=evaluate_fn,
        )
        if num_rounds >= 1 and len(result.arrays) == 0:
            rounds = self._failed_rounds()
            detail = "; ".join(f"round {r}: {why}" for r, why in sorted(rounds.items()))
            raise NoModelError(
                f"[{type(self).__name__}] none of the {num_rounds} rounds produced "
                "a model, so there is no trained model to return"
                + (f" ({detail})" if detail else "")
                + ". The run is failed, not completed.",
                result=result,
                rounds=rounds,
            )
        return result

    def _failed_rounds(self) -> dict[int, str]:
        """Reasons of rounds without a model, from this wrapper and those inside."""
        rounds: dict[int, str] = {}
        for strategy in _chain(self):
            outcomes = getattr(strategy, "_round_outcomes", None) or {}
            for server_round, reason in outcomes.items():
                if reason is not None and server_round not in rounds:
                    rounds[server_round] = f"[{type(strategy).__name__}] {reason}"
        return rounds


def _chain(strategy: Strategy) -> Iterable[Strategy]:
    seen: set[int] = set()
    current: object = strategy
    while isinstance(current, Strategy) and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = getattr(current, "strategy", None)
