"""Property-based fuzzing of the plaintext wrappers' ``aggregate_train``.

Random and mutated replies (see :mod:`tests.hostile_messages`) are mixed with
honest ones and thrown at every robust wrapper (with and without NNM) and at
``DPFedAvg`` (``aggregate_evaluate`` too, for three of them). Whatever the
hostile replies hold, the properties are:

- no exception escapes ``aggregate_train``;
- the returned model, if any, has the global model's keys, order, dtypes and
  shapes and only finite values;
- no honest reply is dropped (a hostile reply costs only itself);
- no reply is modified.

The number of examples is bounded (``FUZZ_EXAMPLES``, default 25 per wrapper) so
the file runs in CI in seconds; raise it locally to search longer, e.g.
``FUZZ_EXAMPLES=2000 pytest tests/test_fuzz_replies.py``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flwr_ext.aggregation import (
    AdaptiveRobustClipping,
    Bucketing,
    MedianNormEqualization,
    NearestNeighborMixing,
    PreAggregationChain,
)
from flwr_ext.privacy import keys
from flwr_ext.strategy import (
    CenteredClipping,
    DPFedAvg,
    GeometricMedian,
    Krum,
    Median,
    MultiKrum,
    TrimmedMean,
)

from .conftest import StaticGrid, instructions
from .hostile_messages import (
    honest_reply,
    hostile_reply,
    is_finite_like,
    random_reply,
    snapshot,
)

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=False,
    database=None,  # CI writes no example files into the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def float32_model() -> ArrayRecord:
    return ArrayRecord(
        {
            "w": Array(np.zeros((3, 2), np.float32)),
            "b": Array(np.zeros(2, np.float32)),
        }
    )


def mixed_model() -> ArrayRecord:
    """float32, a 0-d float64 and an int64 buffer: the float64 work path."""
    return ArrayRecord(
        {
            "w": Array(np.zeros((2, 2), np.float32)),
            "scale": Array(np.array(1.0, np.float64)),
            "steps": Array(np.array([3, 4], np.int64)),
        }
    )


WRAPPERS: dict[str, Callable[[int], Strategy]] = {
    "Krum": lambda n: Krum(num_byzantine=1),
    "MultiKrum": lambda n: MultiKrum(num_byzantine=1),
    "TrimmedMean": lambda n: TrimmedMean(beta=0.2),
    "Median": lambda n: Median(),
    "GeometricMedian": lambda n: GeometricMedian(),
    "CenteredClipping": lambda n: CenteredClipping(),
    "Krum-NNM": lambda n: Krum(num_byzantine=1, pre_aggregation="nnm"),
    "TrimmedMean-NNM": lambda n: TrimmedMean(
        beta=0.2, pre_aggregation="nnm", num_byzantine=1
    ),
    "Median-NNM": lambda n: Median(pre_aggregation="nnm", num_byzantine=1),
    "GeometricMedian-NNM": lambda n: GeometricMedian(
        pre_aggregation="nnm", num_byzantine=1
    ),
    "CenteredClipping-NNM": lambda n: CenteredClipping(
        pre_aggregation="nnm", num_byzantine=1
    ),
    # The issue-13 steps. The stateful ones (in PRIMED) first run one honest
    # round, so the fuzzed round clips around a kept centre.
    "CC-previous-ARC": lambda n: CenteredClipping(
        centre="previous",
        radius_quantile=0.4,
        pre_aggregation=AdaptiveRobustClipping(1),
    ),
    "Median-Bucketing": lambda n: Median(pre_aggregation=Bucketing(2, seed=0)),
    "TrimmedMean-ARC-NNM": lambda n: TrimmedMean(
        beta=0.2,
        pre_aggregation=PreAggregationChain(
            [AdaptiveRobustClipping(1), NearestNeighborMixing(1)]
        ),
    ),
    "TrimmedMean-NormEq-NNM": lambda n: TrimmedMean(
        beta=0.2,
        pre_aggregation=PreAggregationChain(
            [MedianNormEqualization(), NearestNeighborMixing(1)]
        ),
    ),
    "DPFedAvg": lambda n: DPFedAvg(
        num_clients=n, clipping_norm=1.0, noise_multiplier=1.0, accountant="rdp"
    ),
}
#: Wrappers whose rule keeps a state across rounds.
PRIMED = {"CC-previous-ARC"}


@contextmanager
def quiet_flwr() -> Iterator[None]:
    """Drop the wrappers' INFO/WARNING lines while fuzzing (hundreds per test)."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def honest_arrays(global_arrays: ArrayRecord, step: float) -> ArrayRecord:
    return ArrayRecord(
        {
            key: Array(np.asarray(array.numpy() + step, array.numpy().dtype))
            for key, array in global_arrays.items()
        }
    )


@pytest.mark.parametrize("name", list(WRAPPERS))
@FUZZ
@given(data=st.data())
def test_no_reply_breaks_aggregate_train(name: str, data: st.DataObject) -> None:
    global_arrays = data.draw(
        st.sampled_from([float32_model, mixed_model]), label="global"
    )()
    n_honest = data.draw(st.integers(5, 7), label="honest")
    n_hostile = data.draw(st.integers(1, 3), label="hostile")
    nodes = list(range(1, n_honest + n_hostile + 1))
    strategy = WRAPPERS[name](len(nodes))
    if name in PRIMED:
        first = instructions(strategy, global_arrays, nodes)
        with quiet_flwr():
            primed, _ = strategy.aggregate_train(
                1,
                [
                    honest_reply(m, honest_arrays(global_arrays, 0.02 * i), 10)
                    for i, m in enumerate(first)
                ],
            )
        assert primed is not None
        assert strategy.rule_state is not None
    msgs = instructions(strategy, global_arrays, nodes)
    assert len(msgs) == len(nodes)
    replies = [
        honest_reply(m, honest_arrays(global_arrays, 0.01 * i), 10)
        for i, m in enumerate(msgs[:n_honest])
    ]
    for msg in msgs[n_honest:]:
        kind = data.draw(st.sampled_from(["mutated", "mutated", "random"]))
        replies.append(
            data.draw(
                hostile_reply(msg, global_arrays)
                if kind == "mutated"
                else random_reply(msg)
            )
        )
    replies = data.draw(st.permutations(replies), label="order")
    before = [snapshot(r) for r in replies]

    with quiet_flwr():
        arrays, metrics = strategy.aggregate_train(1, replies)

    if arrays is not None:
        assert is_finite_like(arrays, global_arrays)
    assert metrics is not None
    dropped = metrics[keys.DROPPED if name == "DPFedAvg" else "robust-dropped"]
    assert dropped <= n_hostile  # honest replies are never the ones dropped
    assert [snapshot(r) for r in replies] == before


@pytest.mark.parametrize("name", ["Krum", "Median-NNM", "DPFedAvg"])
@FUZZ
@given(data=st.data())
def test_no_reply_breaks_aggregate_evaluate(name: str, data: st.DataObject) -> None:
    global_arrays = float32_model()
    n_honest = data.draw(st.integers(1, 4), label="honest")
    n_hostile = data.draw(st.integers(1, 3), label="hostile")
    nodes = list(range(1, n_honest + n_hostile + 1))
    strategy = WRAPPERS[name](len(nodes))
    msgs = sorted(
        strategy.configure_evaluate(
            1, global_arrays, ConfigRecord(), StaticGrid(nodes)
        ),
        key=lambda m: m.metadata.dst_node_id,
    )
    replies = [
        Message(
            RecordDict({"metrics": MetricRecord({"num-examples": 5, "acc": 0.5})}),
            reply_to=m,
        )
        for m in msgs[:n_honest]
    ]
    for msg in msgs[n_honest:]:
        replies.append(data.draw(hostile_reply(msg, global_arrays)))
    replies = data.draw(st.permutations(replies), label="order")
    before = [snapshot(r) for r in replies]

    with quiet_flwr():
        metrics = strategy.aggregate_evaluate(1, replies)

    assert metrics is None or isinstance(metrics, MetricRecord)
    assert [snapshot(r) for r in replies] == before
