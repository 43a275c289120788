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
:class:`~flwr_ext.appkit.recorder.RecordingGrid`, whose site names it uses)::

    recording = RecordingGrid(grid)
    grid = DeadlineGrid(recording, min_nodes=2, wait_s=120.0)
    result = strategy.start(grid=grid, ...)
    history = round_history(recording, result)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log
from flwr.supercore.run import Run

__all__ = ["DeadlineGrid", "SitesUnavailableError"]


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


class DeadlineGrid(Grid):
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
        self.grid = grid
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

    def set_run(self, run: Run) -> None:
        """Forward to the wrapped grid."""
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        """The wrapped grid's run."""
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Forward to the wrapped grid."""
        return self.grid.create_message(
            content, message_type, dst_node_id, group_id, ttl
        )

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Forward to the wrapped grid."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Forward to the wrapped grid."""
        return self.grid.pull_messages(message_ids)
