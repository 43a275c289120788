"""ClientApp: plain local training; byzantine_mod makes configured nodes attack."""

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flwr_ext.attacks import byzantine_mod

from .task import accuracy, load, train

app = ClientApp(mods=[byzantine_mod])


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    x, y, _, _ = load(
        int(context.node_config["partition-id"]),
        int(context.node_config["num-partitions"]),
    )
    arrays = msg.content["arrays"]
    w, b = train(arrays["w"].numpy(), arrays["b"].numpy(), x, y)
    return Message(
        RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(w), "b": Array(b)}),
                "metrics": MetricRecord({"num-examples": len(x)}),
            }
        ),
        reply_to=msg,
    )


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    _, _, xt, yt = load(
        int(context.node_config["partition-id"]),
        int(context.node_config["num-partitions"]),
    )
    arrays = msg.content["arrays"]
    acc = accuracy(arrays["w"].numpy(), arrays["b"].numpy(), xt, yt)
    return Message(
        RecordDict(
            {"metrics": MetricRecord({"num-examples": len(xt), "accuracy": acc})}
        ),
        reply_to=msg,
    )
