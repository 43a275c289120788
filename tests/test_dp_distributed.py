"""Distributed DP: distributed_dp_mod on real ClientApps + the DistributedDP wrapper.

Statistical checks: the summed noise of ``n`` clients over ``DIM = 20_000``
coordinates; the relative standard error of a sample standard deviation is
1/sqrt(2 DIM) = 0.5 %, so the +-5 % band is 10 standard errors wide (false
failure probability below 1e-22).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.app.message_type import MessageType
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from flwr_ext.he import SECRET_FILE, SERVER_FILE, decrypt_record, load_keys
from flwr_ext.inprocess import InProcessGrid
from flwr_ext.mods import ckks_mod, distributed_dp_mod
from flwr_ext.privacy import compute_epsilon, keys
from flwr_ext.strategy import (
    DistributedDP,
    DPFedAvg,
    HomomorphicAggregation,
    TrimmedMean,
)
from flwr_ext.strategy.round_report import ConfigurationError

DIM = 20_000


def initial(d: int = DIM) -> ArrayRecord:
    return ArrayRecord(
        {
            "w": Array(np.zeros(d, np.float32)),
            "steps": Array(np.array(0, dtype=np.int64)),
        }
    )


def vector(arrays: ArrayRecord) -> np.ndarray:
    return arrays["w"].numpy().astype(np.float64)


def make_app(update_of=None, mods=(distributed_dp_mod,), num_examples=100):
    """A ClientApp that adds ``update_of(node_id)`` (default zero) to the model."""
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content["arrays"]
        w = arrays["w"].numpy()
        delta = 0.0 if update_of is None else update_of(context.node_id, w.shape)
        out = ArrayRecord(
            {
                "w": Array((w + delta).astype(np.float32)),
                "steps": Array(np.asarray(arrays["steps"].numpy() + 1)),
            }
        )
        metrics = MetricRecord({"num-examples": num_examples, "loss": 0.5})
        return Message(RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        metrics = MetricRecord({"num-examples": 1, "acc": 1.0})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def run(strategy, apps, rounds=1, initial_arrays=None, node_configs=None):
    grid = InProcessGrid(apps, node_configs=node_configs)
    result = strategy.start(
        grid=grid,
        initial_arrays=initial_arrays or initial(),
        num_rounds=rounds,
    )
    return result, grid


def ddp(inner=None, **kwargs):
    params = {
        "clipping_norm": 1.0,
        "min_clients": 4,
        "noise_multiplier": 1.0,
        **kwargs,
    }
    return DistributedDP(inner or FedAvg(fraction_evaluate=0.0), **params)


# --------------------------------------------------------------- the sum
def test_sum_of_noise_shares_has_std_at_least_z_times_c():
    """4 clients at t=4: the sum carries noise std exactly z*C."""
    z, clip, t = 1.5, 2.0, 4
    strategy = ddp(noise_multiplier=z, clipping_norm=clip, min_clients=t)
    apps = {i: make_app() for i in range(1, t + 1)}
    result, _ = run(strategy, apps)
    mean_noise = vector(result.arrays)  # FedAvg: uniform mean of 4 noised zeros
    sum_noise = mean_noise * t
    assert sum_noise.std() == pytest.approx(z * clip, rel=0.05)
    metrics = result.train_metrics_clientapp[1]
    assert metrics[keys.NOISE_STDDEV] == pytest.approx(z * clip / math.sqrt(t))
    assert metrics[keys.PARTICIPANTS] == t and metrics[keys.DISCARDED] == 0
    assert metrics["loss"] == pytest.approx(0.5)  # the inner's metrics survive


def test_more_replies_than_t_only_add_noise():
    z, clip, t, n = 1.0, 1.0, 3, 6
    strategy = ddp(noise_multiplier=z, clipping_norm=clip, min_clients=t)
    result, _ = run(strategy, {i: make_app() for i in range(1, n + 1)})
    sum_noise = vector(result.arrays) * n
    assert sum_noise.std() == pytest.approx(z * clip * math.sqrt(n / t), rel=0.05)


def test_mod_clips_each_update_and_sets_weight_one():
    """A node with a norm-1000 update and 10**9 claimed examples moves the mean
    by at most C/n (noise made negligible)."""
    clip, n = 0.5, 5
    strategy = ddp(noise_multiplier=1e-9, clipping_norm=clip, min_clients=n)
    d = 50

    def update_of(node, shape):
        if node != 1:
            return np.zeros(shape)
        return np.full(shape, 1000.0 / math.sqrt(shape[0]))

    apps = {
        i: make_app(update_of, num_examples=10**9 if i == 1 else 1)
        for i in range(1, n + 1)
    }
    # Negligible noise is below every site's default floor: these sites opt out
    # explicitly (site policy, node config) to isolate the clipping.
    opt_out = {i: {"policy-min-noise-multiplier": 0.0} for i in apps}
    result, _ = run(strategy, apps, initial_arrays=initial(d), node_configs=opt_out)
    moved = np.linalg.norm(vector(result.arrays))
    # (The integer "steps" counter is part of the update too: every released
    # array is clipped and noised, so the w part is clip/n up to 1e-6.)
    assert moved == pytest.approx(clip / n, rel=1e-4)


def test_too_few_valid_replies_discard_the_round(caplog):
    strategy = ddp(min_clients=4)
    apps = {i: make_app() for i in range(1, 6)}
    grid = InProcessGrid(apps)
    grid.set_offline(1)
    grid.set_offline(2)  # 3 online < t = 4: the inner samples 3 and the round skips
    with pytest.raises(ConfigurationError, match="fewer than min_clients=4"):
        strategy.start(grid=grid, initial_arrays=initial(10), num_rounds=2)
    assert strategy.privacy_spent().releases == 0  # and the run failed, loudly

    # Sampled 5, but 2 drop out after sampling: discarded in aggregate_train.
    strategy = ddp(min_clients=4)
    g = initial(10)
    grid = InProcessGrid(apps)
    msgs = list(strategy.configure_train(1, g, ConfigRecord(), grid))
    assert len(msgs) == 5
    grid.set_offline(3)
    grid.set_offline(4)
    replies = list(grid.send_and_receive(msgs))
    with caplog.at_level(logging.WARNING):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None and metrics[keys.DISCARDED] == 1
    assert metrics[keys.PARTICIPANTS] == 3
    assert "round 1 discarded" in caplog.text
    assert strategy.privacy_spent().releases == 0


def test_replies_without_the_mod_are_dropped_unread(caplog):
    strategy = ddp(min_clients=2)
    apps = {1: make_app(), 2: make_app(), 3: make_app(mods=())}
    with caplog.at_level(logging.WARNING):
        result, _ = run(strategy, apps, initial_arrays=initial(10))
    assert "not clipped and noised by flwr_ext.mods.distributed_dp_mod" in caplog.text
    metrics = result.train_metrics_clientapp[1]
    assert metrics[keys.PARTICIPANTS] == 2 and metrics[keys.DROPPED] == 1


def test_accounting_per_released_round_and_budget_cap():
    z = 2.0
    cap = (
        compute_epsilon([(z, 1.0, 2)], 1e-5) + compute_epsilon([(z, 1.0, 3)], 1e-5)
    ) / 2
    strategy = ddp(noise_multiplier=z, min_clients=2, max_epsilon=cap)
    apps = {i: make_app() for i in range(1, 4)}
    result, _ = run(strategy, apps, rounds=5, initial_arrays=initial(10))
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    m = result.train_metrics_clientapp[2]
    assert m[keys.CLIENT_EPSILON] == pytest.approx(compute_epsilon([(z, 1.0, 2)], 1e-5))
    assert m[keys.SAMPLING_RATE] == 1.0  # no amplification claimed
    assert strategy.budget_exhausted
    assert strategy.privacy_spent().neighbouring == "zero-out-one"


# ----------------------------------------------------------------- the mod
def _train_message(config: dict) -> Message:
    content = RecordDict({"arrays": initial(10), "config": ConfigRecord(config)})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def _context() -> Context:
    return Context(
        run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}
    )


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({}, "Wrap the server strategy in flwr_ext.strategy.DistributedDP"),
        (
            {keys.DDP_CLIPPING_NORM: 1.0},
            "'ddp-noise-stddev' must be a finite number > 0",
        ),
        (
            {keys.DDP_CLIPPING_NORM: -1.0, keys.DDP_NOISE_STDDEV: 1.0},
            "'ddp-clipping-norm'",
        ),
        (
            {keys.DDP_CLIPPING_NORM: 1.0, keys.DDP_NOISE_STDDEV: float("nan")},
            "'ddp-noise-stddev' must be a finite number",
        ),
    ],
)
def test_mod_returns_a_clear_error_when_config_is_missing(config, match):
    app = make_app()
    reply = app(_train_message(config), _context())
    assert reply.has_error()
    assert reply.error.code == 6  # MOD_FAILED_PRECONDITION
    assert match in reply.error.reason


def test_mod_refuses_a_reshaped_or_non_finite_model():
    def bad(node, shape):
        return np.full(shape, np.nan)

    config = {keys.DDP_CLIPPING_NORM: 1.0, keys.DDP_NOISE_STDDEV: 0.5}
    reply = make_app(bad)(_train_message(config), _context())
    assert reply.has_error() and "NaN or Inf" in reply.error.reason


def test_mod_passes_other_messages_through():
    app = make_app()
    msg = Message(
        RecordDict({"arrays": initial(10), "config": ConfigRecord()}),
        dst_node_id=1,
        message_type=MessageType.EVALUATE,
    )
    reply = app(msg, _context())
    assert not reply.has_error() and reply.content["metrics"]["acc"] == 1.0


def test_mod_noise_is_fresh_each_call():
    config = {keys.DDP_CLIPPING_NORM: 1.0, keys.DDP_NOISE_STDDEV: 0.5}
    app = make_app()
    np.random.seed(0)
    a = app(_train_message(config), _context()).content["arrays"]["w"].numpy()
    np.random.seed(0)
    b = app(_train_message(config), _context()).content["arrays"]["w"].numpy()
    assert not np.allclose(a, b)
    metrics = app(_train_message(config), _context()).content["metrics"]
    assert metrics["num-examples"] == 1
    assert (
        metrics[keys.DDP_CLIPPING_NORM] == 1.0 and metrics[keys.DDP_NOISE_STDDEV] == 0.5
    )


# ------------------------------------------------------------ composition
def test_distributed_dp_over_homomorphic_aggregation_end_to_end(keys_dir):
    """Real CKKS: the server sums ciphertexts; DistributedDP only counts replies."""
    t, z, clip = 3, 1.0, 0.5
    strategy = DistributedDP(
        HomomorphicAggregation(FedAvg(fraction_evaluate=0.0), keys_dir / SERVER_FILE),
        clipping_norm=clip,
        min_clients=t,
        noise_multiplier=z,
    )
    d = 2_000
    apps = {
        i: make_app(
            lambda node, shape: np.full(shape, 0.001 * node),
            mods=[ckks_mod, distributed_dp_mod],
        )
        for i in (1, 2, 3)
    }
    secret = {"ckks-context": str(keys_dir / SECRET_FILE)}
    result, _ = run(
        strategy,
        apps,
        rounds=2,
        initial_arrays=initial(d),
        node_configs={i: secret for i in apps},
    )
    m = result.train_metrics_clientapp[2]
    assert m[keys.PARTICIPANTS] == 3 and m[keys.CLIENT_EPSILON] == pytest.approx(
        compute_epsilon([(z, 1.0, 2)], 1e-5)
    )
    decrypted = decrypt_record(result.arrays, load_keys(keys_dir / SECRET_FILE))
    w = decrypted.arrays["w"].numpy().astype(np.float64)
    # Two rounds of a uniform mean of noised updates: the noise of the mean is
    # z*C*sqrt(n/t)/n per round; its std over 2 rounds is sqrt(2) times that.
    expected = math.sqrt(2) * z * clip / 3
    assert (w - w.mean()).std() == pytest.approx(expected, rel=0.1)


def test_central_dp_over_homomorphic_is_refused_distributed_allowed(keys_dir):
    inner = HomomorphicAggregation(FedAvg(), keys_dir / SERVER_FILE)
    with pytest.raises(ValueError, match="Use DistributedDP"):
        DPFedAvg(inner, num_clients=5, clipping_norm=1.0, noise_multiplier=1.0)
    DistributedDP(inner, clipping_norm=1.0, min_clients=2, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="homomorphic"):
        HomomorphicAggregation(
            DistributedDP(
                FedAvg(), clipping_norm=1.0, min_clients=2, noise_multiplier=1.0
            ),
            keys_dir / SERVER_FILE,
        )


def test_robust_inside_distributed_dp_is_refused():
    with pytest.raises(ValueError, match="robust rule inside"):
        DistributedDP(
            TrimmedMean(beta=0.2),
            clipping_norm=1.0,
            min_clients=2,
            noise_multiplier=1.0,
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_clients": 0}, "min_clients must be an integer >= 1"),
        ({"clipping_norm": 0.0}, "clipping_norm must be > 0"),
        ({"delta": 0.4, "min_clients": 4}, "delta=0.4 must be below 1/min_clients"),
        ({"noise_multiplier": None}, "exactly one of noise_multiplier"),
    ],
)
def test_distributed_dp_parameters_are_validated(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ddp(**kwargs)


def test_target_epsilon_calibrates_the_shares():
    strategy = ddp(
        noise_multiplier=None, target_epsilon=4.0, num_rounds=10, min_clients=9
    )
    eps = compute_epsilon([(strategy.noise_multiplier, 1.0, 10)], 1e-5)
    assert 3.99 <= eps <= 4.0
    assert strategy.client_noise_stddev == pytest.approx(strategy.noise_multiplier / 3)
