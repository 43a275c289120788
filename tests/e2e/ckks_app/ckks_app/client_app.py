"""ClientApp: ordinary training code; ckks_mod encrypts and decrypts around it."""

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flwr_ext.mods import ckks_mod

from .task import accuracy, load, train


def train_fn(msg: Message, context: Context) -> Message:
    """Train on this partition; reply with the model and num-examples."""
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


def evaluate_fn(msg: Message, context: Context) -> Message:
    """Accuracy of the (decrypted) global model on the shared test set."""
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


def build_app(mods: list) -> ClientApp:
    """The ClientApp with the given mods (the test builds a plaintext twin)."""
    client = ClientApp(mods=mods)
    client.train()(train_fn)
    client.evaluate()(evaluate_fn)
    return client


app = build_app([ckks_mod])
