"""HomomorphicAggregation: the server sums CKKS ciphertexts and never sees an update.

Use it with :func:`flwr_ext.mods.ckks_mod` on every client::

    strategy = HomomorphicAggregation(FedAvg(), context="/srv/server-context.ckks")
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=10)
    save_encrypted_model(result.arrays, "/srv/out/final.ckks-model")

and a data owner decrypts the final model with ``flwr-ext keys decrypt --context
secret-context.ckks final.ckks-model --out final.npz``.

Per round:

1. ``configure_train`` lets the inner strategy sample nodes and build the
   instructions, then adds the *announcement* to their train config (profile, key
   fingerprint, wire format, weight unit, number of clients: see
   :mod:`flwr_ext.he.protocol`). The global model it sends is the encrypted sum of
   the previous round (in round 1, the plaintext initial model); ``ckks_mod``
   decrypts it on the client.
2. ``aggregate_train`` checks every reply (error replies, unsampled or duplicate
   senders, exactly one ArrayRecord and a valid weight, the key fingerprint and
   profile, the model structure, every ciphertext) and adds the valid ones to a
   :class:`~flwr_ext.he.CiphertextSum` as they come - one accumulator and one
   ciphertext in flight. A malformed, truncated or foreign-key reply is dropped with one
   WARNING line and the round goes on.
3. What happens to the sum depends on ``mode``:

   ``"encrypted"`` (default, as in NVIDIA FLARE)
       The encrypted sum *is* the next global model; the inner strategy's
       ``aggregate_train`` is bypassed (it would average ciphertext bytes). This
       works with strategies whose aggregation is the weighted average - FedAvg and
       FedProx; strategies that need the plaintext aggregate (FedAdam, FedYogi,
       FedAdagrad, FedAvgM, QFedAvg, robust rules) and server-side evaluation
       (``start(evaluate_fn=...)``) are refused with the reason. Client-side
       evaluation works: ``ckks_mod`` decrypts the model on each client.

   ``"decrypt-aggregate"`` (opt-in, SecAgg semantics)
       The sum goes to one node that opted in (node config
       ``ckks-decrypt-for-server=true``); it decrypts *only the aggregate* and
       returns the weighted average. The inner strategy gets it as one synthetic
       reply, so server optimisers (FedAdam...) and server-side evaluation work;
       the server learns the aggregate, never an individual update.

Client weights: client ``i`` pre-scales its model by ``w_i = num-examples_i /
weight_unit`` and the key holder divides by ``sum w_i`` (the weight slot), so the
result is exactly FedAvg's weighted average for any ``weight_unit``. The unit only
trades headroom against precision (see ``weight_unit`` below).

Threat model and measurements: ``docs/secure-aggregation.md``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Literal

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.app.message_type import MessageType
from flwr.common.constant import SType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedAvgM, QFedAvg, Result, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt
from flwr.supercore import log

from ..he import (
    CiphertextSum,
    CkksKeys,
    EncryptedHeader,
    InvalidCiphertextError,
    KeyMismatchError,
    is_encrypted,
    load_keys,
)
from ..he.protocol import (
    AGGREGATE_REJECTED,
    KEY_DECRYPT_REQUEST,
    KEY_PROFILE,
    METRIC_CONTRIBUTIONS,
    Announcement,
    ModelClaims,
)
from ..he.wire import get_wire
from ..records import (
    InvalidReplyError,
    Manifest,
    ValidReply,
    flatten,
    validate_metrics,
)
from .base import StrategyWrapper
from .composition import Role

__all__ = ["HomomorphicAggregation", "Mode"]

Mode = Literal["encrypted", "decrypt-aggregate"]
_MODES = ("encrypted", "decrypt-aggregate")

#: Keys this wrapper adds to the round's train MetricRecord.
METRIC_RECEIVED = "ckks-received"
METRIC_DROPPED = "ckks-dropped"
METRIC_SUMMED = "ckks-summed"
METRIC_REJECTED = "ckks-rejected"
METRIC_ROLLED_BACK = "ckks-rolled-back"
METRIC_SECONDS = "ckks-aggregation-s"

#: ``weight_unit=None``: examples per weight unit for the whole run (a power of
#: two, so ``n / unit`` is exact in floating point).
DEFAULT_WEIGHT_UNIT = 1024.0
#: Former name, kept for callers that imported it.
FIRST_ROUND_WEIGHT_UNIT = DEFAULT_WEIGHT_UNIT

#: Strategies whose aggregation needs the plaintext aggregate (server optimisers,
#: loss-weighted averaging); refused in mode="encrypted".
_NEEDS_PLAINTEXT: tuple[type, ...] = (FedOpt, FedAvgM, QFedAvg)


class HomomorphicAggregation(StrategyWrapper):
    """Add-only CKKS secure aggregation around a Flower strategy.

    Parameters
    ----------
    strategy : Strategy
        The Flower strategy whose sampling, configuration and evaluation are kept:
        ``FedAvg()`` or ``FedProx(...)`` in mode ``"encrypted"``; any strategy
        (e.g. ``FedAdam()``) in mode ``"decrypt-aggregate"``.
    context : path or CkksKeys
        The server's context, ``server-context.ckks`` from ``flwr-ext keys create``.
        A context holding the secret key is refused: the server must never have it.
    mode : {"encrypted", "decrypt-aggregate"} (default: "encrypted")
        Whether the global model stays encrypted at the server, or one opted-in
        key-holding node decrypts each round's aggregate for the server.
    wire : {"packed", "seeded", "tenseal"} (default: "packed")
        Ciphertext format clients use (:mod:`flwr_ext.he.wire`): ``"packed"``
        (16 B/param, the fastest to aggregate), ``"seeded"`` (8 B/param up, slower
        to aggregate) or ``"tenseal"`` (32 B/param; each chunk a TenSEAL vector).
    weight_unit : float or None (default: None)
        Examples per weight unit: client ``i`` encrypts ``(n_i / weight_unit) *
        model_i``. Each client may use ``1 / num_clients`` of the profile's
        magnitude bound, so a larger unit gives more headroom and a smaller one
        more precision (CKKS error is absolute: the average's error is about
        ``c * weight_unit / mean(n_i)``, c ~ 1e-9 for the default profile and
        ~3e-8 for compact). The unit is **fixed for the whole run**, so no
        client's ``num-examples`` claim can move it (an earlier version averaged
        the claims, and one claim of 1e300 pushed every honest weight below the
        encoding precision). ``None`` means 1024 (sites of up to ~10^7 examples
        fit the default profile's bound); set it to about the typical
        ``num-examples`` for the best precision, e.g. 1.0 with distributed DP
        (whose clients all claim 1).
    min_replies : int (default: 2)
        Fewest valid replies a round needs. The global model is decrypted by every
        data owner, so a "sum" of one update would reveal that client's model to
        the others; with fewer valid replies the previous global model is kept.
    decrypt_timeout : float (default: 600)
        Seconds to wait for a node to decrypt the aggregate
        (``mode="decrypt-aggregate"``).

    Notes
    -----
    The round's train MetricRecord holds the inner strategy's aggregate of the
    clients' metrics plus ``ckks-received``, ``ckks-dropped``, ``ckks-summed``,
    ``ckks-rejected`` (clients that refused the global model),
    ``ckks-rolled-back`` (1 when the round was re-run on a rolled-back model)
    and ``ckks-aggregation-s``.

    **Checked aggregates and rollback.** With every encrypted global model the
    server announces what it summed into it (:class:`~flwr_ext.he.protocol.
    ModelClaims`: the number of updates and the sum of their claimed weights);
    every key holder that decrypts it checks the count and weight slots against
    them (and its site's ``policy-min-contributions``) and refuses a model that
    fails. A client that encrypted another weight than it claimed, or under
    another key set while claiming the right fingerprint, thus corrupts at most
    the sum of the round it lies in: in ``"encrypted"`` mode the clients refuse
    that sum in the next round and, if fewer than ``min_replies`` valid replies
    remain and most replies are refusals, the server **rolls back** to the last
    global model the clients trained on (logging which round and why) instead of
    re-sending the broken one, and re-runs the round on it at once; in
    ``"decrypt-aggregate"`` mode the decrypting node refuses it in the same round
    and the previous model is kept.
    """

    flwr_ext_role = Role.HOMOMORPHIC
    summary_title = "Homomorphic aggregation (flwr-ext, CKKS)"

    def __init__(
        self,
        strategy: Strategy,
        context: str | os.PathLike[str] | CkksKeys,
        *,
        mode: Mode = "encrypted",
        wire: str = "packed",
        weight_unit: float | None = None,
        min_replies: int = 2,
        decrypt_timeout: float = 600.0,
    ) -> None:
        super().__init__(strategy)
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if mode == "encrypted":
            _check_encrypted_inner(strategy)
        get_wire(wire)
        if weight_unit is not None and not (
            isinstance(weight_unit, (int, float))
            and math.isfinite(weight_unit)
            and weight_unit > 0
        ):
            raise ValueError(
                f"weight_unit must be None or a finite number > 0, got {weight_unit!r}"
            )
        if isinstance(min_replies, bool) or not isinstance(min_replies, int):
            raise TypeError(f"min_replies must be an int, got {min_replies!r}")
        if min_replies < 1:
            raise ValueError(f"min_replies must be >= 1, got {min_replies}")
        if not (math.isfinite(decrypt_timeout) and decrypt_timeout > 0):
            raise ValueError(f"decrypt_timeout must be > 0, got {decrypt_timeout!r}")
        keys = context if isinstance(context, CkksKeys) else load_keys(context)
        keys.require_no_secret()
        self.keys = keys
        self.mode: Mode = mode
        self.wire = wire
        self.weight_unit = weight_unit
        self.min_replies = min_replies
        self.decrypt_timeout = float(decrypt_timeout)
        self._unit = DEFAULT_WEIGHT_UNIT if weight_unit is None else float(weight_unit)
        self._manifest: Manifest | None = None
        self._sampled: set[int] = set()
        self._num_clients = 1
        self._grid: Grid | None = None
        self._decryptors: list[int] = []
        #: What this wrapper summed into each encrypted model it produced, by the
        #: model's ciphertext checksums (the last produced and the last good one).
        self._produced: dict[tuple[int, ...], tuple[ModelClaims, int]] = {}
        #: The global model sent this round and the round whose aggregate it is
        #: (0: the initial model).
        self._sent: ArrayRecord | None = None
        self._sent_origin = 0
        #: The last global model that at least ``min_replies`` clients trained on.
        self._last_good: ArrayRecord | None = None
        self._last_good_origin = 0
        #: Fewest contributions an aggregate needs to be returned (raised by
        #: :meth:`require_contributions`, e.g. by DistributedDP to its t).
        self._min_contributions = min_replies
        #: Updates summed into the fresh aggregate the last ``aggregate_train``
        #: returned (0 if it returned none, or rolled back to an older model).
        self.summed_contributions = 0
        #: The round's train config and Flower's reply timeout, to re-run a round
        #: on the rolled-back model.
        self._train_config: ConfigRecord | None = None
        self._timeout = 3600.0
        self._rerunning = False

    def __repr__(self) -> str:
        return (
            f"HomomorphicAggregation({type(self.strategy).__name__}, mode="
            f"{self.mode!r}, wire={self.wire!r}, key={self.keys.fingerprint}, "
            f"min_replies={self.min_replies})"
        )

    # ------------------------------------------------------------------ set-up
    def summary_lines(self) -> list[str]:
        """Return the mode, profile, key, wire, weight unit and replies needed."""
        return [
            f"Mode: {self.mode}",
            f"Profile: {self.keys.profile.describe()}",
            f"Key fingerprint: {self.keys.fingerprint}",
            f"Wire format: {self.wire}",
            f"Weight unit: {self._unit:g} examples (fixed for the run)",
            f"Min valid replies per round: {self.min_replies}",
        ]

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
        """Run Flower's strategy loop; refuse server-side evaluation if encrypted.

        With ``mode="encrypted"`` the returned ``Result.arrays`` is the encrypted
        final model: save it with :func:`flwr_ext.he.save_encrypted_model`.
        """
        if evaluate_fn is not None and self.mode == "encrypted":
            raise ValueError(
                "server-side evaluation (evaluate_fn) needs the plaintext global "
                "model, but with HomomorphicAggregation(mode='encrypted') the server "
                "only holds ciphertexts. Evaluate on the clients (ckks_mod decrypts "
                "the model there), or use mode='decrypt-aggregate'."
            )
        if is_encrypted(initial_arrays):
            header = EncryptedHeader.from_record(initial_arrays)
            header.check_keys(self.keys, "the initial model")
        self._timeout = float(timeout)  # for a round re-run after a rollback
        return super().start(
            grid=grid,
            initial_arrays=initial_arrays,
            num_rounds=num_rounds,
            timeout=timeout,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=evaluate_fn,
        )

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Let the inner strategy build the instructions; add the announcement.

        With an encrypted global model this wrapper produced, the announcement
        also carries what was summed into it (:class:`ModelClaims`), so that the
        clients can check its weight and count slots.
        """
        self._grid = grid
        self._train_config = config
        if is_encrypted(arrays):
            header = EncryptedHeader.from_record(arrays)
            header.check_keys(self.keys, "the global model")
            self._manifest = header.manifest
        else:
            self._manifest = Manifest.from_arrayrecord(arrays)
        produced = self._produced.get(_checksums(arrays))
        self._sent = arrays
        self._sent_origin = produced[1] if produced is not None else 0
        if self._last_good is None:  # the initial model: nothing to roll back to
            self._last_good, self._last_good_origin = arrays, self._sent_origin
        announced = ConfigRecord(dict(config))
        announcement = self._announcement(num_clients=1)
        announcement.write(announced)
        messages = list(
            self.strategy.configure_train(server_round, arrays, announced, grid)
        )
        final = self._announcement(num_clients=max(len(messages), 1))
        for message in messages:
            records = [
                r for r in message.content.config_records.values() if KEY_PROFILE in r
            ]
            if not records:
                raise RuntimeError(
                    f"{type(self.strategy).__name__}.configure_train did not forward "
                    "the train config to the clients, so they cannot learn the CKKS "
                    "settings; HomomorphicAggregation needs an inner strategy that "
                    "sends the given ConfigRecord (as FedAvg does)"
                )
            for record in records:
                final.write(record)
                if produced is not None:
                    produced[0].write(record)
        self._sampled = {int(m.metadata.dst_node_id) for m in messages}
        self._num_clients = final.num_clients
        return messages

    def _announcement(self, num_clients: int) -> Announcement:
        return Announcement(
            profile=self.keys.profile.name,
            fingerprint=self.keys.fingerprint,
            wire=self.wire,
            weight_unit=self._unit,
            weight_key=self.weight_key,
            num_clients=num_clients,
        )

    def default_weight_unit(self, unit: float) -> None:
        """Use ``unit`` as the weight unit if the user left ``weight_unit=None``.

        :class:`DistributedDP` calls it with 1.0: its clients all claim one
        example, so weights of exactly 1 keep the full CKKS precision (with the
        default 1024 every weight would be 1/1024). Still fixed for the run.
        """
        if self.weight_unit is None:
            if not (math.isfinite(unit) and unit > 0):
                raise ValueError(f"unit must be finite and > 0, got {unit!r}")
            self._unit = float(unit)

    def require_contributions(self, minimum: int) -> None:
        """Never return an aggregate of fewer than ``minimum`` updates.

        Raises the floor ``min_replies`` sets; :class:`DistributedDP` calls it
        with its t, so that no sum carrying less than the calibrated noise is
        ever produced - in ``"decrypt-aggregate"`` mode not even decrypted.
        """
        if isinstance(minimum, bool) or not isinstance(minimum, int) or minimum < 1:
            raise ValueError(f"minimum must be an int >= 1, got {minimum!r}")
        self._min_contributions = max(self._min_contributions, minimum)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Sum the valid encrypted replies; decrypt via a node if so configured.

        If too few valid replies arrived because the clients refused the global
        model sent this round (its weight or count slot failed their check), the
        last good global model is returned instead (see :meth:`rollback_model`).
        """
        started = time.perf_counter()
        self.summed_contributions = 0
        replies = list(replies)
        report = self._round_report(server_round, len(replies))
        total = CiphertextSum(self.keys, self._manifest, self.wire)
        decryptors: list[int] = []

        def accept(
            reply: Message, node_id: int, index: int
        ) -> tuple[Message, MetricRecord, float]:
            metrics, weight, header = self._check_reply(reply, node_id, total)
            if header.decryptor:
                decryptors.append(node_id)
            return reply, metrics, weight

        valid, _ = self._screen_replies(report, replies, self._sampled or None, accept)
        counts = {
            METRIC_RECEIVED: len(replies),
            METRIC_DROPPED: len(replies) - len(valid),
            METRIC_SUMMED: total.count,
            METRIC_REJECTED: len(_rejections(replies)),
        }
        if total.count >= self.min_replies and self._sent is not None:
            # enough clients trained on the model sent this round: it was good
            self._last_good, self._last_good_origin = self._sent, self._sent_origin
        if total.count < self._min_contributions:
            rollback = self.rollback_model(server_round, replies)
            if rollback is not None and not self._rerunning:
                rerun = self._rerun_round(server_round, rollback)
                if rerun is not None:
                    return rerun
            needed = (
                f"min_replies={self.min_replies}"
                if self._min_contributions == self.min_replies
                else f"the {self._min_contributions} required by the wrapping "
                "strategy (require_contributions)"
            )
            if rollback is None:
                log(
                    WARNING,
                    "[%s] round %d: %d valid replies of %d, fewer than %s: keeping "
                    "the previous global model",
                    type(self).__name__,
                    server_round,
                    total.count,
                    len(replies),
                    needed,
                )
            return report.finish(
                rollback,
                self._round_metrics(server_round, valid, counts, started),
                f"{total.count} valid replies, fewer than {needed}",
            )
        encrypted_sum = total.result()
        assert encrypted_sum is not None
        claims = ModelClaims(total.count, math.fsum(w for _, _, w in valid))
        if self.mode == "encrypted":
            arrays: ArrayRecord | None = encrypted_sum
            self._remember(encrypted_sum, claims, server_round)
        else:
            arrays = self._decrypt_and_step(
                server_round, encrypted_sum, claims, decryptors, valid
            )
        if arrays is not None:
            self.summed_contributions = total.count
        return report.finish(
            arrays,
            self._round_metrics(server_round, valid, counts, started),
            "the aggregate was not decrypted, or the inner strategy returned no model",
        )

    def rollback_model(
        self, server_round: int, replies: Iterable[Message]
    ) -> ArrayRecord | None:
        """Return the model to roll back to if the clients refused this round's.

        Returns the last good global model (the last one at least
        ``min_replies`` clients trained on) when most ``replies`` are refusals
        of the encrypted global model sent this round - its weight or count slot
        failed their check - and logs which round's aggregate failed and why;
        otherwise None. A wrapper that discards the round itself (e.g.
        :class:`DistributedDP` with fewer than t valid replies) calls it so the
        federation still recovers.
        """
        replies = list(replies)
        rejections = _rejections(replies)
        if (
            # A majority of the replies: every honest key holder refuses a
            # corrupted sum alike, and one client's false refusal must not undo
            # the previous round's progress.
            2 * len(rejections) <= len(replies)
            or self._sent is None
            or self._last_good is None
            or self._sent is self._last_good
            or not is_encrypted(self._sent)
        ):
            return None
        self.summed_contributions = 0
        log(
            WARNING,
            "[%s] round %d: the global model sent this round (the aggregate of "
            "round %d) was refused by %d client(s): %s. Rolled back to the last "
            "good global model (%s); the contributions of round %d are lost",
            type(self).__name__,
            server_round,
            self._sent_origin,
            len(rejections),
            rejections[0][:300],
            "the initial model"
            if self._last_good_origin == 0
            else f"the aggregate of round {self._last_good_origin}",
            self._sent_origin,
        )
        rolled_back = self._last_good
        self._sent = rolled_back  # what the clients will get next
        return rolled_back

    def _rerun_round(
        self, server_round: int, model: ArrayRecord
    ) -> tuple[ArrayRecord | None, MetricRecord | None] | None:
        """Train this round again, at once, on the rolled-back ``model``.

        So that a corrupted sum costs only the round it was made in: the clients
        that refused it train on the last good model in the same round. Returns
        None (the rollback alone then stands) if this wrapper has no grid or
        config of its own for the round (e.g. ``aggregate_train`` was called
        directly).
        """
        if self._grid is None or self._train_config is None:
            return None
        self._rerunning = True
        try:
            messages = list(
                self.configure_train(
                    server_round, model, self._train_config, self._grid
                )
            )
            replies = list(self._grid.send_and_receive(messages, timeout=self._timeout))
            log(
                INFO,
                "[%s] round %d: re-ran the round on the rolled-back model: %d replies",
                type(self).__name__,
                server_round,
                len(replies),
            )
            arrays, metrics = self.aggregate_train(server_round, replies)
        finally:
            self._rerunning = False
        if arrays is None:  # the re-run failed too: the rollback still stands
            arrays = model
        if metrics is not None:
            metrics[METRIC_ROLLED_BACK] = 1
        return arrays, metrics

    def _remember(self, model: ArrayRecord, claims: ModelClaims, origin: int) -> None:
        """Keep the claims of ``model`` (and of the last good one) by checksums."""
        keep = {_checksums(self._last_good)} if self._last_good is not None else set()
        self._produced = {k: v for k, v in self._produced.items() if k in keep}
        self._produced[_checksums(model)] = (claims, origin)

    def _check_reply(
        self, reply: Message, node_id: int, total: CiphertextSum
    ) -> tuple[MetricRecord, float, EncryptedHeader]:
        """Validate one screened reply and add it to ``total``; raise to drop it."""
        records = reply.content.array_records
        if len(records) != 1:
            raise InvalidReplyError(
                node_id,
                f"expected exactly one ArrayRecord, got {len(records)} "
                f"({sorted(records)[:5]})",
            )
        metrics, examples = validate_metrics(reply, self.weight_key, node_id)
        weight = examples / self._unit
        budget = self.keys.profile.bound / self._num_clients
        if not weight > 0 or weight > budget:
            raise InvalidReplyError(
                node_id,
                f"claims {examples:g} examples: a weight of {weight:g} is outside "
                f"(0, {budget:g}], the per-client budget ckks_mod enforces before "
                "encrypting",
            )
        record = next(iter(records.values()))
        if not is_encrypted(record):
            raise InvalidReplyError(
                node_id,
                "the update is not encrypted (is ckks_mod the first mod of the "
                "node's ClientApp?); it was not looked at",
            )
        try:
            header = total.add(record, f"the reply from node {node_id}")
        except (InvalidCiphertextError, KeyMismatchError) as err:
            raise InvalidReplyError(node_id, str(err)) from None
        return metrics, weight, header

    # ------------------------------------------------------ decrypt-aggregate
    def _decrypt_and_step(
        self,
        server_round: int,
        encrypted_sum: ArrayRecord,
        claims: ModelClaims,
        decryptors: list[int],
        valid: list[tuple[Message, MetricRecord, float]],
    ) -> ArrayRecord | None:
        """Have one opted-in node decrypt the sum; run the inner strategy on it."""
        average = self._request_decryption(
            server_round, encrypted_sum, claims, decryptors
        )
        if average is None:
            return None
        assert self._manifest is not None
        return self._inner_step(server_round, average, self._manifest, valid[0][0])

    def _request_decryption(
        self,
        server_round: int,
        encrypted_sum: ArrayRecord,
        claims: ModelClaims,
        decryptors: list[int],
    ) -> ArrayRecord | None:
        candidates = list(dict.fromkeys(self._decryptors + decryptors))
        if not candidates:
            log(
                WARNING,
                "[%s] round %d: no replying node has opted in to decrypt aggregates "
                "(node config ckks-decrypt-for-server=true): keeping the previous "
                "global model",
                type(self).__name__,
                server_round,
            )
            return None
        if self._grid is None:
            raise RuntimeError("aggregate_train called before configure_train")
        for node_id in candidates:
            config = ConfigRecord(
                {KEY_DECRYPT_REQUEST: True, "server-round": server_round}
            )
            claims.write(config)
            request = Message(
                content=RecordDict({"arrays": encrypted_sum, "config": config}),
                dst_node_id=node_id,
                # A train message reaches ckks_mod wherever the ClientApp installs
                # it; the mod answers it itself and the ClientApp never sees it.
                message_type=MessageType.TRAIN,
            )
            answers = list(
                self._grid.send_and_receive([request], timeout=self.decrypt_timeout)
            )
            try:
                average = self._check_decryption(answers, node_id, claims.contributions)
            except InvalidReplyError as err:
                if AGGREGATE_REJECTED in err.reason:
                    log(
                        WARNING,
                        "[%s] round %d: the aggregate of round %d failed the check "
                        "at node %d (%s): it is discarded and the previous global "
                        "model kept; the contributions of round %d are lost",
                        type(self).__name__,
                        server_round,
                        server_round,
                        node_id,
                        err.reason[:300],
                        server_round,
                    )
                    return None  # every key holder would refuse it alike
                log(
                    WARNING,
                    "[%s] round %d: node %d did not decrypt the aggregate: %s",
                    type(self).__name__,
                    server_round,
                    node_id,
                    err.reason[:300],
                )
                if node_id in self._decryptors:
                    self._decryptors.remove(node_id)
                continue
            if node_id not in self._decryptors:
                self._decryptors.append(node_id)
            log(
                INFO,
                "[%s] round %d: node %d decrypted the aggregate of %d updates",
                type(self).__name__,
                server_round,
                node_id,
                claims.contributions,
            )
            return average
        log(
            WARNING,
            "[%s] round %d: no node decrypted the aggregate: keeping the previous "
            "global model",
            type(self).__name__,
            server_round,
        )
        return None

    def _check_decryption(
        self, answers: list[Message], node_id: int, contributions: int
    ) -> ArrayRecord:
        """Check a decryptor's answer totally (it is hostile input, too)."""
        if not answers:
            raise InvalidReplyError(node_id, "no reply before decrypt_timeout")
        answer = answers[0]
        if answer.has_error():
            raise InvalidReplyError(node_id, str(answer.error.reason))
        records = answer.content.array_records
        metric_records = answer.content.metric_records
        if len(records) != 1 or len(metric_records) != 1:
            raise InvalidReplyError(node_id, "malformed decryption reply")
        count = next(iter(metric_records.values())).get(METRIC_CONTRIBUTIONS)
        if isinstance(count, bool) or count != contributions:
            raise InvalidReplyError(
                node_id,
                f"it reports {str(count)[:20]} contributions, the server summed "
                f"{contributions}",
            )
        average = next(iter(records.values()))
        assert self._manifest is not None
        mismatch = _describe_plain_mismatch(average, self._manifest)
        if mismatch is None:
            mismatch = self._manifest.describe_mismatch(average)
        if mismatch is not None:
            raise InvalidReplyError(node_id, f"decrypted model: {mismatch}")
        try:
            vector, _ = flatten(average, self._manifest)
        except (ValueError, TypeError, MemoryError) as err:
            raise InvalidReplyError(node_id, f"decrypted model: {err}"[:300]) from None
        if not np.isfinite(vector).all():
            raise InvalidReplyError(node_id, "decrypted model is not finite")
        return average

    # ---------------------------------------------------------------- metrics
    def _round_metrics(
        self,
        server_round: int,
        valid: list[tuple[Message, MetricRecord, float]],
        counts: dict[str, int],
        started: float,
    ) -> MetricRecord:
        replies = [
            ValidReply(int(r.metadata.src_node_id), np.empty(0), w, m, r)
            for r, m, w in valid
        ]
        metrics = self._aggregate_client_metrics(
            server_round, replies, [r.weight for r in replies]
        )
        return self._add_counters(
            server_round,
            metrics,
            counts,
            METRIC_SECONDS,
            started,
            f"summed {counts[METRIC_SUMMED]} ciphertext updates",
        )

    # ------------------------------------------------------------- evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to the inner strategy (ckks_mod decrypts on the client).

        An encrypted model this wrapper produced goes out with its
        :class:`ModelClaims`, so the clients check it as in training.
        """
        produced = self._produced.get(_checksums(arrays))
        if produced is not None:
            config = ConfigRecord(dict(config))
            produced[0].write(config)
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)


def _check_encrypted_inner(strategy: Strategy) -> None:
    """Refuse inner strategies whose aggregation needs plaintext (mode=encrypted)."""
    name = type(strategy).__name__
    if isinstance(strategy, _NEEDS_PLAINTEXT):
        raise ValueError(
            f"HomomorphicAggregation(mode='encrypted') cannot wrap {name}: it applies "
            "a server-side step to the plaintext aggregate (server optimiser or "
            "loss-weighted averaging), but the server holds only ciphertexts. Use "
            "FedAvg/FedProx, or mode='decrypt-aggregate' (one key-holding node "
            "decrypts only the aggregate for the server)."
        )
    if (
        not isinstance(strategy, FedAvg)
        or type(strategy).aggregate_train is not FedAvg.aggregate_train
    ):
        raise ValueError(
            f"HomomorphicAggregation(mode='encrypted') cannot wrap {name}: the "
            "wrapper sums the ciphertexts itself and never calls the inner "
            "strategy's aggregate_train, so only strategies whose aggregation is "
            "FedAvg's weighted average (FedAvg, FedProx) keep their meaning. Use "
            "mode='decrypt-aggregate' to run "
            f"{name}.aggregate_train on the decrypted aggregate."
        )


def _checksums(arrays: ArrayRecord | None) -> tuple[int, ...]:
    """Identify an encrypted model by its chunks' digests (() if not encrypted)."""
    if arrays is None or not is_encrypted(arrays):
        return ()
    try:
        return EncryptedHeader.from_record(arrays).checksums
    except InvalidCiphertextError:
        return ()


def _rejections(replies: list[Message]) -> list[str]:
    """Reasons of the error replies that refuse the global model's aggregate."""
    return [
        str(reply.error.reason)
        for reply in replies
        if reply.has_error() and AGGREGATE_REJECTED in str(reply.error.reason)
    ]


def _describe_plain_mismatch(record: ArrayRecord, manifest: Manifest) -> str | None:
    """Compare names, dtype strings and shapes without parsing a hostile dtype.

    ``Manifest.describe_mismatch`` hands each array's dtype string to numpy; a
    string numpy does not know must be refused before that.
    """
    if tuple(record.keys()) != manifest.keys:
        return f"arrays {list(record.keys())[:10]} instead of {list(manifest.keys)}"
    for spec in manifest.specs:
        array = record[spec.key]
        if array.stype != SType.NUMPY or array.dtype != np.dtype(spec.dtype).name:
            return f"array '{spec.key}' is not a {np.dtype(spec.dtype).name} array"
        if tuple(array.shape) != spec.shape:
            return f"array '{spec.key}' has shape {tuple(array.shape)[:8]}"
    return None
