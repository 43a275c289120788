"""An in-process federation: a Flower ``Grid`` whose nodes are Python callables.

This drives *real* Flower strategies through their real ``start()`` loop and real
``ClientApp`` objects (mods included) without Ray, SuperLink or SuperNodes, so a
benchmark can run thousands of rounds and a unit test can exercise a strategy with
real :class:`~flwr.app.Message` objects in milliseconds. It is a test and benchmark
harness; production runs use Flower's Simulation or Deployment Engine.

Fidelity: every message crosses the "wire" through Flower's protobuf serialisation
(``recorddict_to_proto`` and back), so a node never shares an object with the
server - exactly as in a deployment, where a client that mutates its incoming
message cannot touch the server's copy. Each node keeps one :class:`Context` for
the whole run (``context.state`` persists across rounds, as on a SuperNode). A
handler that raises produces an error reply, as Flower's ClientApp runtime does; a
node marked offline produces no reply at all (a dropout).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from copy import copy

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from ._flower import message_with_metadata

__all__ = ["InProcessGrid", "NodeHandler", "SERVER_NODE_ID"]

#: A node: anything called like a ClientApp, ``handler(message, context) -> reply``.
NodeHandler = Callable[[Message, Context], Message]

#: Node id the in-process "SuperLink" uses as the source of instructions.
SERVER_NODE_ID = 0


def _wire_copy(message: Message) -> tuple[Message, int]:
    """Return ``message`` as the receiver would deserialize it, and its size.

    The size is that of the serialised content in bytes (0 for an error message).
    """
    metadata = copy(message.metadata)
    if message.has_error():
        return message_with_metadata(message.error, metadata), 0
    proto = recorddict_to_proto(message.content)
    return message_with_metadata(
        recorddict_from_proto(proto), metadata
    ), proto.ByteSize()


class InProcessGrid(Grid):
    """A Grid that delivers each message to a handler in this process.

    Parameters
    ----------
    nodes : Mapping[int, NodeHandler]
        Node id -> handler; a :class:`flwr.clientapp.ClientApp` is a handler.
    node_configs : Mapping[int, dict], optional
        Per-node ``node_config`` (e.g. ``{"partition-id": 3}``).
    run_config : dict, optional
        The ``run_config`` every node's Context sees.
    run_id : int (default: 1)
        Run id stamped on messages.

    Notes
    -----
    Creating instruction messages outside a running ServerApp needs Flower's task
    identity (an internal API, ``flwr.supercore.task_identity.TaskIdentity``); it is
    set here and nowhere else in flwr-ext.
    """

    def __init__(
        self,
        nodes: Mapping[int, NodeHandler],
        *,
        node_configs: Mapping[int, dict] | None = None,
        run_config: dict | None = None,
        run_id: int = 1,
    ) -> None:
        if not nodes:
            raise ValueError("InProcessGrid needs at least one node")
        if SERVER_NODE_ID in nodes:
            raise ValueError(f"node id {SERVER_NODE_ID} is reserved for the server")
        self._nodes = dict(nodes)
        node_configs = node_configs or {}
        self._contexts = {
            node_id: Context(
                run_id=run_id,
                node_id=node_id,
                node_config=dict(node_configs.get(node_id, {})),
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for node_id in self._nodes
        }
        self._offline: set[int] = set()
        self._replies: dict[str, Message] = {}
        self._ids = itertools.count(1)
        self._run = Run.create_empty(run_id)
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SERVER_NODE_ID
        TaskIdentity.task_id = 1
        #: Number of messages delivered per node (for tests and benchmarks).
        self.delivered: dict[int, int] = dict.fromkeys(self._nodes, 0)
        #: Serialised content bytes of the instructions delivered to nodes and of
        #: their non-error replies (``recorddict_to_proto(...).ByteSize()``).
        self.bytes_down = 0
        self.bytes_up = 0

    # -- Grid API -------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        """Set the run (only its id is used)."""
        self._run = run

    @property
    def run(self) -> Run:
        """The run this grid operates in."""
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Create an instruction message to ``dst_node_id``."""
        return Message(
            content=content,
            message_type=message_type,
            dst_node_id=dst_node_id,
            group_id=group_id,
            ttl=ttl,
        )

    def get_node_ids(self) -> Iterable[int]:
        """Ids of the online nodes."""
        return [n for n in self._nodes if n not in self._offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message now and keep its reply for ``pull_messages``."""
        ids = []
        for message in messages:
            message_id = f"m{next(self._ids)}"
            # As Flower's own grids do: the id is assigned by the "SuperLink".
            message.metadata.__dict__["_message_id"] = message_id
            ids.append(message_id)
            node_id = int(message.metadata.dst_node_id)
            if node_id not in self._nodes or node_id in self._offline:
                continue  # a dropout: no reply ever arrives
            self.delivered[node_id] += 1
            delivered, size = _wire_copy(message)
            self.bytes_down += size
            reply, size = _wire_copy(self._call(node_id, delivered))
            self.bytes_up += size
            self._replies[message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Return (and forget) the replies to ``message_ids`` that exist."""
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull every reply (offline nodes never reply)."""
        return self.pull_messages(self.push_messages(messages))

    # -- test controls --------------------------------------------------------
    def set_offline(self, node_id: int, offline: bool = True) -> None:
        """Take a node offline (no replies, not listed) or bring it back."""
        if node_id not in self._nodes:
            raise KeyError(f"unknown node {node_id}")
        if offline:
            self._offline.add(node_id)
        else:
            self._offline.discard(node_id)

    def context(self, node_id: int) -> Context:
        """Return the persistent Context of ``node_id``."""
        return self._contexts[node_id]

    def _call(self, node_id: int, message: Message) -> Message:
        try:
            reply = self._nodes[node_id](message, self._contexts[node_id])
        except Exception as err:  # the ClientApp runtime turns raises into errors
            return Message(
                Error(
                    code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                    reason=f"{type(err).__name__}: {err}",
                ),
                reply_to=message,
            )
        if not isinstance(reply, Message):
            return Message(
                Error(
                    code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                    reason=f"handler returned {type(reply).__name__}, not a Message",
                ),
                reply_to=message,
            )
        return reply
