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
from copy import copy
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
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedAvgM, QFedAvg, Result, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
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
    KEY_DECRYPT_REQUEST,
    KEY_PROFILE,
    METRIC_CONTRIBUTIONS,
    Announcement,
)
from ..he.wire import get_wire
from ..records import (
    InvalidReplyError,
    Manifest,
    conform_to_manifest,
    flatten,
    validate_metrics,
)
from .composition import Role, check_composition
from .round_report import RoundReporting

__all__ = ["HomomorphicAggregation", "Mode"]

Mode = Literal["encrypted", "decrypt-aggregate"]
_MODES = ("encrypted", "decrypt-aggregate")

#: Keys this wrapper adds to the round's train MetricRecord.
METRIC_RECEIVED = "ckks-received"
METRIC_DROPPED = "ckks-dropped"
METRIC_SUMMED = "ckks-summed"
METRIC_SECONDS = "ckks-aggregation-s"

#: ``weight_unit=None``: examples per weight unit before any count is known (a power
#: of two, so ``n / unit`` is exact in floating point).
FIRST_ROUND_WEIGHT_UNIT = 1024.0

#: Strategies whose aggregation needs the plaintext aggregate (server optimisers,
#: loss-weighted averaging); refused in mode="encrypted".
_NEEDS_PLAINTEXT: tuple[type, ...] = (FedOpt, FedAvgM, QFedAvg)


class HomomorphicAggregation(RoundReporting):
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
        ~3e-8 for compact). ``None`` means 1024 in the first round (the server
        knows no example counts yet: sites of up to ~10^7 examples fit the
        default profile's bound) and then the mean ``num-examples`` of the
        previous round's valid replies, so that weights are about 1.
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
    clients' metrics plus ``ckks-received``, ``ckks-dropped``, ``ckks-summed`` and
    ``ckks-aggregation-s``.
    """

    flwr_ext_role = Role.HOMOMORPHIC

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
        check_composition(type(self).__name__, Role.HOMOMORPHIC, strategy)
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
        self.strategy = strategy
        self.keys = keys
        self.mode: Mode = mode
        self.wire = wire
        self.weight_unit = weight_unit
        self.min_replies = min_replies
        self.decrypt_timeout = float(decrypt_timeout)
        self.weight_key: str = getattr(strategy, "weighted_by_key", "num-examples")
        self.arrayrecord_key: str = getattr(strategy, "arrayrecord_key", "arrays")
        self._unit = (
            FIRST_ROUND_WEIGHT_UNIT if weight_unit is None else float(weight_unit)
        )
        self._manifest: Manifest | None = None
        self._sampled: set[int] = set()
        self._grid: Grid | None = None
        self._decryptors: list[int] = []

    def __repr__(self) -> str:
        return (
            f"HomomorphicAggregation({type(self.strategy).__name__}, mode="
            f"{self.mode!r}, wire={self.wire!r}, key={self.keys.fingerprint}, "
            f"min_replies={self.min_replies})"
        )

    # ------------------------------------------------------------------ set-up
    def summary(self) -> None:
        """Log the homomorphic configuration, then the inner strategy's."""
        log(INFO, "\t├──> Homomorphic aggregation (flwr-ext, CKKS):")
        log(INFO, "\t│\t├── Mode: %s", self.mode)
        log(INFO, "\t│\t├── Profile: %s", self.keys.profile.describe())
        log(INFO, "\t│\t├── Key fingerprint: %s", self.keys.fingerprint)
        log(INFO, "\t│\t├── Wire format: %s", self.wire)
        log(
            INFO,
            "\t│\t├── Weight unit: %s",
            "auto" if self.weight_unit is None else f"{self.weight_unit:g}",
        )
        log(INFO, "\t│\t└── Min valid replies per round: %d", self.min_replies)
        log(INFO, "\t├──> Inner strategy: %s", type(self.strategy).__name__)
        self.strategy.summary()

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
        """Let the inner strategy build the instructions; add the announcement."""
        self._grid = grid
        if is_encrypted(arrays):
            header = EncryptedHeader.from_record(arrays)
            header.check_keys(self.keys, "the global model")
            self._manifest = header.manifest
        else:
            self._manifest = Manifest.from_arrayrecord(arrays)
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
        self._sampled = {int(m.metadata.dst_node_id) for m in messages}
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

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Sum the valid encrypted replies; decrypt via a node if so configured."""
        started = time.perf_counter()
        replies = list(replies)
        report = self._round_report(server_round, len(replies))
        total = CiphertextSum(self.keys, self._manifest, self.wire)
        valid: list[tuple[Message, MetricRecord, float]] = []
        decryptors: list[int] = []
        seen: set[int] = set()
        for reply in replies:
            node_id = int(reply.metadata.src_node_id)
            try:
                metrics, weight, header = self._check_reply(reply, seen, total)
            except InvalidReplyError as err:
                self._log_drop(server_round, err.node_id, err.reason)
                report.drop(err.reason)
                continue
            except (InvalidCiphertextError, KeyMismatchError) as err:
                self._log_drop(server_round, node_id, str(err))
                report.drop(str(err))
                continue
            valid.append((reply, metrics, weight))
            if header.decryptor:
                decryptors.append(node_id)
        counts = {
            METRIC_RECEIVED: len(replies),
            METRIC_DROPPED: len(replies) - len(valid),
            METRIC_SUMMED: total.count,
        }
        if total.count < self.min_replies:
            log(
                WARNING,
                "[%s] round %d: %d valid replies of %d, fewer than min_replies=%d: "
                "keeping the previous global model",
                type(self).__name__,
                server_round,
                total.count,
                len(replies),
                self.min_replies,
            )
            return report.finish(
                None,
                self._round_metrics(server_round, valid, counts, started),
                f"{total.count} valid replies, fewer than min_replies="
                f"{self.min_replies}",
            )
        encrypted_sum = total.result()
        assert encrypted_sum is not None
        if self.weight_unit is None:  # auto: weights of about 1 next round
            self._unit = max(float(np.mean([w for _, _, w in valid])), 1e-12)
        if self.mode == "encrypted":
            arrays: ArrayRecord | None = encrypted_sum
        else:
            arrays = self._decrypt_and_step(
                server_round, encrypted_sum, total.count, decryptors, valid
            )
        return report.finish(
            arrays,
            self._round_metrics(server_round, valid, counts, started),
            "the aggregate was not decrypted, or the inner strategy returned no model",
        )

    def _check_reply(
        self, reply: Message, seen: set[int], total: CiphertextSum
    ) -> tuple[MetricRecord, float, EncryptedHeader]:
        """Validate one reply and add it to ``total``; raise to drop it."""
        node_id = int(reply.metadata.src_node_id)
        if self._sampled and node_id not in self._sampled:
            raise InvalidReplyError(node_id, "node was not sampled in this round")
        if node_id in seen:
            raise InvalidReplyError(node_id, "second reply from the same node")
        seen.add(node_id)
        if reply.has_error():
            raise InvalidReplyError(
                node_id, f"client error {reply.error.code}: {reply.error.reason}"
            )
        records = reply.content.array_records
        if len(records) != 1:
            raise InvalidReplyError(
                node_id,
                f"expected exactly one ArrayRecord, got {len(records)} "
                f"({sorted(records)})",
            )
        metrics, weight = validate_metrics(reply, self.weight_key, node_id)
        record = next(iter(records.values()))
        if not is_encrypted(record):
            raise InvalidReplyError(
                node_id,
                "the update is not encrypted (is ckks_mod the first mod of the "
                "node's ClientApp?); it was not looked at",
            )
        header = total.add(record, f"the reply from node {node_id}")
        return metrics, weight, header

    def _log_drop(self, server_round: int, node_id: int, reason: str) -> None:
        log(
            WARNING,
            "[%s] round %d: dropped reply from node %d: %s",
            type(self).__name__,
            server_round,
            node_id,
            reason,
        )

    # ------------------------------------------------------ decrypt-aggregate
    def _decrypt_and_step(
        self,
        server_round: int,
        encrypted_sum: ArrayRecord,
        contributions: int,
        decryptors: list[int],
        valid: list[tuple[Message, MetricRecord, float]],
    ) -> ArrayRecord | None:
        """Have one opted-in node decrypt the sum; run the inner strategy on it."""
        average = self._request_decryption(
            server_round, encrypted_sum, contributions, decryptors
        )
        if average is None:
            return None
        synthetic = Message(
            content=RecordDict(
                {
                    self.arrayrecord_key: average,
                    "metrics": MetricRecord({self.weight_key: 1}),
                }
            ),
            metadata=copy(valid[0][0].metadata),
        )
        arrays, _ = self.strategy.aggregate_train(server_round, [synthetic])
        if arrays is None:
            return None
        assert self._manifest is not None
        return conform_to_manifest(
            arrays, self._manifest, "HomomorphicAggregation", server_round
        )

    def _request_decryption(
        self,
        server_round: int,
        encrypted_sum: ArrayRecord,
        contributions: int,
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
            request = Message(
                content=RecordDict(
                    {
                        "arrays": encrypted_sum,
                        "config": ConfigRecord(
                            {KEY_DECRYPT_REQUEST: True, "server-round": server_round}
                        ),
                    }
                ),
                dst_node_id=node_id,
                # A train message reaches ckks_mod wherever the ClientApp installs
                # it; the mod answers it itself and the ClientApp never sees it.
                message_type=MessageType.TRAIN,
            )
            answers = list(
                self._grid.send_and_receive([request], timeout=self.decrypt_timeout)
            )
            try:
                average = self._check_decryption(answers, node_id, contributions)
            except InvalidReplyError as err:
                log(
                    WARNING,
                    "[%s] round %d: node %d did not decrypt the aggregate: %s",
                    type(self).__name__,
                    server_round,
                    node_id,
                    err.reason,
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
                contributions,
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
        if not answers:
            raise InvalidReplyError(node_id, "no reply before decrypt_timeout")
        answer = answers[0]
        if answer.has_error():
            raise InvalidReplyError(node_id, answer.error.reason)
        records = answer.content.array_records
        metric_records = answer.content.metric_records
        if len(records) != 1 or len(metric_records) != 1:
            raise InvalidReplyError(node_id, "malformed decryption reply")
        count = next(iter(metric_records.values())).get(METRIC_CONTRIBUTIONS)
        if count != contributions:
            raise InvalidReplyError(
                node_id,
                f"it reports {count!r} contributions, the server summed "
                f"{contributions}",
            )
        average = next(iter(records.values()))
        assert self._manifest is not None
        mismatch = self._manifest.describe_mismatch(average)
        if mismatch is not None:
            raise InvalidReplyError(node_id, f"decrypted model: {mismatch}")
        try:
            vector, _ = flatten(average, self._manifest)
        except ValueError as err:
            raise InvalidReplyError(node_id, str(err)) from err
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
        metrics = _aggregate_metrics(
            [(m, w) for _, m, w in valid],
            self.weight_key,
            getattr(self.strategy, "train_metrics_aggr_fn", None),
            type(self).__name__,
        )
        for key, value in counts.items():
            metrics[key] = value
        seconds = time.perf_counter() - started
        metrics[METRIC_SECONDS] = seconds
        log(
            INFO,
            "[%s] round %d: received %d, dropped %d, summed %d ciphertext updates "
            "in %.3f s",
            type(self).__name__,
            server_round,
            counts[METRIC_RECEIVED],
            counts[METRIC_DROPPED],
            counts[METRIC_SUMMED],
            seconds,
        )
        return metrics

    # ------------------------------------------------------------- evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to the inner strategy (ckks_mod decrypts on the client)."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Drop malformed evaluation replies, then delegate to the inner strategy."""
        valid = []
        for reply in replies:
            node_id = int(reply.metadata.src_node_id)
            try:
                if reply.has_error():
                    raise InvalidReplyError(
                        node_id,
                        f"client error {reply.error.code}: {reply.error.reason}",
                    )
                validate_metrics(reply, self.weight_key, node_id)
            except InvalidReplyError as err:
                log(
                    WARNING,
                    "[%s] round %d: dropped evaluate reply from node %d: %s",
                    type(self).__name__,
                    server_round,
                    node_id,
                    err.reason,
                )
                continue
            valid.append(reply)
        if not valid:
            return None
        return self.strategy.aggregate_evaluate(server_round, valid)


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


def _aggregate_metrics(
    valid: list[tuple[MetricRecord, float]],
    weight_key: str,
    aggr_fn: object,
    who: str,
) -> MetricRecord:
    """Aggregate clients' MetricRecords (plaintext in every mode)."""
    if not valid:
        return MetricRecord()
    records = [RecordDict({"metrics": metrics}) for metrics, _ in valid]
    fn = aggr_fn if callable(aggr_fn) else aggregate_metricrecords
    try:
        return fn(records, weight_key)
    except Exception as err:  # a client's metrics never crash the server
        log(
            WARNING,
            "[%s] client metrics could not be aggregated (%s: %s); reporting the "
            "ckks counters only",
            who,
            type(err).__name__,
            err,
        )
        return MetricRecord()
