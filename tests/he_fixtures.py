"""What the CKKS tests share: a toy model, a toy ClientApp and an in-process grid.

The key sets themselves are fixtures in ``tests/conftest.py`` (``keys_dir``,
``other_keys_dir``, ``ckks_keys``, ``secret``): made once per session, read only.

Each test module keeps only what makes its federation different - the update
rule of its sites (:data:`Update`) and the shape of its model - and builds the
rest here, so a change to how a toy site replies lands in every CKKS test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flwr_ext.he import SECRET_FILE
from flwr_ext.inprocess import InProcessGrid

#: A site's training step: (partition id, train instruction) -> its new arrays,
#: in the order the reply lists them.
Update = Callable[[int, Message], dict[str, np.ndarray]]


def toy_model(*, b_dtype: type = np.float32, steps: bool = True) -> ArrayRecord:
    """Zeros: ``w`` (4, 3) float32, ``b`` (3,) ``b_dtype``, and a 0-d int64 ``steps``.

    ``steps`` (an integer counter) checks that a dtype survives aggregation.
    """
    arrays = {
        "w": Array(np.zeros((4, 3), np.float32)),
        "b": Array(np.zeros(3, b_dtype)),
    }
    if steps:
        arrays["steps"] = Array(np.array(0, dtype=np.int64))
    return ArrayRecord(arrays)


def toy_client_app(
    mods: Sequence,
    update: Update,
    *,
    num_examples: Callable[[int], int] = lambda pid: 10 * (pid + 1),
    train_metrics: Callable[[int], dict[str, float]] = lambda pid: {},
    evaluate_examples: int = 1,
) -> ClientApp:
    """A ClientApp with plain train/evaluate code (it never mentions CKKS).

    Train replies ``update``'s arrays with ``num-examples`` = ``num_examples(pid)``
    and ``train_metrics(pid)``; evaluate replies ``num-examples`` =
    ``evaluate_examples`` and ``w-sum``, the sum of the model's ``w`` it received
    (what a leak of the decrypted model would show). ``pid`` is node config
    ``partition-id`` (0 when the node has none).
    """
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config.get("partition-id", 0))
        new = update(pid, msg)
        out = ArrayRecord({key: Array(np.asarray(v)) for key, v in new.items()})
        metrics = MetricRecord(
            {"num-examples": num_examples(pid), **train_metrics(pid)}
        )
        return Message(RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        w = msg.content["arrays"]["w"].numpy()
        metrics = MetricRecord(
            {"num-examples": evaluate_examples, "w-sum": float(w.sum())}
        )
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def secret_config(keys_dir: Path) -> dict:
    """Node config of a site holding the data owners' secret context."""
    return {"ckks-context": str(keys_dir / SECRET_FILE)}


def grid_for(
    apps: dict,
    node_config: dict | None = None,
    per_node: dict | None = None,
) -> InProcessGrid:
    """An in-process grid: node ``n`` has ``partition-id`` ``n - 1``.

    ``node_config`` is added to every node's config, then ``per_node[n]`` to
    node ``n``'s.
    """
    configs = {}
    for node in apps:
        configs[node] = {"partition-id": node - 1, **(node_config or {})}
        configs[node].update((per_node or {}).get(node, {}))
    return InProcessGrid(apps, node_configs=configs)
