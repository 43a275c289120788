"""What federation buys a fraud consortium, and what each protection costs.

Everything runs the real bank-fraud app (``apps/bank-fraud``): its ServerApp and
ClientApps, mods included, exchange real Flower Messages through
:class:`flwr_ext.inprocess.InProcessGrid` (protobuf on the "wire", no Ray), on
the generator's default setting (4 banks, 45,000 transactions, seeded).

Settings compared, per seed (the generator's and the model's):

- **local-only** - each bank runs the app alone (one node): same model, loss,
  rounds and epochs, its own scaler and its own validation threshold;
- **federated** - the four banks with the app's defaults (FedAvg);
- **centralised** - one model trained on the four banks' training rows pooled,
  with appkit's own training loop for as many epochs as a bank trains in the
  federated run (what the consortium could reach if pooling were allowed);
- **protections** - the federation again with CKKS secure aggregation, a robust
  rule (no attack), central user-level DP (DP-FedAvg) and record-level DP-SGD,
  where this installation provides them;
- **Byzantine** - bank 3 sends poisoned updates (``scaling`` with strength -20:
  its update flipped and boosted 20x; ``label-flip``: it trains on flipped
  labels), under FedAvg and under robust rules (with and without NNM);
- **losses** (``--losses``) - weighted cross-entropy vs focal loss (and plain
  cross-entropy) for the class imbalance.

Every model is then scored *exactly* (scikit-learn, every test score) on each
bank's test period (the latest 25 % of its rows), at the decision threshold the
run chose on validation rows: AUPRC, recall at 1 % FPR, precision, recall and F1
at the threshold, and the recall on the fraud typologies the bank had never
seen before its test period ("emerging"). Byzantine runs are scored on the three
honest banks only. Costs: CPU seconds per round of the whole in-process
federation (the server and every bank share one process, so other load on the
machine does not inflate it; training included; each process first runs a tiny
untimed federation so that one-off import costs are nobody's) and bytes per
round on the wire (serialised RecordDicts, both directions).

Writes to ``--out`` (default ``bank-benchmark/``): ``bank-runs.jsonl`` (one line
per run; ``--resume`` skips runs already there), ``bank-tables.md``, and with
``--docs`` the plots ``docs/img/bank-*.png``.

Run from the repository root::

    python -m benchmarks.bank --seeds 0 1 2 --docs      # the tables in docs/bank.md
    python -m benchmarks.bank --losses --seeds 0 1 2    # weighted vs focal loss
    python -m benchmarks.bank --quick                   # smoke run, a few minutes
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "bank-fraud"
if str(APP) not in sys.path:
    sys.path.insert(0, str(APP))

NUM_BANKS = 4
#: Bank that turns Byzantine in the poisoning runs (the credit union).
BYZANTINE_BANK = 3
HONEST = tuple(b for b in range(NUM_BANKS) if b != BYZANTINE_BANK)


@dataclass(frozen=True)
class Spec:
    """One benchmark run: a named configuration at one seed."""

    name: str
    group: str
    seed: int
    overrides: Mapping[str, Any] = field(default_factory=dict)
    banks: tuple[int, ...] = tuple(range(NUM_BANKS))
    evaluate_on: tuple[int, ...] = tuple(range(NUM_BANKS))
    ckks: bool = False
    kind: str = "federated"  # "federated", "local" or "centralised"

    @property
    def key(self) -> str:
        """Unique id of the run (for --resume)."""
        return f"{self.group}/{self.name}/seed{self.seed}"


# ------------------------------------------------------------------ specs
def federation_specs(seed: int) -> list[Spec]:
    """Local-only, federated and centralised at one seed."""
    specs = [
        Spec(
            f"local-bank-{b}",
            "federation",
            seed,
            banks=(b,),
            evaluate_on=(b,),
            kind="local",
            overrides={"min-nodes": 1},
        )
        for b in range(NUM_BANKS)
    ]
    specs.append(Spec("federated", "federation", seed))
    specs.append(Spec("centralised", "federation", seed, kind="centralised"))
    return specs


def protection_specs(seed: int) -> list[Spec]:
    """Return the federation with each protection, no attack."""
    specs = [
        Spec("fedavg", "protection", seed),
        Spec(
            "ckks",
            "protection",
            seed,
            ckks=True,
            overrides={"secure-aggregation": "ckks"},
        ),
        Spec("median", "protection", seed, overrides={"strategy": "median"}),
        Spec(
            "median+nnm",
            "protection",
            seed,
            overrides={
                "strategy": "median",
                "robust-pre-aggregation": "nnm",
                "num-byzantine": 1,
            },
        ),
    ]
    for z in (0.3, 1.0):
        specs.append(
            Spec(
                f"dp-fedavg-z{z:g}",
                "protection",
                seed,
                overrides={
                    "strategy": "dp-fedavg",
                    "dp-fedavg-noise-multiplier": z,
                    "dp-fedavg-clipping-norm": 1.0,
                    "dp-fedavg-num-clients": NUM_BANKS,
                },
            )
        )
    for eps in (1.0, 4.0):
        specs.append(
            Spec(
                f"dp-sgd-eps{eps:g}",
                "protection",
                seed,
                overrides={"dp-sgd": True, "dp-sgd-epsilon": eps},
            )
        )
    # DP-SGD prefers larger batches (the noise is per step, the signal grows with
    # the batch): the same budget with 512-row batches and a larger step.
    specs.append(
        Spec(
            "dp-sgd-eps4-batch512",
            "protection",
            seed,
            overrides={
                "dp-sgd": True,
                "dp-sgd-epsilon": 4.0,
                "batch-size": 512,
                "learning-rate": 0.1,
            },
        )
    )
    return specs


#: Aggregation under attack. With 4 banks a trimmed mean that trims one update
#: from each end *is* the median of 4 (the mean of the middle two) - measured
#: identical, with and without NNM - so it is not listed separately. NNM
#: (nearest-neighbour mixing, num-byzantine=1) runs before the rule.
BYZANTINE_STRATEGIES: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "median": {"strategy": "median"},
    "median+nnm": {
        "strategy": "median",
        "robust-pre-aggregation": "nnm",
        "num-byzantine": 1,
    },
    "geometric-median": {"strategy": "geometric-median"},
    "centered-clipping": {"strategy": "centered-clipping"},
}


def byzantine_specs(seed: int) -> list[Spec]:
    """Bank 3 poisons its updates; scored on the honest banks."""
    specs = [Spec("clean-fedavg", "byzantine", seed, evaluate_on=HONEST)]
    attacks = {"scaling": -20.0, "label-flip": 1.0}
    strategies = BYZANTINE_STRATEGIES
    for attack, strength in attacks.items():
        for name, overrides in strategies.items():
            specs.append(
                Spec(
                    f"{attack}/{name}",
                    "byzantine",
                    seed,
                    evaluate_on=HONEST,
                    overrides={
                        **overrides,
                        "attack": attack,
                        "attack-strength": strength,
                        "attack-partition-ids": str(BYZANTINE_BANK),
                    },
                )
            )
    return specs


LOSSES: dict[str, dict[str, Any]] = {
    "bce": {"loss": "bce"},
    "weighted-w3": {"loss": "weighted", "positive-weight": 3.0},
    "weighted-w10": {"loss": "weighted", "positive-weight": 10.0},
    "weighted-w30": {"loss": "weighted", "positive-weight": 30.0},
    "weighted-balanced": {"loss": "weighted", "positive-weight": 0.0},
    "focal-a0.25-g2": {"loss": "focal", "focal-alpha": 0.25, "focal-gamma": 2.0},
    "focal-a0.5-g2": {"loss": "focal", "focal-alpha": 0.5, "focal-gamma": 2.0},
    "focal-a0.75-g2": {"loss": "focal", "focal-alpha": 0.75, "focal-gamma": 2.0},
}
#: Learning rates tried with every loss (a focal loss has much smaller
#: gradients than cross-entropy, so one fixed rate would not be a fair test).
LOSS_LEARNING_RATES = (0.01, 0.03, 0.1)


def loss_specs(seed: int) -> list[Spec]:
    """Return federated runs for each loss at each learning rate."""
    return [
        Spec(
            f"{name}/lr{lr:g}",
            "loss",
            seed,
            overrides={**overrides, "learning-rate": lr},
        )
        for name, overrides in LOSSES.items()
        for lr in LOSS_LEARNING_RATES
    ]


def unavailable(overrides: Mapping[str, Any]) -> str | None:
    """Return why the app cannot run ``overrides`` here (None if it can).

    A setting the app refuses (e.g. Krum with too few banks) is listed in the
    table with the app's own reason instead of being run.
    """
    from bank_fraud.settings import SCHEMA, load_settings

    from flwr_ext.appkit.strategies import build_strategy

    try:
        settings = load_settings({**SCHEMA.defaults(), **overrides})
        build_strategy(settings)
    except Exception as err:  # reported in the table, not hidden
        return " ".join(f"{type(err).__name__}: {err}".split())
    return None


# ------------------------------------------------------------------- runs
@dataclass
class Trained:
    """A final model and how it was obtained."""

    state: dict
    mean: np.ndarray
    scale: np.ndarray
    threshold: float
    seconds: float
    rounds: int
    cpu_seconds: float = math.nan
    wire: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    epsilon: float | None = None


def _quiet() -> None:
    """Silence Flower's INFO logs in this process (benchmark processes only)."""
    import flwr.supercore  # noqa: F401

    logging.getLogger("flwr").setLevel(logging.WARNING)


def _run_config(spec: Spec, scale: float, rounds: int | None) -> dict[str, Any]:
    from bank_fraud.settings import SCHEMA

    config = SCHEMA.defaults()
    config.update({"seed": spec.seed, "simulation-scale": scale})
    if rounds is not None:
        config["num-server-rounds"] = rounds
    config.update(spec.overrides)
    return config


def _federated(spec: Spec, run_config: dict[str, Any], keys: Sequence[str]) -> Trained:
    """Run the app in-process on ``spec.banks``; return its final model."""
    import torch
    from bank_fraud.client_app import app as client_app
    from bank_fraud.server_app import app as server_app
    from flwr.app import Context, RecordDict

    from flwr_ext.appkit.ckks_results import decrypt_results
    from flwr_ext.inprocess import InProcessGrid

    with tempfile.TemporaryDirectory(prefix="bank-bench-") as tmp:
        out = Path(tmp) / "out"
        run_config = {**run_config, "output-dir": str(out)}
        node_configs: dict[int, dict[str, Any]] = {}
        for i, bank in enumerate(spec.banks):
            node = {
                "partition-id": bank,
                "num-partitions": NUM_BANKS,
                "site-name": f"bank-{bank}",
            }
            if spec.ckks:
                node["ckks-context"] = keys[1]
            node_configs[i + 1] = node
        grid = InProcessGrid(
            dict.fromkeys(node_configs, client_app),
            node_configs=node_configs,
            run_config=run_config,
        )
        started, cpu = time.perf_counter(), time.process_time()
        server_app(grid, Context(1, 0, {}, RecordDict(), run_config))
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        metrics = json.loads((out / "metrics.json").read_text())
        preprocessing = json.loads((out / "preprocessing.json").read_text())
        if (out / "final_model.pt").exists():
            state = torch.load(out / "final_model.pt")
            mean, scale = preprocessing["feature-mean"], preprocessing["feature-scale"]
        else:  # CKKS: decrypt as a bank would (the coordinator cannot)
            decrypted = json.loads(
                (decrypt_results(out, Path(keys[1])) / "preprocessing.json").read_text()
            )
            state = torch.load(out / "decrypted" / "final_model.pt")
            mean, scale = decrypted["feature-mean"], decrypted["feature-scale"]
    rounds = len(metrics["rounds"])
    train = metrics["rounds"][-1]["aggregated"].get("train") or {}
    epsilon = next(
        (train[k] for k in ("dp-record-epsilon", "dp-client-epsilon") if k in train),
        None,
    )
    return Trained(
        state=state,
        mean=np.asarray(mean),
        scale=np.asarray(scale),
        threshold=float(metrics["final"].get("threshold", 0.5)),
        seconds=seconds,
        cpu_seconds=cpu,
        rounds=rounds,
        wire={
            "bytes-up-per-round": grid.bytes_up / max(rounds, 1),
            "bytes-down-per-round": grid.bytes_down / max(rounds, 1),
        },
        history=[
            {
                "round": r["round"],
                **{
                    k: (r["aggregated"].get("evaluate") or {}).get(k)
                    for k in ("auprc", "recall-at-1pct-fpr", "f1")
                },
            }
            for r in metrics["rounds"]
        ],
        epsilon=epsilon,
    )


def _bank(settings: Mapping[str, Any], bank: int) -> Any:
    from bank_fraud.task import load_site_data

    from flwr_ext.appkit.site import SiteSpec

    return load_site_data(
        SiteSpec(f"bank-{bank}", None, bank, NUM_BANKS, None), settings
    )


def _centralised(settings: Mapping[str, Any]) -> Trained:
    """One model on all banks' training rows pooled (appkit's training loop).

    Epochs: ``num-server-rounds x local-epochs``, what each bank trains in the
    federated run. The threshold is chosen by the app's rule on the pooled
    validation rows.
    """
    from bank_fraud.losses import loss_from_settings
    from bank_fraud.task import make_model
    from bank_fraud.thresholds import (
        choose_threshold,
        threshold_rule_from_settings,
    )

    from flwr_ext.appkit.metrics import BinaryStats
    from flwr_ext.appkit.standardisation import FeatureStats, Standardizer
    from flwr_ext.appkit.torch_train import predict_proba, train_binary

    banks = [_bank(settings, b) for b in range(NUM_BANKS)]
    x = np.concatenate([b.train.x for b in banks])
    y = np.concatenate([b.train.y for b in banks])
    scaler = Standardizer.fit(FeatureStats.from_array(x))
    model = make_model(x.shape[1], settings["hidden-layers"], settings["seed"])
    epochs = settings["num-server-rounds"] * settings["local-epochs"]
    started = time.perf_counter()
    train_binary(
        model,
        scaler.transform(x),
        y,
        epochs=epochs,
        learning_rate=settings["learning-rate"],
        batch_size=settings["batch-size"],
        seed=settings["seed"],
        server_round=1,
        site=0,
        loss_fn=loss_from_settings(settings, y),
    )
    seconds = time.perf_counter() - started
    vx = np.concatenate([b.validation.x for b in banks])
    vy = np.concatenate([b.validation.y for b in banks])
    val = BinaryStats.from_scores(
        vy, predict_proba(model, scaler.transform(vx)), num_bins=settings["metric-bins"]
    )
    choice = choose_threshold(val, threshold_rule_from_settings(settings))
    return Trained(
        state={k: v.detach().clone() for k, v in model.state_dict().items()},
        mean=scaler.mean,
        scale=scaler.scale,
        threshold=choice.threshold,
        seconds=seconds,
        rounds=0,
    )


def _metrics(
    y: np.ndarray, s: np.ndarray, threshold: float, emerging: np.ndarray
) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, roc_curve

    fpr, tpr, _ = roc_curve(y, s)
    flagged = s >= threshold
    tp = int(np.sum(flagged & (y == 1)))
    fp = int(np.sum(flagged & (y == 0)))
    fn = int(np.sum(~flagged & (y == 1)))
    new = emerging & (y == 1)
    return {
        "auprc": float(average_precision_score(y, s)),
        "recall-at-1pct-fpr": float(tpr[fpr <= 0.01].max(initial=0.0)),
        "precision": tp / (tp + fp) if tp + fp else math.nan,
        "recall": tp / (tp + fn) if tp + fn else math.nan,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan,
        "emerging-recall": float(flagged[new].mean()) if new.any() else math.nan,
        "frauds": int(y.sum()),
        "emerging-frauds": int(new.sum()),
    }


def _score(trained: Trained, settings: Mapping[str, Any], spec: Spec) -> dict:
    """Exact metrics of a model on each evaluated bank's test period, and pooled."""
    from bank_fraud.generator import LEGIT
    from bank_fraud.splits import temporal_split
    from bank_fraud.task import generated_bank, make_model

    from flwr_ext.appkit.standardisation import Standardizer
    from flwr_ext.appkit.torch_train import predict_proba

    scaler = Standardizer(np.asarray(trained.mean), np.asarray(trained.scale))
    non_finite = False
    banks: dict[str, dict[str, float]] = {}
    pooled: list[list[np.ndarray]] = [[], [], []]
    for bank in spec.evaluate_on:
        data = _bank(settings, bank)
        model = make_model(data.num_features, settings["hidden-layers"], spec.seed)
        model.load_state_dict(trained.state)
        scores = predict_proba(model, scaler.transform(data.test.x))
        if not np.isfinite(scores).all():
            # A diverged or poisoned model (NaN weights) flags nothing: score it
            # as the constant it effectively is, and say so in the tables.
            non_finite = True
            scores = np.zeros_like(scores)
        generated = generated_bank(bank, spec.seed, settings["simulation-scale"])
        _, _, rows = temporal_split(
            generated.time, settings["validation-fraction"], settings["test-fraction"]
        )
        typology = generated.typology[rows]
        if not np.array_equal((typology != LEGIT).astype(np.int64), data.test.y):
            raise RuntimeError("the generator's and the app's test rows disagree")
        emerging = np.isin(typology, generated.bank.emerging)
        banks[f"bank-{bank}"] = _metrics(
            data.test.y, scores, trained.threshold, emerging
        )
        for part, values in zip(pooled, (data.test.y, scores, emerging), strict=True):
            part.append(values)
    y, s, e = (np.concatenate(p) for p in pooled)
    return {
        "non-finite-model": non_finite,
        "banks": banks,
        "pooled": _metrics(y, s, trained.threshold, e),
        "validation-auprc": _validation_auprc(trained, settings, spec, scaler),
    }


def _validation_auprc(
    trained: Trained, settings: Mapping[str, Any], spec: Spec, scaler: Any
) -> float:
    """Pooled AUPRC on the evaluated banks' validation rows (for model selection)."""
    from bank_fraud.task import make_model
    from sklearn.metrics import average_precision_score

    from flwr_ext.appkit.torch_train import predict_proba

    ys, ss = [], []
    for bank in spec.evaluate_on:
        data = _bank(settings, bank)
        model = make_model(data.num_features, settings["hidden-layers"], spec.seed)
        model.load_state_dict(trained.state)
        ys.append(data.validation.y)
        scores = predict_proba(model, scaler.transform(data.validation.x))
        ss.append(np.where(np.isfinite(scores), scores, 0.0))
    return float(average_precision_score(np.concatenate(ys), np.concatenate(ss)))


_WARM: set[str] = set()


def _warm_up(keys: Sequence[str], ckks: bool) -> None:
    """Run a tiny federation once per process before anything is timed.

    The first run in a process pays one-off costs (lazy imports, first calls
    into PyTorch and TenSEAL) that would otherwise be charged to whichever
    configuration happens to run first.
    """
    kind = "ckks" if ckks else "plain"
    if kind in _WARM:
        return
    _WARM.add(kind)
    overrides = {"secure-aggregation": "ckks"} if ckks else {}
    spec = Spec("warm-up", "warm-up", 0, overrides=overrides, ckks=ckks)
    run_config = _run_config(spec, 0.05, 1)
    if ckks:
        run_config["ckks-server-context"] = keys[0]
    _federated(spec, run_config, keys)


def run_spec(
    spec: Spec, scale: float, rounds: int | None, keys: Sequence[str]
) -> dict[str, Any]:
    """Run one spec and score its final model; return a JSON-able dict."""
    import torch
    from bank_fraud.settings import load_settings

    torch.set_num_threads(1)
    if spec.kind != "centralised":
        _warm_up(keys, spec.ckks)
    run_config = _run_config(spec, scale, rounds)
    if spec.ckks:
        run_config["ckks-server-context"] = keys[0]
    settings = load_settings(run_config)
    if spec.kind == "centralised":
        trained = _centralised(settings)
    else:
        trained = _federated(spec, run_config, keys)
    return {
        "key": spec.key,
        "name": spec.name,
        "group": spec.group,
        "seed": spec.seed,
        "overrides": dict(spec.overrides),
        "threshold": trained.threshold,
        "seconds": trained.seconds,
        "cpu-seconds": trained.cpu_seconds,
        "rounds": trained.rounds,
        "epsilon": trained.epsilon,
        "history": trained.history,
        **trained.wire,
        **_score(trained, settings, spec),
    }


# ----------------------------------------------------------------- tables
def _mean_std(values: Iterable[float]) -> tuple[float, float]:
    array = np.asarray([v for v in values if v is not None and math.isfinite(v)])
    if array.size == 0:
        return math.nan, math.nan
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def _cell(values: Iterable[float], digits: int = 3) -> str:
    mean, std = _mean_std(values)
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _by_name(runs: Iterable[dict], group: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        if run["group"] == group:
            out[run["name"]].append(run)
    return dict(out)


def federation_table(runs: list[dict]) -> tuple[str, dict[str, Any]]:
    """Local-only vs federated vs centralised, per bank and pooled."""
    by = _by_name(runs, "federation")
    if "federated" not in by:
        return "", {}
    banks = [f"bank-{b}" for b in range(NUM_BANKS)]
    lines = [
        "| bank (its own test period) | local-only | federated | centralised |",
        "|---|---|---|---|",
    ]
    checks: dict[str, Any] = {"federated-beats-local": {}}
    for b, bank in enumerate(banks):
        local = [r["banks"][bank]["auprc"] for r in by.get(f"local-bank-{b}", [])]
        fed = [r["banks"][bank]["auprc"] for r in by["federated"]]
        central = [r["banks"][bank]["auprc"] for r in by.get("centralised", [])]
        lines.append(
            f"| {bank} ({_profile(b)}) AUPRC | {_cell(local)} | "
            f"{_cell(fed)} | {_cell(central)} |"
        )
        checks["federated-beats-local"][bank] = _mean_std(fed)[0] > _mean_std(local)[0]
    for metric, label in (
        ("auprc", "AUPRC"),
        ("recall-at-1pct-fpr", "recall at 1 % FPR"),
        ("f1", "F1 at the chosen threshold"),
        ("emerging-recall", "recall on typologies new to the bank"),
    ):
        local = _local_pooled(by, metric)
        fed = [r["pooled"][metric] for r in by["federated"]]
        central = [r["pooled"][metric] for r in by.get("centralised", [])]
        lines.append(
            f"| all banks, {label} | {_cell(local)} | {_cell(fed)} | {_cell(central)} |"
        )
    fed_mean = _mean_std(r["pooled"]["auprc"] for r in by["federated"])[0]
    central_mean = _mean_std(r["pooled"]["auprc"] for r in by.get("centralised", []))[0]
    checks["federated/centralised"] = fed_mean / central_mean
    return "\n".join(lines), checks


def _local_pooled(by: dict[str, list[dict]], metric: str) -> list[float]:
    """Return the local-only setting's consortium-wide metric, per seed.

    Each bank scores its own test period with its own model; this is the mean
    over the four banks of that metric (each local run is scored on its own
    bank only).
    """
    seeds = sorted({r["seed"] for r in by.get("local-bank-0", [])})
    values = []
    for seed in seeds:
        runs = [
            next((r for r in by.get(f"local-bank-{b}", []) if r["seed"] == seed), None)
            for b in range(NUM_BANKS)
        ]
        if any(r is None for r in runs):
            continue
        values.append(
            float(
                np.mean(
                    [
                        r["pooled"][metric]
                        for r in runs
                        if math.isfinite(r["pooled"][metric])
                    ]
                )
            )
        )
    return values


def _profile(bank: int) -> str:
    from bank_fraud.generator import bank_profile

    return bank_profile(bank).name


def protection_table(runs: list[dict]) -> str:
    """Return the table of what each protection costs (no attack)."""
    by = _by_name(runs, "protection")
    if "fedavg" not in by:
        return ""
    base = _mean_std(r["pooled"]["auprc"] for r in by["fedavg"])[0]
    base_time = _mean_std(_cpu_per_round(r) for r in by["fedavg"])[0]
    lines = [
        "| configuration | AUPRC | Δ AUPRC | recall at 1 % FPR | F1 | ε | "
        "CPU s / round | x CPU | uplink kB / round | downlink kB / round |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, items in by.items():
        auprc = [r["pooled"]["auprc"] for r in items]
        per_round = [_cpu_per_round(r) for r in items]
        eps = [r["epsilon"] for r in items if r.get("epsilon") is not None]
        lines.append(
            f"| {name} | {_cell(auprc)} | {_mean_std(auprc)[0] - base:+.3f} | "
            f"{_cell(r['pooled']['recall-at-1pct-fpr'] for r in items)} | "
            f"{_cell(r['pooled']['f1'] for r in items)} | "
            f"{_cell(eps, 2) if eps else '-'} | {_mean_std(per_round)[0]:.2f} | "
            f"{_mean_std(per_round)[0] / base_time:.2f} | "
            f"{_mean_std(r['bytes-up-per-round'] for r in items)[0] / 1e3:.1f} | "
            f"{_mean_std(r['bytes-down-per-round'] for r in items)[0] / 1e3:.1f} |"
        )
    return "\n".join(lines)


def _cpu_per_round(run: dict) -> float:
    """Return CPU seconds per round of the whole in-process federation.

    All banks and the server share one process, so its CPU time is the
    federation's compute, whatever else loads the machine.
    """
    return run.get("cpu-seconds", math.nan) / max(run["rounds"], 1)


def byzantine_table(runs: list[dict]) -> tuple[str, dict[str, Any]]:
    """Poisoned bank 3 under FedAvg and robust rules (scored on honest banks)."""
    by = _by_name(runs, "byzantine")
    if "clean-fedavg" not in by:
        return "", {}
    clean = _mean_std(r["pooled"]["auprc"] for r in by["clean-fedavg"])[0]
    attacks = sorted({n.split("/")[0] for n in by if "/" in n})
    strategies = [
        n for n in BYZANTINE_STRATEGIES if any(k.endswith(f"/{n}") for k in by)
    ]
    lines = [
        "| attack by bank 3 | " + " | ".join(strategies) + " |",
        "|---|" + "---|" * len(strategies),
        "| none (clean FedAvg) | "
        + _cell(r["pooled"]["auprc"] for r in by["clean-fedavg"])
        + " |" * len(strategies),
    ]
    checks: dict[str, Any] = {"clean": clean}
    for attack in attacks:
        cells = []
        for strategy in strategies:
            items = by.get(f"{attack}/{strategy}", [])
            values = [r["pooled"]["auprc"] for r in items]
            mean = _mean_std(values)[0]
            checks[f"{attack}/{strategy}"] = mean - clean
            broken = sum(bool(r.get("non-finite-model")) for r in items)
            note = f", NaN model in {broken}/{len(items)} seeds" if broken else ""
            cells.append(f"{_cell(values)} ({mean - clean:+.3f}{note})")
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines), checks


def loss_table(runs: list[dict]) -> str:
    """Return the loss x learning-rate grid, and each loss at its best rate.

    The best rate of a loss is the one with the highest mean pooled AUPRC on
    the banks' *validation* rows; its test metrics are reported.
    """
    by = _by_name(runs, "loss")
    if not by:
        return ""
    rates = LOSS_LEARNING_RATES
    grid = [
        "Test AUPRC per learning rate:\n",
        "| loss | " + " | ".join(f"lr {lr:g}" for lr in rates) + " |",
        "|---|" + "---|" * len(rates),
    ]
    best = [
        "\nEach loss at the learning rate with the best validation AUPRC:\n",
        "| loss | lr | validation AUPRC | test AUPRC | recall at 1 % FPR | "
        "precision | recall | F1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in LOSSES:
        cells, chosen = [], None
        for lr in rates:
            items = by.get(f"{name}/lr{lr:g}", [])
            cells.append(_cell(r["pooled"]["auprc"] for r in items))
            val = _mean_std(r["validation-auprc"] for r in items)[0]
            if items and (chosen is None or val > chosen[1]):
                chosen = (lr, val, items)
        grid.append(f"| {name} | " + " | ".join(cells) + " |")
        if chosen is not None:
            lr, val, items = chosen
            metrics = [
                _cell(r["pooled"][m] for r in items)
                for m in ("auprc", "recall-at-1pct-fpr", "precision", "recall", "f1")
            ]
            best.append(
                f"| {name} | {lr:g} | {val:.3f} | " + " | ".join(metrics) + " |"
            )
    return "\n".join(grid + best)


# ------------------------------------------------------------------ plots
def plot_federation(runs: list[dict], path: Path) -> Path | None:
    """Draw each bank's AUPRC, local-only vs federated vs centralised."""
    by = _by_name(runs, "federation")
    if "federated" not in by:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [f"bank-{b}\n{_profile(b)}" for b in range(NUM_BANKS)] + ["all banks"]
    series = {
        "local-only": [
            *[
                _mean_std(
                    r["banks"][f"bank-{b}"]["auprc"]
                    for r in by.get(f"local-bank-{b}", [])
                )
                for b in range(NUM_BANKS)
            ],
            _mean_std(_local_pooled(by, "auprc")),
        ],
        "federated": [
            *[
                _mean_std(r["banks"][f"bank-{b}"]["auprc"] for r in by["federated"])
                for b in range(NUM_BANKS)
            ],
            _mean_std(r["pooled"]["auprc"] for r in by["federated"]),
        ],
        "centralised": [
            *[
                _mean_std(
                    r["banks"][f"bank-{b}"]["auprc"] for r in by.get("centralised", [])
                )
                for b in range(NUM_BANKS)
            ],
            _mean_std(r["pooled"]["auprc"] for r in by.get("centralised", [])),
        ],
    }
    figure = Figure(figsize=(8.0, 4.5), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    width = 0.26
    positions = np.arange(len(labels))
    for i, (name, values) in enumerate(series.items()):
        means = [v[0] for v in values]
        stds = [v[1] for v in values]
        axes.bar(
            positions + (i - 1) * width, means, width, yerr=stds, capsize=2, label=name
        )
    axes.set_xticks(positions)
    axes.set_xticklabels(labels, fontsize=8)
    axes.set_ylabel("AUPRC on the test period")
    axes.set_ylim(0, 1)
    axes.set_title("Local-only vs federated vs centralised (mean ± std over seeds)")
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    return path


def plot_byzantine(runs: list[dict], path: Path) -> Path | None:
    """Pooled AUPRC per round: clean FedAvg vs each strategy under the attack."""
    by = _by_name(runs, "byzantine")
    if "clean-fedavg" not in by:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 4.2), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for name in ("clean-fedavg", *(f"scaling/{s}" for s in BYZANTINE_STRATEGIES)):
        items = by.get(name, [])
        if not items:
            continue
        rounds = np.array([h["round"] for h in items[0]["history"]])
        values = np.array(
            [
                [h["auprc"] if h["auprc"] is not None else np.nan for h in r["history"]]
                for r in items
            ]
        )
        # Rounds in which no seed has a metric (a NaN model cannot be evaluated)
        # are left out of the line.
        kept = ~np.isnan(values).all(axis=0)
        axes.plot(
            rounds[kept],
            np.nanmean(values[:, kept], axis=0),
            marker="o",
            markersize=3,
            linewidth=2.5 if name == "clean-fedavg" else 1.5,
            color="black" if name == "clean-fedavg" else None,
            label=name,
        )
    axes.set_xlabel("round")
    axes.set_ylabel("pooled AUPRC, 4 banks (the app's per-round metric)")
    axes.set_title("Bank 3 sends -20x its update (mean over seeds)")
    axes.set_ylim(0, 1)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return path


# ------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print and write the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--groups",
        nargs="+",
        default=["federation", "protection", "byzantine"],
        choices=["federation", "protection", "byzantine", "loss"],
    )
    parser.add_argument("--losses", action="store_true", help="only the loss runs")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="simulation-scale (1.0: the generator's default)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="num-server-rounds (default: the app's)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="parallel processes")
    parser.add_argument("--out", type=Path, default=Path("bank-benchmark"))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--docs", action="store_true", help="write docs/img/bank-*.png")
    parser.add_argument(
        "--quick", action="store_true", help="one seed, scale 0.3, 3 rounds"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.scale, args.rounds = [0], 0.3, 3
    groups = ["loss"] if args.losses else args.groups
    makers = {
        "federation": federation_specs,
        "protection": protection_specs,
        "byzantine": byzantine_specs,
        "loss": loss_specs,
    }
    specs = [s for seed in args.seeds for g in groups for s in makers[g](seed)]
    args.out.mkdir(parents=True, exist_ok=True)
    runs_path = args.out / "bank-runs.jsonl"
    done: dict[str, dict] = {}
    if args.resume and runs_path.exists():
        for line in runs_path.read_text().splitlines():
            run = json.loads(line)
            done[run["key"]] = run
    skipped: dict[str, str] = {}
    for spec in specs:
        reason = None if spec.ckks else unavailable(spec.overrides)
        if reason is not None:
            skipped[spec.name] = reason
    specs = [s for s in specs if s.name not in skipped]
    for name, reason in skipped.items():
        print(f"not available here: {name}: {reason}")
    todo = [s for s in specs if s.key not in done]
    keys = _keys(args.out / "ckks-keys") if any(s.ckks for s in todo) else ("", "")
    print(
        f"{len(specs)} runs, {len(todo)} to do, {args.jobs} process(es); "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    started = time.perf_counter()
    with runs_path.open("a") as sink:
        if args.jobs > 1:
            context = get_context("spawn")
            with ProcessPoolExecutor(
                args.jobs, mp_context=context, initializer=_quiet
            ) as pool:
                futures = {
                    pool.submit(run_spec, s, args.scale, args.rounds, keys): s
                    for s in todo
                }
                for future in as_completed(futures):
                    _record(future.result(), sink, done)
        else:
            _quiet()
            for spec in todo:
                _record(run_spec(spec, args.scale, args.rounds, keys), sink, done)
    runs = [done[s.key] for s in specs if s.key in done]
    report = _report(runs, args, skipped)
    (args.out / "bank-tables.md").write_text(report)
    print(report)
    print(
        f"wall time {time.perf_counter() - started:.0f} s; load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    if args.docs:
        images = ROOT / "docs" / "img"
        images.mkdir(parents=True, exist_ok=True)
        for plot, name in (
            (plot_federation, "bank-federation.png"),
            (plot_byzantine, "bank-byzantine.png"),
        ):
            path = plot(runs, images / name)
            if path is not None:
                print(f"wrote {path.relative_to(ROOT)}")
    return 0


def _keys(directory: Path) -> tuple[str, str]:
    from flwr_ext.he import SECRET_FILE, SERVER_FILE, create_keys

    if not (directory / SECRET_FILE).exists():
        create_keys(directory)
    return str(directory / SERVER_FILE), str(directory / SECRET_FILE)


def _record(run: dict, sink: Any, done: dict[str, dict]) -> None:
    sink.write(json.dumps(run, default=_json_default) + "\n")
    sink.flush()
    done[run["key"]] = json.loads(json.dumps(run, default=_json_default))
    pooled = run["pooled"]
    print(
        f"  {run['key']:<40} AUPRC {pooled['auprc']:.3f}  recall@1%FPR "
        f"{pooled['recall-at-1pct-fpr']:.3f}  {run['seconds']:.1f} s",
        flush=True,
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _report(
    runs: list[dict], args: argparse.Namespace, skipped: Mapping[str, str]
) -> str:
    parts = [
        f"Seeds {args.seeds}, simulation-scale {args.scale}, rounds "
        f"{args.rounds or 'app default'}; mean ± std over seeds.\n"
    ]
    table, checks = federation_table(runs)
    if table:
        parts += ["## Local-only vs federated vs centralised (AUPRC)\n", table, ""]
        parts.append(
            f"federated / centralised pooled AUPRC: "
            f"{checks['federated/centralised']:.3f} (target >= 0.95); "
            f"federated beats local-only at every bank: "
            f"{all(checks['federated-beats-local'].values())}\n"
        )
    table = protection_table(runs)
    if table:
        parts += ["## Cost of each protection (no attack)\n", table, ""]
    table, checks = byzantine_table(runs)
    if table:
        parts += ["## A poisoned bank (pooled AUPRC of the honest banks)\n", table, ""]
    table = loss_table(runs)
    if table:
        parts += ["## Class-imbalance loss (federated)\n", table, ""]
    if skipped:
        parts.append("Not available in this installation:\n")
        parts += [f"- {name}: {reason}" for name, reason in skipped.items()]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
