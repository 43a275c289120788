"""hospital-diagnostics with ``secure-aggregation="ckks-threshold"`` through `flwr run`.

Flower's Simulation Engine, 3 simulated hospitals, 2 short rounds: the setup
round makes the collective key from each hospital's own share (in the folder the
environment names: simulated SuperNodes get only ``partition-id`` as node
config), the federated statistics and each round are summed under it and only
the sums are decrypted, by all three hospitals. The run completes with the
plaintext results a plaintext run writes (the server holds the aggregate,
SecAgg's semantics) and no share outside the hospitals' folder.
(The bank app's threshold path is covered in-process: tests/test_app_threshold.py.)
"""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import pytest

from flwr_ext.appkit import parse_summary
from flwr_ext.launch import simulate

APP = Path(__file__).resolve().parents[2] / "apps" / "hospital-diagnostics"
ROUNDS = 2


@pytest.mark.e2e
def test_hospital_app_under_threshold_ckks_with_flwr_run(tmp_path, monkeypatch):
    shares = tmp_path / "shares"
    shares.mkdir(mode=0o700)
    # The private SuperLink (and so every simulated ClientApp) inherits it.
    monkeypatch.setenv("FLWR_EXT_CKKS_THRESHOLD_DIR", str(shares))
    monkeypatch.delenv("FLWR_EXT_CKKS_CONTEXT", raising=False)
    out = tmp_path / "out"
    outcome = simulate(
        APP,
        num_supernodes=3,
        run_config={
            "secure-aggregation": "ckks-threshold",
            "num-server-rounds": ROUNDS,
            "local-epochs": 1,
            "output-dir": str(out),
        },
        home=tmp_path / "flwr-home",
        timeout=300,
    )
    assert outcome.completed, f"{outcome.status}: {outcome.details}\n{outcome.log}"
    log = outcome.log
    assert len(re.findall(r"collective public key of key set \w+ from 3 sites", log))
    assert len(re.findall(r"collective public key of key set", log)) == 1
    assert "pooled over 3 hospitals" in log
    for server_round in range(1, ROUNDS + 1):
        assert f"round {server_round}: aggregate of 3 updates decrypted by all 3" in log

    summary = parse_summary(log, "hospital-diagnostics")
    assert summary["status"] == "completed" and summary["sites"] == "3"
    assert summary["rounds"] == str(ROUNDS) and float(summary["auroc"]) > 0.9
    recipe = json.loads((out / "preprocessing.json").read_text())
    assert len(recipe["feature-mean"]) == len(recipe["features"]) == 30
    assert (out / "final_model.pt").is_file()
    assert not list(out.glob("*.ckks-model"))

    files = sorted(shares.glob("*.share"))
    assert len(files) == 3  # one key set, one share per hospital
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert not list(out.rglob("*.share"))
