"""A Flower ``Grid`` that forwards every call to the grid it wraps.

The apps wrap the ServerApp's grid to add behaviour to a few calls (recording
per-site metrics, a deadline on waiting for sites, answering for restarted
nodes); everything else must reach the real grid unchanged. This base forwards
all of Flower's ``Grid`` API once, so each wrapper overrides only what it adds.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

__all__ = ["ForwardingGrid"]


class ForwardingGrid(Grid):
    """Forward every ``Grid`` call to ``grid``.

    Parameters
    ----------
    grid : Grid
        The grid being wrapped (kept as ``self.grid``).
    """

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

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

    def get_node_ids(self) -> Iterable[int]:
        """Forward to the wrapped grid."""
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Forward to the wrapped grid."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Forward to the wrapped grid."""
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Forward to the wrapped grid."""
        return self.grid.send_and_receive(messages, timeout=timeout)
