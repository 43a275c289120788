"""InProcessGrid's byte counters: what crossed its protobuf "wire", each way."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.common.serde import recorddict_to_proto

from flwr_ext.inprocess import InProcessGrid


def _content(size: int) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(size, "f4"))})})


def _echo_larger(message: Message, context) -> Message:
    return Message(_content(1000), reply_to=message)


def _fail(message: Message, context) -> Message:
    raise RuntimeError("this node's ClientApp crashed")


def test_bytes_count_delivered_instructions_and_non_error_replies():
    grid = InProcessGrid({1: _echo_larger, 2: _fail, 3: _echo_larger})
    grid.set_offline(3)
    instruction = _content(10)
    messages = [
        grid.create_message(instruction, "train", node, "round 1") for node in (1, 2, 3)
    ]
    replies = list(grid.send_and_receive(messages))
    assert [r.has_error() for r in replies] == [False, True]
    down = recorddict_to_proto(instruction).ByteSize()
    up = recorddict_to_proto(_content(1000)).ByteSize()
    # nodes 1 and 2 received an instruction; node 3 was offline (nothing sent)
    assert grid.bytes_down == 2 * down
    # only node 1's reply carries content; an error reply has none
    assert grid.bytes_up == up
