"""DPWrapper: what the two user-level DP wrappers share.

:class:`~.dp_fedavg.DPFedAvg` (the server clips and noises) and
:class:`~.distributed_dp.DistributedDP` (the clients do, under secure
aggregation) differ in who adds the noise and how a round is checked; they share,
on top of :class:`~.base.StrategyWrapper`:

- the **accountant** (:class:`~flwr_ext.privacy.PrivacyAccountant`, client unit,
  the wrapper's neighbouring relation) and the **budget**: ``max_epsilon``
  refuses a release that would exceed it, once, with a WARNING, and the run then
  keeps the last released model;
- the round's **privacy figures** (``dp-client-epsilon``, ``dp-client-delta``,
  ``dp-noise-multiplier``, ``dp-sampling-rate``, ``dp-releases``);
- **state** to save with a run and restore (:meth:`DPWrapper.state_dict`);
- a **start()** that logs the budget plan first and the ε spent at the end, and,
  for a wrapper whose every round is released (:attr:`DPWrapper.releases_every_round`),
  runs only the rounds that fit the budget;
- evaluation delegated to the inner strategy, and skipped once the budget is
  exhausted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import ClassVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from flwr.supercore import log

from ..privacy import keys
from ..privacy.accountant import (
    Neighbouring,
    PrivacyAccountant,
    PrivacySpent,
    PrivacyUnit,
)
from ..privacy.validation import check_positive
from .base import StrategyWrapper
from .composition import Role

__all__ = ["DPWrapper"]


class DPWrapper(StrategyWrapper):
    """Privacy budget, accounting, reporting and run loop of the DP wrappers."""

    flwr_ext_role = Role.DIFFERENTIAL_PRIVACY
    #: True when every round is released and costs the same (DPFedAvg): the
    #: rounds that fit ``max_epsilon`` are known before round 1 and only those
    #: run. False (DistributedDP: a discarded round costs nothing): the budget
    #: is enforced round by round in ``configure_train``.
    releases_every_round: ClassVar[bool] = False

    def _init_privacy(
        self,
        *,
        noise_multiplier: float,
        sampling_rate: float,
        delta: float,
        max_epsilon: float | None,
        accountant: str,
        neighbouring: Neighbouring,
    ) -> None:
        self.noise_multiplier = noise_multiplier
        self.sampling_rate = sampling_rate
        self.delta = delta
        self.max_epsilon = (
            None if max_epsilon is None else check_positive("max_epsilon", max_epsilon)
        )
        self.accountant = PrivacyAccountant(
            accountant,
            delta=delta,
            unit=PrivacyUnit.CLIENT,
            neighbouring=neighbouring,
        )
        self.budget_exhausted = False

    # --------------------------------------------------------------- budget
    def privacy_spent(self) -> PrivacySpent:
        """Cumulative client-level privacy spent so far, with its assumptions."""
        return self.accountant.spent()

    def rounds_within_budget(self, limit: int) -> int:
        """How many more rounds (at most ``limit``) fit under ``max_epsilon``."""
        if self.max_epsilon is None:
            return limit
        return self.accountant.releases_within(
            self.max_epsilon, self.noise_multiplier, self.sampling_rate, limit
        )

    def _next_release_allowed(self, server_round: int) -> bool:
        """Return False (and say why, once) if this round would bust the cap."""
        if self.budget_exhausted:
            return False
        if self.max_epsilon is None:
            return True
        after = self.accountant.epsilon_after(self.noise_multiplier, self.sampling_rate)
        if after <= self.max_epsilon:
            return True
        self.budget_exhausted = True
        log(
            WARNING,
            "[%s] privacy budget reached: round %d would take epsilon from %.4g to "
            "%.4g > max_epsilon=%g (delta=%g, per client). Training stops; the "
            "global model of the last released round is kept.",
            self.name,
            server_round,
            self.accountant.get_epsilon(),
            after,
            self.max_epsilon,
            self.delta,
        )
        return False

    def _log_budget_plan(self, num_rounds: int) -> int:
        """Log how many of ``num_rounds`` fit the budget; return that number."""
        allowed = self.rounds_within_budget(num_rounds)
        if allowed < num_rounds:
            log(
                WARNING,
                "[%s] max_epsilon=%g (delta=%g, per client) allows %d more "
                "round%s at noise_multiplier=%.4g, sampling_rate=%g; %d were "
                "requested. Training will stop after %d released round%s.",
                self.name,
                self.max_epsilon,
                self.delta,
                allowed,
                "" if allowed == 1 else "s",
                self.noise_multiplier,
                self.sampling_rate,
                num_rounds,
                allowed,
                "" if allowed == 1 else "s",
            )
        elif self.max_epsilon is not None:
            planned = self.accountant.epsilon_after(
                self.noise_multiplier, self.sampling_rate, max(num_rounds, 1)
            )
            log(
                INFO,
                "[%s] %d rounds will spend epsilon=%.4g of max_epsilon=%g "
                "(delta=%g, per client)",
                self.name,
                num_rounds,
                planned,
                self.max_epsilon,
                self.delta,
            )
        return allowed

    def _record_release(self) -> PrivacySpent:
        self.accountant.compose(self.noise_multiplier, self.sampling_rate)
        return self.accountant.spent()

    def _privacy_metrics(self, spent: PrivacySpent) -> dict[str, float | int]:
        return {
            keys.CLIENT_EPSILON: spent.epsilon,
            keys.CLIENT_DELTA: spent.delta,
            keys.NOISE_MULTIPLIER: self.noise_multiplier,
            keys.SAMPLING_RATE: self.sampling_rate,
            keys.RELEASES: spent.releases,
        }

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, object]:
        """Privacy state to save with the run (flat: fits a ConfigRecord or JSON).

        Holds the accountant's history and whether the budget is exhausted;
        restore it with :meth:`load_state_dict` into an identically configured
        wrapper to continue a run without resetting its ε.
        """
        return {
            **self.accountant.state_dict(),
            "budget-exhausted": bool(self.budget_exhausted),
        }

    def load_state_dict(self, state: dict[str, object] | ConfigRecord) -> None:
        """Restore :meth:`state_dict` output (e.g. from ``context.state``)."""
        self.accountant.load_state_dict(state)
        self.budget_exhausted = bool(state.get("budget-exhausted", False))

    def _privacy_summary_lines(self) -> list[str]:
        """Return the accountant and what was spent (the end of the summary)."""
        return [
            f"Accountant: {self.accountant.accountant.upper()} (Opacus), "
            f"delta={self.delta:g}, max_epsilon={self.max_epsilon}",
            f"Spent so far: {self.accountant.spent().describe()}",
        ]

    # ------------------------------------------------------------------ run
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
        """Run Flower's loop; log the budget plan first and the ε spent at the end.

        With :attr:`releases_every_round`, every round costs the same, so the
        number of rounds that fit under ``max_epsilon`` is known before round 1:
        the loop runs exactly those and the result holds the last released
        model. Otherwise the budget is enforced round by round in
        ``configure_train`` (a round that would exceed it is not configured, nor
        is any later one, and the last released model is kept).
        """
        planned = self._log_budget_plan(num_rounds)
        rounds = planned if self.releases_every_round else num_rounds
        result = super().start(
            grid,
            initial_arrays,
            num_rounds=rounds,
            timeout=timeout,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=evaluate_fn,
        )
        if len(result.arrays) == 0:
            result.arrays = initial_arrays
        if rounds < num_rounds:
            self.budget_exhausted = True
            log(
                WARNING,
                "[%s] stopped after %d of %d rounds: the next round would exceed "
                "max_epsilon=%g. The result holds the model of round %d.",
                self.name,
                rounds,
                num_rounds,
                self.max_epsilon,
                rounds,
            )
        self._log_final()
        return result

    def _log_final(self) -> None:
        spent = self.accountant.spent()
        log(INFO, "[%s] privacy spent: %s", self.name, spent.describe())

    # ------------------------------------------------------------- evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to the inner strategy (nothing to evaluate once stopped)."""
        if self.budget_exhausted:
            return []
        return super().configure_evaluate(server_round, arrays, config, grid)
