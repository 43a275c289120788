"""The adaptive attacks: by hand, against plain FedAvg, and through byzantine_mod."""

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
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from flwr_ext.aggregation import CoordinateMedian, TrimmedMeanRule, WeightedMean
from flwr_ext.attacks import (
    OMNISCIENT_MOD_ATTACKS,
    alie,
    byzantine_mod,
    line_search,
    mimic,
    minmax,
    minsum,
    optimal_alie,
    optimal_ipm,
)
from flwr_ext.attacks.adaptive import evade_opposition
from flwr_ext.attacks.mod import TARGET_RULES
from flwr_ext.inprocess import InProcessGrid

N_HONEST, F, D = 16, 4, 50


def honest_updates(seed=0):
    """Heterogeneous honest updates around a common direction ``g`` (all ones)."""
    rng = np.random.default_rng(seed)
    return 1.0 + rng.normal(0.0, 1.0, (N_HONEST, D))


def fedavg(rows):
    return WeightedMean().aggregate(rows, np.ones(len(rows)))


def with_attack(honest, byz):
    return np.vstack([honest, np.tile(byz, (F, 1))])


ATTACKS = {
    "minmax": lambda h: minmax(h),
    "minsum": lambda h: minsum(h),
    "mimic": lambda h: h[mimic(h)],
    "alie-opt": lambda h: optimal_alie(h, F, fedavg),
    "ipm-opt": lambda h: optimal_ipm(h, F, fedavg),
    # The last server step: along the honest mean, turned by a few degrees.
    "alie-opt-evasive": lambda h: optimal_alie(h, F, fedavg, reference=_step(h)),
    "ipm-opt-evasive": lambda h: optimal_ipm(h, F, fedavg, reference=_step(h)),
}


def _step(honest):
    step = honest.mean(axis=0).copy()
    step[:5] += 0.5
    return step


def test_evasive_attacks_never_oppose_the_last_server_step():
    honest = honest_updates()
    r = _step(honest)
    for name in ("alie-opt-evasive", "ipm-opt-evasive"):
        assert ATTACKS[name](honest) @ r >= -1e-9 * np.linalg.norm(r)
    # The plain IPM opposes it; the evasive one keeps only what is orthogonal.
    plain = optimal_ipm(honest, F, fedavg)
    assert plain @ r < 0
    evasive = evade_opposition(plain, r)
    assert evasive @ r == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(evasive - plain, (evasive - plain) @ r * r / (r @ r))
    # No reference, or a row that does not oppose it: unchanged.
    np.testing.assert_array_equal(evade_opposition(plain, None), plain)
    np.testing.assert_array_equal(evade_opposition(-plain, r), -plain)


@pytest.mark.parametrize("name", list(ATTACKS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_attack_drags_plain_fedavg_further_than_honest_clients_would(name, seed):
    # The reference: the f Byzantine clients send honest updates of their own.
    rng = np.random.default_rng(100 + seed)
    honest = honest_updates(seed)
    own = 1.0 + rng.normal(0.0, 1.0, (F, D))
    mean = honest.mean(axis=0)
    baseline = np.linalg.norm(fedavg(np.vstack([honest, own])) - mean)
    attacked = np.linalg.norm(fedavg(with_attack(honest, ATTACKS[name](honest))) - mean)
    assert attacked > 1.5 * baseline


@pytest.mark.parametrize("name", ["minmax", "minsum", "alie-opt", "ipm-opt"])
def test_the_attacks_that_aim_against_the_gradient_slow_fedavg(name):
    honest = honest_updates()
    g = np.ones(D)
    progress = fedavg(with_attack(honest, ATTACKS[name](honest))) @ g
    assert progress < 0.9 * (honest.mean(axis=0) @ g)


def test_minmax_and_minsum_meet_their_constraints_exactly():
    honest = honest_updates()
    diffs = honest[:, None, :] - honest[None, :, :]
    max_pair = np.sqrt((diffs**2).sum(-1)).max()
    b = minmax(honest)
    dist = np.linalg.norm(honest - b, axis=1)
    assert dist.max() == pytest.approx(max_pair, rel=1e-9)
    b = minsum(honest)
    sq_to_b = ((honest - b) ** 2).sum()
    most_isolated = (diffs**2).sum(-1).sum(1).max()
    assert sq_to_b == pytest.approx(most_isolated, rel=1e-9)
    # Both go against the honest mean along -std: inside the spread, below the mean.
    assert (b < honest.mean(axis=0)).all()


def test_mimic_copies_the_client_furthest_along_the_top_direction():
    honest = honest_updates()
    honest[5] += 10.0 * np.eye(D)[3]  # the odd one out, along coordinate 3
    assert mimic(honest) == 5 or mimic(-honest) == 5


def test_line_search_picks_the_strength_the_rule_lets_through():
    honest = honest_updates()
    # FedAvg lets everything through: the largest IPM epsilon wins.
    s, _ = line_search(honest, F, lambda e: -e * honest.mean(0), fedavg, [0.1, 1, 10])
    assert s == 10
    # Against a trimmed mean the search returns the factor whose aggregate is
    # farthest from the honest mean (checked by brute force).
    tm = TrimmedMeanRule(0.2)

    def trimmed(x):
        return tm.aggregate(x, np.ones(len(x)))

    factors = [0.0, 0.3, 1.0, 3.0, 1e3]

    def candidate(z):
        return honest.mean(0) - z * honest.std(0)

    gaps = [
        np.linalg.norm(trimmed(with_attack(honest, candidate(z))) - honest.mean(0))
        for z in factors
    ]
    s, byz = line_search(honest, F, candidate, trimmed, factors)
    assert s == factors[int(np.argmax(gaps))] and s != 0.0
    np.testing.assert_array_equal(byz, candidate(s))


def test_line_search_with_a_server_step_measures_the_step_not_the_aggregate():
    """An attacker who models the server's optimizer compares model steps.

    Against FedAvg's mean the aggregate criterion takes the largest IPM
    epsilon. Behind a sign-like step (Adam's first step with a tiny ``tau``)
    every epsilon that flips the mean (past h/f = 4) gives the same, largest
    step gap, so the search keeps the first of them; an affine step (FedAvgM)
    changes nothing.
    """
    honest = honest_updates()
    mean = honest.mean(0)
    factors = [0.1, 1.0, 3.0, 10.0, 100.0]

    def candidate(e):
        return -e * mean

    s_plain, _ = line_search(honest, F, candidate, fedavg, factors)
    assert s_plain == 100.0

    def adam_first_step(a):
        return 0.1 * np.sign(a)

    gaps = [
        np.linalg.norm(
            adam_first_step(fedavg(with_attack(honest, candidate(e))))
            - adam_first_step(mean)
        )
        for e in factors
    ]
    s_step, byz = line_search(honest, F, candidate, fedavg, factors, adam_first_step)
    assert s_step == factors[int(np.argmax(gaps))] == 10.0  # the first past h/f = 4
    np.testing.assert_array_equal(byz, candidate(10.0))

    rng = np.random.default_rng(1)
    momentum = rng.normal(size=D)

    def fedavgm_step(a):
        return 0.5 * (a - 0.9 * momentum)

    tm = TrimmedMeanRule(0.2)

    def trimmed(x):
        return tm.aggregate(x, np.ones(len(x)))

    for attack in (optimal_alie, optimal_ipm):
        assert np.array_equal(
            attack(honest, F, trimmed),
            attack(honest, F, trimmed, server_step=fedavgm_step),
        )


def test_line_search_skips_a_step_that_is_not_finite():
    honest = honest_updates()

    def step(a):
        return a if np.linalg.norm(a) < 5.0 else np.full_like(a, np.inf)

    s, _ = line_search(
        honest, F, lambda e: -e * honest.mean(0), fedavg, [0.1, 100.0], step
    )
    assert s == 0.1


def test_optimal_attacks_beat_their_fixed_versions_against_the_median():
    honest = honest_updates()
    med = CoordinateMedian()

    def rule(x):
        return med.aggregate(x, np.ones(len(x)))

    mean = honest.mean(0)

    def gap(byz):
        return np.linalg.norm(rule(with_attack(honest, byz)) - mean)

    assert gap(optimal_ipm(honest, F, rule)) >= gap(-0.1 * mean)
    assert gap(optimal_alie(honest, F, rule)) >= gap(mean - 1.0 * honest.std(0))


# ----------------------------------------------------------------- through the mod
TARGET = 3.0


def make_app():
    app = ClientApp(mods=[byzantine_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        w = msg.content["arrays"]["w"].numpy()
        node = int(context.node_config["partition-id"])
        target = TARGET + 0.2 * node  # heterogeneous honest optima
        new = w + 0.5 * (target - w)
        return Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({"w": Array(new.astype(np.float32))}),
                    "metrics": MetricRecord({"num-examples": 10}),
                }
            ),
            reply_to=msg,
        )

    return app


class AttackersLastGrid(InProcessGrid):
    """Delivers the attackers' (nodes 9, 10) instructions last in every round.

    Flower shuffles the sampled nodes; in a real simulation the attackers wait
    (``attack-wait-s``) for the others, which a sequential grid cannot do.
    """

    def push_messages(self, messages):
        messages = list(messages)
        order = sorted(messages, key=lambda m: int(m.metadata.dst_node_id) >= 9)
        ids = dict(zip(map(id, order), super().push_messages(order), strict=True))
        return [ids[id(m)] for m in messages]


def federation(attack: str | None, share_dir: str | None, extra=None):
    app = make_app()
    configs = {}
    for node in range(1, 11):
        config = {"partition-id": node, "num-partitions": 10}
        if share_dir is not None:
            config["attack-share-dir"] = share_dir
        # Nodes run in id order: the attackers (9, 10) train last and see all.
        if attack is not None and node >= 9:
            config["attack"] = attack
            config.update(extra or {})
        configs[node] = config
    return AttackersLastGrid({n: app for n in range(1, 11)}, node_configs=configs)


def final(grid, rounds=6):
    initial = ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))})
    result = FedAvg().start(grid=grid, initial_arrays=initial, num_rounds=rounds)
    return result.arrays["w"].numpy()


def train_instruction(node, round_=1):
    return Message(
        RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(np.zeros(4, np.float32))}),
                "config": ConfigRecord({"server-round": round_}),
            }
        ),
        dst_node_id=node,
        message_type="train",
    )


EXPECTED = {
    "alie": lambda h: alie(h, 2),
    "minmax": minmax,
    "minsum": minsum,
    "mimic": lambda h: h[mimic(h)],
    "alie-opt": lambda h: optimal_alie(h, 2, fedavg),
    "ipm-opt": lambda h: optimal_ipm(h, 2, fedavg),
    # A node's first round has no previous global model, hence no server step.
    "alie-opt-evasive": lambda h: optimal_alie(h, 2, fedavg),
    "ipm-opt-evasive": lambda h: optimal_ipm(h, 2, fedavg),
}


@pytest.mark.parametrize("attack", OMNISCIENT_MOD_ATTACKS)
def test_mod_sends_the_attack_computed_from_every_shared_update(attack, tmp_path):
    app = make_app()
    extra = {"attack-target-rule": "mean", "attack-target-f": 2}
    grid = federation(attack, str(tmp_path), extra)
    honest = [
        app(train_instruction(n), grid.context(n)).content["arrays"]["w"].numpy()
        for n in range(1, 9)
    ]
    reply = app(train_instruction(10), grid.context(10))
    assert not reply.has_error()
    sent = reply.content["arrays"]["w"].numpy()
    own = np.full(4, 0.5 * (TARGET + 0.2 * 10))
    rows = np.vstack([own, *[h.astype(np.float64) for h in honest]])
    np.testing.assert_allclose(sent, EXPECTED[attack](rows), rtol=1e-6, atol=1e-6)
    assert attack == "mimic" or not np.allclose(sent, own, atol=1e-3)


@pytest.mark.parametrize("attack", ["minmax", "minsum", "alie-opt", "ipm-opt"])
def test_mod_omniscient_attacks_move_fedavg_away_from_the_clean_run(attack, tmp_path):
    clean = final(federation(None, str(tmp_path / "clean")))
    extra = {"attack-target-rule": "mean", "attack-target-f": 2}
    attacked = final(federation(attack, str(tmp_path / "attack"), extra))
    assert np.isfinite(attacked).all() and attacked.dtype == np.float32
    # Honest nodes' own optima differ by 0.2 each: the attack moves FedAvg by more
    # than one node's worth of heterogeneity.
    assert np.abs(attacked - clean).max() > 0.2


def test_mod_line_search_can_target_the_recommended_chain(tmp_path):
    """``attack-target-rule="trimmed-mean-normeq-nnm"``: the attacker probes
    norm equalization, NNM and the trimmed mean, not the bare trimmed mean."""
    from flwr_ext.aggregation import (
        MedianNormEqualization,
        NearestNeighborMixing,
        PreAggregationChain,
    )

    app = make_app()
    extra = {"attack-target-rule": "trimmed-mean-normeq-nnm", "attack-target-f": 2}
    grid = federation("ipm-opt", str(tmp_path), extra)
    honest = [
        app(train_instruction(n), grid.context(n)).content["arrays"]["w"].numpy()
        for n in range(1, 9)
    ]
    reply = app(train_instruction(10), grid.context(10))
    sent = reply.content["arrays"]["w"].numpy()
    own = np.full(4, 0.5 * (TARGET + 0.2 * 10))
    rows = np.vstack([own, *[h.astype(np.float64) for h in honest]])
    chain = PreAggregationChain([MedianNormEqualization(), NearestNeighborMixing(2)])
    n = 10  # the federation's num-partitions

    def recommended(x):
        w = np.ones(len(x))
        return TrimmedMeanRule(2 / n).aggregate(chain.transform(x, w), w)

    np.testing.assert_allclose(
        sent, optimal_ipm(rows, 2, recommended), rtol=1e-6, atol=1e-6
    )
    # The target is the whole chain, not the bare trimmed mean.
    rule = TARGET_RULES["trimmed-mean-normeq-nnm"](20, 4)
    x = honest_updates()
    x = np.vstack([x, np.tile(-0.2 * x.mean(0), (4, 1))])
    w = np.ones(len(x))
    chain4 = PreAggregationChain([MedianNormEqualization(), NearestNeighborMixing(4)])
    expected = TrimmedMeanRule(0.2).aggregate(chain4.transform(x, w), w)
    np.testing.assert_allclose(rule.aggregate(x, w), expected)
    assert not np.allclose(expected, TrimmedMeanRule(0.2).aggregate(x, w), atol=1e-3)


def test_omniscient_mod_attack_without_share_dir_is_an_error_reply():
    grid = federation("minmax", None)
    reply = make_app()(train_instruction(10), grid.context(10))
    assert reply.has_error() and "attack-share-dir" in reply.error.reason


def test_mod_rejects_an_unknown_target_rule(tmp_path):
    app = make_app()
    grid = federation("alie-opt", str(tmp_path), {"attack-target-rule": "kurm"})
    instruction = Message(
        RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(np.zeros(4, np.float32))}),
            }
        ),
        dst_node_id=10,
        message_type="train",
    )
    reply = app(instruction, grid.context(10))
    assert reply.has_error() and "kurm" in reply.error.reason


def test_share_dir_must_be_absolute():
    app = make_app()
    grid = federation("minmax", "relative/dir")
    instruction = Message(
        RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(4, np.float32))})}),
        dst_node_id=1,
        message_type="train",
    )
    reply = app(instruction, grid.context(1))
    assert reply.has_error() and "absolute" in reply.error.reason


def _instruction_with(node, round_, w):
    message = train_instruction(node, round_)
    message.content["arrays"] = ArrayRecord({"w": Array(w.astype(np.float32))})
    return message


@pytest.mark.parametrize(
    ("attack", "plain"),
    [
        ("ipm-opt-evasive", lambda h: optimal_ipm(h, 2, fedavg)),
        ("alie-opt-evasive", lambda h: optimal_alie(h, 2, fedavg)),
    ],
)
def test_mod_evasive_attacks_never_oppose_the_last_server_step(attack, plain, tmp_path):
    """Round 2's attack is built against the step between the two global models.

    The server moved from 0 to ``w2`` (towards the honest optima); the plain
    line-searched attack points against that step, the evasive one must not, and
    it must be exactly the evasive line search with the step the node saw.
    """
    app = make_app()
    extra = {"attack-target-rule": "mean", "attack-target-f": 2}
    grid = federation(attack, str(tmp_path), extra)
    zero, w2 = np.zeros(4), np.full(4, 0.5 * TARGET)
    for node in [*range(1, 9), 10]:
        app(_instruction_with(node, 1, zero), grid.context(node))
    honest = [
        app(_instruction_with(n, 2, w2), grid.context(n))
        .content["arrays"]["w"]
        .numpy()
        .astype(np.float64)
        - w2
        for n in range(1, 9)
    ]
    reply = app(_instruction_with(10, 2, w2), grid.context(10))
    assert not reply.has_error()
    sent = reply.content["arrays"]["w"].numpy().astype(np.float64) - w2
    own = 0.5 * (TARGET + 0.2 * 10 - w2)
    rows = np.vstack([own, *honest])
    step = w2 - zero
    assert float(plain(rows) @ step) < 0  # the plain attack opposes the step
    assert float(sent @ step) >= -1e-5 * np.linalg.norm(step)
    search = optimal_ipm if attack.startswith("ipm") else optimal_alie
    expected = search(rows, 2, fedavg, reference=step)
    np.testing.assert_allclose(sent, expected, rtol=1e-5, atol=1e-5)
