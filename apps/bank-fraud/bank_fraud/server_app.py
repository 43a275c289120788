"""ServerApp: the consortium's coordinator. It never sees a transaction.

1. Validate the run config (a typo fails here, with the valid choices) and open
   the results folder (an unwritable one fails here, before any training).
2. Unless ``standardisation="site"``: ask every bank for the sums of its
   training rows' features and combine them into one scaler for all
   (:mod:`flwr_ext.appkit.scaling`: in plaintext, encrypted under ``ckks``, or
   as threshold-CKKS secure sums under ``ckks-threshold``, whose first sum runs
   the key-generation setup round, logged with the banks that took part).
3. Run the strategy the run config names (FedAvg, a robust rule, DP, CKKS...)
   for ``num-server-rounds`` through a grid that records every bank's metrics
   and score histograms per round and names any bank that drops out (a round
   waits at most ``node-wait-timeout`` for an absent bank, then goes on without
   it, ``min-nodes`` permitting, or fails naming it). Each round
   the decision threshold is chosen on the banks' validation histograms
   (:mod:`bank_fraud.thresholds`) and precision, recall and F1 at it are
   computed on their test histograms - pooled and per bank.
4. Write ``metrics.json``, ``metrics.csv``, the final model, its preprocessing
   and threshold (``preprocessing.json``), the plots (``auprc.png``,
   ``recall-at-1pct-fpr.png``, ``pr_curve.png``), and log one summary line:
   ``flwr-ext result: app=bank-fraud ... auprc=... threshold=...``. A run that
   fails on the way still writes its results folder (what completed, which
   bank failed and why) and a ``status=failed`` summary line
   (:mod:`flwr_ext.appkit.failure`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from flwr_ext.appkit.metrics import BinaryStats, OperatingPoint, make_metrics_aggregator
from flwr_ext.appkit.plots import plot_rounds
from flwr_ext.appkit.results import ResultsWriter, round_history, summary_line
from flwr_ext.appkit.scaling import prepare_feature_scaling
from flwr_ext.appkit.site_run import SiteRun, run_with_sites
from flwr_ext.appkit.strategies import build_strategy
from flwr_ext.appkit.torch_train import model_to_arrays
from flwr_ext.he import is_encrypted, save_encrypted_model
from flwr_ext.privacy.keys import CLIENT_EPSILON, RECORD_EPSILON
from flwr_ext.privacy.silo_metrics import aggregate_silo_metrics

from .decrypt import NOTE as DECRYPTED_NOTE
from .pr_curves import plot_pr_curves
from .settings import APP_NAME, EVALUATION_METRICS, load_settings
from .site_thresholds import HISTOGRAM_KEYS, SiteEvaluation, add_site_threshold_metrics
from .task import data_spec, make_model
from .threshold_metrics import make_threshold_metrics_aggregator
from .thresholds import threshold_rule_from_settings

app = ServerApp()

#: Metrics of the summary line, in order (pooled over the banks' test rows).
SUMMARY_METRICS = (
    "auprc", "recall-at-1pct-fpr", "precision", "recall", "f1", "alert-rate",
    "threshold",
)  # fmt: skip
POOLED = "consortium (pooled)"


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation and write the results."""
    settings = load_settings(context.run_config)
    run_with_sites(
        APP_NAME,
        grid,
        context,
        settings,
        lambda run: _run(run, context, settings),
        keep_lists=HISTOGRAM_KEYS,
    )


def _run(run: SiteRun, context: Context, settings: dict) -> None:
    """Statistics round, training rounds, results: everything that needs the banks."""
    grid, recording, writer, started = run.grid, run.recording, run.writer, run.started
    rule = threshold_rule_from_settings(settings)
    selection = settings["threshold-selection"]
    strategy = build_strategy(
        settings,
        train_metrics_aggr_fn=_train_metrics_aggregator(settings),
        evaluate_metrics_aggr_fn=make_threshold_metrics_aggregator(
            EVALUATION_METRICS, rule, selection=selection
        ),
    )
    spec = data_spec(settings)
    num_features = len(spec.schema.features)
    model = make_model(num_features, settings["hidden-layers"], settings["seed"])

    config = ConfigRecord()
    prepare_feature_scaling(
        grid,
        settings,
        num_features,
        config,
        writer.directory,
        sites="banks",
        strategy=strategy,
    )

    result = strategy.start(
        grid=grid,
        initial_arrays=model_to_arrays(model),
        num_rounds=settings["num-server-rounds"],
        timeout=settings["round-timeout"],
        train_config=ConfigRecord(dict(config)),
        evaluate_config=ConfigRecord(dict(config)),
    )

    history = round_history(recording, result)
    per_site = add_site_threshold_metrics(history, recording, rule, selection=selection)
    seconds = time.monotonic() - started
    final = history[-1] if history else {"aggregated": {}, "sites": {}, "round": 0}
    evaluation = final["aggregated"].get("evaluate", {})
    dropped = sorted({(d["node-id"], d["site"]) for d in recording.dropouts()})
    _write_preprocessing(writer, settings, spec, config, evaluation)
    files = ["preprocessing.json"]
    files += _write(
        writer, settings, context, history, result.arrays, seconds, dropped,
        per_site.get(final["round"], {}), evaluation,
    )  # fmt: skip
    fields: dict[str, object] = {"run": context.run_id, "status": "completed"}
    fields["rounds"] = len(history)
    fields["sites"] = len(final["sites"])
    for name in SUMMARY_METRICS:
        fields[name] = float(evaluation.get(name, math.nan))
    if settings["threshold-selection"] == "site":
        fields["threshold"] = "per-bank"
    train = final["aggregated"].get("train", {})
    if settings["dp-sgd"]:
        # Record level: the largest cumulative epsilon over the banks.
        fields["epsilon"] = float(train.get(RECORD_EPSILON, math.nan))
    if settings["strategy"] == "dp-fedavg":
        fields["client-epsilon"] = float(train.get(CLIENT_EPSILON, math.nan))
    fields["dropped"] = ",".join(site for _, site in dropped) or "none"
    fields["seconds"] = f"{seconds:.1f}"
    fields["output"] = str(writer.directory)
    log(INFO, "%s: results in %s: %s", APP_NAME, writer.directory, ", ".join(files))
    log(INFO, summary_line(APP_NAME, fields))


def _train_metrics_aggregator(settings: Mapping[str, Any]) -> Any:
    """Train metrics: the worst bank's epsilon under DP-SGD, else averages."""
    if settings["dp-sgd"]:
        return aggregate_silo_metrics
    return make_metrics_aggregator(())


def _write_preprocessing(
    writer: ResultsWriter,
    settings: Mapping[str, Any],
    spec: Any,
    config: ConfigRecord,
    evaluation: Mapping[str, float],
) -> None:
    """Write the recipe that turns a transaction into the model's input."""
    if settings["standardisation"] == "site":
        note = (
            "each bank standardises with the mean and standard deviation of its "
            "own (log-transformed) training rows"
        )
    elif "feature-mean" in config:
        note = DECRYPTED_NOTE
    else:
        note = (
            "under CKKS the coordinator never saw the pooled feature mean and "
            "scale, nor the model: a bank decrypts them with `python -m "
            "bank_fraud.decrypt --context secret-context.ckks RESULTS_DIR`"
        )
    recipe: dict[str, Any] = {
        "label": spec.schema.label,
        "positive-label": spec.schema.positive_label,
        "features": list(spec.schema.features),
        "log1p-columns": list(spec.log_columns),
        "standardisation": settings["standardisation"],
    }
    if "feature-mean" in config:
        recipe["feature-mean"] = list(config["feature-mean"])
        recipe["feature-scale"] = list(config["feature-scale"])
    recipe.update(
        {
            "threshold-selection": settings["threshold-selection"],
            "threshold-rule": settings["threshold-rule"],
            "threshold": evaluation.get("threshold"),
            "note": note,
        }
    )
    writer.write_json("preprocessing.json", recipe)


def _write(
    writer: ResultsWriter,
    settings: Mapping[str, Any],
    context: Context,
    history: list[dict],
    arrays: ArrayRecord,
    seconds: float,
    dropped: list[tuple[int, str]],
    final_sites: Mapping[str, SiteEvaluation],
    evaluation: Mapping[str, float],
) -> list[str]:
    """Write metrics, model and plots; return the file names written."""
    run = {
        "app": APP_NAME,
        "run-id": context.run_id,
        "run-config": dict(settings),
        "wall-time-s": seconds,
        "dropped-out": [{"node-id": n, "site": s} for n, s in dropped],
        "final": dict(evaluation),
    }
    files = [p.name for p in writer.write_metrics(history, run=run)]
    if is_encrypted(arrays):
        # Under CKKS the server only ever holds the encrypted model; a bank
        # decrypts it: flwr-ext keys decrypt --context secret-context.ckks ...
        files.append(
            save_encrypted_model(arrays, writer.path("final_model.ckks-model")).name
        )
    else:
        files.append(writer.write_arrays(arrays).name)
        with writer.open("final_model.pt") as handle:  # 0600, atomic
            torch.save(arrays.to_torch_state_dict(), handle)
        files.append("final_model.pt")
    for metric, title in (
        ("auprc", "AUPRC per round (test period of each bank)"),
        ("recall-at-1pct-fpr", "Recall at 1 % false-positive rate per round"),
    ):
        path = plot_rounds(
            history, metric, writer.path(f"{metric}.png"), title=title,
            ylabel=metric.upper() if metric == "auprc" else "recall at 1 % FPR",
            aggregate_label=POOLED,
        )  # fmt: skip
        if path is not None:
            files.append(path.name)
    curve = _pr_curve(writer, final_sites, evaluation, settings)
    if curve is not None:
        files.append(curve)
    if settings["dp-sgd"]:
        epsilon = plot_rounds(
            history,
            RECORD_EPSILON,
            writer.path("epsilon.png"),
            phase="train",
            title="Cumulative record-level epsilon per bank (DP-SGD)",
            ylabel="epsilon",
            aggregate_label="consortium (max over banks)",
        )
        if epsilon is None:
            log(WARNING, "DP-SGD is on but no bank reported epsilon")
        else:
            files.append(epsilon.name)
    return files


def _pr_curve(
    writer: ResultsWriter,
    sites: Mapping[str, SiteEvaluation],
    evaluation: Mapping[str, float],
    settings: Mapping[str, Any],
) -> str | None:
    """Draw the final model's precision-recall curves, pooled and per bank."""
    if not sites:
        return None
    pooled: BinaryStats | None = None
    for site in sites.values():
        pooled = site.test if pooled is None else pooled + site.test
    assert pooled is not None
    curves = {POOLED: pooled, **{name: s.test for name, s in sorted(sites.items())}}
    points = {name: s.point for name, s in sites.items()}
    if all(k in evaluation for k in ("tp", "fp", "tn", "fn")):
        points[POOLED] = OperatingPoint(
            float(evaluation.get("threshold", math.nan)),
            *(int(evaluation[k]) for k in ("tp", "fp", "tn", "fn")),
        )
    rule = settings["threshold-rule"]
    path = plot_pr_curves(
        curves,
        writer.path("pr_curve.png"),
        title=f"Precision-recall of the final model (threshold: {rule}, "
        f"{settings['threshold-selection']})",
        highlight=POOLED,
        operating_points=points,
        xlabel="recall (share of fraud caught)",
        ylabel="precision (share of alerts that are fraud)",
    )
    return None if path is None else path.name
