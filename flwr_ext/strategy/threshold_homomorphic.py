"""ThresholdHomomorphicAggregation: CKKS secure aggregation with no key holder at all.

Use it like :class:`~flwr_ext.strategy.HomomorphicAggregation`, with ``ckks_mod``
on every site and no key files to distribute::

    strategy = ThresholdHomomorphicAggregation(FedAdam())
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=10)

(site node config: ``ckks-threshold-dir='/secure/dir'``, where each site keeps its
own secret share). The multiparty protocol is :mod:`flwr_ext.he.threshold`
(Mouchet et al., PoPETs 2021); the messages :mod:`flwr_ext.he.threshold_protocol`.

What the server runs:

1. **Setup** (before round 1, in :meth:`start`): wait for at least ``min_sites``
   connected nodes, announce a fresh key-set id and public seed, collect every
   site's public share ``p_i`` and sum them into the collective public key. The
   sites that answered are *the* key holders for the whole run (N-of-N).
2. **Each round**: the inner strategy samples and configures; the instructions
   carry the collective public key; each reply (an update encrypted under it,
   pre-scaled by the client's weight, with weight and count slots) is checked and
   added to the running sum (:class:`flwr_ext.he.residue_sum.ResidueSum`, the
   secure-sum primitive the single-key wrapper uses too: SEAL's bytes parsed and
   added as residues with numpy, every check of SEAL's ``load`` kept, a refused
   reply subtracted again exactly).
3. **Collective decryption**: the server sends each key holder the sum's ``c1``;
   each returns its flooded partial decryption; the server adds them to ``c0`` and
   decodes. Only the aggregate is ever decrypted. A site that does not answer (or
   answers for another ciphertext, or twice) is named, and the round keeps the
   previous global model.
4. The decrypted weighted average goes to the inner strategy as one synthetic
   reply, so FedAdam & co. and server-side evaluation run on it (the server holds
   the plaintext aggregate and nothing else: SecAgg's semantics).

Who must collude to read one site's update: the server *and every other site*
(with single-key CKKS: the server and any one site).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

from ..he.residue_sum import CiphertextLevel, ResidueSum
from ..he.seal_raw import RawCiphertext
from ..he.threshold import (
    THRESHOLD_PROFILE,
    PartialDecryption,
    ThresholdContext,
    ThresholdError,
    ThresholdProfile,
    collective_public_key,
    combine,
    common_polynomial,
    digest,
    unpack,
)
from ..he.threshold_protocol import (
    KEY_CONTRIBUTIONS,
    KEY_DIGESTS,
    KEY_KEYSET,
    KEY_LAYOUT,
    KEY_NUM_CLIENTS,
    KEY_OP,
    KEY_ROUND,
    KEY_SCALE_BITS,
    KEY_SEED,
    KEY_SITE_NAME,
    OP_DECRYPT,
    OP_KEYGEN,
    OP_SUM,
    TrainAnnouncement,
    decode_update,
    layout_size,
    read_layout,
    read_residue_record,
    residue_record,
    vector_to_metrics,
)
from ..he.wire import CiphertextError
from ..records import (
    InvalidReplyError,
    Manifest,
    ValidReply,
    unflatten,
    validate_metrics,
)
from .base import StrategyWrapper
from .composition import Role

__all__ = ["ThresholdHomomorphicAggregation"]

METRIC_RECEIVED = "ckks-received"
METRIC_DROPPED = "ckks-dropped"
METRIC_SUMMED = "ckks-summed"
METRIC_SECONDS = "ckks-aggregation-s"


class ThresholdHomomorphicAggregation(StrategyWrapper):
    """Multiparty (N-of-N) CKKS secure aggregation around any Flower strategy.

    Parameters
    ----------
    strategy : Strategy
        The Flower strategy whose sampling, configuration, server step (FedAdam...)
        and evaluation are kept; it receives the decrypted weighted average.
    weight_unit : float (default: 100.0)
        Examples per weight unit: a client encrypts ``(n_i / weight_unit) *
        model_i`` and the weight slot ``n_i / weight_unit``. Fixed for the run, so
        no client can move it; the decrypted average is exact for any unit, and
        a client whose pre-scaled values exceed the profile's bound refuses to
        send (its error reply says why).
    min_sites : int (default: 2)
        Fewest key holders the setup accepts; with fewer the run fails at start.
    min_replies : int (default: 2)
        Fewest valid encrypted replies a round needs before its aggregate is
        decrypted (the sites refuse aggregates below their own policy minimum too).
    setup_timeout : float (default: 600)
        Seconds to wait for ``min_sites`` nodes and for their public shares.
    decrypt_timeout : float (default: 600)
        Seconds to wait for the sites' partial decryptions each round.
    profile : ThresholdProfile
        CKKS parameters and flooding (:class:`~flwr_ext.he.threshold.ThresholdProfile`).
    """

    flwr_ext_role = Role.HOMOMORPHIC
    summary_title = "Threshold homomorphic aggregation (flwr-ext, multiparty CKKS)"

    def __init__(
        self,
        strategy: Strategy,
        *,
        weight_unit: float = 100.0,
        min_sites: int = 2,
        min_replies: int = 2,
        setup_timeout: float = 600.0,
        decrypt_timeout: float = 600.0,
        profile: ThresholdProfile = THRESHOLD_PROFILE,
    ) -> None:
        super().__init__(strategy)
        if isinstance(weight_unit, bool) or not (
            isinstance(weight_unit, int | float)
            and math.isfinite(weight_unit)
            and weight_unit > 0
        ):
            raise ValueError(
                f"weight_unit must be a finite number > 0, got {weight_unit!r}"
            )
        for name, value, low in (
            ("min_sites", min_sites, 1),
            ("min_replies", min_replies, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name, seconds in (
            ("setup_timeout", setup_timeout),
            ("decrypt_timeout", decrypt_timeout),
        ):
            if not (
                isinstance(seconds, int | float)
                and math.isfinite(seconds)
                and seconds > 0
            ):
                raise ValueError(
                    f"{name} must be a number of seconds > 0, got {seconds!r}"
                )
        self.weight_unit = float(weight_unit)
        self.min_sites = min_sites
        self.min_replies = min_replies
        self.setup_timeout = float(setup_timeout)
        self.decrypt_timeout = float(decrypt_timeout)
        self.profile = profile
        self._context: ThresholdContext | None = None
        self._keyset = ""
        self._public_key = b""
        self._sites: dict[int, str] = {}
        self._manifest: Manifest | None = None
        self._sampled: set[int] = set()
        self._grid: Grid | None = None
        self._sequence = 0  # collective decryptions so far (sites refuse replays)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({type(self.strategy).__name__}(), "
            f"weight_unit={self.weight_unit:g}, min_sites={self.min_sites})"
        )

    # ------------------------------------------------------------------ set-up
    def summary_lines(self) -> list[str]:
        """Return the ring, flooding and weight unit."""
        profile = self.profile
        return [
            f"Ring N={profile.poly_modulus_degree}, primes "
            f"{list(profile.coeff_mod_bit_sizes)}, scale 2^{profile.scale_bits}",
            f"Flooding: {profile.security_bits}-bit statistical security over "
            f"{profile.max_decryptions} decryptions",
            f"Weight unit: {self.weight_unit:g} examples",
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
        """Run the collective key generation (unless done), then Flower's loop.

        A key set made before :meth:`start` (by :meth:`setup` or a first
        :meth:`secure_sum`, e.g. the apps' statistics round) is kept: the same
        sites hold the shares for the whole run.
        """
        if self._context is None:
            self.setup(grid)
        return super().start(
            grid=grid,
            initial_arrays=initial_arrays,
            num_rounds=num_rounds,
            timeout=timeout,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=evaluate_fn,
        )

    def setup(self, grid: Grid) -> None:
        """Dealer-free key generation: every connected site sends ``p_i``."""
        self._grid = grid
        self._context = ThresholdContext(self.profile)
        deadline = time.monotonic() + self.setup_timeout
        node_ids = sorted(int(n) for n in grid.get_node_ids())
        while len(node_ids) < self.min_sites and time.monotonic() < deadline:
            time.sleep(1.0)
            node_ids = sorted(int(n) for n in grid.get_node_ids())
        if len(node_ids) < self.min_sites:
            raise RuntimeError(
                f"threshold CKKS setup: {len(node_ids)} node(s) connected within "
                f"{self.setup_timeout:g} s, min_sites={self.min_sites}"
            )
        self._keyset = os.urandom(16).hex()
        seed = os.urandom(32)
        a = common_polynomial(self._context, seed)
        requests = [
            Message(
                content=RecordDict(
                    {
                        "config": ConfigRecord(
                            {
                                KEY_OP: OP_KEYGEN,
                                KEY_KEYSET: self._keyset,
                                KEY_SEED: seed,
                            }
                        )
                    }
                ),
                dst_node_id=node_id,
                message_type=MessageType.TRAIN,
            )
            for node_id in node_ids
        ]
        replies = list(grid.send_and_receive(requests, timeout=self.setup_timeout))
        shares: list[np.ndarray] = []
        sites: dict[int, str] = {}
        for reply in replies:
            node_id = int(reply.metadata.src_node_id)
            try:
                if node_id not in node_ids or node_id in sites:
                    raise ThresholdError("unexpected or duplicate setup reply")
                if reply.has_error():
                    raise ThresholdError(reply.error.reason)
                record = reply.content.array_records.get("public-share")
                if record is None:
                    raise ThresholdError("no public share in the reply")
                (share,) = read_residue_record(
                    self._context, record, "p", expected=1, key_level=True
                )
            except (ThresholdError, ValueError) as err:
                log(
                    WARNING,
                    "[%s] setup: node %d left out: %s",
                    type(self).__name__,
                    node_id,
                    err,
                )
                continue
            shares.append(share)
            sites[node_id] = _site_name(reply, node_id)
        for first, second in _same_secret(self._context, list(sites), shares):
            log(
                WARNING,
                "[%s] setup: %s and %s hold the same secret share (one share "
                "directory for two sites?): both left out",
                type(self).__name__,
                sites[first],
                sites[second],
            )
            for node_id in (first, second):
                if node_id in sites:
                    index = list(sites).index(node_id)
                    del sites[node_id]
                    del shares[index]
        if len(sites) > self.profile.max_parties:
            raise RuntimeError(
                f"threshold CKKS setup: {len(sites)} sites, but the flooding is sized "
                f"for at most max_parties={self.profile.max_parties}; use a profile "
                "with a larger max_parties"
            )
        if len(sites) < self.min_sites:
            raise RuntimeError(
                f"threshold CKKS setup: {len(sites)} valid public share(s), "
                f"min_sites={self.min_sites}; see the warnings above"
            )
        self._public_key = collective_public_key(self._context, a, shares)
        self._sites = sites
        log(
            INFO,
            "[%s] setup: collective public key of key set %s from %d sites: %s",
            type(self).__name__,
            self._keyset[:8],
            len(sites),
            ", ".join(sites.values()),
        )

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Let the inner strategy build the instructions; add the public key."""
        if self._context is None:
            self.setup(grid)
        self._grid = grid
        self._manifest = Manifest.from_arrayrecord(arrays)
        announced = ConfigRecord(dict(config))
        announcement = TrainAnnouncement(
            keyset=self._keyset,
            public_key=self._public_key,
            weight_unit=self.weight_unit,
            weight_key=self.weight_key,
            num_clients=1,
        )
        announcement.write(announced)
        messages = list(
            self.strategy.configure_train(server_round, arrays, announced, grid)
        )
        for message in messages:
            records = [
                r for r in message.content.config_records.values() if KEY_OP in r
            ]
            if not records:
                raise RuntimeError(
                    f"{type(self.strategy).__name__}.configure_train did not forward "
                    "the train config to the clients; ThresholdHomomorphicAggregation "
                    "needs an inner strategy that sends the given ConfigRecord"
                )
            for record in records:
                record[KEY_NUM_CLIENTS] = max(len(messages), 1)
        if len(messages) > self.profile.max_parties:
            raise RuntimeError(
                f"round {server_round}: {len(messages)} clients sampled, but the "
                f"flooding is sized for aggregates of at most "
                f"max_parties={self.profile.max_parties} updates"
            )
        self._sampled = {int(m.metadata.dst_node_id) for m in messages}
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Sum the valid encrypted replies, decrypt the sum collectively, step."""
        started = time.perf_counter()
        replies = list(replies)
        report = self._round_report(server_round, len(replies))
        assert self._context is not None and self._manifest is not None
        total = self._residue_sum(self._manifest.size + 2, self._context.scale)

        def accept(reply: Message, node_id: int, index: int) -> tuple[Message, float]:
            try:
                weight = self._add_reply(reply, node_id, total)
            except ThresholdError as err:
                raise InvalidReplyError(node_id, str(err)) from None
            return reply, weight

        valid, _ = self._screen_replies(report, replies, self._sampled, accept)
        counts = {
            METRIC_RECEIVED: len(replies),
            METRIC_DROPPED: len(replies) - len(valid),
            METRIC_SUMMED: len(valid),
        }
        arrays = None
        why = ""
        if len(valid) < self.min_replies:
            why = (
                f"{len(valid)} valid replies, fewer than min_replies={self.min_replies}"
            )
            log(
                WARNING,
                "[%s] round %d: %d valid replies of %d, fewer than min_replies=%d: "
                "keeping the previous global model",
                type(self).__name__,
                server_round,
                len(valid),
                len(replies),
                self.min_replies,
            )
        else:
            average = self._decrypt(server_round, total.raw(), valid)
            if average is not None:
                arrays = self._step(server_round, average, valid)
            why = "the collective decryption failed or its checks did not pass"
        return report.finish(
            arrays, self._round_metrics(server_round, valid, counts, started), why
        )

    def _residue_sum(self, num_values: int, scale: float) -> ResidueSum:
        """Return an empty sum of updates of ``num_values`` values at ``scale``."""
        context = self._context
        assert context is not None
        level = CiphertextLevel.of_context(context.context, scale)
        return ResidueSum(level, max(1, math.ceil(num_values / context.n)))

    def _add_reply(self, reply: Message, node_id: int, total: ResidueSum) -> float:
        """Check a training reply and add its update to ``total``; its weight."""
        assert self._context is not None and self._manifest is not None
        _, weight = validate_metrics(reply, self.weight_key, node_id)
        records = reply.content.array_records
        if len(records) != 1:
            raise InvalidReplyError(
                node_id, f"expected one ArrayRecord, got {len(records)}"
            )
        update = decode_update(
            self._context,
            next(iter(records.values())),
            expected_values=self._manifest.size + 2,
        )
        self._add_update(update, total)
        return weight

    def _add_update(self, update: Any, total: ResidueSum) -> None:
        """Add an update's ciphertexts to ``total``: all of them, or none."""
        if update.keyset != self._keyset:
            raise ThresholdError("the update is encrypted under another key set")
        try:
            total.add(update.ciphertexts)
        except CiphertextError as err:
            raise ThresholdError(str(err)) from None

    def _who(self, node_id: int) -> str:
        """Name a node in log lines by its site name, learned at set-up."""
        return self._sites.get(node_id, f"node {node_id}")

    # ------------------------------------------------------ decryption
    def _decrypt(
        self,
        server_round: int,
        raws: list[RawCiphertext],
        valid: list[tuple[Message, float]],
    ) -> np.ndarray | None:
        """Decrypt a training round's aggregate; the checked weighted average."""
        vector = self._collective_decrypt(f"round {server_round}", raws, len(valid))
        if vector is None:
            return None
        return self._check_slots(server_round, vector, valid)

    def _collective_decrypt(
        self, label: str, raws: list[RawCiphertext], contributions: int
    ) -> np.ndarray | None:
        """Decrypt an aggregate with every key holder; ``None`` if any site fails.

        Each request carries the next decryption number (sites refuse a number
        they have passed: a replay), the number of summed contributions (sites
        refuse fewer than their policy minimum) and the chunks' ``c1``.
        """
        assert self._context is not None and self._grid is not None
        context = self._context
        c1_record = residue_record("c1", [raw.polys[1] for raw in raws])
        self._sequence += 1
        requests = [
            Message(
                content=RecordDict(
                    {
                        "c1": c1_record,
                        "config": ConfigRecord(
                            {
                                KEY_OP: OP_DECRYPT,
                                KEY_KEYSET: self._keyset,
                                KEY_ROUND: self._sequence,
                                KEY_CONTRIBUTIONS: contributions,
                            }
                        ),
                    }
                ),
                dst_node_id=node_id,
                message_type=MessageType.TRAIN,
            )
            for node_id in self._sites
        ]
        answers = list(
            self._grid.send_and_receive(requests, timeout=self.decrypt_timeout)
        )
        expected_digests = [digest(raw.polys[1]).hex() for raw in raws]
        shares: dict[int, list[np.ndarray]] = {}
        problems: list[str] = []
        for answer in answers:
            node_id = int(answer.metadata.src_node_id)
            name = self._sites.get(node_id, f"node {node_id}")
            try:
                if node_id not in self._sites:
                    raise ThresholdError("not a key holder of this run")
                if node_id in shares:
                    raise ThresholdError("a second partial decryption (replay)")
                shares[node_id] = self._check_share(answer, expected_digests)
            except ThresholdError as err:
                problems.append(f"{name}: {err}")
        missing = [self._sites[n] for n in self._sites if n not in shares]
        if missing or problems:
            details = "; ".join(
                problems + [f"{name}: no partial decryption" for name in missing]
            )
            log(
                WARNING,
                "[%s] %s: collective decryption failed (%s): keeping the "
                "previous state",
                type(self).__name__,
                label,
                details,
            )
            return None
        values = []
        for index, raw in enumerate(raws):
            partials = [
                PartialDecryption(
                    bytes.fromhex(expected_digests[index]), shares[n][index]
                )
                for n in self._sites
            ]
            slots = combine(context, raw, partials, expected_sites=len(self._sites))
            values.append(unpack(slots, context.n))
        log(
            INFO,
            "[%s] %s: aggregate of %d updates decrypted by all %d sites (%s)",
            type(self).__name__,
            label,
            contributions,
            len(self._sites),
            ", ".join(self._sites.values()),
        )
        return np.concatenate(values)

    # ------------------------------------------------------------ secure sum
    def secure_sum(
        self,
        grid: Grid,
        query: ConfigRecord,
        *,
        scale_bits: int = 75,
        timeout: float | None = None,
    ) -> tuple[MetricRecord, int] | None:
        """Sum one MetricRecord over the key holders; only the sum is decrypted.

        Sends every key holder a query carrying ``query`` (the app's own request,
        e.g. for feature statistics); ``ckks_mod`` encrypts the ClientApp's
        MetricRecord answer as one vector under the collective key. The server
        adds the vectors and decrypts the sum collectively, so it learns the sum
        and never one site's numbers (SecAgg's semantics, as for the model).

        ``scale_bits`` trades range for precision: at the default 2^75, sums up to
        about 2^44 / sites fit, with an absolute error of about 0.02 (10 sites).

        Returns the summed MetricRecord (lists stay lists) and the number of
        sites in the sum, or ``None`` (logged) if fewer than ``min_replies``
        valid answers arrive or the collective decryption fails.
        """
        if self._context is None:
            self.setup(grid)
        assert self._context is not None
        context = self._context
        self._grid = grid
        config = ConfigRecord(dict(query))
        TrainAnnouncement(
            keyset=self._keyset,
            public_key=self._public_key,
            weight_unit=1.0,
            weight_key=self.weight_key,
            num_clients=max(len(self._sites), 1),
        ).write(config)
        config[KEY_OP] = OP_SUM
        config[KEY_SCALE_BITS] = int(scale_bits)
        requests = [
            Message(
                content=RecordDict({"config": ConfigRecord(dict(config))}),
                dst_node_id=node_id,
                message_type=MessageType.QUERY,
            )
            for node_id in self._sites
        ]
        replies = list(
            grid.send_and_receive(requests, timeout=timeout or self.decrypt_timeout)
        )
        layout: list[tuple[str, int]] | None = None
        total: ResidueSum | None = None
        seen: set[int] = set()
        for reply in replies:
            node_id = int(reply.metadata.src_node_id)
            try:
                self._screen(reply, set(self._sites), seen)
                config_record = reply.content.config_records.get("config")
                record = reply.content.array_records.get("sum")
                if config_record is None or record is None:
                    raise ThresholdError("malformed secure-sum reply")
                reply_layout = read_layout(config_record.get(KEY_LAYOUT))
                if layout is not None and reply_layout != layout:
                    raise ThresholdError("its layout differs from the other sites'")
                size = layout_size(reply_layout) + 1
                update = decode_update(context, record, expected_values=size)
                # The first valid answer fixes the layout (and the sum's size,
                # bounded by read_layout and by the bytes decode_update checked).
                candidate = (
                    total
                    if total is not None
                    else self._residue_sum(size, float(2**scale_bits))
                )
                self._add_update(update, candidate)
            except (InvalidReplyError, ThresholdError) as err:
                reason = err.reason if isinstance(err, InvalidReplyError) else str(err)
                self._log_drop(0, node_id, f"secure sum: {reason}")
                continue
            layout, total = reply_layout, candidate
        count = 0 if total is None else total.count
        if total is None or count < self.min_replies or layout is None:
            log(
                WARNING,
                "[%s] secure sum: %d valid answers, fewer than min_replies=%d",
                type(self).__name__,
                count,
                self.min_replies,
            )
            return None
        vector = self._collective_decrypt("secure sum", total.raw(), count)
        if vector is None:
            return None
        size = layout_size(layout)
        if abs(float(vector[size]) - count) > 0.25:
            log(
                WARNING,
                "[%s] secure sum: count slot %.3f for %d answers: a site encrypted "
                "something else than it claims; sum discarded",
                type(self).__name__,
                float(vector[size]),
                count,
            )
            return None
        return vector_to_metrics(layout, vector[:size]), count

    def _check_share(self, answer: Message, digests: list[str]) -> list[np.ndarray]:
        assert self._context is not None
        if answer.has_error():
            raise ThresholdError(answer.error.reason)
        record = answer.content.array_records.get("shares")
        config = answer.content.config_records.get("config")
        if record is None or config is None:
            raise ThresholdError("malformed partial decryption")
        try:
            answered = json.loads(str(config.get(KEY_DIGESTS, "")))
        except (ValueError, RecursionError) as err:
            raise ThresholdError("malformed digests") from err
        if answered != digests:
            raise ThresholdError("partial decryption of another ciphertext")
        return read_residue_record(self._context, record, "h", expected=len(digests))

    def _check_slots(
        self, server_round: int, vector: np.ndarray, valid: list[tuple[Message, float]]
    ) -> np.ndarray | None:
        """Check the weight and count slots; return the weighted average."""
        assert self._manifest is not None
        size = self._manifest.size
        total_weight, count = float(vector[size]), float(vector[size + 1])
        claimed = sum(w for _, w in valid) / self.weight_unit
        problems = []
        if abs(count - len(valid)) > 0.25:
            problems.append(f"count slot {count:.3f}, {len(valid)} updates summed")
        if not (math.isfinite(total_weight) and total_weight > 0):
            problems.append(f"total weight {total_weight!r}")
        elif abs(total_weight - claimed) > 1e-3 * max(1.0, claimed):
            problems.append(
                f"total weight {total_weight:.6g}, the clients claimed {claimed:.6g}"
            )
        average = vector[:size] / total_weight if not problems else None
        if average is not None and not np.isfinite(average).all():
            problems.append("the average is not finite")
        if problems:
            log(
                WARNING,
                "[%s] round %d: the decrypted aggregate fails its check (%s): a "
                "client encrypted something other than it claimed; keeping the "
                "previous global model",
                type(self).__name__,
                server_round,
                "; ".join(problems),
            )
            return None
        return average

    def _step(
        self, server_round: int, average: np.ndarray, valid: list[tuple[Message, float]]
    ) -> ArrayRecord | None:
        assert self._manifest is not None
        return self._inner_step(
            server_round, unflatten(average, self._manifest), self._manifest,
            valid[0][0],
        )  # fmt: skip

    def _round_metrics(
        self,
        server_round: int,
        valid: list[tuple[Message, float]],
        counts: dict[str, int],
        started: float,
    ) -> MetricRecord:
        replies = [
            ValidReply(
                int(m.metadata.src_node_id),
                np.empty(0),
                w,
                next(iter(m.content.metric_records.values())),
                m,
            )
            for m, w in valid
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
            f"summed {counts[METRIC_SUMMED]} encrypted updates",
        )


def _same_secret(
    context: ThresholdContext, node_ids: list[int], shares: list[np.ndarray]
) -> list[tuple[int, int]]:
    """Pairs of sites whose public shares differ by a small polynomial.

    ``p_i - p_j = -a (s_i - s_j) + (e_i - e_j)`` is uniform unless ``s_i = s_j``,
    when it is the difference of two small errors: two sites configured with the
    same share directory would otherwise silently hold one share between them.
    """
    pairs = []
    q = context.key_moduli[0]
    coefficient_rows = {}
    for node_id, share in zip(node_ids, shares, strict=True):
        coefficient_rows[node_id] = share[:1]
    for i, first in enumerate(node_ids):
        for second in node_ids[i + 1 :]:
            difference = np.where(
                coefficient_rows[first] >= coefficient_rows[second],
                coefficient_rows[first] - coefficient_rows[second],
                coefficient_rows[first] + (np.uint64(q) - coefficient_rows[second]),
            )
            padded = np.zeros((len(context.key_moduli), context.n), dtype=np.uint64)
            padded[0] = difference[0]
            small = context.key_ntt.inverse(padded)[0]
            centred = np.where(small > np.uint64(q // 2), q - small, small)
            if int(centred.max()) < 1 << 20:
                pairs.append((first, second))
    return pairs


def _site_name(reply: Message, node_id: int) -> str:
    config = reply.content.config_records.get("config")
    name = config.get(KEY_SITE_NAME) if config is not None else None
    if isinstance(name, str) and name and name.isprintable() and len(name) <= 64:
        return name
    return f"node {node_id}"
