"""ClientApp: what runs inside each bank, on its own transactions only.

- ``query``: answers the server's one-off feature-statistics request with the row
  count, per-feature sums and sums of squares of its *training* rows (after the
  log transform; see :mod:`flwr_ext.appkit.standardisation`) - under CKKS, with
  the encrypted three-step variant of :mod:`flwr_ext.appkit.encrypted_stats`,
  under threshold CKKS with the two secure sums of
  :mod:`flwr_ext.appkit.threshold_stats`; only in the run's own mode
  (:func:`flwr_ext.appkit.scaling.answer_feature_stats`).
- ``train``: standardises its rows with the scaler the server sent (or its own,
  under ``standardisation="site"``), trains the received model for
  ``local-epochs`` with the class-imbalance loss of the run config
  (:mod:`bank_fraud.losses`) - with record-level DP-SGD if ``dp-sgd`` -
  and replies with the new weights, ``num-examples`` and ``train-loss`` (and
  under DP-SGD the bank's cumulative ``dp-record-epsilon``...).
- ``evaluate``: scores its validation and test rows with the received model and
  replies with its own AUPRC, recall at 1 % FPR and AUROC (exact, from its
  scores), per-class histograms of its test scores and of its validation scores
  (:mod:`flwr_ext.appkit.metrics`, :mod:`bank_fraud.validation_histograms`) - counts
  per score bin, never a score or a transaction - and its bank name. The server
  chooses the decision threshold from the validation histograms and computes
  precision, recall and F1 at it from the test histograms.

Mods, outermost first: ``site_policy_mod`` enforces the bank's own privacy
policy (node config ``policy-*``: CKKS required, minimum contributions, error
replies that carry no data - see ``docs/security.md``);
``secure_aggregation_mod`` runs ``ckks_mod`` (decrypts the global model, encrypts
the update) when the bank holds a secret context or the
run asks for ``secure-aggregation="ckks"`` or ``"ckks-threshold"`` (then
``ckks_mod`` also makes the site's secret share, in node config
``ckks-threshold-dir``, and answers the collective decryptions);
``byzantine_mod`` turns a bank
Byzantine when its config says so (robustness experiments; otherwise it does
nothing).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.supercore import log
from torch import nn

from flwr_ext.appkit.encrypted_stats import scaler_from_state
from flwr_ext.appkit.metrics import site_metrics
from flwr_ext.appkit.recorder import SITE_RECORD_KEY, site_record
from flwr_ext.appkit.scaling import answer_feature_stats
from flwr_ext.appkit.site import site_from_context
from flwr_ext.appkit.site_errors import site_errors_mod
from flwr_ext.appkit.site_state import keep_state, load_scaler, restore_state
from flwr_ext.appkit.standardisation import FeatureStats, Standardizer
from flwr_ext.appkit.torch_train import (
    arrays_to_model,
    model_to_arrays,
    predict_proba,
    train_binary,
    train_binary_dp,
)
from flwr_ext.attacks import byzantine_mod, flip_labels_if_attacking
from flwr_ext.mods.secure_aggregation import secure_aggregation_mod
from flwr_ext.mods.site_policy import ShareableError, site_policy_mod

from .losses import loss_from_settings
from .settings import EVALUATION_METRICS, load_settings
from .task import SiteData, describe_rows, load_site_data, make_model
from .validation_histograms import validation_metrics

# Outermost first: every error reply names the site; the site's policy checks
# every instruction and every reply before CKKS and the attack mod.
app = ClientApp(
    mods=[
        site_errors_mod("bank"),
        site_policy_mod,
        secure_aggregation_mod,
        byzantine_mod,
    ]
)


def _site(context: Context) -> tuple[SiteData, Mapping[str, Any]]:
    settings = load_settings(context.run_config)
    spec = site_from_context(context, name_prefix="bank")
    data = load_site_data(spec, settings)
    if "logged" not in context.state.config_records:
        log(
            INFO,
            "%s (%s): training %s; validation %s; test %s",
            data.name,
            data.description,
            describe_rows(data.train),
            describe_rows(data.validation),
            describe_rows(data.test),
        )
        context.state["logged"] = ConfigRecord({"yes": True})
    return data, settings


def _standardizer(
    msg: Message, context: Context, data: SiteData, settings: Mapping[str, Any]
) -> Standardizer:
    if settings["standardisation"] == "site":
        return Standardizer.fit(FeatureStats.from_array(data.train.x))
    config = msg.content.config_records.get("config", {})
    # Plaintext runs: the server sends the pooled scaler in every round's config.
    # Under CKKS the bank decrypted it itself in the statistics round.
    # A site restarted mid-run takes it back from its state-dir (site_state).
    standardizer = (
        Standardizer.from_config(config)
        or scaler_from_state(context)
        or load_scaler(context)
    )
    if standardizer is None:
        raise ShareableError(
            "no feature scaler: the server sent none (CKKS run), this bank took no "
            "part in the statistics round before training (it joined late), and it "
            "kept none in a state-dir (node config state-dir='/abs/folder' keeps "
            "it across a SuperNode restart); or the ServerApp is not this app's"
        )
    return standardizer


def _model(msg: Message, data: SiteData, settings: Mapping[str, Any]) -> nn.Module:
    model = make_model(data.num_features, settings["hidden-layers"], settings["seed"])
    arrays: ArrayRecord = msg.content.array_records["arrays"]
    arrays_to_model(model, arrays)
    return model


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer the feature-statistics request of the run's secure-aggregation mode."""
    data, settings = _site(context)
    return answer_feature_stats(
        msg, context, data.train.x, settings["secure-aggregation"]
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on this bank's training rows."""
    data, settings = _site(context)
    x = _standardizer(msg, context, data, settings).transform(data.train.x)
    y = flip_labels_if_attacking(data.train.y, context, num_classes=2)
    model = _model(msg, data, settings)
    config = msg.content.config_records.get("config", {})
    loss_fn = loss_from_settings(settings, y)
    if settings["dp-sgd"]:
        from flwr_ext.privacy.dpsgd import STATE_KEY as DP_ACCOUNT

        # After a SuperNode restart, continue the privacy account kept in
        # state-dir: counting epsilon from zero again would under-report it.
        restore_state(context, (DP_ACCOUNT,))
        result = train_binary_dp(
            model,
            x,
            y,
            context,
            epochs=settings["local-epochs"],
            learning_rate=settings["learning-rate"],
            batch_size=settings["batch-size"],
            num_rounds=settings["num-server-rounds"],
            target_epsilon=settings["dp-sgd-epsilon"],
            target_delta=settings["dp-sgd-delta"],
            max_grad_norm=settings["dp-sgd-max-grad-norm"],
            loss_fn=loss_fn,
        )
        keep_state(context, (DP_ACCOUNT,))
    else:
        result = train_binary(
            model,
            x,
            y,
            epochs=settings["local-epochs"],
            learning_rate=settings["learning-rate"],
            batch_size=settings["batch-size"],
            seed=settings["seed"],
            server_round=int(config.get("server-round", 0)),
            site=zlib.crc32(data.name.encode()),
            proximal_mu=float(config.get("proximal-mu", 0.0)),
            loss_fn=loss_fn,
        )
    metrics = {"num-examples": len(data.train), "train-loss": result.loss}
    metrics.update(result.metrics)
    return Message(
        RecordDict(
            {"arrays": model_to_arrays(model), "metrics": MetricRecord(metrics)}
        ),
        reply_to=msg,
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score this bank's validation and test rows with the received model."""
    data, settings = _site(context)
    standardizer = _standardizer(msg, context, data, settings)
    model = _model(msg, data, settings)
    bins = settings["metric-bins"]
    test_scores = predict_proba(model, standardizer.transform(data.test.x))
    if not np.isfinite(test_scores).all():
        raise ShareableError(
            "the global model's scores are NaN/Inf: its weights are not finite (a "
            "diverged or poisoned aggregate), so this bank cannot evaluate it"
        )
    metrics: dict[str, Any] = site_metrics(
        data.test.y,
        test_scores,
        EVALUATION_METRICS,
        threshold=settings["decision-threshold"],
        num_bins=bins,
    )
    val_scores = predict_proba(model, standardizer.transform(data.validation.x))
    metrics.update(validation_metrics(data.validation.y, val_scores, num_bins=bins))
    metrics["num-examples"] = len(data.test)
    return Message(
        RecordDict(
            {
                "metrics": MetricRecord(metrics),
                SITE_RECORD_KEY: site_record(data.name),
            }
        ),
        reply_to=msg,
    )
