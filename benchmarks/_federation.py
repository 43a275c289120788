"""A fast, in-process Flower federation on scikit-learn's digits, with Byzantine nodes.

Used by :mod:`benchmarks.robustness` (and its test). Everything Flower-facing is
real: clients are :class:`flwr.clientapp.ClientApp` objects (with
:func:`flwr_ext.attacks.byzantine_mod`), the server side is any Flower
:class:`~flwr.serverapp.strategy.Strategy` driven by its own ``start()``, and every
message crosses :class:`flwr_ext.inprocess.InProcessGrid`'s protobuf "wire". What is
simplified is only the transport (no Ray, no SuperLink) and the model (a numpy MLP,
so that a 30-round, 20-client run takes about a second on one core).

How each attack reaches the server
----------------------------------
- ``sign-flip``, ``scaling``, ``gaussian-noise`` and ``nan-inf`` (half of the
  attackers send NaN, the other half +Inf) are applied by
  :func:`~flwr_ext.attacks.byzantine_mod` inside the Byzantine nodes' ClientApp,
  configured through their ``node_config`` exactly as on a SuperNode.
- ``weight-inflation``: the attackers claim :data:`WEIGHT_INFLATION` times their
  ``num-examples`` *and* send sign-flipped updates (the mod's ``sign-flip``), so
  the inflated claim amplifies something harmful; a claim on an honest update
  would only test over-weighting one honest client. :class:`ByzantineGrid`
  rewrites the claim in those nodes' replies.
- ``malformed``: not an attack on the model but on the server's parsing. The
  attackers take turns sending the replies that crash Flower's built-ins: an
  array with the wrong shape, a missing array, an extra ArrayRecord, and an
  error reply (:data:`MALFORMED_KINDS`); :class:`ByzantineGrid` builds them.
- ``label-flip`` poisons the Byzantine nodes' training labels
  (:func:`~flwr_ext.attacks.flip_labels_if_attacking` in the ClientApp).
- ``alie``, ``ipm``, ``minmax``, ``minsum``, ``mimic``, ``alie-opt`` and
  ``ipm-opt`` are *omniscient*: the attacker must know the honest updates of the
  round. :class:`ByzantineGrid` plays the colluding adversary: it lets every node
  train, and before the replies reach the strategy it replaces the Byzantine nodes'
  replies with ``global + attack(honest updates)`` (new reply Messages to the same
  instructions, with the nodes' own ``num-examples``). The strategy still sees
  ordinary reply Messages in ``aggregate_train``. ``alie-opt`` and ``ipm-opt`` are
  also given the server's rule (:func:`benchmarks._targets.target_aggregator`,
  including the state of a stateful rule) and line-search their strength against
  it every round; ``alie-opt-evasive`` and ``ipm-opt-evasive`` do the same
  with every candidate made non-opposing to the last server step (the
  difference of the last two global models, which every client sees):
  the counter-move to ``CenteredClippingRule(max_opposed=f)``; ``mimic``
  picks the honest client to copy in round 1 (largest projection on the top
  direction of variance) and keeps it.

The grid also audits the strategy: it fingerprints every reply it hands over and,
at the next round (or at :meth:`ByzantineGrid.finish`), counts replies whose
content was modified in place (Flower's ``FedTrimmedAvg``, ``FedMedian`` and
``Bulyan`` pop arrays out of the replies).
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import Strategy
from sklearn.datasets import load_digits

from flwr_ext.attacks import (
    alie,
    byzantine_mod,
    flip_labels_if_attacking,
    inflate_weight,
    ipm,
    minmax,
    minsum,
    optimal_alie,
    optimal_ipm,
)
from flwr_ext.attacks.adaptive import Aggregator, ServerStep, mimic
from flwr_ext.inprocess import InProcessGrid
from flwr_ext.records import Manifest, unflatten

__all__ = [
    "ATTACKS",
    "MLP_LAYERS",
    "NUM_CLASSES",
    "ByzantineGrid",
    "FederatedDigits",
    "RunResult",
    "RunSpec",
    "TrainConfig",
    "dirichlet_partition",
    "evaluate_mlp",
    "federated_digits",
    "init_mlp",
    "make_client_app",
    "run_federation",
    "train_mlp",
]

NUM_CLASSES = 10
#: Layer widths of the MLP: 64 pixels -> 32 hidden (ReLU) -> 10 classes.
MLP_LAYERS = (64, 32, NUM_CLASSES)

#: Attack names, in table order. ``none`` is the clean run.
ATTACKS: tuple[str, ...] = (
    "none",
    "sign-flip",
    "gaussian-noise",
    "scaling",
    "label-flip",
    "alie",
    "ipm",
    "weight-inflation",
    "nan-inf",
    "malformed",
    "minmax",
    "minsum",
    "mimic",
    "alie-opt",
    "ipm-opt",
    "alie-opt-evasive",
    "ipm-opt-evasive",
)
#: Omniscient attacks that are also given the server's rule.
RULE_AWARE_ATTACKS = ("alie-opt", "ipm-opt", "alie-opt-evasive", "ipm-opt-evasive")
#: Attacks the adversary grid applies (they read the honest updates of the round).
OMNISCIENT_ATTACKS = ("alie", "ipm", "minmax", "minsum", "mimic", *RULE_AWARE_ATTACKS)
#: IPM's epsilon: the small value of Xie et al. that hides in the honest spread.
IPM_EPSILON = 0.1
#: Factor by which weight-inflation attackers multiply their ``num-examples``.
WEIGHT_INFLATION = 100.0
#: What the ``malformed`` attackers send, in turn (attacker i sends kind i mod 4).
MALFORMED_KINDS = ("wrong-shape", "missing-array", "extra-arrayrecord", "error")


# ---------------------------------------------------------------------------- data
@dataclass(frozen=True)
class FederatedDigits:
    """Client partitions of digits and the held-out set the server evaluates on.

    Attributes
    ----------
    partitions : tuple of (x, y)
        One ``(x (m_i, 64) float32 in [0, 1], y (m_i,) int64)`` pair per client.
    x_eval, y_eval : np.ndarray
        The held-out evaluation set (the test split, or a validation split of the
        training pool when hyper-parameters are being chosen).
    """

    partitions: tuple[tuple[np.ndarray, np.ndarray], ...]
    x_eval: np.ndarray
    y_eval: np.ndarray


def _stratified_split(
    y: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(rest, held_out)`` index arrays, ``fraction`` of each class held out."""
    held: list[np.ndarray] = []
    rest: list[np.ndarray] = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = round(fraction * len(idx))
        held.append(idx[:k])
        rest.append(idx[k:])
    return np.sort(np.concatenate(rest)), np.sort(np.concatenate(held))


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_partition_size: int = 10,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Split indices non-IID: each class is divided by ``Dirichlet(alpha)`` shares.

    The usual label-skew partition (Hsu et al., 2019): for every class, draw the
    clients' shares from a symmetric Dirichlet with concentration ``alpha`` (0.5 is
    strongly skewed: most clients see a few classes) and split that class's
    examples accordingly. Redrawn until every client has ``min_partition_size``
    examples.

    Raises
    ------
    ValueError
        If no draw in ``max_tries`` gives every client enough examples.
    """
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_partition_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split of {len(labels)} examples gave each of "
        f"{num_clients} clients >= {min_partition_size} examples in {max_tries} draws"
    )


def federated_digits(
    num_clients: int,
    alpha: float,
    seed: int,
    *,
    holdout: str = "test",
    test_fraction: float = 0.2,
) -> FederatedDigits:
    """Split digits (1,797 8x8 images) into a test set and non-IID client partitions.

    The test split (``test_fraction`` of each class: 359 images) is the same for
    every seed; ``seed`` draws the client partitions of the rest. With
    ``holdout="validation"`` the server evaluates instead on a validation split
    (``test_fraction`` of each class of the training pool: 287 images), the
    clients share what remains, and the test split is not touched: that is how the
    training hyper-parameters and the recommended configuration were chosen.
    """
    if holdout not in ("test", "validation"):
        raise ValueError(f"holdout must be 'test' or 'validation', got {holdout!r}")
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    pool, test = _stratified_split(y, test_fraction, np.random.default_rng(0))
    if holdout == "validation":
        rest, val = _stratified_split(y[pool], test_fraction, np.random.default_rng(1))
        pool, held = pool[rest], pool[val]
    else:
        held = test
    rng = np.random.default_rng([seed, 1])
    parts = dirichlet_partition(y[pool], num_clients, alpha, rng)
    partitions = tuple((x[pool[p]], y[pool[p]]) for p in parts)
    return FederatedDigits(partitions, x[held], y[held])


# ---------------------------------------------------------------------------- model
def init_mlp(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Return float32 MLP parameters, PyTorch's default ``nn.Linear`` init.

    Keys ``fc{i}.weight`` (out, in) and ``fc{i}.bias`` (out,), uniform in
    ``+-1/sqrt(fan_in)``: 2,410 parameters for :data:`MLP_LAYERS`.
    """
    params: dict[str, np.ndarray] = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(MLP_LAYERS), start=1):
        bound = 1.0 / math.sqrt(fan_in)
        params[f"fc{i}.weight"] = rng.uniform(-bound, bound, (fan_out, fan_in)).astype(
            np.float32
        )
        params[f"fc{i}.bias"] = rng.uniform(-bound, bound, fan_out).astype(np.float32)
    return params


def _forward(
    params: Mapping[str, np.ndarray], x: np.ndarray
) -> tuple[list[np.ndarray], np.ndarray]:
    """Return the activations of every layer (inputs first) and the logits."""
    num_layers = len(MLP_LAYERS) - 1
    acts = [x]
    h = x
    for i in range(1, num_layers + 1):
        z = h @ params[f"fc{i}.weight"].T + params[f"fc{i}.bias"]
        h = np.maximum(z, 0.0) if i < num_layers else z
        if i < num_layers:
            acts.append(h)
    return acts, h


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def train_mlp(
    params: Mapping[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], float]:
    """Mini-batch SGD on the cross-entropy; returns new float32 params and the loss.

    The loss is the mean cross-entropy over the last epoch's batches. ``params``
    is not modified.
    """
    p = {k: np.array(v, dtype=np.float32) for k, v in params.items()}
    num_layers = len(MLP_LAYERS) - 1
    m = len(x)
    losses: list[float] = []
    for _ in range(epochs):
        order = rng.permutation(m)
        losses = []
        for start in range(0, m, batch_size):
            idx = order[start : start + batch_size]
            xb, yb = x[idx], y[idx]
            acts, logits = _forward(p, xb)
            prob = _softmax(logits)
            rows = np.arange(len(idx))
            losses.append(float(-np.log(prob[rows, yb] + 1e-12).mean()))
            grad = prob
            grad[rows, yb] -= 1.0
            grad /= len(idx)
            for i in range(num_layers, 0, -1):
                w = p[f"fc{i}.weight"]
                below = grad @ w if i > 1 else None
                w -= lr * (grad.T @ acts[i - 1])
                p[f"fc{i}.bias"] -= lr * grad.sum(axis=0)
                if below is not None:
                    grad = below * (acts[i - 1] > 0)
    return p, float(np.mean(losses)) if losses else math.nan


def evaluate_mlp(
    params: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray
) -> float:
    """Return the MLP's accuracy on ``(x, y)``; NaN if a parameter is not finite."""
    if not all(np.isfinite(v).all() for v in params.values()):
        return math.nan
    _, logits = _forward(params, x)
    return float((logits.argmax(axis=1) == y).mean())


# ---------------------------------------------------------------------------- client
@dataclass(frozen=True)
class TrainConfig:
    """Local training of every client (plain SGD, as in FedAvg).

    The defaults were chosen for clean FedAvg on a *validation* split of the
    training pool (``holdout="validation"``; see ``docs/robustness.md``), never on
    the test split: lr in {0.05, 0.1, 0.2, 0.3, 0.4} x epochs in {1, 2, 5, 10}
    plateaus at 95.5-96 % from lr=0.2, 5 epochs.
    """

    epochs: int = 5
    batch_size: int = 16
    lr: float = 0.2


def make_client_app(
    data: FederatedDigits,
    train: TrainConfig,
    seed: int,
    *,
    momentum: float | None = None,
) -> ClientApp:
    """Return the ClientApp every node runs (``byzantine_mod`` included).

    With ``momentum`` ``beta``, :func:`flwr_ext.mods.momentum_mod` runs inside
    ``byzantine_mod`` (the node's momentum reply is what a mod attack transforms),
    with ``beta`` in every node's config as a site would set it.

    The node's ``partition-id`` (from its ``node_config``) picks its data; a node
    whose config says ``attack='label-flip'`` trains on flipped labels, and the mod
    applies the update attacks. SGD shuffling is seeded by (seed, partition, round).
    """
    mods = [byzantine_mod]
    if momentum is not None:
        from flwr_ext.mods.momentum import momentum_mod

        mods.append(momentum_mod)
    app = ClientApp(mods=mods)

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        x, y = data.partitions[pid]
        y = flip_labels_if_attacking(y, context, NUM_CLASSES)
        arrays = next(iter(msg.content.array_records.values()))
        server_round = int(msg.content["config"].get("server-round", 0))
        params, loss = train_mlp(
            {k: a.numpy() for k, a in arrays.items()},
            x,
            y,
            epochs=train.epochs,
            batch_size=train.batch_size,
            lr=train.lr,
            rng=np.random.default_rng([seed, pid, server_round]),
        )
        return Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(v) for k, v in params.items()}),
                    "metrics": MetricRecord(
                        {"num-examples": len(x), "train-loss": loss}
                    ),
                }
            ),
            reply_to=msg,
        )

    return app


def byzantine_node_config(attack: str, index: int, seed: int) -> dict:
    """``node_config`` entries that make the ``index``-th Byzantine node attack.

    Omniscient attacks (ALIE, IPM) need no entry: :class:`ByzantineGrid` applies
    them. ``nan-inf`` alternates NaN and +Inf between attackers.
    """
    if attack in ("none", "malformed") or attack in OMNISCIENT_ATTACKS:
        return {}
    if attack == "nan-inf":
        return {"attack": "nan" if index % 2 == 0 else "inf"}
    if attack == "weight-inflation":
        return {"attack": "sign-flip"}  # ByzantineGrid inflates the claim
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; choose one of {ATTACKS}")
    return {"attack": attack, "attack-seed": seed * 1000 + index}


# ---------------------------------------------------------------------------- grid
#: An omniscient attack: honest updates (h, d), f, the server's rule -> update (d,).
OmniscientAttack = Callable[[np.ndarray, int, Aggregator | None], np.ndarray]


_OMNISCIENT: dict[str, OmniscientAttack] = {
    "alie": lambda honest, f, _r: alie(honest, num_byzantine=f),
    "ipm": lambda honest, _f, _r: ipm(honest, epsilon=IPM_EPSILON),
    "minmax": lambda honest, _f, _r: minmax(honest),
    "minsum": lambda honest, _f, _r: minsum(honest),
    "mimic": lambda honest, _f, _r: honest[mimic(honest)],  # see ByzantineGrid
}
#: The line-searched attacks (see ByzantineGrid): the attack, and whether it is
#: evasive (called with the last server step as ``reference``).
_LINE_SEARCHED: dict[str, tuple[Callable[..., np.ndarray], bool]] = {
    "alie-opt": (optimal_alie, False),
    "ipm-opt": (optimal_ipm, False),
    "alie-opt-evasive": (optimal_alie, True),
    "ipm-opt-evasive": (optimal_ipm, True),
}


def _fingerprint(message: Message) -> tuple:
    """Summarise what a strategy must not change: record keys and array bytes."""
    if message.has_error():
        return ("error",)
    content = message.content
    arrays = tuple(
        (rk, tuple((k, a.dtype, tuple(a.shape), hash(a.data)) for k, a in rec.items()))
        for rk, rec in content.array_records.items()
    )
    metrics = tuple(
        (rk, tuple(sorted((k, repr(v)) for k, v in rec.items())))
        for rk, rec in content.metric_records.items()
    )
    return arrays, metrics


class ByzantineGrid(InProcessGrid):
    """:class:`InProcessGrid` with a colluding adversary and an in-place-edit audit.

    Parameters
    ----------
    nodes, node_configs, run_config
        As for :class:`~flwr_ext.inprocess.InProcessGrid`.
    byzantine : Iterable[int]
        Node ids controlled by the adversary.
    omniscient : str or None
        One of :data:`OMNISCIENT_ATTACKS`: replace the Byzantine nodes' train
        replies with that attack computed from the honest updates of the round.
    aggregator : callable or None
        The server's rule as the attacker sees it, ``(n, d) -> (d,)``; needed by
        :data:`RULE_AWARE_ATTACKS`.
    server_step : callable or None
        The server's optimizer as the attacker models it, aggregate ``(d,)`` ->
        model step ``(d,)``
        (:func:`benchmarks._targets.target_server_step`); the line-searched
        attacks then compare candidates by the step they cause. None: by the
        aggregate (a server without an optimizer of its own).
    weight_factor : float (default: 1.0)
        Multiply the ``num-examples`` the Byzantine nodes claim by this factor.
    malformed : bool (default: False)
        Replace the Byzantine nodes' train replies with malformed ones
        (:data:`MALFORMED_KINDS`, the i-th attacker sends kind i mod 4).
    """

    def __init__(
        self,
        nodes: Mapping[int, Callable[[Message, Context], Message]],
        *,
        node_configs: Mapping[int, dict] | None = None,
        run_config: dict | None = None,
        byzantine: Iterable[int] = (),
        omniscient: str | None = None,
        aggregator: Aggregator | None = None,
        server_step: ServerStep | None = None,
        weight_factor: float = 1.0,
        malformed: bool = False,
    ) -> None:
        super().__init__(nodes, node_configs=node_configs, run_config=run_config)
        if omniscient is not None and omniscient not in OMNISCIENT_ATTACKS:
            raise ValueError(f"omniscient must be one of {sorted(OMNISCIENT_ATTACKS)}")
        if omniscient in RULE_AWARE_ATTACKS and aggregator is None:
            raise ValueError(f"omniscient={omniscient!r} needs the server's aggregator")
        self.byzantine = frozenset(byzantine)
        self.omniscient = omniscient
        self.aggregator = aggregator
        self.server_step = server_step
        #: The honest node the ``mimic`` attackers copy (chosen in round 1).
        self.mimic_target: int | None = None
        #: The last two global models seen in train rounds (evasive attacks).
        self._globals: tuple[np.ndarray | None, np.ndarray | None] = (None, None)
        self.weight_factor = weight_factor
        self.malformed = malformed
        self._instructions: dict[str, Message] = {}
        self._handed_over: list[tuple[Message, tuple]] = []
        #: Replies the strategy modified in place (counted once each).
        self.modified_replies = 0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Audit the previous round's replies, then deliver ``messages``."""
        self._audit()
        messages = list(messages)
        ids = list(super().push_messages(messages))
        self._instructions = dict(zip(ids, messages, strict=True))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Return the replies, with the omniscient attack applied if configured."""
        replies = list(super().pull_messages(message_ids))
        if self.omniscient is not None:
            replies = self._attack(replies)
        if self.weight_factor != 1.0:
            replies = [self._inflate(r) for r in replies]
        if self.malformed:
            replies = [self._malform(r) for r in replies]
        self._handed_over = [(r, _fingerprint(r)) for r in replies]
        return replies

    def finish(self) -> int:
        """Audit the last round; return the number of replies modified in place."""
        self._audit()
        return self.modified_replies

    def _audit(self) -> None:
        for reply, before in self._handed_over:
            if _fingerprint(reply) != before:
                self.modified_replies += 1
        self._handed_over = []

    def _malform(self, reply: Message) -> Message:
        """Return a malformed replacement for an attacker's train reply."""
        node = int(reply.metadata.src_node_id)
        instruction = self._instructions.get(reply.metadata.reply_to_message_id)
        if (
            reply.has_error()
            or node not in self.byzantine
            or instruction is None
            or instruction.metadata.message_type != MessageType.TRAIN
        ):
            return reply
        kind = MALFORMED_KINDS[
            sorted(self.byzantine).index(node) % len(MALFORMED_KINDS)
        ]
        if kind == "error":
            return Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="malformed"),
                reply_to=instruction,
            )
        content: dict = {}
        for key, record in reply.content.items():
            if isinstance(record, ArrayRecord):
                arrays = {k: a.numpy() for k, a in record.items()}
                first, last = next(iter(arrays)), list(arrays)[-1]
                if kind == "wrong-shape":
                    arrays[first] = np.ascontiguousarray(arrays[first].T)
                elif kind == "missing-array":
                    del arrays[last]
                content[key] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
                if kind == "extra-arrayrecord":
                    content["extra"] = ArrayRecord(
                        {k: Array(v) for k, v in arrays.items()}
                    )
            else:
                content[key] = record
        return Message(RecordDict(content), reply_to=instruction)

    def _inflate(self, reply: Message) -> Message:
        """Return ``reply`` with its claimed ``num-examples`` inflated (attackers)."""
        if reply.has_error() or int(reply.metadata.src_node_id) not in self.byzantine:
            return reply
        instruction = self._instructions.get(reply.metadata.reply_to_message_id)
        if instruction is None:
            return reply
        content: dict = {}
        for key, record in reply.content.items():
            if isinstance(record, MetricRecord) and "num-examples" in record:
                claimed = dict(record.items())
                claimed["num-examples"] = inflate_weight(
                    float(claimed["num-examples"]), self.weight_factor
                )
                content[key] = MetricRecord(claimed)
            else:
                content[key] = record
        return Message(RecordDict(content), reply_to=instruction)

    def _attack(self, replies: list[Message]) -> list[Message]:
        train: list[tuple[Message, Message]] = []
        for reply in replies:
            instruction = self._instructions.get(reply.metadata.reply_to_message_id)
            if (
                instruction is not None
                and instruction.metadata.message_type == MessageType.TRAIN
                and not reply.has_error()
            ):
                train.append((reply, instruction))
        attackers = [
            (r, i) for r, i in train if int(r.metadata.src_node_id) in self.byzantine
        ]
        if not attackers:
            return replies
        # Clients reply in their own dtypes (float32 here) even when a strategy
        # sends a float64 model (Flower's FedAdam): read each record by its own
        # manifest, and answer in the honest replies' format.
        honest_train = [
            r for r, _ in train if int(r.metadata.src_node_id) not in self.byzantine
        ]
        honest_records = [
            next(iter(r.content.array_records.values())) for r in honest_train
        ]
        if not honest_records:
            return replies
        reply_manifest = Manifest.from_arrayrecord(honest_records[0])
        global_arrays = next(iter(attackers[0][1].content.array_records.values()))
        global_vec = _vector(global_arrays, reply_manifest.keys)
        honest = np.stack(
            [_vector(rec, reply_manifest.keys) - global_vec for rec in honest_records]
        )
        assert self.omniscient is not None
        # The last server step, as any client sees it (two global models).
        if self._globals[-1] is None or not np.array_equal(
            self._globals[-1], global_vec
        ):
            self._globals = (self._globals[-1], global_vec)
        previous = self._globals[0]
        reference = None if previous is None else global_vec - previous
        if self.omniscient == "mimic":
            nodes = [int(r.metadata.src_node_id) for r in honest_train]
            if self.mimic_target not in nodes:
                self.mimic_target = nodes[mimic(honest)]
            update = honest[nodes.index(self.mimic_target)]
        elif self.omniscient in _LINE_SEARCHED:
            if self.aggregator is None:
                raise ValueError("this attack needs the server's rule (aggregator=...)")
            attack, evasive = _LINE_SEARCHED[self.omniscient]
            update = attack(
                honest,
                len(self.byzantine),
                self.aggregator,
                reference=reference if evasive else None,
                server_step=self.server_step,
            )
        else:
            update = _OMNISCIENT[self.omniscient](
                honest, len(self.byzantine), self.aggregator
            )
        poisoned = global_vec + update
        manifest = reply_manifest
        replaced = {
            id(r): _replace_arrays(r, i, poisoned, manifest) for r, i in attackers
        }
        return [replaced.get(id(r), r) for r in replies]


def _vector(record: ArrayRecord, keys: tuple[str, ...]) -> np.ndarray:
    """Concatenate ``record``'s arrays in ``keys`` order as one float64 vector."""
    return np.concatenate([record[k].numpy().ravel() for k in keys]).astype(np.float64)


def _replace_arrays(
    reply: Message, instruction: Message, model: np.ndarray, manifest: Manifest
) -> Message:
    """Build a new reply to ``instruction`` carrying ``model`` (not the node's)."""
    content: dict = {}
    for key, record in reply.content.items():
        if isinstance(record, ArrayRecord):
            content[key] = unflatten(model, manifest)
        elif isinstance(record, MetricRecord):
            content[key] = MetricRecord(dict(record.items()))
        else:
            content[key] = record
    return Message(RecordDict(content), reply_to=instruction)


# ---------------------------------------------------------------------------- runs
StrategyFactory = Callable[[int, int, float], Strategy]
#: What the rule-aware attacker is given: the strategy -> its rule ``(n, d) -> (d,)``.
TargetFactory = Callable[[Strategy], Aggregator]


@dataclass(frozen=True)
class RunSpec:
    """One federation: a strategy under one attack, one Byzantine fraction, one seed.

    ``num_byzantine`` is ``round(fraction * num_clients)``; the first that many
    partitions are Byzantine (partitions are a fresh random draw per seed).
    With ``attack="none"`` every node is honest, but the strategy is still built
    for ``fraction`` (a defence configured for f pays its price without attack).
    """

    strategy: str
    attack: str
    fraction: float
    seed: int
    rounds: int = 30
    num_clients: int = 20
    alpha: float = 0.5
    holdout: str = "test"
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def num_byzantine(self) -> int:
        """``f``, Byzantine clients the strategy is told to tolerate."""
        return round(self.fraction * self.num_clients)


@dataclass
class RunResult:
    """What one federation produced.

    ``status`` is ``ok``, ``crash`` (``start()`` raised: ``error`` says what),
    ``nan`` (the final model has NaN/Inf) or ``no-model`` (no round ever produced
    a model). ``accuracy`` is the accuracy on the held-out set of the model the
    server holds at the end (the initial one for ``no-model``; None for ``crash``
    and ``nan``); ``curve`` the accuracy after every round (round 0 first).
    """

    spec: RunSpec
    status: str
    accuracy: float | None
    curve: list[float]
    error: str = ""
    dtype_changed: bool = False
    replies_modified: int = 0
    rounds_without_update: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """JSON-ready dict (spec fields flattened in)."""
        out = asdict(self)
        spec = out.pop("spec")
        train = spec.pop("train")
        return {**spec, **{f"train_{k}": v for k, v in train.items()}, **out}


def run_federation(
    spec: RunSpec,
    factory: StrategyFactory,
    target: TargetFactory | None = None,
    *,
    client_momentum: float | None = None,
) -> RunResult:
    """Run ``spec`` with the strategy ``factory(n, f, fraction)`` builds.

    ``target(strategy)`` gives the rule-aware attacks the server's rule (default:
    :func:`benchmarks._targets.target_aggregator`). ``client_momentum`` ``beta``
    puts :func:`flwr_ext.mods.momentum_mod` in every node's ClientApp (honest and
    Byzantine; the adversary then reads the honest nodes' momentum replies).

    Exceptions raised by the strategy are caught and reported as ``crash`` (that
    is a finding about the strategy, not a harness failure).
    """
    started = time.perf_counter()
    data = federated_digits(
        spec.num_clients, spec.alpha, spec.seed, holdout=spec.holdout
    )
    app = make_client_app(data, spec.train, spec.seed, momentum=client_momentum)
    f = spec.num_byzantine if spec.attack != "none" else 0
    node_ids = list(range(1, spec.num_clients + 1))
    byzantine = node_ids[:f]
    node_configs = {
        node: {
            "partition-id": pid,
            "num-partitions": spec.num_clients,
            **({} if client_momentum is None else {"momentum-beta": client_momentum}),
            **(
                byzantine_node_config(spec.attack, pid, spec.seed)
                if node in byzantine
                else {}
            ),
        }
        for pid, node in enumerate(node_ids)
    }
    random.seed(spec.seed)  # Flower samples (and orders) nodes with `random`
    strategy = factory(spec.num_clients, spec.num_byzantine, spec.fraction)
    aggregator = server_step = None
    if spec.attack in RULE_AWARE_ATTACKS:
        from benchmarks._targets import target_server_step

        if target is None:
            from benchmarks._targets import target_aggregator as target
        aggregator = target(strategy)
        server_step = target_server_step(strategy)
    grid = ByzantineGrid(
        dict.fromkeys(node_ids, app),
        node_configs=node_configs,
        byzantine=byzantine,
        omniscient=spec.attack if spec.attack in OMNISCIENT_ATTACKS else None,
        aggregator=aggregator,
        server_step=server_step,
        weight_factor=WEIGHT_INFLATION if spec.attack == "weight-inflation" else 1.0,
        malformed=spec.attack == "malformed",
    )
    initial = init_mlp(np.random.default_rng([spec.seed, 2]))
    initial_record = ArrayRecord({k: Array(v) for k, v in initial.items()})
    dtypes = {k: v.dtype for k, v in initial.items()}
    curve: list[float] = []
    state = {"previous": None, "skipped": 0, "dtype_changed": False, "bad": ""}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        if server_round > 0 and arrays is state["previous"]:
            state["skipped"] += 1
        state["previous"] = arrays
        if set(arrays.keys()) != set(dtypes):
            state["bad"] = f"model has arrays {sorted(arrays.keys())}"
            curve.append(math.nan)
            return MetricRecord({"accuracy": math.nan})
        params = {k: a.numpy() for k, a in arrays.items()}
        if any(params[k].dtype != dtypes[k] for k in dtypes):
            state["dtype_changed"] = True
        acc = evaluate_mlp(params, data.x_eval, data.y_eval)
        curve.append(acc)
        return MetricRecord({"accuracy": acc})

    status, error, accuracy = "ok", "", None
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=initial_record,
            num_rounds=spec.rounds,
            evaluate_fn=evaluate,
        )
    except Exception as err:  # a crashing strategy is a result, not a harness bug
        status, error = "crash", f"{type(err).__name__}: {err}"[:300]
    else:
        if len(result.arrays) == 0:
            status, accuracy = "no-model", curve[-1]  # still the initial model
        elif state["bad"]:
            status, error = "crash", state["bad"]
        elif curve and math.isnan(curve[-1]):
            status = "nan"
        else:
            accuracy = curve[-1]
    modified = grid.finish()
    return RunResult(
        spec=spec,
        status=status,
        accuracy=accuracy,
        curve=curve,
        error=error,
        dtype_changed=bool(state["dtype_changed"]),
        replies_modified=modified,
        rounds_without_update=int(state["skipped"]),
        seconds=time.perf_counter() - started,
    )
