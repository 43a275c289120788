"""A run that trains nothing is a failed run, in Flower's Simulation Engine too.

Issue 14, 1(a): CKKS with no secret context on the simulated SuperNodes (the
variable exported after the SuperLink had started) ended ``completed`` with an
empty final model. Here ``flwr-ext simulate`` runs the hospital app under CKKS
with no ``FLWR_EXT_CKKS_CONTEXT`` anywhere: every reply of round 1 is dropped for
that one configuration cause, so the ServerApp stops with ConfigurationError,
Flower marks the run failed and the command exits 1 (not 0), naming the cause.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flwr_ext.cli import main
from flwr_ext.he import create_keys

APP = Path(__file__).resolve().parents[2] / "apps" / "hospital-diagnostics"


@pytest.mark.e2e
def test_simulate_exits_1_when_no_site_has_the_secret_context(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("FLWR_EXT_CKKS_CONTEXT", raising=False)
    keys = create_keys(tmp_path / "keys", "compact")
    code = main(
        [
            "simulate", str(APP), "--num-supernodes", "2", "--timeout", "600",
            "-c", "min-nodes=2", "-c", "num-server-rounds=2",
            "-c", 'standardisation="site"', "-c", 'secure-aggregation="ckks"',
            "-c", f'ckks-server-context="{keys.server}"',
            "-c", f'output-dir="{tmp_path / "out"}"',
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1, out[-4000:]
    assert "finished:failed" in out, out[-4000:]
    assert "ConfigurationError" in out and "no CKKS secret context" in out, out[-4000:]
    assert "round 1" in out
    assert not list((tmp_path / "out").rglob("final_model*")), "an empty model saved"
