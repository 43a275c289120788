"""ServerApp: HomomorphicAggregation(FedAvg()), or the threshold variant.

``secure-aggregation = "ckks"`` saves the encrypted final model;
``"ckks-threshold"`` (the server learns only each round's aggregate) saves the
plaintext final model as ``final.npz``.
"""

import os
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flwr_ext.he import is_encrypted, save_encrypted_model
from flwr_ext.strategy import HomomorphicAggregation, ThresholdHomomorphicAggregation

from .task import initial_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedAvg under CKKS; write final.ckks-model; print one result line."""
    config = context.run_config
    if str(config["secure-aggregation"]) == "ckks-threshold":
        _threshold(grid, context)
        return
    server_context = str(config["server-context"])
    if not server_context:
        raise ValueError(
            "set run config server-context to the absolute path of "
            "server-context.ckks (flwr-ext keys create --out DIR)"
        )
    strategy = HomomorphicAggregation(
        FedAvg(),
        server_context,
        wire=str(config["wire"]),
    )
    w, b = initial_model()
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord({"w": Array(w), "b": Array(b)}),
        num_rounds=int(config["num-server-rounds"]),
    )
    out_dir = str(config["output-dir"]) or os.path.join(
        os.environ.get("FLWR_HOME", os.path.expanduser("~/.flwr")),
        "outputs",
        str(context.run_id),
    )
    path = save_encrypted_model(result.arrays, Path(out_dir) / "final.ckks-model")
    accuracy = result.evaluate_metrics_clientapp[max(result.evaluate_metrics_clientapp)]
    print(
        f"CKKS-FINAL encrypted={is_encrypted(result.arrays)} path={path} "
        f"accuracy={accuracy['accuracy']:.4f}"
    )


def _threshold(grid: Grid, context: Context) -> None:
    """Multiparty CKKS: setup round, then FedAvg on collectively decrypted sums."""
    config = context.run_config
    strategy = ThresholdHomomorphicAggregation(FedAvg(), min_sites=2)
    w, b = initial_model()
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord({"w": Array(w), "b": Array(b)}),
        num_rounds=int(config["num-server-rounds"]),
    )
    out_dir = Path(
        str(config["output-dir"])
        or os.path.join(
            os.environ.get("FLWR_HOME", os.path.expanduser("~/.flwr")),
            "outputs",
            str(context.run_id),
        )
    )
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = out_dir / "final.npz"
    np.savez(path, **{key: array.numpy() for key, array in result.arrays.items()})
    accuracy = result.evaluate_metrics_clientapp[max(result.evaluate_metrics_clientapp)]
    print(f"THRESHOLD-FINAL path={path} accuracy={accuracy['accuracy']:.4f}")
