"""benchmarks/bank.py stays runnable: one tiny run of each kind and the tables."""

import math

from benchmarks.bank import (
    BYZANTINE_BANK,
    Spec,
    byzantine_table,
    federation_table,
    run_spec,
    unavailable,
)


def test_local_federated_and_centralised_runs_are_scored_exactly():
    runs = []
    for name, kind, banks in (
        ("local-bank-0", "local", (0,)),
        ("local-bank-1", "local", (1,)),
        ("local-bank-2", "local", (2,)),
        ("local-bank-3", "local", (3,)),
        ("federated", "federated", (0, 1, 2, 3)),
        ("centralised", "centralised", (0, 1, 2, 3)),
    ):
        spec = Spec(
            name,
            "federation",
            0,
            banks=banks,
            evaluate_on=banks if kind == "local" else (0, 1, 2, 3),
            kind=kind,
            overrides={"min-nodes": 1} if kind == "local" else {},
        )
        runs.append(run_spec(spec, 0.15, 2, ("", "")))
    federated = runs[4]
    assert set(federated["banks"]) == {"bank-0", "bank-1", "bank-2", "bank-3"}
    for metrics in (federated["pooled"], *federated["banks"].values()):
        assert 0 <= metrics["auprc"] <= 1 and metrics["frauds"] > 0
        assert metrics["emerging-frauds"] > 0  # every bank's test period has some
    assert federated["bytes-up-per-round"] > 4 * 1249 * 4  # 4 banks' float32 models
    assert 0 < federated["threshold"] < 1 and federated["rounds"] == 2
    table, checks = federation_table(runs)
    assert "| bank-0 (high-street) AUPRC |" in table
    assert math.isfinite(checks["federated/centralised"])


def test_a_poisoned_run_and_the_byzantine_table():
    clean = run_spec(
        Spec("clean-fedavg", "byzantine", 0, evaluate_on=(0, 1, 2)), 0.15, 2, ("", "")
    )
    attacked = run_spec(
        Spec(
            "scaling/fedavg",
            "byzantine",
            0,
            evaluate_on=(0, 1, 2),
            overrides={
                "attack": "scaling",
                "attack-strength": -20.0,
                "attack-partition-ids": str(BYZANTINE_BANK),
            },
        ),
        0.15,
        2,
        ("", ""),
    )
    assert set(attacked["banks"]) == {"bank-0", "bank-1", "bank-2"}
    table, checks = byzantine_table([clean, attacked])
    assert "| scaling |" in table and "scaling/fedavg" in checks


def test_unavailable_names_the_reason():
    assert unavailable({"strategy": "fedavg"}) is None
    reason = unavailable({"strategy": "krum", "min-nodes": 3, "num-byzantine": 1})
    assert reason is not None and "needs 5 valid replies" in reason
