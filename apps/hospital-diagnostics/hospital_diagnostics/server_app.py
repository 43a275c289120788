"""ServerApp: the coordinator. It never sees a row of data.

1. Validate the run config (a typo fails here, with the valid choices) and open
   the results folder (an unwritable one fails here, before any training).
2. Unless ``standardisation="site"``: ask every hospital for the sums of its
   training rows' features and combine them into one scaler for all
   (:mod:`flwr_ext.appkit.scaling`: in plaintext, encrypted under ``ckks``, or
   as threshold-CKKS secure sums under ``ckks-threshold``, whose first sum runs
   the key-generation setup round, logged with the hospitals that took part).
3. Run the strategy the run config names (FedAvg, a robust rule, DP, CKKS...)
   for ``num-server-rounds`` through a :class:`RecordingGrid`, which records every
   hospital's metrics per round and names any hospital that drops out, wrapped
   in a :class:`DeadlineGrid`: a round waits at most ``node-wait-timeout`` for an
   absent hospital, then goes on without it (``min-nodes`` permitting) or fails
   naming it.
4. Write ``metrics.json``, ``metrics.csv``, the final model, its preprocessing
   (``preprocessing.json``: columns, feature mean and scale) and the plots, and
   log one summary line: ``flwr-ext result: app=hospital-diagnostics ...``.
   A run that fails on the way still writes its results folder (what completed,
   which hospital failed and why) and a ``status=failed`` summary line
   (:mod:`flwr_ext.appkit.failure`).
"""

from __future__ import annotations

import time
from logging import INFO, WARNING

import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from flwr_ext.appkit.metrics import make_metrics_aggregator
from flwr_ext.appkit.plots import plot_rounds
from flwr_ext.appkit.results import ResultsWriter, round_history, summary_line
from flwr_ext.appkit.scaling import prepare_feature_scaling
from flwr_ext.appkit.site_run import SiteRun, run_with_sites
from flwr_ext.appkit.strategies import build_strategy
from flwr_ext.appkit.torch_train import model_to_arrays
from flwr_ext.he import is_encrypted, save_encrypted_model
from flwr_ext.privacy.keys import CLIENT_EPSILON, RECORD_EPSILON
from flwr_ext.privacy.silo_metrics import aggregate_silo_metrics

from .settings import (
    APP_NAME,
    EVALUATION_METRICS,
    check_server_settings,
    load_settings,
)
from .task import make_model, schema_for

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation and write the results."""
    settings = load_settings(context.run_config)
    check_server_settings(settings)
    run_with_sites(
        APP_NAME,
        grid,
        context,
        settings,
        lambda run: _run(run, context, settings),
    )


def _run(run: SiteRun, context: Context, settings: dict) -> None:
    """Statistics round, training rounds, results: everything that needs the sites."""
    grid, recording, writer, started = run.grid, run.recording, run.writer, run.started
    strategy = build_strategy(
        settings,
        train_metrics_aggr_fn=_train_metrics_aggregator(settings),
        evaluate_metrics_aggr_fn=make_metrics_aggregator(EVALUATION_METRICS),
    )
    schema = schema_for(settings)
    num_features = len(schema.features)
    model = make_model(num_features, settings["hidden-units"], settings["seed"])

    config = ConfigRecord()
    prepare_feature_scaling(
        grid,
        settings,
        num_features,
        config,
        writer.directory,
        sites="hospitals",
        strategy=strategy,
    )
    writer.write_json("preprocessing.json", _preprocessing(schema, settings, config))

    result = strategy.start(
        grid=grid,
        initial_arrays=model_to_arrays(model),
        num_rounds=settings["num-server-rounds"],
        timeout=settings["round-timeout"],
        train_config=ConfigRecord(dict(config)),
        evaluate_config=ConfigRecord(dict(config)),
    )

    history = round_history(recording, result)
    seconds = time.monotonic() - started
    final = history[-1] if history else {"aggregated": {}, "sites": {}, "dropped": []}
    evaluation = final["aggregated"].get("evaluate", {})
    dropped = sorted({(d["node-id"], d["site"]) for d in recording.dropouts()})
    files = _write(writer, settings, context, history, result.arrays, seconds, dropped)
    fields: dict[str, object] = {"run": context.run_id, "status": "completed"}
    fields["rounds"] = len(history)
    fields["sites"] = len(final["sites"])
    for name in EVALUATION_METRICS:
        fields[name] = float(evaluation.get(name, float("nan")))
    train = final["aggregated"].get("train", {})
    if settings["dp-sgd"]:
        # Record level: the largest cumulative epsilon over the hospitals.
        fields["epsilon"] = float(train.get(RECORD_EPSILON, float("nan")))
    if settings["strategy"] == "dp-fedavg":
        fields["client-epsilon"] = float(train.get(CLIENT_EPSILON, float("nan")))
    fields["dropped"] = ",".join(site for _, site in dropped) or "none"
    fields["seconds"] = f"{seconds:.1f}"
    fields["output"] = str(writer.directory)
    log(INFO, "%s: results in %s: %s", APP_NAME, writer.directory, ", ".join(files))
    log(INFO, summary_line(APP_NAME, fields))


def _write(
    writer: ResultsWriter,
    settings: dict,
    context: Context,
    history: list[dict],
    arrays,
    seconds: float,
    dropped: list[tuple[int, str]],
) -> list[str]:
    """Write metrics, model and plots; return the file names written."""
    run = {
        "app": APP_NAME,
        "run-id": context.run_id,
        "run-config": dict(settings),
        "wall-time-s": seconds,
        "dropped-out": [{"node-id": n, "site": s} for n, s in dropped],
    }
    files = ["preprocessing.json"]
    if (writer.directory / "feature-mean.ckks-model").exists():
        files += ["feature-mean.ckks-model", "feature-spread.ckks-model"]
    files += [p.name for p in writer.write_metrics(history, run=run)]
    if is_encrypted(arrays):
        # Under CKKS the server only ever holds the encrypted model; a hospital
        # decrypts it: flwr-ext keys decrypt --context secret-context.ckks ...
        files.append(
            save_encrypted_model(arrays, writer.path("final_model.ckks-model")).name
        )
    else:
        files.append(writer.write_arrays(arrays).name)
        with writer.open("final_model.pt") as handle:  # 0600, atomic
            torch.save(arrays.to_torch_state_dict(), handle)
        files.append("final_model.pt")
    auroc = plot_rounds(
        history,
        "auroc",
        writer.path("auroc.png"),
        title="AUROC per round (held-out rows of each hospital)",
        ylabel="AUROC",
    )
    if auroc is not None:
        files.append(auroc.name)
    if settings["dp-sgd"] or settings["strategy"] == "dp-fedavg":
        record_level = settings["dp-sgd"]
        delta = settings["dp-sgd-delta" if record_level else "dp-fedavg-delta"]
        epsilon = plot_rounds(
            history,
            RECORD_EPSILON if record_level else CLIENT_EPSILON,
            writer.path("epsilon.png"),
            phase="train",
            title="Cumulative record-level epsilon per hospital (DP-SGD)"
            if record_level
            else "Cumulative client-level epsilon of the released models (DP-FedAvg)",
            ylabel=f"epsilon (delta = {delta:g})",
            aggregate_label="federation (max over hospitals)"
            if record_level
            else "released global model",
        )
        if epsilon is None:
            log(WARNING, "DP is on but no epsilon was reported")
        else:
            files.append(epsilon.name)
    return files


def _preprocessing(schema, settings: dict, config: ConfigRecord) -> dict:
    """How to turn a CSV row into the model's input (kept next to the model)."""
    recipe = {
        "label": schema.label,
        "positive-label": schema.positive_label,
        "features": list(schema.features),
        "standardisation": settings["standardisation"],
    }
    if settings["standardisation"] == "site":
        recipe["note"] = (
            "each hospital standardises with the mean and standard deviation of "
            "its own training rows"
        )
    elif "feature-mean" in config:
        recipe["feature-mean"] = list(config["feature-mean"])
        recipe["feature-scale"] = list(config["feature-scale"])
        recipe["note"] = (
            "model input = (x - feature-mean) / feature-scale, columns in "
            "'features' order; output = logit of malignant"
        )
    else:
        recipe["note"] = (
            "under CKKS the server never saw the pooled feature mean and scale: "
            "they are in feature-mean.ckks-model and feature-spread.ckks-model; "
            "a hospital decrypts them and the model with `python -m "
            "hospital_diagnostics.decrypt --context secret-context.ckks "
            "RESULTS_DIR`"
        )
    return recipe


def _train_metrics_aggregator(settings: dict):
    """Train metrics: the worst hospital's epsilon under DP-SGD, else averages."""
    if settings["dp-sgd"]:
        return aggregate_silo_metrics
    return make_metrics_aggregator(())
