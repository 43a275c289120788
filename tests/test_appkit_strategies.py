import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from flwr_ext.appkit.config import ConfigError, ConfigSchema, Option
from flwr_ext.appkit.strategies import BUILDERS, build_strategy
from flwr_ext.appkit.strategy_options import (
    ATTACK_OPTIONS,
    STRATEGY_CHOICES,
    STRATEGY_OPTIONS,
    check_strategy_settings,
)
from flwr_ext.mods.secure_aggregation import (
    secure_aggregation_mod,
    site_requires_ckks,
)
from flwr_ext.strategy import ROBUST_STRATEGIES, DPFedAvg, HomomorphicAggregation

SCHEMA = ConfigSchema(
    [*STRATEGY_OPTIONS, *ATTACK_OPTIONS,
     Option("num-server-rounds", int, 3, "rounds", min=1)]
)  # fmt: skip


def settings(**overrides):
    values = {"min-nodes": 5}
    values.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return SCHEMA.validate(values)


def test_every_choice_has_exactly_one_builder():
    assert set(ROBUST_STRATEGIES) <= set(STRATEGY_CHOICES)
    assert {"fedavg", "fedprox", "fedadam", "dp-fedavg"} <= set(STRATEGY_CHOICES)
    assert list(BUILDERS) == list(STRATEGY_CHOICES)


@pytest.mark.parametrize("name", sorted(ROBUST_STRATEGIES))
def test_robust_rules_wrap_fedavg_with_run_config_parameters(name):
    strategy = build_strategy(
        settings(strategy=name, num_byzantine=1, trim_beta=0.3, min_nodes=7)
    )
    assert isinstance(strategy, ROBUST_STRATEGIES[name])
    assert isinstance(strategy.strategy, FedAvg)
    assert strategy.strategy.min_available_nodes == 7
    assert strategy.num_byzantine == 1
    assert strategy.pre_aggregation is None
    if name == "trimmed-mean":  # trim-beta reaches the rule, not its default 0.2
        assert strategy.rule.beta == 0.3 and strategy.trimmed_per_side(7) == 2
    nnm = build_strategy(
        settings(strategy=name, num_byzantine=1, robust_pre_aggregation="nnm",
                 min_nodes=7)
    )  # fmt: skip
    assert type(nnm.pre_aggregation).__name__ == "NearestNeighborMixing"


def test_flower_base_strategies_and_their_parameters():
    prox = build_strategy(settings(strategy="fedprox", proximal_mu=0.3))
    assert isinstance(prox, FedProx) and prox.proximal_mu == 0.3
    adam = build_strategy(settings(strategy="fedadam", server_learning_rate=0.2))
    assert isinstance(adam, FedAdam) and adam.eta == 0.2
    plain = build_strategy(settings(fraction_train=0.5))
    assert type(plain) is FedAvg and plain.fraction_train == 0.5


def test_dp_fedavg_uses_the_federation_size_and_target_epsilon():
    strategy = build_strategy(
        settings(strategy="dp-fedavg", num_server_rounds=10, min_nodes=4,
                 dp_fedavg_epsilon=8.0, dp_fedavg_clipping_norm=0.5)
    )  # fmt: skip
    assert isinstance(strategy, DPFedAvg) and strategy.num_clients == 4
    assert strategy.target_epsilon == 8.0 and strategy.clipping_norm == 0.5
    fixed = build_strategy(
        settings(strategy="dp-fedavg", num_server_rounds=10,
                 dp_fedavg_num_clients=7, dp_fedavg_noise_multiplier=2.0)
    )  # fmt: skip
    assert fixed.num_clients == 7 and fixed.noise_multiplier == 2.0
    with pytest.raises(ConfigError, match="dp-fedavg"):
        build_strategy(settings(strategy="dp-fedavg", num_server_rounds=10,
                                fraction_train=0.5))  # fmt: skip


def test_metric_aggregators_reach_the_base_strategy():
    def fn(records, key):
        return MetricRecord()

    strategy = build_strategy(settings(strategy="median"), evaluate_metrics_aggr_fn=fn)
    assert strategy.strategy.evaluate_metrics_aggr_fn is fn


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strategy": "krum", "num_byzantine": 2, "min_nodes": 3},
         "needs 7 valid replies per round but min-nodes=3"),
        ({"strategy": "trimmed-mean", "trim_beta": 0.2, "min_nodes": 3},
         "trims no update with min-nodes=3"),
        ({"secure_aggregation": "ckks"}, "needs ckks-server-context"),
    ],
)  # fmt: skip
def test_unsound_or_no_op_combinations_fail_at_start_up(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_strategy_settings(settings(**overrides))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("median", "HomomorphicAggregation cannot wrap Median: a robust rule must "
                   "compare individual updates"),
        ("dp-fedavg", "HomomorphicAggregation cannot wrap DPFedAvg: a DP wrapper "
                      "inside homomorphic aggregation"),
    ],
)  # fmt: skip
def test_the_app_surfaces_the_library_refusal_of_a_defence_over_ckks(
    tmp_path, name, message
):
    # The refusal is composition.check_composition's own text, not an app copy.
    from flwr_ext.he import create_keys

    files = create_keys(tmp_path / "keys")
    with pytest.raises(ConfigError, match=message) as err:
        build_strategy(
            settings(strategy=name, secure_aggregation="ckks",
                     ckks_server_context=str(files.server), num_server_rounds=3)
        )  # fmt: skip
    if name == "dp-fedavg":
        assert "dp-sgd=true" in str(err.value)


def test_ckks_builds_homomorphic_aggregation_from_a_real_key_set(tmp_path):
    from flwr_ext.he import create_keys

    files = create_keys(tmp_path / "keys")
    strategy = build_strategy(
        settings(secure_aggregation="ckks", ckks_server_context=str(files.server))
    )
    assert isinstance(strategy, HomomorphicAggregation)
    assert isinstance(strategy.strategy, FedAvg)
    with pytest.raises(ConfigError, match="does not exist on the machine"):
        build_strategy(
            settings(
                secure_aggregation="ckks",
                ckks_server_context=str(tmp_path / "none.ckks"),
            )
        )
    with pytest.raises(ConfigError, match="absolute path"):
        settings(secure_aggregation="ckks", ckks_server_context="keys/server.ckks")


def test_attack_options_validate_partition_ids_and_names():
    assert settings(attack="sign-flip", attack_partition_ids="0, 2")["attack"]
    with pytest.raises(ConfigError, match="comma-separated"):
        settings(attack_partition_ids="0;2")
    with pytest.raises(ConfigError, match="choose one of"):
        settings(attack="flip")


def _context(node_config=None, run_config=None):
    return Context(
        run_id=1,
        node_id=1,
        node_config=node_config or {},
        state=RecordDict(),
        run_config=run_config or {},
    )


def test_secure_aggregation_mod_passes_plain_runs_through(monkeypatch):
    monkeypatch.delenv("FLWR_EXT_CKKS_CONTEXT", raising=False)
    from flwr_ext.inprocess import InProcessGrid

    InProcessGrid({1: lambda m, c: m})  # task identity for creating messages
    msg = Message(RecordDict(), dst_node_id=1, message_type="train")
    seen = []

    def call_next(message, context):
        seen.append(message)
        return Message(RecordDict({"m": MetricRecord({"x": 1})}), reply_to=message)

    reply = secure_aggregation_mod(msg, _context(), call_next)
    assert seen and not reply.has_error()
    # The run asks for ckks (but this server did not announce it): ckks_mod runs
    # and fails closed, and the ClientApp never runs.
    seen.clear()
    reply = secure_aggregation_mod(
        msg, _context(run_config={"secure-aggregation": "ckks"}), call_next
    )
    assert reply.has_error() and "refusing to send the update" in reply.error.reason
    assert not seen
    # A site with keys refuses a plaintext train round even if the run says none.
    site = _context(node_config={"ckks-context": "/secure/secret.ckks"})
    assert site_requires_ckks(site)
    reply = secure_aggregation_mod(msg, site, call_next)
    assert reply.has_error() and "refusing to send the update" in reply.error.reason
    assert not seen


def test_the_recommended_robust_configuration_from_the_run_config():
    """docs/robustness.md's recommendation, spelled in run-config keys."""
    from flwr.serverapp.strategy import FedAvgM

    from flwr_ext.aggregation import (
        MedianNormEqualization,
        NearestNeighborMixing,
        PreAggregationChain,
    )

    from .conftest import instructions, model, reply_to

    values = settings(
        strategy="trimmed-mean", num_byzantine=1, trim_beta=0.2,
        robust_pre_aggregation="norm-equalization+nnm",
        robust_server_momentum=0.9, robust_server_learning_rate=0.3,
    )  # fmt: skip
    check_strategy_settings(values)
    strategy = build_strategy(values)
    inner = strategy.strategy
    assert type(inner) is FedAvgM and inner.min_available_nodes == 5
    assert (inner.server_learning_rate, inner.server_momentum) == (0.3, 0.9)
    chain = strategy.pre_aggregation
    assert isinstance(chain, PreAggregationChain)
    assert [type(s) for s in chain.steps] == [
        MedianNormEqualization,
        NearestNeighborMixing,
    ]
    assert chain.steps[1].num_byzantine == 1
    # One real round: five sites send global + 2; FedAvgM's first step is
    # 0.3 times the robust aggregate (the momentum starts as the step).
    msgs = instructions(strategy, model(0.0), [1, 2, 3, 4, 5])
    arrays, _ = strategy.aggregate_train(1, [reply_to(m, model(2.0)) for m in msgs])
    assert arrays["w"].numpy() == pytest.approx(0.6)
    # Defaults keep FedAvg around the rule, as before these options.
    assert type(build_strategy(settings(strategy="median")).strategy) is FedAvg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"robust_server_momentum": 0.9},
         "set the server step of a robust rule, but strategy='fedavg'"),
        ({"strategy": "fedadam", "robust_server_learning_rate": 0.3},
         "set the server step of a robust rule, but strategy='fedadam'"),
        ({"robust_pre_aggregation": "nnm"},
         "runs before a robust rule, but strategy='fedavg'"),
    ],
)  # fmt: skip
def test_robust_options_without_a_robust_rule_fail_at_start_up(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_strategy_settings(settings(**overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"robust_pre_aggregation": "norm-equalisation+nnm"},
         "norm-equalization\\+nnm"),
        ({"robust_server_momentum": 1.0}, "robust-server-momentum"),
        ({"robust_server_learning_rate": 0.0}, "robust-server-learning-rate"),
    ],
)  # fmt: skip
def test_robust_option_typos_and_ranges_fail_at_start_up(overrides, message):
    with pytest.raises(ConfigError, match=message):
        settings(strategy="trimmed-mean", **overrides)
