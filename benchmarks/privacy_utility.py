"""Accuracy against ε on digits: what each kind of DP costs, and what Flower can claim.

Every run is a real Flower federation: clients are ``ClientApp`` objects, the
server is a real strategy driven by its own ``Strategy.start()``, and messages cross
:class:`flwr_ext.inprocess.InProcessGrid`'s protobuf "wire". Data: scikit-learn's
digits (1797 images, 8x8, 10 classes), pixels divided by 16 (a data-independent
scaling), 360 images held out for the server's test accuracy, the other 1437 split
i.i.d. across the clients. Model: multinomial logistic regression (650 parameters).

Rows (the exact accounting assumptions of each are printed with the table and
written into ``docs/privacy.md``):

- ``ours-user-100``: :class:`flwr_ext.strategy.DPFedAvg`, user level, 100 clients,
  Poisson sampling q = 0.2, accounted *with* amplification by sampling (PRV).
- ``ours-user-10``: DPFedAvg, user level, 10 silos, full participation (PRV,
  no amplification).
- ``ours-record-10``: record-level DP-SGD in 10 silos
  (:func:`flwr_ext.privacy.make_private`, Opacus, PRV), FedAvg on the server.
- ``flower-user-100``: Flower's ``DifferentialPrivacyServerSideFixedClipping`` with
  its own accountant, 100 clients, 20 sampled per round by Flower's fixed-size
  sampler; Flower's accountant only supports ``no-amplification`` for it.
- ``flower-user-10``: the same Flower wrapper, 10 silos, full participation.
- ``fedavg-100`` / ``fedavg-10``: non-private FedAvg baselines.

Two side measurements need no training:

- adaptive clipping with update norms whose median is 1.0: the clip norm after
  60 rounds from starts 0.1 and 10, for DPFedAvg and for Flower's
  ``DifferentialPrivacyServerSideAdaptiveClipping``;
- the "new PrivacyEngine every round" Opacus pattern: the ε it reports for a
  round against the cumulative ε of the run;
- Flower's ``DifferentialPrivacyServerSideFixedClipping`` on legal but hostile
  input: the effective noise multiplier when one client claims half the weight or
  half the clients drop out, whether ``np.random.seed`` reproduces its noise, and
  what an exactly-zero update does.

``--side-only`` runs just these (about 30 seconds).

Flower's accountant needs Google's ``dp-accounting``, which neither Flower nor
flwr-ext installs; without it the ``flower-*`` rows are skipped with a message.

Run from the repository root::

    python -m benchmarks.privacy_utility            # 3 repeats (51 runs)
    python -m benchmarks.privacy_utility --quick    # 1 repeat (17 runs)

The default run took 512 CPU-seconds in all: 623 s of wall time with 2 workers on a
2-core machine shared with other jobs (load average 4.0).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flwr_ext.inprocess import InProcessGrid
from flwr_ext.privacy import (
    aggregate_silo_metrics,
    calibrate_noise_multiplier,
    compute_epsilon,
    keys,
    make_private,
    silo_privacy_metrics,
)
from flwr_ext.strategy import DPFedAvg

DELTA = 1e-5
EPSILONS = (1.0, 4.0, 8.0)
TEST_SIZE = 360


# ------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Row:
    """One line of the table: a federation, a mechanism and its accounting."""

    key: str
    label: str
    clients: int
    accounting: str
    private: bool = True


ROWS = (
    Row(
        "ours-user-100",
        "DPFedAvg (ours), user level, 100 clients, Poisson q=0.2",
        100,
        "per client, add/remove one client, Poisson q=0.2 (amplified), PRV",
    ),
    Row(
        "ours-user-10",
        "DPFedAvg (ours), user level, 10 silos, full participation",
        10,
        "per silo, add/remove one silo, no sampling (q=1), PRV",
    ),
    Row(
        "ours-record-10",
        "DP-SGD (ours, Opacus), record level, 10 silos",
        10,
        "per record, add/remove one record, Poisson batches q=1/9, PRV, max over silos",
    ),
    Row(
        "flower-user-100",
        "Flower ServerSideFixedClipping + its accountant, 100 clients, 20/round",
        100,
        "per client, add/remove one client, no amplification (Flower supports no "
        "other for fixed-size sampling), RDP (dp-accounting)",
    ),
    Row(
        "flower-user-10",
        "Flower ServerSideFixedClipping + its accountant, 10 silos",
        10,
        "per silo, add/remove one silo, no amplification, RDP (dp-accounting)",
    ),
    Row("fedavg-100", "FedAvg, no DP, 100 clients, 20/round", 100, "none", False),
    Row("fedavg-10", "FedAvg, no DP, 10 silos", 10, "none", False),
)


@dataclass(frozen=True)
class Hyper:
    """Training hyperparameters, the same for every row where they apply."""

    rounds: int = 50
    local_epochs: int = 10  # 100 small clients (~14 images each), no DP-SGD
    local_lr: float = 0.2
    silo_local_epochs: int = 2  # 10 silos (~144 images each), no DP-SGD
    silo_local_lr: float = 0.5
    local_batch: int = 8
    clip: float = 0.5  # user-level clip norm (L2 of the model update)
    sgd_batch: int = 16  # record level: expected Poisson batch size
    sgd_lr: float = 0.5
    sgd_max_grad_norm: float = 1.0
    sgd_epochs: int = 1
    sampling_rate: float = 0.2


@dataclass
class Outcome:
    """One run's result."""

    row: str
    epsilon_target: float | None
    repeat: int
    accuracy: float
    epsilon_reported: float | None
    noise_multiplier: float | None
    seconds: float


# ---------------------------------------------------------------------- data
def digits_split(seed: int, clients: int) -> tuple[list, tuple]:
    """I.i.d. client partitions of the training images, and the test set."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(1234).permutation(len(x))  # fixed test set
    test, train = order[:TEST_SIZE], order[TEST_SIZE:]
    rng = np.random.default_rng(seed)
    parts = np.array_split(rng.permutation(train), clients)
    return [(x[p], y[p]) for p in parts], (x[test], y[test])


def new_model() -> nn.Module:
    return nn.Linear(64, 10)


def accuracy(arrays: ArrayRecord, test: tuple) -> float:
    model = new_model()
    model.load_state_dict(arrays.to_torch_state_dict())
    with torch.no_grad():
        predicted = model(torch.from_numpy(test[0])).argmax(1).numpy()
    return float((predicted == test[1]).mean())


# ------------------------------------------------------------------ clients
def make_app(
    parts: list,
    hyper: Hyper,
    *,
    dp_sgd_epsilon: float | None,
    unit_weight: bool,
    silos: bool,
) -> ClientApp:
    """Build a ClientApp that runs local SGD (or record-level DP-SGD)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        x, y = parts[int(context.node_config["partition-id"])]
        model = new_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        data = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
        metrics: dict[str, float | int] = {}
        if dp_sgd_epsilon is None:
            loader = DataLoader(data, batch_size=hyper.local_batch, shuffle=True)
            lr = hyper.silo_local_lr if silos else hyper.local_lr
            optimizer = torch.optim.SGD(model.parameters(), lr=lr)
            for _ in range(hyper.silo_local_epochs if silos else hyper.local_epochs):
                for xb, yb in loader:
                    optimizer.zero_grad()
                    nn.functional.cross_entropy(model(xb), yb).backward()
                    optimizer.step()
        else:
            loader = DataLoader(data, batch_size=hyper.sgd_batch)
            optimizer = torch.optim.SGD(model.parameters(), lr=hyper.sgd_lr)
            private = make_private(
                model,
                optimizer,
                loader,
                context,
                target_epsilon=dp_sgd_epsilon,
                target_delta=DELTA,
                epochs_per_round=hyper.sgd_epochs,
                num_rounds=hyper.rounds,
                max_grad_norm=hyper.sgd_max_grad_norm,
            )
            for _ in range(hyper.sgd_epochs):
                for xb, yb in private.data_loader:
                    private.optimizer.zero_grad()
                    if len(yb):
                        loss = nn.functional.cross_entropy(private.model(xb), yb)
                        loss.backward()
                    private.optimizer.step()  # an empty batch is still a step
            metrics.update(silo_privacy_metrics(context))
        metrics["num-examples"] = 1 if unit_weight else len(x)
        content = RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "metrics": MetricRecord(metrics),
            }
        )
        return Message(content, reply_to=msg)

    return app


# ----------------------------------------------------------------- strategies
def flower_accountant(clients: int):
    """Flower's RdpAccountant (dp-accounting), no amplification: all it allows."""
    from flwr.supercore.privacy_accounting import (
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    return RdpAccountant(
        PrivacyConfig(
            DELTA,
            clients,
            NeighboringRelation.ADD_OR_REMOVE_ONE,
            SamplingMethod.NO_AMPLIFICATION,
        )
    )


def flower_noise_multiplier(target: float, sampled: int, clients: int, rounds: int):
    """Smallest z whose Flower-accounted ε after ``rounds`` is <= ``target``."""
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    def epsilon(z: float) -> float:
        accountant = flower_accountant(clients)
        accountant.compose(GaussianPrivacyEvent(z, sampled, clients), rounds)
        return accountant.get_epsilon(DELTA)

    low, high = 0.1, 1.0
    while epsilon(high) > target:
        low, high = high, 2 * high
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if epsilon(mid) > target else (low, mid)
    return high


def run_one(task: tuple[str, float | None, int, Hyper]) -> Outcome:
    """One federation run (executed in a worker process)."""
    row_key, target, repeat, hyper = task
    torch.set_num_threads(1)
    torch.manual_seed(repeat)  # local SGD shuffling; DP noise cannot be seeded
    logging.getLogger("flwr").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    row = next(r for r in ROWS if r.key == row_key)
    parts, test = digits_split(repeat, row.clients)
    started = time.process_time()
    dp_sgd = target if row_key == "ours-record-10" else None
    flower = row_key.startswith("flower")
    app = make_app(
        parts,
        hyper,
        dp_sgd_epsilon=dp_sgd,
        unit_weight=flower,
        silos=row.clients == 10,
    )
    grid = InProcessGrid(
        dict.fromkeys(range(1, row.clients + 1), app),
        node_configs={i: {"partition-id": i - 1} for i in range(1, row.clients + 1)},
    )
    few = row.clients == 10
    fraction = 1.0 if few else hyper.sampling_rate
    base = {"fraction_evaluate": 0.0, "min_available_nodes": row.clients}
    noise: float | None = None
    epsilon: float | None = None
    if row_key == "ours-user-100" or row_key == "ours-user-10":
        strategy = DPFedAvg(
            FedAvg(**base),
            num_clients=row.clients,
            sampling_rate=None if few else hyper.sampling_rate,
            clipping_norm=hyper.clip,
            target_epsilon=target,
            num_rounds=hyper.rounds,
            delta=DELTA,
        )
        noise = strategy.noise_multiplier
    elif flower:
        sampled = round(fraction * row.clients)
        noise = flower_noise_multiplier(target, sampled, row.clients, hyper.rounds)
        strategy = DifferentialPrivacyServerSideFixedClipping(
            FedAvg(fraction_train=fraction, **base),
            noise_multiplier=noise,
            clipping_norm=hyper.clip,
            num_sampled_clients=sampled,
            accountant=flower_accountant(row.clients),
        )
    else:
        aggregate = aggregate_silo_metrics if dp_sgd is not None else None
        strategy = FedAvg(
            fraction_train=fraction,
            train_metrics_aggr_fn=aggregate,
            **base,
        )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(new_model().state_dict()),
        num_rounds=hyper.rounds,
    )
    last = result.train_metrics_clientapp[max(result.train_metrics_clientapp)]
    if isinstance(strategy, DPFedAvg):
        epsilon = float(last[keys.CLIENT_EPSILON])
    elif flower:
        epsilon = float(strategy.privacy_spent().epsilon)
    elif dp_sgd is not None:
        epsilon = float(last[keys.RECORD_EPSILON])
        noise = float(last[keys.RECORD_NOISE_MULTIPLIER])
    return Outcome(
        row_key,
        target,
        repeat,
        accuracy(result.arrays, test),
        epsilon,
        noise,
        time.process_time() - started,
    )


# ------------------------------------------------------------ side studies
def adaptive_clipping_study(rounds: int = 60, clients: int = 40) -> dict:
    """Clip norm trajectories when the median update norm is 1.0."""
    from flwr.app import Array, ConfigRecord

    logging.getLogger("flwr").setLevel(logging.ERROR)
    norms = np.geomspace(0.5, 2.0, clients)
    direction = np.ones(8) / math.sqrt(8)
    nodes = list(range(1, clients + 1))
    InProcessGrid({1: lambda m, c: m})  # sets Flower's task identity

    class Nodes:
        def get_node_ids(self) -> list[int]:
            return nodes

    def model(vector: np.ndarray) -> ArrayRecord:
        return ArrayRecord({"w": Array(vector.astype(np.float32))})

    trajectories: dict[str, list[float]] = {}
    for start in (0.1, 10.0):
        for name in ("ours", "flower"):
            if name == "ours":
                strategy = DPFedAvg(
                    FedAvg(),
                    num_clients=clients,
                    clipping_norm=start,
                    noise_multiplier=1.0,
                    adaptive_clipping=True,
                    accountant="rdp",
                )
            else:
                strategy = DifferentialPrivacyServerSideAdaptiveClipping(
                    FedAvg(),
                    noise_multiplier=1.0,
                    num_sampled_clients=clients,
                    initial_clipping_norm=start,
                )
            values = [start]
            global_model = model(np.zeros(8))
            for rnd in range(1, rounds + 1):
                msgs = list(
                    strategy.configure_train(rnd, global_model, ConfigRecord(), Nodes())
                )
                replies = []
                for msg in msgs:
                    node = int(msg.metadata.dst_node_id)
                    update = norms[node - 1] * direction
                    replies.append(
                        Message(
                            RecordDict(
                                {
                                    "arrays": model(update),
                                    "metrics": MetricRecord({"num-examples": 1}),
                                }
                            ),
                            reply_to=msg,
                        )
                    )
                strategy.aggregate_train(rnd, replies)
                values.append(
                    strategy.current_clipping_norm
                    if name == "ours"
                    else strategy.clipping_norm
                )
            trajectories[f"{name}-from-{start:g}"] = values
    return trajectories


def flower_checks(clients: int = 10, dim: int = 1000) -> dict:
    """Flower's DifferentialPrivacyServerSideFixedClipping on hostile-but-legal input.

    Measures, with Flower's own class (no accountant, so z = 0 is allowed where
    a movement must be seen without noise): how far one client moves the mean
    when it claims half the total weight, or when half the clients drop out,
    against the noise std Flower adds (z C / n); whether ``np.random.seed``
    reproduces its noise; and what a zero update does.
    """
    from flwr.app import Array, ConfigRecord

    logging.getLogger("flwr").setLevel(logging.ERROR)
    InProcessGrid({1: lambda m, c: m})  # sets Flower's task identity
    nodes = list(range(1, clients + 1))

    class Nodes:
        def get_node_ids(self) -> list[int]:
            return nodes

    def record(value: np.ndarray) -> ArrayRecord:
        return ArrayRecord({"w": Array(value.astype(np.float32))})

    unit = np.ones(dim) / math.sqrt(dim)

    def aggregate(z, update_of, weight_of, repliers=None):
        strategy = DifferentialPrivacyServerSideFixedClipping(
            FedAvg(), noise_multiplier=z, clipping_norm=1.0, num_sampled_clients=clients
        )
        g = record(np.zeros(dim))
        msgs = strategy.configure_train(1, g, ConfigRecord(), Nodes())
        replies = [
            Message(
                RecordDict(
                    {
                        "arrays": record(update_of(int(m.metadata.dst_node_id))),
                        "metrics": MetricRecord(
                            {"num-examples": weight_of(int(m.metadata.dst_node_id))}
                        ),
                    }
                ),
                reply_to=m,
            )
            for m in msgs
            if repliers is None or int(m.metadata.dst_node_id) in repliers
        ]
        arrays, _ = strategy.aggregate_train(1, replies)
        return arrays["w"].numpy().astype(np.float64)

    # The others send a tiny update orthogonal to the heavy client's (an exact
    # zero would crash Flower, see below), so the projection on ``unit`` is the
    # heavy client's influence alone.
    orthogonal = np.zeros(dim)
    orthogonal[:2] = (1e-6, -1e-6)

    def huge(node: int) -> np.ndarray:
        return 1000.0 * unit if node == 1 else orthogonal

    noise_std = 1.0 * 1.0 / clients  # z = 1, C = 1
    heavy = aggregate(0.0, huge, lambda n: clients - 1 if n == 1 else 1)
    half = aggregate(0.0, huge, lambda n: 1, repliers=set(nodes[: clients // 2]))
    out = {
        "noise_std_at_z1": noise_std,
        "move_heavy_client": float(heavy @ unit),
        "move_with_half_dropped": float(half @ unit),
    }
    out["effective_z_heavy"] = noise_std / out["move_heavy_client"]
    out["effective_z_dropouts"] = noise_std / out["move_with_half_dropped"]
    seeded = []
    for _ in range(2):
        np.random.seed(0)
        seeded.append(aggregate(1.0, lambda n: 0.01 * unit, lambda n: 1))
    out["np_random_seed_reproduces_noise"] = bool(np.array_equal(*seeded))
    try:
        aggregate(1.0, lambda n: np.zeros(dim), lambda n: 1)
        out["zero_update"] = "ok"
    except Exception as err:  # what Flower raises is the measurement
        out["zero_update"] = f"{type(err).__name__}: {err}"
    return out


def per_round_engine_study(hyper: Hyper) -> list[dict]:
    """ε reported by a new Opacus PrivacyEngine per round vs the cumulative ε."""
    batches = math.ceil((1797 - TEST_SIZE) / 10 / hyper.sgd_batch)
    q = 1.0 / batches
    steps = batches * hyper.sgd_epochs
    out = []
    for target in EPSILONS:
        z = calibrate_noise_multiplier(target, DELTA, steps, q)
        out.append(
            {
                "reported_per_round": compute_epsilon([(z, q, steps)], DELTA),
                "cumulative": compute_epsilon([(z, q, steps * hyper.rounds)], DELTA),
                "noise_multiplier": z,
            }
        )
    return out


# -------------------------------------------------------------------- output
def summarise(outcomes: list[Outcome]) -> dict:
    table: dict = {}
    for row in ROWS:
        for target in EPSILONS if row.private else (None,):
            runs = [
                o for o in outcomes if o.row == row.key and o.epsilon_target == target
            ]
            if not runs:
                continue
            acc = np.array([o.accuracy for o in runs])
            table.setdefault(row.key, {})[str(target)] = {
                "accuracy_mean": float(acc.mean()),
                "accuracy_std": float(acc.std()),
                "epsilon_reported": max(
                    (o.epsilon_reported for o in runs if o.epsilon_reported),
                    default=None,
                ),
                "noise_multiplier": runs[0].noise_multiplier,
                "runs": len(runs),
                "cpu_seconds": float(np.mean([o.seconds for o in runs])),
            }
    return table


def markdown(table: dict) -> str:
    lines = [
        "| setting | ε = 1 | ε = 4 | ε = 8 | no DP | accounting |",
        "|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        if row.key not in table or not row.private:
            continue
        cells = []
        for target in EPSILONS:
            cell = table[row.key].get(str(target))
            cells.append(
                "-"
                if cell is None
                else f"{cell['accuracy_mean']:.3f} ± {cell['accuracy_std']:.3f} "
                f"(z={cell['noise_multiplier']:.2f})"
            )
        baseline = "fedavg-100" if row.clients == 100 else "fedavg-10"
        base = table.get(baseline, {}).get("None")
        cells.append("-" if base is None else f"{base['accuracy_mean']:.3f}")
        lines.append(f"| {row.label} | " + " | ".join(cells) + f" | {row.accounting} |")
    return "\n".join(lines)


def plot(table: dict, trajectories: dict, out: Path, rounds: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(8, 6.2))
    styles = {
        "ours-user-100": ("C0", "o", "-"),
        "ours-user-10": ("C1", "s", "-"),
        "ours-record-10": ("C2", "^", "-"),
        "flower-user-100": ("C0", "o", ":"),
        "flower-user-10": ("C1", "s", ":"),
    }
    for row in ROWS:
        if not row.private or row.key not in table:
            continue
        colour, marker, line = styles[row.key]
        xs = [e for e in EPSILONS if str(e) in table[row.key]]
        ys = [table[row.key][str(e)]["accuracy_mean"] for e in xs]
        es = [table[row.key][str(e)]["accuracy_std"] for e in xs]
        ax.errorbar(
            xs, ys, yerr=es, color=colour, marker=marker, linestyle=line,
            capsize=3, label=row.label,
        )  # fmt: skip
    for key, colour in (("fedavg-100", "C0"), ("fedavg-10", "C1")):
        if key in table:
            ax.axhline(
                table[key]["None"]["accuracy_mean"], color=colour, alpha=0.35,
                linestyle="--", label=f"no DP ({key})",
            )  # fmt: skip
    ax.set_xscale("log")
    ax.set_xticks(EPSILONS, [f"{e:g}" for e in EPSILONS])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(f"ε at δ = {DELTA:g} (unit per row: client, silo or record)")
    ax.set_ylabel("test accuracy (digits, 360 held-out images)")
    ax.set_ylim(0, 1)
    ax.set_title(f"Privacy-utility on digits, {rounds} rounds")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "privacy-utility.png")
    fig.savefig(paths[-1], dpi=130)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for name, values in trajectories.items():
        ours = name.startswith("ours")
        ax.plot(
            values, color="C0" if ours else "C3", linestyle="-" if ours else ":",
            label=("DPFedAvg (flwr-ext)" if ours else "Flower adaptive clipping")
            + f", start {name.rsplit('-', 1)[1]}",
        )  # fmt: skip
    ax.axhline(1.0, color="black", alpha=0.4, linestyle="--", label="target: median")
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("clip norm C")
    ax.set_title("Adaptive clipping, update norms log-uniform on [0.5, 2]")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "privacy-adaptive-clipping.png")
    fig.savefig(paths[-1], dpi=130)
    plt.close(fig)
    return paths


def print_side_studies(hyper: Hyper) -> tuple[dict, list[dict], dict]:
    """Run and print the measurements that need no training."""
    trajectories = adaptive_clipping_study()
    engine = per_round_engine_study(hyper)
    checks = flower_checks()
    print()
    print("Adaptive clipping (median update norm 1.0), clip norm after 60 rounds:")
    for name, values in trajectories.items():
        print(f"  {name:>18}: {values[-1]:.4g}")
    print()
    print("New Opacus PrivacyEngine each round (record level, 10 silos):")
    for target, row in zip(EPSILONS, engine, strict=True):
        print(
            f"  calibrated per round to eps={target:g}: reports "
            f"{row['reported_per_round']:.3f}, cumulative after {hyper.rounds} "
            f"rounds {row['cumulative']:.2f} (z={row['noise_multiplier']:.3f})"
        )
    print()
    print("Flower's DifferentialPrivacyServerSideFixedClipping, 10 clients, z=1, C=1:")
    for key, value in checks.items():
        print(f"  {key}: {value}")
    return trajectories, engine, checks


def have_dp_accounting() -> bool:
    try:
        import dp_accounting  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, 17 runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2, help="processes")
    parser.add_argument(
        "--rows", default=",".join(r.key for r in ROWS), help="comma-separated rows"
    )
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument(
        "--side-only",
        action="store_true",
        help="only the measurements that need no training (seconds)",
    )
    args = parser.parse_args(argv)
    if args.side_only:
        print_side_studies(Hyper(rounds=args.rounds))
        return 0
    repeats = 1 if args.quick else args.repeats
    hyper = Hyper(rounds=args.rounds)
    rows = [r for r in ROWS if r.key in args.rows.split(",")]
    if not have_dp_accounting():
        skipped = [r.key for r in rows if r.key.startswith("flower")]
        rows = [r for r in rows if not r.key.startswith("flower")]
        if skipped:
            print(
                f"skipping {skipped}: Flower's accountant needs Google's "
                "dp-accounting (pip install dp-accounting)",
                file=sys.stderr,
            )
    tasks = [
        (row.key, target, repeat, hyper)
        for repeat in range(repeats)
        for row in rows
        for target in (EPSILONS if row.private else (None,))
    ]
    started = time.time()
    outcomes: list[Outcome] = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for outcome in pool.map(run_one, tasks):
            outcomes.append(outcome)
            print(
                f"{outcome.row:>16} eps={outcome.epsilon_target} rep={outcome.repeat}"
                f" acc={outcome.accuracy:.3f} reported={outcome.epsilon_reported}"
                f" z={outcome.noise_multiplier} cpu={outcome.seconds:.0f}s",
                flush=True,
            )
    table = summarise(outcomes)
    print()
    print(markdown(table))
    trajectories, engine, checks = print_side_studies(hyper)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = plot(table, trajectories, args.out, hyper.rounds)
    load = os.getloadavg()[0]
    print(
        f"\n{len(tasks)} runs, {repeats} repeat(s), {hyper.rounds} rounds; wall "
        f"{time.time() - started:.0f} s; load average {load:.1f}; plots: "
        + ", ".join(str(p) for p in paths)
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "hyper": asdict(hyper),
                    "table": table,
                    "runs": [asdict(o) for o in outcomes],
                    "adaptive_clipping": trajectories,
                    "per_round_engine": engine,
                    "flower_checks": checks,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
