"""ServerApp: HomomorphicAggregation(FedAvg()); saves the encrypted final model."""

import os
from pathlib import Path

from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flwr_ext.he import is_encrypted, save_encrypted_model
from flwr_ext.strategy import HomomorphicAggregation

from .task import initial_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedAvg under CKKS; write final.ckks-model; print one result line."""
    config = context.run_config
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
