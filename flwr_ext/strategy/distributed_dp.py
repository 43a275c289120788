"""DistributedDP: user-level DP where clients add the noise, for secure aggregation.

With secure aggregation (CKKS in :mod:`flwr_ext.he`, or Flower's SecAgg+) the
server never sees an individual update, so it cannot clip or noise one: central DP
(:class:`flwr_ext.strategy.DPFedAvg`) is impossible. Instead each client runs
:func:`flwr_ext.mods.distributed_dp_mod`, which clips its own update to C and adds
Gaussian noise of std ``z * C / sqrt(t)``; the *sum* of ``n >= t`` such updates then
carries noise of std ``z * C * sqrt(n / t) >= z * C`` - at least what central DP would
add to a sum with sensitivity C.

This wrapper is the server half:

- ``configure_train`` puts C, the per-client noise std and the weight key into the
  train instructions' ConfigRecord (``ddp-clipping-norm``, ``ddp-noise-stddev``,
  ``ddp-weight-key``) and lets the inner strategy sample and configure as usual;
- ``aggregate_train`` counts the valid replies - it never reads their arrays, so
  the inner strategy may be one whose replies carry ciphertexts, such as
  ``HomomorphicAggregation(FedAvg())`` - and checks that each says it was clipped
  and noised with this round's values. If fewer than ``min_clients`` (t) valid
  replies arrived, the sum would carry less noise than calibrated: the round is
  **discarded** (the previous model kept, a WARNING says why) and not accounted,
  since nothing was released. Otherwise the inner strategy aggregates and the
  release is accounted.
- The markers are the clients' word; what counts is what was summed. An inner
  strategy that may sum fewer replies than it is given - ``HomomorphicAggregation``
  drops a damaged ciphertext without being able to look inside it - is told t at
  construction (``require_contributions(t)``: it then never returns, nor in
  ``decrypt-aggregate`` mode decrypts, a sum of fewer than t updates) and reports
  how many updates its result really holds (``summed_contributions``). A round is
  released and accounted only if that count is at least t; otherwise it is
  **not released** (discarded, not accounted), never accounted at a noise level
  that was not reached.
- A rollback by ``HomomorphicAggregation`` (the clients refused a corrupted
  aggregate) returns an earlier global model: nothing new is released, so
  nothing is accounted.

What ε protects, and the assumptions (stated in every log line and in
``docs/privacy.md``):

- **Unit and relation**: one client's update, under the *zero-out* relation: the
  released sum is almost the same whether a client's update is its real one or
  zero. A client's *participation* is visible to the server (it sees who
  replied), as it is in any cross-silo federation.
- **No sampling amplification**: clients are chosen by the inner strategy (a
  fixed-size or full sample), so each round is accounted as a plain Gaussian
  mechanism with noise multiplier z.
- **Trust**: at least t of the replying clients add their noise share honestly;
  up to ``n - t`` clients that skip their share (or collude with the server)
  cannot reduce the noise below z * C. Whoever decrypts the aggregate sees the
  noised sum only; the server sees ciphertexts (HE) and the reply count.
- Dropouts are assumed independent of the clients' data; a discarded round
  reveals only that fewer than t clients replied.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from ..privacy import keys
from ..privacy.accountant import ACCOUNTANTS, Neighbouring
from ..privacy.calibration import resolve_noise_multiplier
from ..privacy.validation import (
    check_choice,
    check_int,
    check_open_unit,
    check_positive,
)
from ..records import InvalidReplyError
from .dp_base import DPWrapper
from .round_report import ConfigurationError

__all__ = ["DistributedDP"]


class DistributedDP(DPWrapper):
    """Server side of distributed DP: clients clip and add shares of the noise.

    Parameters
    ----------
    strategy : Strategy
        Inner strategy, e.g. ``FedAvg()`` or ``HomomorphicAggregation(FedAvg())``.
        It samples the clients and aggregates the replies; this wrapper only
        counts them.
    clipping_norm : float
        Clip norm C every client applies to its update, > 0.
    min_clients : int
        t: the fewest valid replies for which a round is released (>= 1). Each
        client's noise share is calibrated so that t shares add up to std
        ``z * C``; more replies add more noise, fewer discard the round. Set it
        to the number of clients you expect to report, minus the dropouts you
        want to tolerate.
    noise_multiplier : float, optional
        z of the summed noise relative to C, > 0. Exactly one of
        ``noise_multiplier`` and ``target_epsilon``.
    target_epsilon : float, optional
        Calibrate z so that ``num_rounds`` released rounds spend at most this ε.
        Also the default of ``max_epsilon``.
    num_rounds : int, optional
        Rounds the target is spread over (required with ``target_epsilon``).
    delta : float (default: 1e-5)
        δ of the guarantee, in (0, 1/min_clients).
    max_epsilon : float, optional
        No round is configured whose release would take ε above this. Default:
        ``target_epsilon``.
    accountant : {"prv", "rdp"} (default: "prv")
        Opacus accountant.

    Notes
    -----
    Clients must list the mod *after* any encrypting mod, so that it runs on the
    plaintext update before encryption:
    ``ClientApp(mods=[ckks_mod, distributed_dp_mod])`` (Flower applies mods
    outermost-first; the reply passes the innermost mod first).

    The round's MetricRecord is the inner strategy's plus ``dp-client-epsilon``,
    ``dp-client-delta``, ``dp-noise-multiplier``, ``dp-clipping-norm``,
    ``dp-noise-stddev`` (per client), ``dp-min-clients``, ``dp-sampled``,
    ``dp-participants``, ``dp-dropped``, ``dp-discarded``, ``dp-releases`` and
    ``dp-sampling-rate`` (always 1.0: no amplification is claimed).
    """

    summary_title = "User-level DP (flwr-ext DistributedDP, noise by clients)"

    def __init__(
        self,
        strategy: Strategy,
        *,
        clipping_norm: float,
        min_clients: int,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        num_rounds: int | None = None,
        delta: float = 1e-5,
        max_epsilon: float | None = None,
        accountant: str = "prv",
    ) -> None:
        super().__init__(strategy)
        clipping_norm = check_positive("clipping_norm", clipping_norm)
        min_clients = check_int("min_clients", min_clients, 1)
        delta = check_open_unit("delta", delta)
        if delta >= 1.0 / min_clients:
            raise ValueError(
                f"delta={delta:g} must be below 1/min_clients={1 / min_clients:g} "
                "(publishing one random client's update outright would already "
                "meet it). Use e.g. delta=1e-5"
            )
        accountant = check_choice("accountant", accountant, ACCOUNTANTS)
        if target_epsilon is not None:
            target_epsilon = check_positive("target_epsilon", target_epsilon)
        z = resolve_noise_multiplier(
            noise_multiplier=noise_multiplier,
            target_epsilon=target_epsilon,
            num_rounds=num_rounds,
            delta=delta,
            sampling_rate=1.0,
            accountant=accountant,
        )
        self._init_privacy(
            noise_multiplier=z,
            sampling_rate=1.0,
            delta=delta,
            max_epsilon=target_epsilon if max_epsilon is None else max_epsilon,
            accountant=accountant,
            neighbouring=Neighbouring.ZERO_OUT_ONE,
        )
        self.clipping_norm = clipping_norm
        self.min_clients = min_clients
        require = getattr(strategy, "require_contributions", None)
        if callable(require):  # e.g. HomomorphicAggregation: sum >= t or nothing
            require(min_clients)
        unit = getattr(strategy, "default_weight_unit", None)
        if callable(unit):  # every client claims weight 1 (distributed_dp_mod)
            unit(1.0)
        self.target_epsilon = target_epsilon
        self.num_rounds = num_rounds
        self._sampled: set[int] | None = None
        self._round: int | None = None

    @property
    def client_noise_stddev(self) -> float:
        """Std of each client's noise share: ``z * C / sqrt(min_clients)``."""
        return self.noise_multiplier * self.clipping_norm / math.sqrt(self.min_clients)

    def __repr__(self) -> str:
        return (
            f"DistributedDP({type(self.strategy).__name__}, clipping_norm="
            f"{self.clipping_norm:g}, min_clients={self.min_clients}, "
            f"noise_multiplier={self.noise_multiplier:.4g})"
        )

    def summary_lines(self) -> list[str]:
        """Return the protected unit, C, the noise shares, z, t and the budget."""
        calibrated = (
            f" (calibrated: epsilon={self.target_epsilon} over {self.num_rounds} "
            "rounds)"
            if self.target_epsilon is not None
            else ""
        )
        return [
            "Protects: one client's update (zero-out-one-client)",
            "Sampling: by the inner strategy, no amplification",
            f"Clipping norm C: {self.clipping_norm:g}; per-client noise std "
            f"z*C/sqrt(t): {self.client_noise_stddev:.4g}",
            f"Noise multiplier z of the sum: {self.noise_multiplier:.4g}"
            f"{calibrated}; min clients t: {self.min_clients}",
            *self._privacy_summary_lines(),
        ]

    # ----------------------------------------------------------------- train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Inject C and the per-client noise std; let the inner strategy sample."""
        self._sampled, self._round = None, None
        if not self._next_release_allowed(server_round):
            return []
        instructed = ConfigRecord(dict(config))
        instructed[keys.DDP_CLIPPING_NORM] = self.clipping_norm
        instructed[keys.DDP_NOISE_STDDEV] = self.client_noise_stddev
        instructed[keys.DDP_WEIGHT_KEY] = self.weight_key
        messages = list(
            self.strategy.configure_train(server_round, arrays, instructed, grid)
        )
        if len(messages) < self.min_clients:
            problem = (
                f"[DistributedDP] round {server_round}: the inner strategy sampled "
                f"{len(messages)} nodes, fewer than min_clients={self.min_clients}, "
                "so the noise shares could not add up to the calibrated noise"
            )
            if messages and not self.models_produced():  # never could: misconfigured
                raise ConfigurationError(
                    problem, server_round=server_round, cause="cohort too small"
                )
            log(WARNING, "%s: skipping the round", problem)
            return []
        self._sampled = {int(m.metadata.dst_node_id) for m in messages}
        self._round = server_round
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Count valid replies; release (and account) only if at least t."""
        sampled, configured = self._sampled, self._round
        self._sampled, self._round = None, None
        replies = list(replies)
        if configured != server_round or sampled is None:
            if not replies:
                return None, None  # round skipped in configure_train
            raise RuntimeError(
                f"DistributedDP.aggregate_train(round {server_round}) called "
                "without configure_train for that round"
            )
        report = self._round_report(server_round, len(replies))
        valid, rejected = self._screen_replies(
            report, replies, sampled, self._check_markers
        )
        dropped = len(rejected)

        counts: dict[str, float | int] = {
            keys.CLIPPING_NORM: self.clipping_norm,
            keys.NOISE_STDDEV: self.client_noise_stddev,
            keys.MIN_CLIENTS: self.min_clients,
            keys.SAMPLED: len(sampled),
            keys.PARTICIPANTS: len(valid),
            keys.DROPPED: dropped,
        }
        if len(valid) < self.min_clients:
            rollback = getattr(self.strategy, "rollback_model", None)
            rolled_back = (
                rollback(server_round, replies) if callable(rollback) else None
            )
            log(
                WARNING,
                "[%s] round %d discarded: %d valid replies, fewer than "
                "min_clients=%d, so their sum would carry noise std %.4g < z*C = "
                "%.4g. Keeping the previous global model; nothing was released, "
                "so no privacy is spent.",
                self.name,
                server_round,
                len(valid),
                self.min_clients,
                self.client_noise_stddev * math.sqrt(len(valid)),
                self.noise_multiplier * self.clipping_norm,
            )
            metrics = MetricRecord(
                {
                    **counts,
                    **self._privacy_metrics(self.accountant.spent()),
                    keys.DISCARDED: 1,
                }
            )
            # A rollback re-sends an earlier (already accounted) global model.
            return report.finish(
                rolled_back,
                metrics,
                f"{len(valid)} valid replies, fewer than "
                f"min_clients={self.min_clients}",
            )

        arrays, inner_metrics = self.strategy.aggregate_train(server_round, valid)
        summed = getattr(self.strategy, "summed_contributions", None)
        if arrays is None:
            log(
                WARNING,
                "[%s] round %d: the inner strategy released no model; "
                "nothing was released, so no privacy is spent",
                self.name,
                server_round,
            )
            released = False
        elif not isinstance(summed, int) or summed >= self.min_clients:
            released = True  # a sum of at least t noise shares
        elif summed == 0:
            log(
                WARNING,
                "[%s] round %d: the inner strategy rolled back to an "
                "earlier global model; nothing new was released, so no privacy is "
                "spent",
                self.name,
                server_round,
            )
            released = False
        else:
            log(
                WARNING,
                "[%s] round %d discarded: the inner strategy summed %d "
                "updates (%d replies passed the checks), fewer than min_clients=%d, "
                "so the sum carries noise std %.4g < z*C = %.4g; it is not released "
                "and no privacy is spent",
                self.name,
                server_round,
                summed,
                len(valid),
                self.min_clients,
                self.client_noise_stddev * math.sqrt(summed),
                self.noise_multiplier * self.clipping_norm,
            )
            arrays, released = None, False
        spent = self._record_release() if released else self.accountant.spent()
        metrics = MetricRecord() if inner_metrics is None else inner_metrics
        for key in (keys.DDP_CLIPPING_NORM, keys.DDP_NOISE_STDDEV):
            if key in metrics:
                del metrics[key]
        for key, value in {
            **counts,
            **self._privacy_metrics(spent),
            keys.DISCARDED: 0 if released else 1,
        }.items():
            metrics[key] = value
        log(
            INFO,
            "[%s] round %d: epsilon=%.4g delta=%g per client (%s, %s, "
            "no sampling amplification) | z=%.4g C=%g per-client noise std=%.4g | "
            "sampled %d, valid %d (t=%d), dropped %d",
            self.name,
            server_round,
            spent.epsilon,
            spent.delta,
            spent.accountant.upper(),
            spent.neighbouring,
            self.noise_multiplier,
            self.clipping_norm,
            self.client_noise_stddev,
            len(sampled),
            len(valid),
            self.min_clients,
            dropped,
        )
        return report.finish(arrays, metrics, "the inner strategy returned no model")

    def _check_markers(self, reply: Message, node_id: int, index: int) -> Message:
        """Check a screened reply's DP markers and weight, never its arrays."""
        metric_records = list(reply.content.metric_records.values())
        markers = {
            keys.DDP_CLIPPING_NORM: self.clipping_norm,
            keys.DDP_NOISE_STDDEV: self.client_noise_stddev,
        }
        for key, expected in markers.items():
            found = [m[key] for m in metric_records if key in m]
            if not found:
                raise InvalidReplyError(
                    node_id,
                    f"no '{key}' in the reply's metrics: the update was not clipped "
                    "and noised by flwr_ext.mods.distributed_dp_mod (add it to the "
                    "ClientApp's mods, after any encrypting mod)",
                )
            value = found[0]
            if not isinstance(value, int | float) or not math.isclose(
                float(value), expected, rel_tol=1e-9
            ):
                raise InvalidReplyError(
                    node_id,
                    f"reply says {key}={value!r}, but this round instructed "
                    f"{expected!r}",
                )
        for record in metric_records:
            weight = record.get(self.weight_key)
            if weight is not None and weight != 1:
                raise InvalidReplyError(
                    node_id,
                    f"claims {self.weight_key}={weight!r}; distributed DP needs a "
                    "uniform mean (distributed_dp_mod sets it to 1)",
                )
        return reply
