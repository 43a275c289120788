"""What federation buys a hospital consortium, and what each protection costs.

Every federated setting runs the real hospital-diagnostics app
(``apps/hospital-diagnostics``): its ServerApp and ClientApps, mods included,
exchange real Flower Messages through :class:`flwr_ext.inprocess.InProcessGrid`
(protobuf on the "wire", no Ray), with the app's default run config (3 hospitals,
5 rounds of 2 local epochs, FedAvg) unless a setting changes it. Each seed gives a
different non-IID split of the WDBC data, held-out rows, initial model and batches.

Settings, per seed:

- **local-only** - each hospital runs the app alone (one node, its own scaler);
- **federated** - the three hospitals with the app's defaults (FedAvg);
- **centralised** - one model trained on the three hospitals' training rows
  pooled (pooled scaler), with appkit's training loop, for as many epochs as a
  hospital trains in the federated run: what pooling the data would give;
- **protections** - the federation with CKKS secure aggregation, record-level
  DP-SGD at epsilon 1, 4 and 8 per hospital (delta 1e-5), central user-level
  DP-FedAvg at epsilon 8 (a whole hospital protected, delta 1e-5), and a robust
  rule (median), where this installation provides them;
- **Byzantine** - hospital 0 sends poisoned updates (``scaling``, strength -20:
  its update flipped and boosted 20x) under FedAvg and under the median; these
  runs are scored on the two honest hospitals.

Every model is scored *exactly* (every held-out score, no histogram) on the
pooled held-out rows of the hospitals it serves ("pooled AUROC") and on each
hospital's own held-out rows ("hospital AUROC", mean over hospitals); local-only
is scored per hospital with its own model, its pooled AUROC on the union of the
hospitals' own predictions. Costs: wall time of the whole in-process run
(training included; Flower's engines add process start-up) and bytes on the wire
per round (serialised RecordDicts, both directions, the statistics round before
training included: total bytes / rounds).

``--wall-time`` also measures the README's default command, the app in Flower's
Simulation Engine with 3 SuperNodes (``flwr_ext.launch.simulate``: private
SuperLink, ``flwr run``, wait for the final status).

``--more-sites 5 8`` repeats local-only, federated and centralised with 5 and 8
(smaller) hospitals.

Run from the repository root::

    python -m benchmarks.hospital --seeds 0 1 2 3 4 --more-sites 5 8 \
        --wall-time 2 --docs

``--docs`` writes the tables into ``docs/hospital.md`` (between the
``benchmark`` markers) and the plots to ``docs/img/hospital-*.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "hospital-diagnostics"
if str(APP) not in sys.path:
    sys.path.insert(0, str(APP))

NUM_SITES = 3
BYZANTINE_SITE = 0
DOCS = ROOT / "docs" / "hospital.md"
IMG = ROOT / "docs" / "img"
START, END = "<!-- benchmark:start -->", "<!-- benchmark:end -->"


@dataclass(frozen=True)
class Spec:
    """One benchmark run: a named configuration at one seed."""

    name: str
    seed: int
    overrides: Mapping[str, Any] = field(default_factory=dict)
    kind: str = "federated"  # "federated", "local" or "centralised"
    evaluate_on: tuple[int, ...] = tuple(range(NUM_SITES))
    ckks: bool = False
    num_sites: int = NUM_SITES


def specs(seed: int) -> list[Spec]:
    """Every setting at one seed."""
    honest = tuple(s for s in range(NUM_SITES) if s != BYZANTINE_SITE)
    attack = {
        "attack": "scaling",
        "attack-strength": -20.0,
        "attack-partition-ids": str(BYZANTINE_SITE),
    }
    result = [
        Spec("local-only", seed, kind="local"),
        Spec("centralised", seed, kind="centralised"),
        Spec("federated", seed),
        Spec("ckks", seed, {"secure-aggregation": "ckks"}, ckks=True),
    ]
    for epsilon in (1.0, 4.0, 8.0):
        result.append(
            Spec(
                f"dp-sgd eps={epsilon:g}",
                seed,
                {"dp-sgd": True, "dp-sgd-epsilon": epsilon},
            )
        )
    result += [
        Spec(
            "dp-fedavg eps=8",
            seed,
            {"strategy": "dp-fedavg", "dp-fedavg-epsilon": 8.0},
        ),
        Spec("median", seed, {"strategy": "median"}),
        Spec("fedavg + Byzantine", seed, attack, evaluate_on=honest),
        Spec(
            "median + Byzantine",
            seed,
            {"strategy": "median", **attack},
            evaluate_on=honest,
        ),
    ]
    return result


def size_specs(seed: int, num_sites: int) -> list[Spec]:
    """Local-only, federated and centralised with more (hence smaller) hospitals."""
    everyone = tuple(range(num_sites))
    suffix = f", {num_sites} hospitals"
    return [
        Spec(f"local-only{suffix}", seed, kind="local", evaluate_on=everyone,
             num_sites=num_sites),
        Spec(f"centralised{suffix}", seed, kind="centralised", evaluate_on=everyone,
             num_sites=num_sites),
        Spec(f"federated{suffix}", seed, {"min-nodes": num_sites},
             evaluate_on=everyone, num_sites=num_sites),
    ]  # fmt: skip


# ------------------------------------------------------------------ running
def _quiet() -> None:
    logging.getLogger("flwr").setLevel(logging.WARNING)


@dataclass
class Trained:
    """A trained model, how to preprocess for it, and what it cost."""

    state: dict[str, Any]
    scalers: dict[int, tuple[np.ndarray, np.ndarray]]  # site -> (mean, scale)
    seconds: float
    bytes_per_round: float = math.nan
    models: dict[int, Any] = field(default_factory=dict)  # local-only: per site
    history: list[dict] = field(default_factory=list)


def _settings(overrides: Mapping[str, Any]) -> Any:
    from hospital_diagnostics.settings import SCHEMA

    return SCHEMA.validate({**SCHEMA.defaults(), **overrides})


def _site(settings: Mapping[str, Any], site: int, num_sites: int = NUM_SITES) -> Any:
    from hospital_diagnostics.task import load_site_data

    from flwr_ext.appkit.site import SiteSpec

    return load_site_data(
        SiteSpec(f"hospital-{site}", None, site, num_sites, None), settings
    )


def _run_app(
    run_config: dict[str, Any],
    sites: Sequence[int],
    keys: tuple[str, str] | None,
    num_sites: int = NUM_SITES,
) -> Trained:
    """Run the app's ServerApp with ClientApps for ``sites``; read its results."""
    import torch
    from flwr.app import Context, RecordDict
    from hospital_diagnostics.client_app import app as client_app
    from hospital_diagnostics.server_app import app as server_app

    from flwr_ext.inprocess import InProcessGrid

    with tempfile.TemporaryDirectory(prefix="hospital-bench-") as tmp:
        out = Path(tmp) / "out"
        config = {**run_config, "output-dir": str(out)}
        if keys is not None:
            config["ckks-server-context"] = keys[1]
        node_configs = {
            i + 1: {"partition-id": site, "num-partitions": num_sites}
            for i, site in enumerate(sites)
        }
        if keys is not None:
            for node_config in node_configs.values():
                node_config["ckks-context"] = keys[0]
        grid = InProcessGrid(
            dict.fromkeys(node_configs, client_app),
            node_configs=node_configs,
            run_config=config,
        )
        started = time.perf_counter()
        server_app(grid, Context(1, 0, {}, RecordDict(), config))
        seconds = time.perf_counter() - started
        preprocessing = json.loads((out / "preprocessing.json").read_text())
        metrics = json.loads((out / "metrics.json").read_text())
        if (out / "final_model.pt").exists():
            state = torch.load(out / "final_model.pt")
            scaler = (
                np.asarray(preprocessing["feature-mean"]),
                np.asarray(preprocessing["feature-scale"]),
            )
        else:  # CKKS: decrypt as a hospital would
            from flwr_ext.appkit.encrypted_stats import decrypt_scaler
            from flwr_ext.he import decrypt_model_file

            assert keys is not None
            decrypted = decrypt_model_file(out / "final_model.ckks-model", keys[0])
            state = decrypted.arrays.to_torch_state_dict()
            pooled = decrypt_scaler(out, keys[0])
            scaler = (pooled.mean, pooled.scale)
    rounds = max(len(metrics["rounds"]), 1)
    return Trained(
        state,
        dict.fromkeys(sites, scaler),
        seconds,
        (grid.bytes_down + grid.bytes_up) / rounds,
        history=metrics["rounds"],
    )


def _centralised(settings: Mapping[str, Any], num_sites: int = NUM_SITES) -> Trained:
    from hospital_diagnostics.task import make_model

    from flwr_ext.appkit.standardisation import FeatureStats, Standardizer
    from flwr_ext.appkit.torch_train import train_binary

    started = time.perf_counter()
    sites = [_site(settings, s, num_sites) for s in range(num_sites)]
    x = np.concatenate([s.train.x for s in sites])
    y = np.concatenate([s.train.y for s in sites])
    scaler = Standardizer.fit(FeatureStats.from_array(x))
    model = make_model(x.shape[1], settings["hidden-units"], settings["seed"])
    train_binary(
        model,
        scaler.transform(x),
        y,
        epochs=settings["num-server-rounds"] * settings["local-epochs"],
        learning_rate=settings["learning-rate"],
        batch_size=settings["batch-size"],
        seed=settings["seed"],
        server_round=0,
        site=0,
    )
    pair = (scaler.mean, scaler.scale)
    return Trained(
        model.state_dict(),
        dict.fromkeys(range(num_sites), pair),
        time.perf_counter() - started,
    )


def _local(spec: Spec, run_config: dict[str, Any]) -> Trained:
    """Each hospital runs the app alone; keep each one's model and scaler."""
    models, scalers, seconds = {}, {}, 0.0
    for site in spec.evaluate_on:
        trained = _run_app({**run_config, "min-nodes": 1}, [site], None, spec.num_sites)
        models[site] = trained.state
        scalers[site] = trained.scalers[site]
        seconds += trained.seconds
    return Trained({}, scalers, seconds / len(spec.evaluate_on), models=models)


def _scores(
    trained: Trained, settings: Mapping[str, Any], site: int, num_sites: int
) -> tuple[np.ndarray, np.ndarray]:
    from hospital_diagnostics.task import make_model

    from flwr_ext.appkit.torch_train import predict_proba

    data = _site(settings, site, num_sites)
    model = make_model(data.num_features, settings["hidden-units"], settings["seed"])
    model.load_state_dict(trained.models.get(site, trained.state))
    mean, scale = trained.scalers[site]
    x = ((data.test.x.astype(np.float64) - mean) / scale).astype(np.float32)
    return data.test.y, predict_proba(model, x)


def _score(trained: Trained, settings: Mapping[str, Any], spec: Spec) -> dict:
    from sklearn.metrics import roc_auc_score

    per_site, labels, scores = {}, [], []
    for site in spec.evaluate_on:
        y, s = _scores(trained, settings, site, spec.num_sites)
        per_site[site] = float(roc_auc_score(y, s))
        labels.append(y)
        scores.append(s)
    y, s = np.concatenate(labels), np.concatenate(scores)
    predicted = s >= settings["decision-threshold"]
    result = {
        "pooled-auroc": float(roc_auc_score(y, s)),
        "hospital-auroc": float(np.mean(list(per_site.values()))),
        "site-auroc": per_site,
        "sensitivity": float(np.mean(predicted[y == 1])),
        "specificity": float(np.mean(~predicted[y == 0])),
        "rows": {
            site: len(_site(settings, site, spec.num_sites).train) for site in per_site
        },
    }
    if trained.history:
        train = trained.history[-1]["aggregated"].get("train", {})
        for key in ("dp-record-epsilon", "dp-client-epsilon"):
            if key in train:
                result["epsilon"] = float(train[key])
                result["epsilon-unit"] = key
    return result


def run_spec(spec: Spec, keys: tuple[str, str] | None) -> dict[str, Any]:
    """Run one setting and score it."""
    _quiet()
    overrides = {"seed": spec.seed, **spec.overrides}
    settings = _settings(overrides)
    run_config = settings.to_dict()
    if spec.kind == "centralised":
        trained = _centralised(settings, spec.num_sites)
    elif spec.kind == "local":
        trained = _local(spec, run_config)
    else:
        trained = _run_app(
            run_config,
            list(range(spec.num_sites)),
            keys if spec.ckks else None,
            spec.num_sites,
        )
    return {
        "name": spec.name,
        "seed": spec.seed,
        "seconds": trained.seconds,
        "bytes-per-round": trained.bytes_per_round,
        **_score(trained, settings, spec),
    }


def wall_time(repeats: int) -> list[dict[str, float]]:
    """Time the README's default command: the app in Flower's Simulation Engine."""
    from flwr_ext.launch import simulate

    results = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="hospital-wall-") as tmp:
            started = time.perf_counter()
            outcome = simulate(
                APP, num_supernodes=NUM_SITES, run_config={"output-dir": tmp}
            )
            total = time.perf_counter() - started
        if not outcome.completed:
            raise RuntimeError(f"default run failed: {outcome.details}")
        server = _summary_seconds(outcome.log)
        results.append(
            {"total-s": total, "run-s": outcome.elapsed_s, "serverapp-s": server}
        )
    return results


def _summary_seconds(log: str) -> float:
    for line in reversed(log.splitlines()):
        if "flwr-ext result:" in line and "seconds=" in line:
            return float(line.split("seconds=")[1].split()[0])
    return math.nan


# ------------------------------------------------------------------ report
def _mean_std(values: Iterable[float]) -> tuple[float, float]:
    array = np.asarray([v for v in values if v is not None and math.isfinite(v)])
    if array.size == 0:
        return math.nan, math.nan
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def _cell(values: Iterable[float], digits: int = 4) -> str:
    mean, std = _mean_std(values)
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table(runs: list[dict]) -> str:
    """Return the Markdown table of every setting (mean ± std over seeds)."""
    names = list(dict.fromkeys(r["name"] for r in runs))
    rows = [
        "| setting | pooled AUROC | hospital AUROC | sensitivity | specificity "
        "| epsilon | wall time (s) | wire/round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        group = [r for r in runs if r["name"] == name]
        eps = [r.get("epsilon") for r in group]
        kib = [r["bytes-per-round"] / 1024 for r in group]
        sizes = _cell(kib, 1) + " KiB" if any(math.isfinite(k) for k in kib) else "-"
        rows.append(
            f"| {name} | {_cell(r['pooled-auroc'] for r in group)} "
            f"| {_cell(r['hospital-auroc'] for r in group)} "
            f"| {_cell((r['sensitivity'] for r in group), 3)} "
            f"| {_cell((r['specificity'] for r in group), 3)} "
            f"| {_cell(eps, 2) if any(e is not None for e in eps) else '-'} "
            f"| {_cell((r['seconds'] for r in group), 2)} "
            f"| {sizes} |"
        )
    return "\n".join(rows)


def claims(runs: list[dict]) -> str:
    """Return the comparisons the issue asks for, computed from the runs."""
    by = {name: {r["seed"]: r for r in runs if r["name"] == name}
          for name in dict.fromkeys(r["name"] for r in runs)}  # fmt: skip
    lines = []
    more = {n[len("federated") :] for n in by if n.startswith("federated, ")}
    suffixes = ["", *sorted(more)]
    fed = by.get("federated", {})
    for suffix in suffixes:
        f = by.get(f"federated{suffix}", {})
        c = by.get(f"centralised{suffix}", {})
        loc = by.get(f"local-only{suffix}", {})
        seeds = sorted(set(f) & set(c) & set(loc))
        if not seeds:
            continue
        gap = [f[s]["pooled-auroc"] - c[s]["pooled-auroc"] for s in seeds]
        lift = [f[s]["pooled-auroc"] - loc[s]["pooled-auroc"] for s in seeds]
        lift_h = [f[s]["hospital-auroc"] - loc[s]["hospital-auroc"] for s in seeds]
        wins = sum(x > 0 for x in lift)
        wins_h = sum(x > 0 for x in lift_h)
        label = suffix.lstrip(", ") or f"{NUM_SITES} hospitals"
        lines += [
            f"- {label}: federated - centralised pooled AUROC: mean "
            f"{np.mean(gap):+.4f}, largest gap {max(abs(g) for g in gap):.4f} over "
            f"{len(seeds)} seeds.",
            f"- {label}: federated - local-only: pooled AUROC mean "
            f"{np.mean(lift):+.4f} (federated better in {wins} of {len(seeds)} "
            f"seeds), hospital AUROC mean {np.mean(lift_h):+.4f} (better in "
            f"{wins_h} of {len(seeds)}); ranking error 1 - pooled AUROC: "
            f"local-only {1 - np.mean([loc[s]['pooled-auroc'] for s in seeds]):.4f}"
            f", federated {1 - np.mean([f[s]['pooled-auroc'] for s in seeds]):.4f}.",
        ]
    ckks = by.get("ckks", {})
    common = sorted(set(fed) & set(ckks))
    if common:
        diff = max(
            abs(fed[s][k] - ckks[s][k])
            for s in common
            for k in ("pooled-auroc", "hospital-auroc", "sensitivity", "specificity")
        )
        lines.append(
            f"- ckks vs plaintext FedAvg: largest difference in pooled and hospital "
            f"AUROC, sensitivity and specificity {diff:.1e} over {len(common)} "
            "seeds (exactly equal scores give 0; the CKKS error on the weights is "
            "about 1e-7)."
        )
    for eps in ("1", "4", "8"):
        dp = by.get(f"dp-sgd eps={eps}", {})
        if dp:
            values = [r["pooled-auroc"] for r in dp.values()]
            lines.append(
                f"- DP-SGD at epsilon = {eps}: pooled AUROC min {min(values):.4f}, "
                f"mean {np.mean(values):.4f} over {len(values)} seeds."
            )
    return "\n".join(lines)


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def _stat(runs: list[dict], name: str, metric: str) -> tuple[float, float]:
    return _mean_std(r[metric] for r in runs if r["name"] == name)


def plot_federation(runs: list[dict], path: Path) -> Path | None:
    """Local-only vs federated vs centralised, per number of hospitals."""
    names = {r["name"] for r in runs}
    more = {
        int(n.split(", ")[1].split()[0]) for n in names if n.startswith("federated, ")
    }
    sizes = [NUM_SITES, *sorted(more)]
    kinds = ("local-only", "federated", "centralised")
    colours = ("#C44E52", "#4C72B0", "#55A868")
    if not any(r["name"] == "federated" for r in runs):
        return None
    figure = _figure(10, 4.2)
    for column, (metric, label) in enumerate(
        (("pooled-auroc", "pooled AUROC"), ("hospital-auroc", "mean hospital AUROC"))
    ):
        axes = figure.add_subplot(1, 2, column + 1)
        width = 0.26
        for k, (kind, colour) in enumerate(zip(kinds, colours, strict=True)):
            means, stds = [], []
            for size in sizes:
                name = kind if size == NUM_SITES else f"{kind}, {size} hospitals"
                mean, std = _stat(runs, name, metric)
                means.append(mean)
                stds.append(std)
            xs = [i + (k - 1) * width for i in range(len(sizes))]
            axes.bar(xs, means, width, yerr=stds, capsize=3, color=colour, label=kind)
        axes.set_xticks(range(len(sizes)))
        axes.set_xticklabels([f"{n} hospitals" for n in sizes])
        axes.set_ylim(0.93, 1.0)
        axes.set_ylabel(label)
        axes.grid(True, axis="y", alpha=0.3)
        if column == 0:
            axes.legend(fontsize=8, loc="lower left")
    figure.suptitle(
        "What federation buys: AUROC on held-out rows (mean ± std over seeds)"
    )
    figure.tight_layout()
    figure.savefig(path)
    return path


def plot_protections(runs: list[dict], path: Path) -> Path | None:
    """Pooled AUROC and wall time of each protection, and the Byzantine runs."""
    protections = [n for n in ("federated", "ckks", "dp-sgd eps=1", "dp-sgd eps=4",
                               "dp-sgd eps=8", "dp-fedavg eps=8", "median")
                   if any(r["name"] == n for r in runs)]  # fmt: skip
    byzantine = [n for n in ("federated", "fedavg + Byzantine", "median",
                             "median + Byzantine")
                 if any(r["name"] == n for r in runs)]  # fmt: skip
    if not protections:
        return None
    figure = _figure(11, 4.2)
    axes = figure.add_subplot(1, 2, 1)
    stats = [_stat(runs, n, "pooled-auroc") for n in protections]
    axes.barh(range(len(protections)), [m for m, _ in stats],
              xerr=[e for _, e in stats], capsize=3, color="#4C72B0")  # fmt: skip
    for i, (mean, _) in enumerate(stats):
        axes.annotate(f"{mean:.3f}", (0.803, i), fontsize=8, va="center",
                      ha="left", color="white")  # fmt: skip
    axes.axvline(0.97, color="black", linestyle=":", linewidth=1)
    axes.set_yticks(range(len(protections)))
    axes.set_yticklabels(protections)
    axes.invert_yaxis()
    axes.set_xlim(0.8, 1.0)
    axes.set_xlabel("pooled AUROC (dotted: 0.97)")
    axes.set_title("Cost of each protection (no attack)", fontsize=10)
    axes.grid(True, axis="x", alpha=0.3)

    axes = figure.add_subplot(1, 2, 2)
    stats = [_stat(runs, n, "pooled-auroc") for n in byzantine]
    labels = ["fedavg" if n == "federated" else n for n in byzantine]
    colours = ["#C44E52" if "Byzantine" in n else "#4C72B0" for n in byzantine]
    axes.barh(range(len(byzantine)), [m for m, _ in stats],
              xerr=[e for _, e in stats], capsize=3, color=colours)  # fmt: skip
    axes.set_yticks(range(len(byzantine)))
    axes.set_yticklabels(labels)
    axes.invert_yaxis()
    axes.set_xlim(0.0, 1.0)
    axes.axvline(0.5, color="black", linestyle=":", linewidth=1)
    axes.set_xlabel("pooled AUROC of the honest hospitals (dotted: chance)")
    axes.set_title("One Byzantine hospital of three (scaling x -20)", fontsize=10)
    axes.grid(True, axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return path


def plot(runs: list[dict]) -> list[Path]:
    """Write every benchmark figure into docs/img; return the paths written."""
    IMG.mkdir(parents=True, exist_ok=True)
    written = [
        plot_federation(runs, IMG / "hospital-federation.png"),
        plot_protections(runs, IMG / "hospital-protections.png"),
    ]
    return [p for p in written if p is not None]


def write_docs(text: str) -> None:
    """Replace the block between the benchmark markers in docs/hospital.md."""
    doc = (
        DOCS.read_text()
        if DOCS.exists()
        else f"# hospital-diagnostics\n\n{START}\n{END}\n"
    )
    if START not in doc or END not in doc:
        doc += f"\n{START}\n{END}\n"
    head, rest = doc.split(START, 1)
    _, tail = rest.split(END, 1)
    DOCS.write_text(f"{head}{START}\n{text}\n{END}{tail}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print (and optionally write) its report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--only", nargs="+", default=None, help="run only these setting names"
    )
    parser.add_argument(
        "--wall-time",
        type=int,
        default=0,
        metavar="N",
        help="also time the default simulation run N times (flwr run, 3 SuperNodes)",
    )
    parser.add_argument(
        "--more-sites",
        type=int,
        nargs="*",
        default=[],
        metavar="N",
        help="also compare local-only/federated/centralised with N hospitals",
    )
    parser.add_argument("--docs", action="store_true", help="update docs/hospital.md")
    parser.add_argument(
        "--plots-from",
        type=Path,
        default=None,
        metavar="RUNS_JSON",
        help="only redraw docs/img/hospital-*.png from a previous hospital-runs.json",
    )
    parser.add_argument("--out", type=Path, default=Path("hospital-benchmark"))
    args = parser.parse_args(argv)
    _quiet()
    if args.plots_from is not None:
        for path in plot(json.loads(args.plots_from.read_text())):
            print(f"wrote {path}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)

    from flwr_ext.he import create_keys

    key_dir = Path(tempfile.mkdtemp(prefix="hospital-bench-keys-"))
    files = create_keys(key_dir / "keys")
    keys = (str(files.secret), str(files.server))

    # Warm-up: the first run in a process pays for imports (torch, Flower).
    _run_app(
        _settings({"num-server-rounds": 1}).to_dict(), list(range(NUM_SITES)), None
    )
    runs: list[dict] = []
    started = time.perf_counter()
    for seed in args.seeds:
        todo = specs(seed) + [
            spec for n in args.more_sites for spec in size_specs(seed, n)
        ]
        for spec in todo:
            if args.only and spec.name not in args.only:
                continue
            run = run_spec(spec, keys)
            runs.append(run)
            print(
                f"seed {seed} {spec.name:>20}: pooled AUROC {run['pooled-auroc']:.4f}"
                f" hospital AUROC {run['hospital-auroc']:.4f} "
                f"({run['seconds']:.1f} s)",
                flush=True,
            )
    (args.out / "hospital-runs.json").write_text(json.dumps(runs, indent=1))

    walls = wall_time(args.wall_time) if args.wall_time else []
    command = "python -m benchmarks.hospital " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    report = [
        f"Measured with `{command}` on {platform.machine()}, "
        f"{_cpu_count()} CPU cores, Python {platform.python_version()} "
        f"({time.strftime('%Y-%m-%d')}; {len(args.seeds)} seeds, benchmark "
        f"{time.perf_counter() - started:.0f} s; load average at the end "
        f"{_load()}: other processes shared the cores, so times are upper bounds).",
        "",
        table(runs),
        "",
        claims(runs),
    ]
    if walls:
        totals = [w["total-s"] for w in walls]
        runs_s = [w["run-s"] for w in walls]
        server = [w["serverapp-s"] for w in walls]
        report += [
            "",
            f"Default simulation run (`flwr-ext simulate apps/hospital-diagnostics`,"
            f" 3 SuperNodes, 5 rounds), {len(walls)} runs: "
            f"{_cell(totals, 1)} s end to end (SuperLink start, `flwr run`, "
            f"teardown); {_cell(runs_s, 1)} s from submission to final status; "
            f"{_cell(server, 1)} s inside the ServerApp.",
        ]
    text = "\n".join(report)
    print("\n" + text)
    if args.docs:
        plot(runs)
        history = next(
            (
                r
                for r in runs
                if r["name"] == "federated" and r["seed"] == args.seeds[0]
            ),
            None,
        )
        if history is not None:
            _round_plot(args.seeds[0])
        write_docs(text)
    return 0


def _round_plot(seed: int) -> None:
    """AUROC per round, per hospital and pooled, of the default federated run."""
    from flwr_ext.appkit.plots import plot_rounds

    trained = _run_app(
        _settings({"seed": seed}).to_dict(), list(range(NUM_SITES)), None
    )
    plot_rounds(
        trained.history,
        "auroc",
        IMG / "hospital-auroc-rounds.png",
        title=f"hospital-diagnostics, default run (seed {seed}): AUROC per round",
        ylabel="AUROC (held-out rows)",
    )


def _load() -> str:
    import os

    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def _cpu_count() -> int:
    import os

    return (
        len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else (os.cpu_count() or 1)
    )


if __name__ == "__main__":
    sys.exit(main())
