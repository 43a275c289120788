"""`flwr run` in Flower's Simulation Engine with one Byzantine node (byzantine_mod)."""

import re
from pathlib import Path

import pytest

from flwr_ext.launch import simulate

APP = Path(__file__).parent / "robust_app"


@pytest.mark.e2e
def test_trimmed_mean_survives_a_sign_flipping_node_in_flower_simulation(tmp_path):
    outcome = simulate(
        APP,
        num_supernodes=5,
        run_config={"attack": "scaling", "attack-strength": -20.0,
                    "attack-partition-ids": "4", "num-server-rounds": 4},
        home=tmp_path / "flwr-home",
        timeout=600,
    )  # fmt: skip
    assert outcome.completed, (
        f"{outcome.status}: {outcome.details}\n{outcome.log[-3000:]}"
    )
    match = re.search(r"FINAL finite=(\w+) dtype=(\w+) accuracy=([0-9.]+)", outcome.log)
    assert match, outcome.log[-3000:]
    assert match.group(1) == "True" and match.group(2) == "float32"
    assert float(match.group(3)) >= 0.85
    # The attacker's node really ran the attack: its update was trimmed each round.
    assert "robust-received" in outcome.log
