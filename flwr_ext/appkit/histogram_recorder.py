"""HistogramRecordingGrid: a RecordingGrid that also keeps sites' histograms.

:class:`~flwr_ext.appkit.recorder.RecordingGrid` keeps every site's *scalar*
metrics per round and leaves list values out (they would flood ``metrics.json``).
Some results need a site's list values after the run: its score histograms, to
draw its precision-recall curve or to compute its precision at a threshold the
server chose from everyone's validation histograms
(:mod:`flwr_ext.appkit.thresholds`). This subclass keeps the list values of the
keys it is given, per phase, round and node, in :attr:`lists`; everything else
is :class:`RecordingGrid`'s behaviour, unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from flwr.app import Message
from flwr.serverapp import Grid

from .recorder import RecordingGrid

__all__ = ["HistogramRecordingGrid"]


class HistogramRecordingGrid(RecordingGrid):
    """A RecordingGrid that keeps the list metrics named in ``keys``.

    Parameters
    ----------
    grid : Grid
        The grid the ServerApp was given.
    keys : sequence of str
        MetricRecord keys whose list values to keep (e.g. ``"hist-pos"``).

    Attributes
    ----------
    lists : dict[str, dict[int, dict[int, dict[str, list]]]]
        Phase -> round -> node id -> key -> the reply's list (ints or floats).
        Rounds and phases are those of :attr:`RecordingGrid.phases`.
    """

    def __init__(self, grid: Grid, keys: Sequence[str]) -> None:
        super().__init__(grid)
        self.keys = tuple(keys)
        self.lists: dict[str, dict[int, dict[int, dict[str, list]]]] = {}

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send and receive as RecordingGrid does; keep the named list values."""
        messages = list(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        if not messages:
            return replies
        phase = str(messages[0].metadata.message_type).split(".", 1)[0]
        server_round = _server_round(messages[0])
        kept = self.lists.setdefault(phase, {}).setdefault(server_round, {})
        for reply in replies:
            if reply.has_error():
                continue
            values: dict[str, list] = {}
            for record in reply.content.metric_records.values():
                for key in self.keys:
                    value = record.get(key)
                    if isinstance(value, list):
                        values[key] = list(value)
            if values:
                kept[int(reply.metadata.src_node_id)] = values
        return replies

    def node_lists(self, phase: str, server_round: int) -> dict[int, dict[str, list]]:
        """Return node id -> kept lists of one phase and round (empty if none)."""
        return dict(self.lists.get(phase, {}).get(server_round, {}))


def _server_round(message: Message) -> int:
    """Return an instruction's ``server-round`` (0 if absent), as RecordingGrid."""
    for record in message.content.config_records.values():
        value = record.get("server-round")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0
