"""ClientApp: what runs inside each hospital, on its own rows only.

- ``query``: answers the server's one-off feature-statistics request with the row
  count, per-feature sums and sums of squares of its *training* rows (see
  :mod:`flwr_ext.appkit.standardisation`) - under CKKS, with the encrypted
  three-step variant of :mod:`flwr_ext.appkit.encrypted_stats`, under threshold
  CKKS with the two secure sums of :mod:`flwr_ext.appkit.threshold_stats`; only
  in the run's own mode (:func:`flwr_ext.appkit.scaling.answer_feature_stats`).
- ``train``: standardises its rows with the scaler the server sent (or its own,
  under ``standardisation="site"``), trains the received model for
  ``local-epochs`` (with record-level DP-SGD if ``dp-sgd``), replies with the new
  weights and ``num-examples``, ``train-loss`` (and under DP-SGD the hospital's
  cumulative ``dp-record-epsilon``, ``dp-record-delta``...).
- ``evaluate``: scores its held-out rows with the received model and replies with
  its AUROC, sensitivity, specificity, accuracy and the summable statistics the
  server pools (:mod:`flwr_ext.appkit.metrics`), plus its site name.

Mods, outermost first: ``site_policy_mod`` enforces the hospital's own privacy
policy (node config ``policy-*``: CKKS required, minimum contributions, error
replies that carry no data - see ``docs/security.md``);
``secure_aggregation_mod`` runs ``ckks_mod`` (decrypts the global model, encrypts
the update) when the hospital has a secret context or the
run asks for ``secure-aggregation="ckks"`` or ``"ckks-threshold"`` (then
``ckks_mod`` also makes the site's secret share, in node config
``ckks-threshold-dir``, and answers the collective decryptions);
``byzantine_mod`` turns a site
Byzantine when its config says so (robustness experiments; otherwise it does
nothing).
"""

from __future__ import annotations

import zlib
from logging import INFO

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

from flwr_ext.appkit.encrypted_stats import scaler_from_state
from flwr_ext.appkit.metrics import site_metrics
from flwr_ext.appkit.recorder import SITE_RECORD_KEY, site_record
from flwr_ext.appkit.scaling import answer_feature_stats
from flwr_ext.appkit.site import site_from_context
from flwr_ext.appkit.site_errors import site_errors_mod
from flwr_ext.appkit.site_state import keep_state, load_scaler, restore_state
from flwr_ext.appkit.standardisation import FeatureStats, Standardizer
from flwr_ext.appkit.tabular import summarise
from flwr_ext.appkit.torch_train import (
    arrays_to_model,
    loss_of,
    model_to_arrays,
    predict_proba,
    train_binary,
    train_binary_dp,
)
from flwr_ext.attacks import byzantine_mod, flip_labels_if_attacking
from flwr_ext.mods.secure_aggregation import secure_aggregation_mod
from flwr_ext.mods.site_policy import ShareableError, site_policy_mod

from .settings import EVALUATION_METRICS, load_settings
from .task import SiteData, load_site_data, make_model

# Outermost first: every error reply names the site; the site's policy checks
# every instruction and every reply before CKKS and the attack mod.
app = ClientApp(
    mods=[
        site_errors_mod("hospital"),
        site_policy_mod,
        secure_aggregation_mod,
        byzantine_mod,
    ]
)


def _site(context: Context) -> tuple[SiteData, dict]:
    settings = load_settings(context.run_config)
    spec = site_from_context(context, name_prefix="hospital")
    data = load_site_data(spec, settings)
    if "logged" not in context.state.config_records:
        log(
            INFO,
            "%s: %s training rows (%s), %s test rows",
            data.name,
            len(data.train),
            summarise(data.train, ("benign", "malignant")),
            len(data.test),
        )
        context.state["logged"] = ConfigRecord({"yes": True})
    return data, settings


def _standardizer(
    msg: Message, context: Context, data: SiteData, settings: dict
) -> Standardizer:
    if settings["standardisation"] == "site":
        return Standardizer.fit(FeatureStats.from_array(data.train.x))
    config = msg.content.config_records.get("config", {})
    # Plaintext runs: the server sends the pooled scaler in every round's config.
    # Under CKKS the site decrypted it itself in the statistics round.
    # A site restarted mid-run takes it back from its state-dir (site_state).
    standardizer = (
        Standardizer.from_config(config)
        or scaler_from_state(context)
        or load_scaler(context)
    )
    if standardizer is None:
        raise ShareableError(
            "no feature scaler: the server sent none (CKKS run), this site took no "
            "part in the statistics round before training (it joined late), and it "
            "kept none in a state-dir (node config state-dir='/abs/folder' keeps "
            "it across a SuperNode restart); or the ServerApp is not this app's"
        )
    return standardizer


def _model(msg: Message, data: SiteData, settings: dict):
    model = make_model(data.num_features, settings["hidden-units"], settings["seed"])
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
    """Train the received model on this hospital's training rows."""
    data, settings = _site(context)
    x = _standardizer(msg, context, data, settings).transform(data.train.x)
    y = flip_labels_if_attacking(data.train.y, context, num_classes=2)
    model = _model(msg, data, settings)
    config = msg.content.config_records.get("config", {})
    server_round = int(config.get("server-round", 0))
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
            server_round=server_round,
            site=zlib.crc32(data.name.encode()),
            proximal_mu=float(config.get("proximal-mu", 0.0)),
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
    """Score this hospital's held-out rows with the received model."""
    data, settings = _site(context)
    x = _standardizer(msg, context, data, settings).transform(data.test.x)
    model = _model(msg, data, settings)
    scores = predict_proba(model, x)
    metrics = site_metrics(
        data.test.y,
        scores,
        EVALUATION_METRICS,
        threshold=settings["decision-threshold"],
        num_bins=settings["metric-bins"],
    )
    metrics["num-examples"] = len(data.test)
    metrics["loss"] = loss_of(model, x, data.test.y)
    return Message(
        RecordDict(
            {
                "metrics": MetricRecord(metrics),
                SITE_RECORD_KEY: site_record(data.name),
            }
        ),
        reply_to=msg,
    )
