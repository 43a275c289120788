"""momentum_mod through real ClientApps, real Messages and real strategies."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from flwr_ext.inprocess import InProcessGrid
from flwr_ext.mods import momentum_mod
from flwr_ext.mods.momentum import STATE_KEY
from flwr_ext.strategy import CenteredClipping, TrimmedMean


def make_app(steps, width=None):
    """A ClientApp whose n-th train reply is the global model + steps[n].

    With ``width``, the reply keeps only the first ``width`` values (a ClientApp
    whose model does not match the server's).
    """
    app = ClientApp(mods=[momentum_mod])
    calls = {"n": 0}

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        w = msg.content["arrays"]["w"].numpy()[:width]
        step = steps(calls["n"]) if callable(steps) else steps[calls["n"]]
        calls["n"] += 1
        return Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({"w": Array((w + step).astype(np.float32))}),
                    "metrics": MetricRecord({"num-examples": 10}),
                }
            ),
            reply_to=msg,
        )

    return app


def instruction(value=0.0, dtype=np.float32, extra=None):
    content = {"arrays": ArrayRecord({"w": Array(np.full(3, value, dtype))})}
    content.update(extra or {})
    return Message(RecordDict(content), dst_node_id=1, message_type="train")


def ctx(beta=0.5):
    node_config = {} if beta is None else {"momentum-beta": beta}
    return Context(1, 1, node_config, RecordDict(), {})


def sent(reply):
    assert not reply.has_error(), reply.error.reason
    return reply.content["arrays"]["w"].numpy()


def test_momentum_by_hand_over_three_rounds():
    app = make_app([np.full(3, 4.0), np.full(3, 0.0), np.full(3, 2.0)])
    context = ctx(0.5)
    # Round 1: no state, m = u = 4.
    np.testing.assert_allclose(sent(app(instruction(1.0), context)), 5.0)
    # Round 2: u = 0, m = 0.5 * 4 + 0.5 * 0 = 2, from a new global model 10.
    np.testing.assert_allclose(sent(app(instruction(10.0), context)), 12.0)
    # Round 3: u = 2, m = 0.5 * 2 + 0.5 * 2 = 2.
    np.testing.assert_allclose(sent(app(instruction(0.0), context)), 2.0)
    assert context.state[STATE_KEY]["w"].numpy().dtype == np.float64


def test_reply_keeps_the_client_dtype_when_the_server_sends_float64():
    app = make_app([np.full(3, 1.0)])
    w = sent(app(instruction(0.0, np.float64), ctx()))
    assert w.dtype == np.float32


def test_beta_zero_is_a_no_op_and_the_default_is_used_without_config():
    app = make_app([np.full(3, 4.0), np.full(3, 0.0)])
    context = ctx(0.0)
    sent(app(instruction(), context))
    np.testing.assert_allclose(sent(app(instruction(), context)), 0.0)
    assert STATE_KEY not in context.state
    app = make_app([np.full(3, 4.0), np.full(3, 0.0)])
    context = ctx(None)  # DEFAULT_BETA = 0.9
    sent(app(instruction(), context))
    np.testing.assert_allclose(sent(app(instruction(), context)), 3.6, rtol=1e-6)


@pytest.mark.parametrize("beta", [1.0, -0.1, "0.9", True, float("nan")])
def test_invalid_beta_is_an_error_reply(beta):
    reply = make_app([np.zeros(3)])(instruction(), ctx(beta))
    assert reply.has_error() and "momentum-beta" in reply.error.reason


def test_node_config_wins_over_the_run_config():
    app = make_app([np.full(3, 4.0), np.full(3, 0.0)])
    context = Context(
        1, 1, {"momentum-beta": 0.5}, RecordDict(), {"momentum-beta": 0.0}
    )
    sent(app(instruction(), context))
    np.testing.assert_allclose(sent(app(instruction(), context)), 2.0)


def test_hostile_or_broken_messages_become_error_replies_and_keep_the_state():
    app = make_app(lambda n: np.full(3, np.nan) if n == 1 else np.full(3, 1.0))
    context = ctx(0.5)
    sent(app(instruction(), context))
    before = context.state[STATE_KEY]["w"].numpy().copy()
    reply = app(instruction(), context)  # the ClientApp produced NaN
    assert reply.has_error() and "NaN" in reply.error.reason
    np.testing.assert_array_equal(context.state[STATE_KEY]["w"].numpy(), before)
    two = instruction(extra={"other": ArrayRecord({"w": Array(np.zeros(3))})})
    reply = app(two, context)
    assert reply.has_error() and "exactly one ArrayRecord" in reply.error.reason
    shaped = Message(
        RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(5, np.float32))})}),
        dst_node_id=1,
        message_type="train",
    )
    reply = make_app(lambda n: 1.0, width=3)(shaped, context)  # (3,) for (5,)
    assert reply.has_error() and "does not match" in reply.error.reason
    np.testing.assert_array_equal(context.state[STATE_KEY]["w"].numpy(), before)


def test_a_model_that_changes_shape_restarts_the_momentum():
    app = make_app(lambda n: 1.0)
    context = ctx(0.5)
    sent(app(instruction(), context))
    five = Message(
        RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(5, np.float32))})}),
        dst_node_id=1,
        message_type="train",
    )
    np.testing.assert_allclose(sent(app(five, context)), 1.0)
    assert context.state[STATE_KEY]["w"].numpy().shape == (5,)


def test_evaluate_messages_pass_through():
    app = ClientApp(mods=[momentum_mod])

    @app.evaluate()
    def evaluate(msg, context):
        return Message(
            RecordDict({"metrics": MetricRecord({"acc": 1.0})}), reply_to=msg
        )

    msg = Message(RecordDict(), dst_node_id=1, message_type="evaluate")
    reply = app(msg, ctx(2.0))  # an invalid beta does not matter for evaluate
    assert not reply.has_error() and reply.content["metrics"]["acc"] == 1.0


class RecordingGrid(InProcessGrid):
    """Keeps the train replies of the last round (what the server aggregates)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last: list = []

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        if replies and "arrays" in replies[0].content:
            self.last = [r.content["arrays"]["w"].numpy().copy() for r in replies]
        return replies


def noisy_federation(momentum: bool, seed=0):
    """10 clients whose updates are 'pull towards 3' plus fresh noise each round."""
    rng = np.random.default_rng(seed)
    app = ClientApp(mods=[momentum_mod] if momentum else [])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        w = msg.content["arrays"]["w"].numpy()
        new = w + 0.5 * (3.0 - w) + rng.normal(0.0, 1.0, w.shape)
        return Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({"w": Array(new.astype(np.float32))}),
                    "metrics": MetricRecord({"num-examples": 10}),
                }
            ),
            reply_to=msg,
        )

    configs = {n: {"momentum-beta": 0.8} for n in range(1, 11)}
    return RecordingGrid({n: app for n in range(1, 11)}, node_configs=configs)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: FedAvg(fraction_evaluate=0.0),
        lambda: TrimmedMean(FedAvg(fraction_evaluate=0.0), beta=0.2),
        lambda: CenteredClipping(FedAvg(fraction_evaluate=0.0), centre="previous"),
    ],
)
def test_momentum_composes_with_rules_and_shrinks_the_honest_spread(factory):
    initial = ArrayRecord({"w": Array(np.zeros(200, dtype=np.float32))})
    spread = {}
    for momentum in (False, True):
        grid = noisy_federation(momentum)
        result = factory().start(grid=grid, initial_arrays=initial, num_rounds=25)
        w = result.arrays["w"].numpy()
        assert w.dtype == np.float32 and np.isfinite(w).all()
        assert np.sqrt(np.mean((w - 3.0) ** 2)) < 0.6  # it still converges
        # The spread of honest replies within a round: what ALIE/IPM hide in.
        spread[momentum] = float(np.stack(grid.last).std(axis=0).mean())
    # sqrt((1 - beta) / (1 + beta)) = 1/3 of the noise for beta = 0.8.
    assert spread[True] < 0.5 * spread[False]
