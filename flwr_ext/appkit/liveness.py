"""Waiting for sites with a deadline: a run never waits for ever.

Flower's strategies sample nodes with ``sample_nodes(grid, min_available_nodes,
...)``, which polls ``grid.get_node_ids()`` once a second, **without a
deadline**, until ``min_available_nodes`` are connected. One crashed SuperNode in
a consortium of exactly ``min-nodes`` sites therefore stalls the run for ever
("Waiting for nodes to connect: 2 connected (minimum required: 3)." every
second). :class:`DeadlineGrid` wraps the ServerApp's grid so that
``get_node_ids()`` does the waiting instead, with a deadline, and Flower's loop
never spins:

- it waits for every site the run has seen so far (at the start: for
  ``min_nodes`` sites), polling once a second, for at most ``wait_s`` seconds
  per phase (run config ``node-wait-timeout``);
- past the deadline, if at least ``min_nodes`` sites are connected (the
  consortium's stated minimum, run config ``min-nodes``), it logs one WARNING
  naming the missing sites and the round goes on with the others; a missing site
  that reconnects later (same node id with SuperNode authentication, or a new
  one) is sampled again from the next phase on;
- otherwise it raises :class:`SitesUnavailableError`, whose one-line message
  names the missing sites and the minimum, and the ServerApp records the failed
  run (:mod:`flwr_ext.appkit.failure`).

The deadline is per phase: a ``send_and_receive`` call (one phase of one round)
resets it, so a site that stays away costs each later phase at most ``wait_s``
seconds, and only until the SuperLink stops listing it.

It forwards everything else to the wrapped grid (a
:class:`~flwr_ext.appkit.recorder.RecordingGrid`, whose site names it uses).

A second gap: a SuperNode killed while it computes a reply and restarted with the
same node key is the *same* node to the SuperLink. Flower's SuperLink answers
"Node Unavailable" for a lost reply only if it notices the node offline when the
ServerApp polls; a node restarted quickly is online again by then, and the
round waits the whole ``round-timeout`` (600 s by default) for a reply that
will never come. :class:`RestartAwareGrid`, under the recording grid, polls
itself and answers for such a node at once: when the SuperLink's node list
(``Grid.get_nodes()``) shows that a node with a pending reply was *activated
again* after the instruction was sent, its reply is lost, and the round goes on
with an error reply "restarted while its reply was pending" for it. The site
takes part again from the next phase::

    recording = RecordingGrid(RestartAwareGrid(grid))
    grid = DeadlineGrid(recording, min_nodes=2, wait_s=120.0)
    result = strategy.start(grid=grid, ...)
    history = round_history(recording, result)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore import log

from .forwarding_grid import ForwardingGrid

__all__ = ["DeadlineGrid", "RestartAwareGrid", "SitesUnavailableError"]

#: Error reason of a reply lost to a SuperNode restart.
RESTARTED_REASON = (
    "Error: Node Unavailable - the SuperNode restarted while its reply was pending; "
    "the reply is lost (the site takes part again from the next phase)"
)


class SitesUnavailableError(RuntimeError):
    """Fewer than the consortium's minimum of sites are connected past the deadline.

    Attributes
    ----------
    missing : list[str]
        Labels of the sites the run had seen and that are not connected.
    """

    def __init__(self, message: str, missing: list[str]) -> None:
        super().__init__(message)
        self.missing = missing


class DeadlineGrid(ForwardingGrid):
    """A Grid whose ``get_node_ids()`` waits for sites with a deadline.

    Parameters
    ----------
    grid : Grid
        The grid to forward to (usually a ``RecordingGrid``: its ``label(node_id)``
        names sites in the log).
    min_nodes : int
        The fewest connected sites the run may go on with (run config
        ``min-nodes``).
    wait_s : float
        Seconds one phase waits for missing sites (run config
        ``node-wait-timeout``).
    clock, sleep : callables
        ``time.monotonic`` and ``time.sleep``; replaceable in tests.
    """

    def __init__(
        self,
        grid: Grid,
        *,
        min_nodes: int,
        wait_s: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if min_nodes < 1:
            raise ValueError(f"min_nodes must be >= 1, got {min_nodes}")
        if not wait_s > 0:
            raise ValueError(f"wait_s must be > 0, got {wait_s}")
        super().__init__(grid)
        self.min_nodes = int(min_nodes)
        self.wait_s = float(wait_s)
        self._clock = clock
        self._sleep = sleep
        self.known: set[int] = set()
        self._deadline: float | None = None
        self._given_up: set[int] = set()

    # ------------------------------------------------------------- names
    def label(self, node_id: int) -> str:
        """Return ``"node 12 (st-marys)"``: the wrapped grid's ``label`` if any."""
        label = getattr(self.grid, "label", None)
        return label(node_id) if callable(label) else f"node {node_id}"

    # ------------------------------------------------------------- waiting
    def get_node_ids(self) -> Iterable[int]:
        """Return the connected node ids, after waiting for missing sites.

        Raises
        ------
        SitesUnavailableError
            Past the deadline with fewer than ``min_nodes`` sites connected.
        """
        announced = False
        while True:
            connected = sorted(int(n) for n in self.grid.get_node_ids())
            self.known.update(connected)
            self._given_up -= set(connected)  # back again: wait for it next time
            awaited = self.known - self._given_up
            missing = sorted(awaited - set(connected))
            if len(connected) >= self.min_nodes and not missing:
                return connected
            now = self._clock()
            if self._deadline is None:
                self._deadline = now + self.wait_s
            if now >= self._deadline:
                return self._past_deadline(connected, missing)
            if not announced:
                log(
                    INFO,
                    "waiting up to %.0f s for %s: %d site(s) connected, min-nodes=%d",
                    self._deadline - now,
                    ", ".join(self.label(n) for n in missing)
                    or f"{self.min_nodes - len(connected)} more site(s)",
                    len(connected),
                    self.min_nodes,
                )
                announced = True
            self._sleep(1.0)

    def _past_deadline(self, connected: list[int], missing: list[int]) -> list[int]:
        names = [self.label(n) for n in missing]
        if len(connected) >= self.min_nodes:
            log(
                WARNING,
                "%s not connected after %.0f s (node-wait-timeout): going on "
                "with %d site(s) (min-nodes=%d)",
                ", ".join(names),
                self.wait_s,
                len(connected),
                self.min_nodes,
            )
            self._given_up.update(missing)
            return connected
        unseen = self.min_nodes - len(connected) - len(missing)
        parts = names + ([f"{unseen} site(s) never connected"] if unseen > 0 else [])
        raise SitesUnavailableError(
            f"only {len(connected)} site(s) connected after {self.wait_s:.0f} s "
            f"(node-wait-timeout), min-nodes={self.min_nodes}; missing: "
            f"{', '.join(parts)}",
            names,
        )

    # ------------------------------------------------------- forwarding
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Forward; a new phase gets a fresh deadline."""
        self._deadline = None
        return self.grid.send_and_receive(messages, timeout=timeout)


class RestartAwareGrid(ForwardingGrid):
    """A Grid whose ``send_and_receive`` answers for nodes that restarted meanwhile.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid. Without ``get_nodes()`` (the in-process and
        simulation grids) ``send_and_receive`` is simply forwarded.
    poll_s : float (default: 3.0)
        Longest pause between two polls for replies (Flower's deployment grid
        polls every 3 s); the pause starts at 0.1 s and doubles up to it, so
        fast replies (simulation) are not delayed.
    clock, sleep : callables
        ``time.monotonic`` and ``time.sleep``; replaceable in tests.
    """

    def __init__(
        self,
        grid: Grid,
        *,
        poll_s: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(grid)
        self.poll_s = float(poll_s)
        self._clock = clock
        self._sleep = sleep

    def _activations(self) -> dict[int, str] | None:
        """Node id -> when the SuperLink last activated it; None if unknown.

        Only the Deployment Engine's grid reports activation times; for any
        other grid (in-process, simulation) this is None and
        ``send_and_receive`` is forwarded unchanged.
        """
        get_nodes = getattr(self.grid, "get_nodes", None)
        if not callable(get_nodes):
            return None
        stamps = {
            int(node.node_id): str(getattr(node, "last_activated_at", "") or "")
            for node in get_nodes()
        }
        return stamps if any(stamps.values()) else None

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull until every reply is in, lost to a restart, or late."""
        before = self._activations()
        if before is None:
            return self.grid.send_and_receive(messages, timeout=timeout)
        messages = list(messages)
        ids = list(self.grid.push_messages(messages))
        sent = {m.metadata.message_id: m for m in messages}
        pending = set(ids)
        end = None if timeout is None else self._clock() + timeout
        replies: list[Message] = []
        pause = min(0.1, self.poll_s)
        while pending:
            arrived = list(self.grid.pull_messages(pending))
            replies.extend(arrived)
            pending -= {m.metadata.reply_to_message_id for m in arrived}
            if not pending or (end is not None and self._clock() >= end):
                break
            now = self._activations() or before
            for message_id in sorted(pending):
                original = sent.get(message_id)
                if original is None:
                    continue
                node_id = int(original.metadata.dst_node_id)
                if node_id in now and now[node_id] != before.get(node_id):
                    log(
                        WARNING,
                        "node %d restarted while its %s reply was pending: that "
                        "reply is lost; it takes part again from the next phase",
                        node_id,
                        str(original.metadata.message_type).split(".", 1)[0],
                    )
                    reason = RESTARTED_REASON
                    error = Error(code=ErrorCode.NODE_UNAVAILABLE, reason=reason)
                    replies.append(Message(error, reply_to=original))
                    pending.discard(message_id)
            if pending:
                wait = pause
                if end is not None:
                    wait = max(0.0, min(wait, end - self._clock()))
                self._sleep(wait)
                pause = min(2 * pause, self.poll_s)
        return replies
