"""The robustness benchmark's harness on tiny federations, so it cannot rot."""

import itertools
import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian

from benchmarks import _byzfl as byzfl
from benchmarks import robustness
from benchmarks._federation import (
    ByzantineGrid,
    RunSpec,
    TrainConfig,
    dirichlet_partition,
    evaluate_mlp,
    federated_digits,
    init_mlp,
    run_federation,
    train_mlp,
)
from benchmarks._strategies import STRATEGIES, strategy_config

TINY = TrainConfig(epochs=1, batch_size=16, lr=0.2)


def spec(strategy, attack, **kw):
    return RunSpec(
        strategy, attack, kw.pop("fraction", 0.34), 0, rounds=1, num_clients=3,
        train=TINY, **kw,
    )  # fmt: skip


def test_dirichlet_partition_covers_every_index_once():
    labels = np.repeat(np.arange(10), 30)
    parts = dirichlet_partition(labels, 7, 0.5, np.random.default_rng(0), 10)
    joined = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(joined, np.arange(300))
    assert min(len(p) for p in parts) >= 10
    with pytest.raises(ValueError, match="gave each of 40 clients >= 10 examples"):
        dirichlet_partition(labels, 40, 0.5, np.random.default_rng(0), 10, 5)


def test_data_split_keeps_test_out_of_training_and_validation():
    test = federated_digits(5, 0.5, seed=0)
    val = federated_digits(5, 0.5, seed=0, holdout="validation")
    assert len(test.x_eval) == 359 and len(val.x_eval) == 287
    # 1,797 images: test (359) | validation (287) | clients.
    assert sum(len(x) for x, _ in test.partitions) == 1797 - 359
    assert sum(len(x) for x, _ in val.partitions) == 1797 - 359 - 287
    assert np.bincount(test.y_eval).min() >= 35  # stratified: every class
    assert not np.array_equal(test.x_eval[:287], val.x_eval)


def test_numpy_mlp_learns_with_sgd_and_does_not_modify_its_input():
    data = federated_digits(1, 0.5, seed=0)
    x, y = data.partitions[0]
    params = init_mlp(np.random.default_rng(0))
    assert sum(v.size for v in params.values()) == 2410
    before = {k: v.copy() for k, v in params.items()}
    trained, loss = train_mlp(
        params, x, y, epochs=5, batch_size=16, lr=0.2, rng=np.random.default_rng(0)
    )
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])
        assert trained[k].dtype == np.float32
    assert evaluate_mlp(trained, data.x_eval, data.y_eval) > 0.85
    assert loss < 0.5
    trained["fc1.bias"][0] = np.nan
    assert math.isnan(evaluate_mlp(trained, data.x_eval, data.y_eval))


def test_one_round_with_an_attack_through_a_real_strategy():
    result = run_federation(
        spec("ours-median", "sign-flip"), strategy_config("ours-median").build
    )
    assert result.status == "ok" and result.error == ""
    assert len(result.curve) == 2 and result.accuracy == result.curve[-1]
    assert result.replies_modified == 0 and not result.dtype_changed


def test_failures_are_recorded_not_raised():
    nan = run_federation(
        spec("flwr-fedavg", "nan-inf"), strategy_config("flwr-fedavg").build
    )
    assert nan.status == "nan" and nan.accuracy is None

    class Exploding(FedAvg):
        def aggregate_train(self, server_round, replies):
            raise ValueError("boom")

    crash = run_federation(spec("x", "none"), lambda n, f, b: Exploding())
    assert crash.status == "crash" and crash.error == "ValueError: boom"


def test_malformed_replies_crash_flowers_fedavg_but_not_ours():
    # 4 of 5 nodes attack: one of each kind (wrong shape, missing array, extra
    # ArrayRecord, error reply); one honest reply remains.
    malformed = dict(fraction=0.8, num_clients=5)
    kw = dict(rounds=1, train=TINY, **malformed)
    crash = run_federation(
        RunSpec("flwr-fedavg", "malformed", seed=0, **kw),
        strategy_config("flwr-fedavg").build,
    )
    assert crash.status == "crash"
    assert crash.error.startswith("InconsistentMessageReplies")
    ours = run_federation(
        RunSpec("ours-median", "malformed", seed=0, **kw),
        strategy_config("ours-median").build,
    )
    assert ours.status == "ok" and ours.rounds_without_update == 0


def test_in_place_modification_of_replies_is_detected():
    trimmed = run_federation(
        spec("flwr-trimmedavg", "none"), strategy_config("flwr-trimmedavg").build
    )
    assert trimmed.replies_modified == 3  # Flower's FedTrimmedAvg pops the arrays


def node(msg: Message, context: Context) -> Message:
    """Node i returns global + i, claiming one example."""
    w = msg.content["arrays"]["w"].numpy()
    delta = np.float32(context.node_id)
    return Message(
        RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(w + delta)}),
                "metrics": MetricRecord({"num-examples": 1}),
            }
        ),
        reply_to=msg,
    )


@pytest.mark.parametrize("attack", ["ipm", "alie"])
def test_omniscient_adversary_replaces_byzantine_replies(attack):
    """Node 1 is Byzantine and omniscient; nodes 2-4 are honest."""
    grid = ByzantineGrid(
        {1: node, 2: node, 3: node, 4: node}, byzantine=[1], omniscient=attack
    )
    result = FedAvg(fraction_evaluate=0.0).start(
        grid=grid,
        initial_arrays=ArrayRecord({"w": Array(np.zeros(3, np.float32))}),
        num_rounds=1,
    )
    honest = np.array([2.0, 3.0, 4.0])
    # ALIE with n = 4, f = 1: z = Phi^-1(2/4) = 0, the honest mean.
    byzantine = -0.1 * honest.mean() if attack == "ipm" else honest.mean()
    expected = (honest.sum() + byzantine) / 4
    np.testing.assert_allclose(result.arrays["w"].numpy(), expected, rtol=1e-6)
    assert grid.finish() == 0


def test_weight_inflation_multiplies_the_attackers_claim():
    grid = ByzantineGrid({1: node, 2: node, 3: node}, byzantine=[1], weight_factor=100)
    result = FedAvg(fraction_evaluate=0.0).start(
        grid=grid,
        initial_arrays=ArrayRecord({"w": Array(np.zeros(2, np.float32))}),
        num_rounds=1,
    )
    expected = (100 * 1 + 2 + 3) / 102
    np.testing.assert_allclose(result.arrays["w"].numpy(), expected, rtol=1e-6)


def test_every_configuration_builds_for_both_fractions():
    keys = [s.key for s in STRATEGIES]
    assert len(keys) == len(set(keys)) == 69
    for config in STRATEGIES:
        if config.key.startswith("byzfl-") and not byzfl.available():
            continue  # the benchmark-only extra `bench` is not installed
        for fraction in (0.2, 0.3):
            assert config.build(20, round(20 * fraction), fraction) is not None
    with pytest.raises(KeyError, match="unknown strategy 'nope'; choose from"):
        strategy_config("nope")


def test_cli_writes_tables_heatmap_and_runs(tmp_path):
    argv = [
        "--rounds", "1", "--seeds", "1", "--fractions", "0.2", "--clients", "5",
        "--strategies", "flwr-fedavg", "ours-median", "--attacks", "none",
        "nan-inf", "--reference-attacks", "none", "nan-inf", "--alphas",
        "--workers", "1", "--out", str(tmp_path),
    ]  # fmt: skip
    assert robustness.main(argv) == 0
    runs = [json.loads(line) for line in (tmp_path / "robustness-runs.jsonl").open()]
    assert len(runs) == 4
    text = (tmp_path / "robustness-tables.md").read_text()
    assert "| FedAvg (Flower) |" in text and "| Median |" in text
    assert "NaN (1/1)" in text  # FedAvg under NaN/Inf
    assert (tmp_path / "img" / "robustness-f20.png").stat().st_size > 10_000
    # --resume reuses every run.
    assert robustness.main([*argv, "--resume"]) == 0
    assert len((tmp_path / "robustness-runs.jsonl").read_text().splitlines()) == 4


def test_cli_sweep_and_reference_limited_to_clean_runs(tmp_path):
    argv = [
        "--rounds", "1", "--seeds", "1", "--fractions", "0.2", "--clients", "5",
        "--strategies", "flwr-fedavg", robustness.RECOMMENDED, "--attacks", "none",
        "ipm-opt", "--alphas", "1.0", "--sweep-fractions", "0.2", "--workers", "1",
        "--out", str(tmp_path),
    ]  # fmt: skip
    assert robustness.main(argv) == 0
    runs = [json.loads(line) for line in (tmp_path / "robustness-runs.jsonl").open()]
    # FedAvg: clean only (2 alphas); the recommended rule: 2 attacks x 2 alphas.
    assert len(runs) == 6
    assert {
        (r["strategy"], r["attack"]) for r in runs if r["strategy"] == "flwr-fedavg"
    } == {("flwr-fedavg", "none")}
    text = (tmp_path / "robustness-tables.md").read_text()
    assert "## Heterogeneity sweep" in text and "| 1 |" in text
    assert "IPM line-searched" in text


@pytest.mark.parametrize(
    "attack",
    ["alie-opt", "ipm-opt", "minmax", "minsum", "mimic", "ipm-opt-evasive"],
)
def test_adaptive_attacks_run_through_real_strategies(attack):
    key = robustness.RECOMMENDED
    result = run_federation(
        spec(key, attack, fraction=0.34), strategy_config(key).build
    )
    assert result.status == "ok", result.error


@pytest.mark.parametrize(
    ("attack", "opposes"), [("ipm-opt", True), ("ipm-opt-evasive", False)]
)
def test_evasive_ipm_does_not_oppose_the_last_server_step(attack, opposes):
    """From round 2 the evasive attacker removes what opposes the last step."""
    sent: list[tuple[np.ndarray, np.ndarray]] = []

    class Recording(FedMedian):
        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            by_node = {r.metadata.src_node_id: r for r in replies}
            reply = by_node[2].content["arrays"]["w"].numpy().astype(np.float64)
            global_ = reply - 2.0  # node 2 sends global + 2
            byz = by_node[1].content["arrays"]["w"].numpy().astype(np.float64)
            sent.append((global_, byz - global_))
            return super().aggregate_train(server_round, replies)

    grid = ByzantineGrid(
        {i: node for i in (1, 2, 3, 4)},
        byzantine=[1],
        omniscient=attack,
        aggregator=lambda x: np.median(x, axis=0),
    )
    Recording(fraction_evaluate=0.0).start(
        grid=grid,
        initial_arrays=ArrayRecord({"w": Array(np.zeros(3, np.float32))}),
        num_rounds=3,
    )
    for (before, _), (after, update) in itertools.pairwise(sent):
        step = after - before
        assert np.linalg.norm(step) > 0
        assert bool(update @ step < -1e-6) == opposes


def test_rule_aware_attacks_need_the_rule():
    with pytest.raises(ValueError, match="needs the server's aggregator"):
        ByzantineGrid({1: node, 2: node}, byzantine=[1], omniscient="ipm-opt")


def test_mimic_keeps_copying_the_same_honest_node():
    grid = ByzantineGrid(
        {1: node, 2: node, 3: node, 4: node}, byzantine=[1], omniscient="mimic"
    )
    FedAvg(fraction_evaluate=0.0).start(
        grid=grid,
        initial_arrays=ArrayRecord({"w": Array(np.zeros(3, np.float32))}),
        num_rounds=3,
    )
    assert grid.mimic_target in (2, 4)  # an extreme honest node, never the middle


def test_round_diagnosis_reports_each_round_in_units_of_the_honest_mean(capsys):
    """IPM sends ``-0.1 * mean(honest)``: its length is 0.100 honest means."""
    from benchmarks import round_diagnosis

    key = robustness.RECOMMENDED
    assert (
        round_diagnosis.main(["--strategy", key, "--attack", "ipm", "--rounds", "2"])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert "(ok)" in lines[0]
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == ["1", "2"]
    for row in rows:
        byz = float(row[5])
        assert byz == pytest.approx(0.1, abs=1e-3)
