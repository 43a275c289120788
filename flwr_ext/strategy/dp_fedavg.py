"""DPFedAvg: user-level (client-level) central differential privacy for any FedAvg.

What is protected: **one client's entire contribution** - every record it holds -
under the add-or-remove-one-client relation. The server is trusted: it sees each
client's update in plaintext, clips it, and adds the noise (central DP). Anyone who
sees only the released global models (other clients, the public, a later user of
the model) learns almost nothing about whether any one client took part.

Per round (McMahan et al., "Learning Differentially Private Recurrent Language
Models", ICLR 2018, with the accounting done right):

1. **Sampling** (``configure_train``): with ``sampling_rate=q`` every available
   node is included independently with probability q (Poisson sampling, decided
   by an OS-seeded generator), which is what privacy amplification by sampling
   assumes; Flower's own sampler draws a fixed-size sample, for which that
   amplification does not hold. With ``sampling_rate=None`` every available node
   trains every round (cross-silo) and nothing is claimed from sampling.
2. **Clipping**: each valid reply's update (its model minus the global model) is
   scaled to L2 norm at most C; a zero update stays zero.
3. **Fixed denominator**: the clipped updates are summed and divided by the
   public constant ``m`` (expected clients per round: ``q * num_clients``, or
   ``num_clients``), never by the number that replied and never by claimed
   weights, so one client moves the mean by at most ``C / m`` whatever it claims
   and whoever drops out.
4. **Noise**: i.i.d. Gaussian noise of std ``z * C / m`` per coordinate from a
   fresh OS-seeded generator (:mod:`flwr_ext.privacy.noise`); ``np.random.seed``
   does not reproduce it. Every round is released, even one with no replies.
5. **Adaptive clipping** (optional; Andrew et al. 2021): the noised count of
   unclipped updates moves C towards a target quantile of the update norms. Its
   cost is accounted (effective noise multiplier), and the noise of a round uses
   the C that clipped that round.
6. **Inner step**: the inner strategy receives one synthetic reply carrying
   ``global + noised mean update`` (weight 1), so FedAvg returns it and FedAdam,
   FedYogi, FedAvgM apply their server optimiser to it - post-processing, which
   costs no privacy.
7. **Accounting**: the release is composed into a :class:`PrivacyAccountant`
   (Opacus PRV or RDP) with the round's (z, q); ε, δ, z, C and the participation
   counts go into the round's MetricRecord and one log line. With ``max_epsilon``
   training ends before a release would exceed it, keeping the last model.

Not covered by ε: the clients' own train/evaluate metrics (aggregated and logged
by the server, which is trusted), and evaluation - exactly as in Flower's DP
wrappers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Literal

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAvg,
    FedXgbBagging,
    FedXgbCyclic,
    QFedAvg,
    Strategy,
)
from flwr.supercore import log

from ..privacy import keys
from ..privacy.accountant import (
    ACCOUNTANTS,
    Neighbouring,
)
from ..privacy.calibration import (
    effective_noise_multiplier,
    resolve_noise_multiplier,
    update_noise_multiplier,
)
from ..privacy.clipping import AdaptiveClipNorm, clip_to_norm
from ..privacy.noise import add_gaussian_noise, secure_generator
from ..privacy.validation import (
    check_choice,
    check_int,
    check_open_unit,
    check_positive,
    check_rate,
)
from ..records import (
    Manifest,
    ValidReply,
    flatten,
    unflatten,
    validate_train_reply,
)
from .dp_base import DPWrapper

__all__ = ["DPFedAvg"]

ClientMetrics = Literal["aggregate", "drop"]

#: Flower strategies whose aggregation is not a mean of model updates: their
#: server step reads per-client losses or trees, which one noised aggregate
#: cannot provide, and their sensitivity is not bounded by clipping.
_NOT_MEAN_BASED: dict[type, str] = {
    QFedAvg: "q-FedAvg reweights clients by their reported losses",
    FedXgbBagging: "it aggregates XGBoost trees, not arrays of model weights",
    FedXgbCyclic: "it passes XGBoost trees from client to client",
}


@dataclass
class _Round:
    """What configure_train hands to aggregate_train for one round."""

    server_round: int
    arrays: ArrayRecord
    manifest: Manifest
    sampled: set[int]
    available: int
    template: Message | None


class DPFedAvg(DPWrapper):
    """User-level central DP (DP-FedAvg) around FedAvg, FedAdam and friends.

    Parameters
    ----------
    strategy : Strategy, optional
        Inner strategy (default ``FedAvg()``) whose configuration, server
        optimiser and evaluation are kept. It must address every available node
        (``fraction_train=1.0``, the default): DPFedAvg does the sampling.
    num_clients : int
        Number of clients in the federation, a public constant (>= 1). Sets the
        fixed denominator ``m = sampling_rate * num_clients`` (or
        ``num_clients`` with full participation).
    clipping_norm : float
        Clip norm C of each client's update (L2, over all arrays), > 0. With
        ``adaptive_clipping=True``, the first round's C.
    noise_multiplier : float, optional
        Noise multiplier z (noise std / sensitivity) of each round's release,
        > 0. Exactly one of ``noise_multiplier`` and ``target_epsilon``.
    target_epsilon : float, optional
        Calibrate z so that ``num_rounds`` rounds spend at most this ε at
        ``delta``. Also the default of ``max_epsilon``.
    num_rounds : int, optional
        Rounds the target is spread over (required with ``target_epsilon``).
    delta : float (default: 1e-5)
        δ of the guarantee, in (0, 1/num_clients).
    sampling_rate : float, optional
        Poisson sampling rate q in (0, 1]: each available node trains in a
        round independently with probability q. None (default): full
        participation, accounted without amplification.
    adaptive_clipping : bool (default: False)
        Adapt C to the ``target_quantile`` of update norms (Andrew et al. 2021).
    target_quantile : float (default: 0.5)
        Fraction of updates to leave unclipped, in (0, 1).
    clip_learning_rate : float (default: 0.2)
        Step size of the geometric clip-norm update, > 0.
    clipped_count_stddev : float, optional
        Std of the noise on the count of unclipped updates. Default:
        ``max(m / 20, 1.5 * z)`` - Andrew et al.'s m/20, raised where it would
        cost more than 6 % extra update noise (small m).
    max_epsilon : float, optional
        Stop training before a release would take ε above this. Default:
        ``target_epsilon`` (None with ``noise_multiplier``: no cap).
    accountant : {"prv", "rdp"} (default: "prv")
        Opacus accountant (see :mod:`flwr_ext.privacy.accountant`).
    client_metrics : {"aggregate", "drop"} (default: "aggregate")
        What to do with the clients' train metrics, which DP does not protect:
        average them uniformly into the round's MetricRecord (the server is
        trusted), or drop them so only DP figures leave the round.

    Notes
    -----
    The round's MetricRecord holds ``dp-client-epsilon``, ``dp-client-delta``,
    ``dp-noise-multiplier`` (accounted z), ``dp-update-noise-multiplier``,
    ``dp-clipping-norm`` (the C that clipped this round), ``dp-noise-stddev``,
    ``dp-sampling-rate``, ``dp-expected-clients``, ``dp-sampled``,
    ``dp-participants``, ``dp-dropped``, ``dp-releases`` and, with adaptive
    clipping, ``dp-unclipped-fraction`` and ``dp-next-clipping-norm``.

    Examples
    --------
    Cross-device, 100 clients, 20 expected per round, ε = 4 over 50 rounds::

        strategy = DPFedAvg(
            FedAvg(), num_clients=100, sampling_rate=0.2, clipping_norm=0.5,
            target_epsilon=4.0, num_rounds=50, delta=1e-5,
        )
        result = strategy.start(grid, initial_arrays, num_rounds=50)
    """

    releases_every_round = True
    summary_title = "User-level DP (flwr-ext DPFedAvg, central)"

    def __init__(
        self,
        strategy: Strategy | None = None,
        *,
        num_clients: int,
        clipping_norm: float,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        num_rounds: int | None = None,
        delta: float = 1e-5,
        sampling_rate: float | None = None,
        adaptive_clipping: bool = False,
        target_quantile: float = 0.5,
        clip_learning_rate: float = 0.2,
        clipped_count_stddev: float | None = None,
        max_epsilon: float | None = None,
        accountant: str = "prv",
        client_metrics: ClientMetrics = "aggregate",
    ) -> None:
        strategy = FedAvg() if strategy is None else strategy
        super().__init__(strategy)
        _check_inner(type(self).__name__, strategy)
        num_clients = check_int("num_clients", num_clients, 1)
        clipping_norm = check_positive("clipping_norm", clipping_norm)
        delta = check_open_unit("delta", delta)
        if delta >= 1.0 / num_clients:
            raise ValueError(
                f"delta={delta:g} must be below 1/num_clients={1 / num_clients:g}: "
                "publishing one random client's data outright would already "
                "satisfy (0, 1/num_clients)-DP. Use e.g. delta=1e-5"
            )
        q = 1.0 if sampling_rate is None else check_rate("sampling_rate", sampling_rate)
        accountant = check_choice("accountant", accountant, ACCOUNTANTS)
        if not isinstance(adaptive_clipping, bool):
            raise TypeError(
                f"adaptive_clipping must be True or False, got {adaptive_clipping!r}"
            )
        self.client_metrics: ClientMetrics = check_choice(  # type: ignore[assignment]
            "client_metrics", client_metrics, ("aggregate", "drop")
        )
        if target_epsilon is not None:
            target_epsilon = check_positive("target_epsilon", target_epsilon)
        z = resolve_noise_multiplier(
            noise_multiplier=noise_multiplier,
            target_epsilon=target_epsilon,
            num_rounds=num_rounds,
            delta=delta,
            sampling_rate=q,
            accountant=accountant,
        )
        self._init_privacy(
            noise_multiplier=z,
            sampling_rate=q,
            delta=delta,
            max_epsilon=target_epsilon if max_epsilon is None else max_epsilon,
            accountant=accountant,
            neighbouring=Neighbouring.ADD_OR_REMOVE_ONE,
        )
        self.num_clients = num_clients
        self.poisson = sampling_rate is not None and q < 1.0
        self.expected_clients = q * num_clients
        self.target_epsilon = target_epsilon
        self.num_rounds = num_rounds
        self.clipping_norm = clipping_norm
        self.adaptive: AdaptiveClipNorm | None = None
        self.update_noise_multiplier = z
        if adaptive_clipping:
            stddev = (
                max(self.expected_clients / 20.0, 1.5 * z)
                if clipped_count_stddev is None
                else check_positive("clipped_count_stddev", clipped_count_stddev)
            )
            self.update_noise_multiplier = update_noise_multiplier(z, stddev)
            self.adaptive = AdaptiveClipNorm(
                clipping_norm,
                target_quantile=target_quantile,
                learning_rate=clip_learning_rate,
                count_noise_stddev=stddev,
            )
            # The accounted z must be the joint one; recompute it as a check.
            joint = effective_noise_multiplier(self.update_noise_multiplier, stddev)
            assert math.isclose(joint, z, rel_tol=1e-9), (joint, z)
        self._round: _Round | None = None
        self._warned_population: int | None = None

    # ---------------------------------------------------------------- set-up
    @property
    def current_clipping_norm(self) -> float:
        """The clip norm the next round will use."""
        return self.adaptive.value if self.adaptive else self.clipping_norm

    def noise_stddev(self) -> float:
        """Noise std per coordinate of the next round's mean: z_update * C / m."""
        return (
            self.update_noise_multiplier
            * self.current_clipping_norm
            / self.expected_clients
        )

    def __repr__(self) -> str:
        return (
            f"DPFedAvg({type(self.strategy).__name__}, num_clients="
            f"{self.num_clients}, sampling_rate="
            f"{self.sampling_rate if self.poisson else None}, "
            f"noise_multiplier={self.noise_multiplier:.4g}, "
            f"clipping_norm={self.current_clipping_norm:.4g}, "
            f"adaptive_clipping={self.adaptive is not None})"
        )

    def summary_lines(self) -> list[str]:
        """Return the protected unit, sampling, m, z, clipping and the budget."""
        sampling = (
            f"Poisson q={self.sampling_rate:g} of num_clients={self.num_clients}"
            if self.poisson
            else f"full participation of num_clients={self.num_clients} "
            "(no amplification)"
        )
        calibrated = (
            f" (calibrated: epsilon={self.target_epsilon} over {self.num_rounds} "
            "rounds)"
            if self.target_epsilon is not None
            else ""
        )
        if self.adaptive is not None:
            clipping = (
                f"Adaptive clipping: start C={self.adaptive.value:.4g}, target "
                f"quantile {self.adaptive.target_quantile:g}, lr "
                f"{self.adaptive.learning_rate:g}, count noise std "
                f"{self.adaptive.count_noise_stddev:.4g}, update z "
                f"{self.update_noise_multiplier:.4g}"
            )
        else:
            clipping = f"Clipping norm C: {self.clipping_norm:.4g} (fixed)"
        return [
            "Protects: one client's whole data (add-or-remove-one-client)",
            f"Sampling: {sampling}",
            f"Fixed denominator m: {self.expected_clients:g} (sensitivity C/m)",
            f"Noise multiplier z: {self.noise_multiplier:.4g}{calibrated}",
            clipping,
            *self._privacy_summary_lines(),
        ]

    # ----------------------------------------------------------------- train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Check the budget, let the inner strategy configure, Poisson-sample."""
        self._round = None
        if not self._next_release_allowed(server_round):
            return []
        manifest = Manifest.from_arrayrecord(arrays)
        messages = list(
            self.strategy.configure_train(server_round, arrays, config, grid)
        )
        available = len(messages)
        if self.poisson:
            keep = secure_generator().random(available) < self.sampling_rate
            sampled = [m for m, k in zip(messages, keep, strict=True) if k]
        else:
            sampled = messages
        self._check_population(server_round, available)
        self._round = _Round(
            server_round=server_round,
            arrays=arrays,
            manifest=manifest,
            sampled={int(m.metadata.dst_node_id) for m in sampled},
            available=available,
            template=messages[0] if messages else None,
        )
        log(
            INFO,
            "[%s] round %d: %s %d of %d available nodes (expected m=%g)",
            self.name,
            server_round,
            f"Poisson sampling q={self.sampling_rate:g} selected"
            if self.poisson
            else "full participation:",
            len(sampled),
            available,
            self.expected_clients,
        )
        return sampled

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip, sum over a fixed denominator, noise, account, inner step."""
        current = self._round
        self._round = None
        if current is None or current.server_round != server_round:
            if self.budget_exhausted:
                return None, None
            raise RuntimeError(
                f"DPFedAvg.aggregate_train(round {server_round}) called without "
                "configure_train for that round: the wrapper needs the round's "
                "global model and sample"
            )
        replies = list(replies)
        report = self._round_report(server_round, len(replies))
        manifest = current.manifest
        global_vector, _ = flatten(current.arrays, manifest, dtype=np.float64)
        clip_norm = self.current_clipping_norm
        total = np.zeros(manifest.size, dtype=np.float64)
        buffer = np.empty(manifest.size, dtype=np.float64)
        unclipped = 0

        def accept(reply: Message, node_id: int, index: int) -> ValidReply:
            nonlocal unclipped
            checked = validate_train_reply(
                reply, manifest, self.weight_key, out=buffer, reference=global_vector
            )
            _, norm = clip_to_norm(buffer, clip_norm)  # buffer holds the update
            unclipped += int(norm <= clip_norm)
            total[:] += buffer
            return checked

        valid, rejected = self._screen_replies(report, replies, current.sampled, accept)
        dropped = len(rejected)

        if not valid:  # a misconfigured federation stops before any release
            report.check_configuration()
        # The release: sum / m + N(0, (z_update * C / m)^2), with C the norm that
        # clipped this round's updates.
        rng = secure_generator()
        stddev = self.update_noise_multiplier * clip_norm / self.expected_clients
        noised_mean = total / self.expected_clients
        add_gaussian_noise(noised_mean, stddev, rng)
        round_metrics: dict[str, float | int] = {
            keys.UPDATE_NOISE_MULTIPLIER: self.update_noise_multiplier,
            keys.CLIPPING_NORM: clip_norm,
            keys.NOISE_STDDEV: stddev,
            keys.EXPECTED_CLIENTS: self.expected_clients,
            keys.SAMPLED: len(current.sampled),
            keys.PARTICIPANTS: len(valid),
            keys.DROPPED: dropped,
        }
        if self.adaptive is not None:
            fraction = self.adaptive.noisy_unclipped_fraction(
                unclipped, len(valid), self.expected_clients, rng
            )
            round_metrics[keys.UNCLIPPED_FRACTION] = fraction
            round_metrics[keys.NEXT_CLIPPING_NORM] = self.adaptive.step(fraction)
        spent = self._record_release()
        round_metrics.update(self._privacy_metrics(spent))

        candidate = unflatten(global_vector + noised_mean, manifest)
        arrays = self._inner_step(server_round, candidate, manifest, current.template)
        metrics = (
            MetricRecord()
            if self.client_metrics == "drop"
            else self._aggregate_client_metrics(server_round, valid, [1.0] * len(valid))
        )
        for key, value in round_metrics.items():
            metrics[key] = value
        log(
            INFO,
            "[%s] round %d: epsilon=%.4g delta=%g per client (%s, %s, %s) | "
            "z=%.4g C=%.4g noise std=%.4g | sampled %d, participated %d, dropped "
            "%d, m=%g",
            self.name,
            server_round,
            spent.epsilon,
            spent.delta,
            spent.accountant.upper(),
            spent.neighbouring,
            spent.sampling,
            self.noise_multiplier,
            clip_norm,
            stddev,
            len(current.sampled),
            len(valid),
            dropped,
            self.expected_clients,
        )
        return report.finish(
            arrays,
            metrics,
            "the inner strategy returned no model (the round's privacy cost stays "
            "accounted)",
        )

    # --------------------------------------------------------------- helpers
    def _check_population(self, server_round: int, available: int) -> None:
        if available == self.num_clients or available == self._warned_population:
            return
        self._warned_population = available
        log(
            WARNING,
            "[%s] round %d: %d nodes available but num_clients=%d. Privacy "
            "is unaffected (the denominator m=%g is fixed), but the mean update is "
            "scaled by about %.2f.",
            self.name,
            server_round,
            available,
            self.num_clients,
            self.expected_clients,
            available / self.num_clients,
        )

    def state_dict(self) -> dict[str, object]:
        """Privacy state (accountant history, current clip norm, budget flag)."""
        return {**super().state_dict(), "clipping-norm": self.current_clipping_norm}

    def load_state_dict(self, state: dict[str, object] | ConfigRecord) -> None:
        """Restore :meth:`state_dict` output, including an adapted clip norm."""
        super().load_state_dict(state)
        if "clipping-norm" in state:
            value = check_positive("clipping-norm", state["clipping-norm"])
            if self.adaptive is not None:
                self.adaptive.value = value
            else:
                self.clipping_norm = value


def _check_inner(name: str, strategy: Strategy) -> None:
    """Refuse inner strategies DPFedAvg cannot keep private or cannot feed."""
    for cls, reason in _NOT_MEAN_BASED.items():
        if isinstance(strategy, cls):
            raise ValueError(
                f"{name} cannot wrap {type(strategy).__name__}: {reason}, so one "
                "clipped, noised mean update cannot drive it and its sensitivity "
                "is not bounded. Use FedAvg, FedProx, FedAvgM, FedAdam, FedYogi or "
                "FedAdagrad"
            )
    fraction = getattr(strategy, "fraction_train", None)
    if fraction is not None and fraction != 1.0:
        raise ValueError(
            f"{name} samples clients itself, but the inner "
            f"{type(strategy).__name__} has fraction_train={fraction}. Construct it "
            f"with fraction_train=1.0 (the default) and pass "
            f"{name}(sampling_rate={fraction}) instead: Poisson sampling is what "
            "the privacy accounting assumes"
        )
