"""Shared fixtures: a tiny float32 model and helpers that build real Flower replies."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from flwr_ext.inprocess import InProcessGrid


class StaticGrid:
    """The smallest grid a strategy's configure_train needs: a fixed node list."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Creating instruction messages in-process needs Flower's task identity.

    InProcessGrid sets it (the one place flwr-ext touches that internal API).
    """
    InProcessGrid({1: lambda m, c: m})


@pytest.fixture(scope="session")
def ckks_keys(tmp_path_factory) -> Callable[..., Path]:
    """CKKS key sets made once per session: ``ckks_keys(name, profile)`` -> folder.

    Making a key set costs seconds; every CKKS test module used to make its own.
    Tests only read these folders (none writes into a key set).
    """
    made: dict[tuple[str, str], Path] = {}

    def key_set(name: str = "main", profile: str = "default") -> Path:
        if (name, profile) not in made:
            from flwr_ext.he import create_keys  # TenSEAL: only for the tests using it

            directory = tmp_path_factory.mktemp(f"ckks-{name}-{profile}")
            create_keys(directory, profile)
            made[name, profile] = directory
        return made[name, profile]

    return key_set


@pytest.fixture(scope="session")
def keys_dir(ckks_keys) -> Path:
    """The data owners' key set ("default" profile)."""
    return ckks_keys("main")


@pytest.fixture(scope="session")
def other_keys_dir(ckks_keys) -> Path:
    """A second, unrelated key set: a site or a server with the wrong keys."""
    return ckks_keys("other")


@pytest.fixture(scope="module")
def secret(keys_dir):
    """The secret context of ``keys_dir`` (what only the sites hold)."""
    from flwr_ext.he import SECRET_FILE, load_keys

    return load_keys(keys_dir / SECRET_FILE)


def model(value: float = 0.0) -> ArrayRecord:
    """A 2-array float32 model: w (3, 2) and b (2,), filled with ``value``."""
    return ArrayRecord(
        {
            "w": Array(np.full((3, 2), value, dtype=np.float32)),
            "b": Array(np.full(2, value, dtype=np.float32)),
        }
    )


def reply_to(
    instruction: Message,
    arrays: ArrayRecord | None,
    num_examples: object = 10,
    extra_metrics: dict | None = None,
    extra_records: dict | None = None,
) -> Message:
    """A real reply Message to ``instruction``."""
    content: dict = {}
    if arrays is not None:
        content["arrays"] = arrays
    metrics = {} if num_examples is None else {"num-examples": num_examples}
    metrics.update(extra_metrics or {})
    content["metrics"] = MetricRecord(metrics)
    content.update(extra_records or {})
    return Message(RecordDict(content), reply_to=instruction)


def instructions(strategy, global_arrays: ArrayRecord, node_ids: list[int]) -> list:
    """Instruction messages from the strategy's own configure_train, by node id."""
    messages = strategy.configure_train(
        1, global_arrays, ConfigRecord(), StaticGrid(node_ids)
    )
    return sorted(messages, key=lambda m: m.metadata.dst_node_id)
