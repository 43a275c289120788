"""StrategyWrapper: the plumbing every flwr-ext strategy wrapper shares.

flwr-ext's defences are *wrappers* around a Flower strategy - the pattern of
Flower's ``DifferentialPrivacyServerSideFixedClipping(strategy)`` and its
``…FixedClippingBase`` - so they compose with FedAvg, FedProx, FedAdam... This
base holds, once, what every wrapper needs around the part that makes it
different:

- **Composition** (:mod:`.composition`): the wrapper's :class:`~.composition.Role`
  is checked against the chain it wraps, at construction.
- **The inner strategy's keys**: ``weight_key`` (Flower's ``weighted_by_key``,
  default ``num-examples``) and ``arrayrecord_key`` (default ``arrays``), read once.
- **Reply screening, one policy** (:meth:`StrategyWrapper._screen_replies`). Every
  train reply goes through the same checks, in this order, before any wrapper
  looks at its content:

  1. the sender was sampled this round (when the sample is known; an error
     reply from outside the sample is the SuperLink answering for a sampled
     node that went away, and says so);
  2. it is the sender's first reply this round (Flower sends one instruction per
     node; a second reply is dropped, the first one kept);
  3. it is not an error reply (the ClientApp failed);
  4. its content passes the wrapper's own validation (shapes, finiteness,
     weights, ciphertext checks...), written by the wrapper.

  Each rejection is one WARNING naming the node and the reason, and an
  :class:`~flwr_ext.records.InvalidReplyError`. Only step 4 *proves* the sender
  faulty (``proves_faulty=True``): an honest node can fail (3), and a reply from
  an unsampled node or a second reply (1, 2) says nothing about the rows that
  were accepted - the node is either outside the sample or already counted in
  it - so rejections 1-3 carry ``proves_faulty=False``. Robust rules lower
  ``f`` by the proven ones only (:class:`~.robust.RobustAggregation`).
- **The synthetic-reply inner step** (:meth:`StrategyWrapper._inner_step`): the
  wrapper's aggregate goes to the inner strategy as one reply of weight 1, so its
  own server step (FedAdam, FedAvgM...) runs on it; the result is conformed to the
  global model's manifest (:func:`~flwr_ext.records.conform_to_manifest`).
- **Client-metric aggregation** (:meth:`StrategyWrapper._aggregate_client_metrics`)
  with the weights the wrapper trusts, through the inner strategy's
  ``*_metrics_aggr_fn``; a client's metrics never crash the server.
- **Evaluate delegation**: evaluation replies are screened (error replies,
  malformed metrics) and the valid ones handed to the inner strategy.
- **Fail loudly** (:mod:`.round_report`): every rejection is recorded in the
  round's :class:`~.round_report.RoundReport` by the screening itself, so a
  round that aggregates nothing says why, a configuration error stops the run
  and a run that trained nothing fails (:class:`~.round_report.RoundReporting`).
- **Round counters**: ``<prefix>-received``, ``-dropped`` and the seconds the
  wrapper spent, in the round's MetricRecord and one INFO line.
- **The summary header**: the wrapper's title and lines, then the inner
  strategy's summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from copy import copy
from logging import INFO, WARNING
from typing import ClassVar, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from .._flower import message_with_metadata
from ..records import (
    InvalidReplyError,
    Manifest,
    ValidReply,
    aggregate_client_metrics,
    check_no_error,
    conform_to_manifest,
    node_of,
    validate_evaluate_replies,
)
from .composition import Role, check_composition
from .round_report import RoundReport, RoundReporting

__all__ = ["StrategyWrapper", "inner_keys"]

T = TypeVar("T")

#: A wrapper's content validation of one screened reply: ``(reply, node_id,
#: index)`` -> what the wrapper keeps of it (``index``: replies accepted so far).
#: It raises :class:`~flwr_ext.records.InvalidReplyError` to drop the reply.
Accept = Callable[[Message, int, int], T]


def inner_keys(strategy: Strategy) -> tuple[str, str]:
    """Return the inner strategy's ``(weight_key, arrayrecord_key)``.

    Flower's strategies name the reply metric that weighs a client
    (``weighted_by_key``) and the ArrayRecord holding the model
    (``arrayrecord_key``); a strategy without them gets Flower's defaults.
    """
    weight_key = getattr(strategy, "weighted_by_key", "num-examples")
    arrayrecord_key = getattr(strategy, "arrayrecord_key", "arrays")
    return str(weight_key), str(arrayrecord_key)


class StrategyWrapper(RoundReporting):
    """Base of flwr-ext's strategy wrappers (see the module docstring).

    Parameters
    ----------
    strategy : Strategy
        The Flower strategy whose sampling, configuration, server step and
        evaluation the wrapper keeps.

    Raises
    ------
    TypeError, ValueError
        From :func:`~.composition.check_composition`: ``strategy`` is not a
        Flower strategy, or the chain would be unsound.
    """

    #: What the wrapper does (set by each subclass).
    flwr_ext_role: ClassVar[Role]
    #: Title of the wrapper's block in :meth:`summary`.
    summary_title: ClassVar[str] = "flwr-ext wrapper"

    def __init__(self, strategy: Strategy) -> None:
        check_composition(type(self).__name__, self.flwr_ext_role, strategy)
        self.strategy = strategy
        self.weight_key, self.arrayrecord_key = inner_keys(strategy)

    @property
    def name(self) -> str:
        """The wrapper's name in log lines (its class name)."""
        return type(self).__name__

    # --------------------------------------------------------------- summary
    def summary_lines(self) -> list[str]:
        """Lines describing this wrapper's configuration (for :meth:`summary`)."""
        return []

    def summary(self) -> None:
        """Log the wrapper's configuration, then the inner strategy's."""
        log(INFO, "\t├──> %s:", self.summary_title)
        lines = self.summary_lines()
        for i, line in enumerate(lines):
            log(INFO, "\t│\t%s── %s", "└" if i == len(lines) - 1 else "├", line)
        log(INFO, "\t├──> Inner strategy: %s", type(self.strategy).__name__)
        self.strategy.summary()

    # ------------------------------------------------------------- screening
    def _who(self, node_id: int) -> str:
        """Name a node in log lines (a wrapper that knows site names says so)."""
        return f"node {node_id}"

    def _log_drop(
        self, server_round: int, node_id: int, reason: str, phase: str = ""
    ) -> None:
        log(
            WARNING,
            "[%s] round %d: dropped %sreply from %s: %s",
            self.name,
            server_round,
            f"{phase} " if phase else "",
            self._who(node_id),
            reason[:500],
        )

    @staticmethod
    def _screen(reply: Message, sampled: set[int] | None, seen: set[int]) -> int:
        """Apply steps 1-3 of the screening policy; return the sender's node id.

        Error reasons are the client's (or the SuperLink's) text: they are quoted
        on one line, bounded (:func:`~flwr_ext.records.check_no_error`).
        """
        node_id = node_of(reply)
        if sampled is not None and node_id not in sampled:
            if reply.has_error():  # the SuperLink (node 1) answers for a lost node
                try:
                    check_no_error(reply, node_id)
                except InvalidReplyError as err:
                    raise InvalidReplyError(
                        node_id,
                        "the SuperLink's reply for a sampled node that is "
                        f"unavailable (no heartbeat): {err.reason}",
                        proves_faulty=False,
                    ) from None
            raise InvalidReplyError(
                node_id, "node was not sampled in this round", proves_faulty=False
            )
        if node_id in seen:
            raise InvalidReplyError(
                node_id, "second reply from the same node", proves_faulty=False
            )
        seen.add(node_id)
        check_no_error(reply, node_id)  # proves_faulty=False: a ClientApp can crash
        return node_id

    def _screen_replies(
        self,
        report: RoundReport,
        replies: Iterable[Message],
        sampled: set[int] | None,
        accept: Accept[T],
    ) -> tuple[list[T], list[InvalidReplyError]]:
        """Screen train replies with the one policy; validate content with ``accept``.

        Parameters
        ----------
        report : RoundReport
            The round's report (:meth:`_round_report`): every rejection is
            recorded in it, with the reason logged.
        replies : iterable of Message
            The round's replies.
        sampled : set of int or None
            Node ids the round's instructions went to; None when unknown (then
            step 1 is skipped).
        accept : callable
            ``(reply, node_id, index) -> kept``: the wrapper's content validation
            (step 4). Raises :class:`~flwr_ext.records.InvalidReplyError` to drop.

        Returns
        -------
        tuple
            What ``accept`` returned for each valid reply, in order, and the
            rejections.
        """
        valid: list[T] = []
        dropped: list[InvalidReplyError] = []
        seen: set[int] = set()
        for reply in replies:
            try:
                node_id = self._screen(reply, sampled, seen)
                valid.append(accept(reply, node_id, len(valid)))
            except InvalidReplyError as err:
                dropped.append(err)
                report.drop(err.reason)
                self._log_drop(report.server_round, err.node_id, err.reason)
        return valid, dropped

    # ------------------------------------------------------------ inner step
    def _inner_step(
        self,
        server_round: int,
        aggregate: ArrayRecord,
        manifest: Manifest,
        template: Message | None,
    ) -> ArrayRecord | None:
        """Hand the inner strategy one reply carrying ``aggregate``, weight 1.

        The synthetic reply copies ``template``'s metadata (a real reply or
        instruction of the round; a bare train message when there is none), so
        Flower's reply checks pass. The inner strategy's result is conformed to
        ``manifest`` (its keys, shapes and dtypes; finite). None keeps the
        previous global model; the caller's :meth:`RoundReport.finish` says so.
        """
        content = RecordDict(
            {
                self.arrayrecord_key: aggregate,
                "metrics": MetricRecord({self.weight_key: 1}),
            }
        )
        if template is not None:
            synthetic = message_with_metadata(content, copy(template.metadata))
        else:
            synthetic = Message(
                content=content, dst_node_id=0, message_type=MessageType.TRAIN
            )
        arrays, _ = self.strategy.aggregate_train(server_round, [synthetic])
        if arrays is None:
            return None
        return conform_to_manifest(arrays, manifest, self.name, server_round)

    # -------------------------------------------------------------- counters
    def _add_counters(
        self,
        server_round: int,
        metrics: MetricRecord,
        counts: dict[str, int],
        seconds_key: str,
        started: float,
        outcome: str,
        *,
        note: str = "",
    ) -> MetricRecord:
        """Add the round's counters and seconds to ``metrics``; log one line.

        ``counts`` holds ``<prefix>-received`` and ``<prefix>-dropped`` first,
        then the wrapper's own counters; ``outcome`` says what was aggregated
        (e.g. "selected 4"); ``note`` ends the line.
        """
        for key, value in counts.items():
            metrics[key] = value
        seconds = time.perf_counter() - started
        metrics[seconds_key] = seconds
        received, dropped = list(counts.values())[:2]
        log(
            INFO,
            "[%s] round %d: received %d, dropped %d, %s in %.3f s%s",
            self.name,
            server_round,
            received,
            dropped,
            outcome,
            seconds,
            note,
        )
        return metrics

    # --------------------------------------------------------------- metrics
    def _aggregate_client_metrics(
        self,
        server_round: int,
        valid: Sequence[ValidReply],
        weights: Sequence[float],
        phase: str = "train",
    ) -> MetricRecord:
        """Aggregate clients' metrics with the weights the wrapper trusts.

        Through the inner strategy's ``<phase>_metrics_aggr_fn`` (Flower's
        weighted mean when it has none) and
        :func:`~flwr_ext.records.aggregate_client_metrics`: replies whose metric
        keys differ from the round's most common set are left out, and a failing
        function costs only the round's client metrics, never the run.
        """
        return aggregate_client_metrics(
            list(valid),
            weights,
            self.weight_key,
            getattr(self.strategy, f"{phase}_metrics_aggr_fn", None),
            self.name,
            server_round,
        )

    # -------------------------------------------------------------- evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to the inner strategy."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def _evaluate_weights(self, valid: list[ValidReply]) -> list[float]:
        """Weights of the evaluation replies' metrics (the claims, by default)."""
        return [reply.weight for reply in valid]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Drop malformed evaluation replies; aggregate with the inner's function.

        The replies are screened by :func:`~flwr_ext.records.validate_evaluate_replies`
        (error replies, malformed or non-finite metrics) and aggregated here with
        the inner strategy's ``evaluate_metrics_aggr_fn``, not handed to its
        ``aggregate_evaluate``: Flower's raises on one inconsistent reply.
        """
        valid = validate_evaluate_replies(
            replies, self.weight_key, self.name, server_round
        )
        if not valid:
            return None
        return self._aggregate_client_metrics(
            server_round, valid, self._evaluate_weights(valid), "evaluate"
        )
