"""ServerApp: a robust flwr-ext strategy chosen by run config; prints the outcome."""

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from flwr_ext.strategy import ROBUST_STRATEGIES

from .task import accuracy, load

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    name = str(context.run_config["strategy"])
    strategy = ROBUST_STRATEGIES[name](beta=float(context.run_config["beta"]))
    initial = ArrayRecord(
        {
            "w": Array(np.zeros((64, 10), np.float32)),
            "b": Array(np.zeros(10, np.float32)),
        }
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=int(context.run_config["num-server-rounds"]),
    )
    w, b = result.arrays["w"].numpy(), result.arrays["b"].numpy()
    _, _, xt, yt = load(0, 1)
    finite = bool(np.isfinite(w).all() and np.isfinite(b).all())
    print(
        f"FINAL finite={finite} dtype={w.dtype} accuracy={accuracy(w, b, xt, yt):.4f}"
    )
