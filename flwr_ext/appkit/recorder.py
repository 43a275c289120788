"""RecordingGrid: keep every site's metrics per round, and name sites that drop out.

Flower's ``Strategy.start()`` keeps only the *aggregated* metrics of each round. A
consortium also wants each site's own numbers (is the federated model good at *my*
hospital?) and to know which site failed to answer. :class:`RecordingGrid` wraps
the :class:`~flwr.serverapp.Grid` the ServerApp receives - not the strategy - so
every strategy (Flower's, flwr-ext's robust, DP and homomorphic wrappers, with
their own ``start()`` overrides) runs exactly as it would without it::

    grid = RecordingGrid(grid)
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=5)
    history = round_history(grid, result)   # flwr_ext.appkit.results

For each ``send_and_receive`` call it:

- notes the phase (the message type: ``train``, ``evaluate``, ``query``) and the
  round (``server-round`` in the instructions' config), and where they went;
- records every reply's scalar metrics by node and how long the phase took;
  list values (histograms) are left out of :attr:`RecordingGrid.phases` - they
  would flood ``metrics.json`` - and kept apart, in :attr:`RecordingGrid.lists`,
  only for the keys named in ``keep_lists`` (e.g. the bank app's score
  histograms, for per-site curves and thresholds after the run);
- logs one WARNING per node that replied with an error or did not reply within the
  timeout, naming the node id and, once known, the site's name;
- learns site names from a ``ConfigRecord`` named ``"site"`` (key ``"name"``) that
  ClientApps may add to their replies (:func:`site_record`), and from error
  replies whose reason starts with ``site '<name>': ``
  (:mod:`flwr_ext.appkit.site_errors`). Names come from clients, so they are
  sanitised and made unique;
- hands the strategy an error reply that the SuperLink wrote for an unavailable
  node ("Node Unavailable", sent under the SuperLink's own node id) as a reply
  from the node the instruction was for, so every log line names the real node;
- logs one INFO line per phase with its own counts (sampled, replied, errors,
  missing), next to Flower's "Received N results and M failures".
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.supercore import log

from .forwarding_grid import ForwardingGrid
from .site_errors import site_from_reason

__all__ = ["SITE_RECORD_KEY", "PhaseRecord", "RecordingGrid", "site_record"]

#: Name of the ConfigRecord in which a ClientApp reports its site name.
SITE_RECORD_KEY = "site"
_MAX_NAME = 64


def site_record(name: str) -> ConfigRecord:
    """Return the ConfigRecord a ClientApp adds to a reply to name its site."""
    return ConfigRecord({"name": str(name)})


@dataclass
class PhaseRecord:
    """What happened in one phase (train, evaluate, query) of one round.

    Attributes
    ----------
    sampled : list[int]
        Node ids the instructions went to.
    per_node : dict[int, dict[str, float]]
        Scalar metrics of each node's reply.
    failed : dict[int, str]
        Nodes that replied with an error, and the reason.
    missing : list[int]
        Nodes that sent no reply before the timeout.
    seconds : float
        Wall time of the ``send_and_receive`` call.
    """

    sampled: list[int] = field(default_factory=list)
    per_node: dict[int, dict[str, float]] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)
    seconds: float = math.nan


class RecordingGrid(ForwardingGrid):
    """A Grid that forwards everything to ``grid`` and records what comes back.

    Parameters
    ----------
    grid : Grid
        The grid the ServerApp was given.
    keep_lists : sequence of str, optional
        MetricRecord keys whose list values to keep in :attr:`lists`.

    Attributes
    ----------
    phases : dict[str, dict[int, PhaseRecord]]
        Phase (message type) -> round -> record. Messages without a
        ``server-round`` (e.g. a query before training) are round 0.
    site_names : dict[int, str]
        Node id -> site name reported by the site.
    lists : dict[str, dict[int, dict[int, dict[str, list]]]]
        Phase -> round -> node id -> key -> the reply's list, for the keys in
        ``keep_lists`` (successful replies only).
    """

    def __init__(self, grid: Grid, *, keep_lists: Sequence[str] = ()) -> None:
        super().__init__(grid)
        self.keep_lists = tuple(keep_lists)
        self.phases: dict[str, dict[int, PhaseRecord]] = {}
        self.site_names: dict[int, str] = {}
        self.lists: dict[str, dict[int, dict[int, dict[str, list]]]] = {}

    # --------------------------------------------------------------- Grid API
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send, receive, and record the replies per node."""
        messages = list(messages)
        if not messages:
            return self.grid.send_and_receive(messages, timeout=timeout)
        phase = _phase(messages[0])
        server_round = _round(messages[0])
        record = self.phases.setdefault(phase, {}).setdefault(
            server_round, PhaseRecord()
        )
        record.sampled = sorted(int(m.metadata.dst_node_id) for m in messages)
        started = time.perf_counter()
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        record.seconds = time.perf_counter() - started
        # Message ids are assigned when the grid pushes the messages.
        destinations = {
            m.metadata.message_id: int(m.metadata.dst_node_id) for m in messages
        }
        replies = _from_real_nodes(
            replies, {m.metadata.message_id: m for m in messages}
        )
        self._record(phase, server_round, record, replies, timeout, destinations)
        return replies

    # ----------------------------------------------------------------- naming
    def label(self, node_id: int) -> str:
        """Return ``"node 123 (hospital-2)"``, or ``"node 123"`` if no name is known."""
        name = self.site_names.get(node_id)
        return f"node {node_id} ({name})" if name else f"node {node_id}"

    def site_of(self, node_id: int) -> str:
        """Return the site's name, or ``"node-<id>"`` if it never sent one."""
        return self.site_names.get(node_id, f"node-{node_id}")

    def _learn_name(self, reply: Message) -> None:
        if reply.has_error():
            raw: object = site_from_reason(str(reply.error.reason))
        else:
            record = reply.content.config_records.get(SITE_RECORD_KEY)
            raw = None if record is None else record.get("name")
        if not isinstance(raw, str):
            return
        name = re.sub(r"[^A-Za-z0-9_.@ -]", "_", raw.strip())[:_MAX_NAME]
        if not name:
            return
        node_id = int(reply.metadata.src_node_id)
        taken = {n for other, n in self.site_names.items() if other != node_id}
        self.site_names[node_id] = f"{name}@{node_id}" if name in taken else name

    # ---------------------------------------------------------------- records
    def _record(
        self,
        phase: str,
        server_round: int,
        record: PhaseRecord,
        replies: list[Message],
        timeout: float | None,
        destinations: dict[str, int],
    ) -> None:
        replied: set[int] = set()
        for reply in replies:
            # An error the SuperLink writes for an unreachable node (heartbeat
            # expired) comes from the SuperLink itself: attribute it to the node
            # the instruction was for.
            node_id = destinations.get(
                reply.metadata.reply_to_message_id, int(reply.metadata.src_node_id)
            )
            replied.add(node_id)
            if reply.has_error():
                if node_id == int(reply.metadata.src_node_id):
                    self._learn_name(reply)
                record.failed[node_id] = str(reply.error.reason)
                continue
            self._learn_name(reply)
            scalars: dict[str, float] = {}
            lists: dict[str, list] = {}
            for metrics in reply.content.metric_records.values():
                for key, value in metrics.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        scalars[key] = float(value)
                    elif isinstance(value, list) and key in self.keep_lists:
                        lists[key] = list(value)
            record.per_node[node_id] = scalars
            if lists:
                kept = self.lists.setdefault(phase, {}).setdefault(server_round, {})
                kept[node_id] = lists
        record.missing = [n for n in record.sampled if n not in replied]
        failed = len(record.failed) + len(record.missing)
        log(
            INFO,
            "round %d %s: %d site(s) sampled, %d replied, %d with an error, %d "
            "missing%s",
            server_round,
            phase,
            len(record.sampled),
            len(replied) - len(record.failed),
            len(record.failed),
            len(record.missing),
            " (Flower's 'Received N results and M failures' counts only what "
            "reached the strategy: a missing site is in neither number, and a "
            "wrapper may already have dropped an error reply)"
            if failed
            else "",
        )
        for node_id, reason in record.failed.items():
            log(
                WARNING,
                "round %d %s: %s replied with an error: %s",
                server_round,
                phase,
                self.label(node_id),
                reason,
            )
        for node_id in record.missing:
            log(
                WARNING,
                "round %d %s: %s sent no reply within %s; it dropped out or is too "
                "slow, and the round goes on without it",
                server_round,
                phase,
                self.label(node_id),
                "the timeout" if timeout is None else f"{timeout:.0f} s",
            )

    def node_lists(self, phase: str, server_round: int) -> dict[int, dict[str, list]]:
        """Return node id -> kept lists of one phase and round (empty if none)."""
        return dict(self.lists.get(phase, {}).get(server_round, {}))

    def dropouts(self) -> list[dict[str, object]]:
        """Every failed or missing reply: round, phase, node id, site, reason."""
        events = []
        for phase, rounds in self.phases.items():
            for server_round, record in sorted(rounds.items()):
                for node_id, reason in sorted(record.failed.items()):
                    events.append(
                        {"round": server_round, "phase": phase, "node-id": node_id,
                         "site": self.site_of(node_id), "reason": reason}
                    )  # fmt: skip
                for node_id in record.missing:
                    events.append(
                        {"round": server_round, "phase": phase, "node-id": node_id,
                         "site": self.site_of(node_id),
                         "reason": "no reply before the timeout"}
                    )  # fmt: skip
        return sorted(events, key=lambda e: (e["round"], str(e["phase"])))


def _from_real_nodes(replies: list[Message], sent: dict[str, Message]) -> list[Message]:
    """Re-address the SuperLink's "Node Unavailable" replies to the real node.

    The SuperLink answers for a node whose heartbeats stopped with an error
    reply under its *own* node id; strategies then log a reply "from node 1".
    Such a reply is rebuilt as an error reply to the original instruction, so
    it comes from the node the instruction was for.
    """
    fixed = []
    for reply in replies:
        original = sent.get(reply.metadata.reply_to_message_id)
        if (
            reply.has_error()
            and original is not None
            and int(reply.metadata.src_node_id) != int(original.metadata.dst_node_id)
        ):
            reply = Message(reply.error, reply_to=original)
        fixed.append(reply)
    return fixed


def _phase(message: Message) -> str:
    return str(message.metadata.message_type).split(".", 1)[0]


def _round(message: Message) -> int:
    for record in message.content.config_records.values():
        value = record.get("server-round")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0
