"""`flwr run` of a threshold-CKKS app (3 sites) in Flower's Simulation Engine.

The same tiny app as ``test_ckks_flwr_run.py`` with
``secure-aggregation = "ckks-threshold"``: the sites make the collective key at a
setup round (no key files), encrypt under it, and decrypt each round's aggregate
together. The final model equals plaintext FedAvg on the same app code and data
within 1e-5, and every site's share stays in its own file.
"""

import re
import stat

import numpy as np
import pytest

from flwr_ext.launch import simulate

from .test_ckks_flwr_run import APP, NODES, ROUNDS, plaintext_fedavg


@pytest.mark.e2e
def test_threshold_ckks_app_in_flower_simulation_equals_plaintext_fedavg(
    tmp_path, monkeypatch
):
    shares = tmp_path / "shares"
    shares.mkdir(mode=0o700)
    # Simulated SuperNodes only get partition-id/num-partitions as node config: the
    # share directory reaches ckks_mod through the environment.
    monkeypatch.setenv("FLWR_EXT_CKKS_THRESHOLD_DIR", str(shares))
    out_dir = tmp_path / "out"
    outcome = simulate(
        APP,
        num_supernodes=NODES,
        run_config={
            "num-server-rounds": ROUNDS,
            "secure-aggregation": "ckks-threshold",
            "output-dir": str(out_dir),
        },
        home=tmp_path / "flwr-home",
        timeout=600,
    )
    assert outcome.completed, (
        f"{outcome.status}: {outcome.details}\n{outcome.log[-4000:]}"
    )
    assert re.search(r"collective public key of key set \w+ from 3 sites", outcome.log)
    decrypted = re.findall(
        r"round (\d+): aggregate of 3 updates decrypted by all 3", outcome.log
    )
    assert {int(r) for r in decrypted} == set(range(1, ROUNDS + 1))
    assert re.search(r"THRESHOLD-FINAL path=(\S+)", outcome.log), outcome.log[-4000:]
    files = sorted(shares.glob("*.share"))
    assert len(files) == NODES
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)

    final = np.load(out_dir / "final.npz")
    expected = plaintext_fedavg()
    for key in ("w", "b"):
        got, want = final[key], expected[key].numpy()
        assert got.dtype == np.float32
        assert np.abs(want).max() > 0.01  # the model trained: not a trivial match
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
