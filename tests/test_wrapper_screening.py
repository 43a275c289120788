"""One reply-screening policy for every flwr-ext wrapper (strategy/base.py).

Every wrapper drops, with the same reason and ``proves_faulty=False``, a reply
from a node that was not sampled, a second reply from one node and an error
reply - before it looks at the reply's content. Checked on the four real
wrappers with real Flower Messages (and a real CKKS key set).
"""

import logging

import pytest
from flwr.app import Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from flwr_ext.he import create_keys
from flwr_ext.records import InvalidReplyError
from flwr_ext.strategy import (
    DistributedDP,
    DPFedAvg,
    HomomorphicAggregation,
    Median,
)
from flwr_ext.strategy.base import StrategyWrapper

from .conftest import instructions, model, reply_to

NODES = [101, 102, 103]


@pytest.fixture(scope="module")
def server_context(tmp_path_factory):
    return create_keys(tmp_path_factory.mktemp("keys")).server


def _wrappers(server_context):
    return {
        "robust": Median(FedAvg(min_available_nodes=3, min_train_nodes=3)),
        "dp-fedavg": DPFedAvg(
            FedAvg(min_available_nodes=3, min_train_nodes=3),
            num_clients=3,
            clipping_norm=1.0,
            noise_multiplier=1.0,
        ),
        "distributed-dp": DistributedDP(
            FedAvg(min_available_nodes=3, min_train_nodes=3),
            clipping_norm=1.0,
            min_clients=1,
            noise_multiplier=1.0,
        ),
        "homomorphic": HomomorphicAggregation(
            FedAvg(min_available_nodes=3, min_train_nodes=3), server_context
        ),
    }


@pytest.mark.parametrize(
    "name", ["robust", "dp-fedavg", "distributed-dp", "homomorphic"]
)
def test_every_wrapper_screens_unsampled_duplicate_and_error_replies_alike(
    server_context, name, caplog
):
    strategy = _wrappers(server_context)[name]
    assert isinstance(strategy, StrategyWrapper)
    msgs = instructions(strategy, model(), NODES)
    assert sorted(int(m.metadata.dst_node_id) for m in msgs) == NODES
    stranger = Message(RecordDict({"arrays": model()}), dst_node_id=999,
                       message_type="train")  # fmt: skip
    replies = [
        reply_to(msgs[0], model(1.0)),
        reply_to(msgs[0], model(50.0)),  # a second reply from node 101
        Message(Error(code=0, reason="client crashed"), reply_to=msgs[1]),
        reply_to(stranger, model(9.0)),  # a reply "from" node 999
    ]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy.aggregate_train(1, replies)
    text = caplog.text
    assert "node 101: second reply from the same node" in text
    assert "node 102: client error 0: client crashed" in text
    assert "node 999: node was not sampled in this round" in text


def test_screening_never_counts_its_rejections_as_proof_of_a_byzantine_sender():
    strategy = Median()
    msgs = instructions(strategy, model(), NODES)
    stranger = Message(RecordDict({"arrays": model()}), dst_node_id=999,
                       message_type="train")  # fmt: skip
    seen: set[int] = set()
    sampled = set(NODES)
    assert strategy._screen(reply_to(msgs[0], model()), sampled, seen) == 101
    for reply in (
        reply_to(msgs[0], model()),  # duplicate
        Message(Error(code=0, reason="crash"), reply_to=msgs[1]),
        reply_to(stranger, model()),
    ):
        with pytest.raises(InvalidReplyError) as err:
            strategy._screen(reply, sampled, seen)
        assert err.value.proves_faulty is False


@pytest.mark.parametrize(
    "name", ["robust", "dp-fedavg", "distributed-dp", "homomorphic"]
)
def test_every_wrapper_drops_malformed_evaluate_replies(server_context, name, caplog):
    strategy = _wrappers(server_context)[name]
    msgs = instructions(strategy, model(), NODES)
    replies = [
        reply_to(msgs[0], None, num_examples=5, extra_metrics={"acc": 0.5}),
        reply_to(msgs[1], None, num_examples=5, extra_metrics={"acc": float("nan")}),
        Message(Error(code=0, reason="crash"), reply_to=msgs[2]),
    ]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics is not None and metrics["acc"] == pytest.approx(0.5)
    assert "dropped evaluate reply from node 102" in caplog.text
    assert "dropped evaluate reply from node 103" in caplog.text
    assert isinstance(metrics, MetricRecord)
