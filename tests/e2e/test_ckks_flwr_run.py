"""`flwr run` of a CKKS app in Flower's Simulation Engine equals plaintext FedAvg.

The app (``ckks_app``) is an ordinary Flower app whose ClientApp has ``ckks_mod`` and
whose ServerApp uses ``HomomorphicAggregation(FedAvg())``: the server only ever holds
ciphertexts and writes the encrypted final model. The test decrypts that file with
the data owners' key and compares it with plaintext FedAvg run in-process
(``InProcessGrid``) on the same app code, data and initial model.
"""

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvg

from flwr_ext.he import SECRET_FILE, SERVER_FILE, create_keys, decrypt_model_file
from flwr_ext.inprocess import InProcessGrid
from flwr_ext.launch import simulate

APP = Path(__file__).parent / "ckks_app"
NODES = 3
ROUNDS = 3


def plaintext_fedavg() -> ArrayRecord:
    sys.path.insert(0, str(APP))
    try:
        from ckks_app.client_app import build_app
        from ckks_app.task import initial_model
    finally:
        sys.path.remove(str(APP))
    client = build_app([])  # the same ClientApp code, without ckks_mod
    grid = InProcessGrid(
        {n + 1: client for n in range(NODES)},
        node_configs={
            n + 1: {"partition-id": n, "num-partitions": NODES} for n in range(NODES)
        },
    )
    w, b = initial_model()
    result = FedAvg().start(
        grid=grid,
        initial_arrays=ArrayRecord({"w": Array(w), "b": Array(b)}),
        num_rounds=ROUNDS,
    )
    return result.arrays


@pytest.mark.e2e
def test_ckks_app_in_flower_simulation_equals_plaintext_fedavg(tmp_path, monkeypatch):
    keys = create_keys(tmp_path / "keys", "default")
    # Simulated SuperNodes only get partition-id/num-partitions as node config, so
    # the data owners' key path reaches ckks_mod through the environment.
    monkeypatch.setenv("FLWR_EXT_CKKS_CONTEXT", str(keys.secret))
    out_dir = tmp_path / "out"
    outcome = simulate(
        APP,
        num_supernodes=NODES,
        run_config={
            "num-server-rounds": ROUNDS,
            "server-context": str(keys.server),
            "output-dir": str(out_dir),
        },
        home=tmp_path / "flwr-home",
        timeout=600,
    )
    assert outcome.completed, (
        f"{outcome.status}: {outcome.details}\n{outcome.log[-4000:]}"
    )
    match = re.search(r"CKKS-FINAL encrypted=(\w+) path=(\S+)", outcome.log)
    assert match, outcome.log[-4000:]
    assert match.group(1) == "True"
    assert "summed 3 ciphertext updates" in outcome.log
    assert keys.secret.name == SECRET_FILE and keys.server.name == SERVER_FILE

    decrypted = decrypt_model_file(out_dir / "final.ckks-model", keys.secret)
    assert decrypted.contributions == NODES
    expected = plaintext_fedavg()
    for key in ("w", "b"):
        got, want = decrypted.arrays[key].numpy(), expected[key].numpy()
        assert got.dtype == np.float32
        assert np.abs(want).max() > 0.01  # the model trained: not a trivial match
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
