"""Both app templates under ``secure-aggregation = "ckks-threshold"`` (3 sites).

The apps' real ServerApp and ClientApp (mods included) run through
:class:`~flwr_ext.inprocess.InProcessGrid` (real Flower Messages, protobuf on the
wire): the setup round makes the collective key from every site's own share, the
federated statistics round and every training round are summed under it and only
the sums are decrypted, by all sites together. Each run is compared with the same
app in plaintext: SecAgg's semantics, the same results.
"""

import json
import logging
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from flwr_ext.appkit.config import ConfigError
from flwr_ext.appkit.scaling import answer_feature_stats
from flwr_ext.appkit.threshold_stats import (
    THRESHOLD_STATS_QUERY,
    reply_threshold_stats,
)
from flwr_ext.inprocess import InProcessGrid

ROOT = Path(__file__).resolve().parents[1]
for app_dir in ("hospital-diagnostics", "bank-fraud"):
    sys.path.insert(0, str(ROOT / "apps" / app_dir))

import bank_fraud.client_app as bank_client  # noqa: E402
import bank_fraud.server_app as bank_server  # noqa: E402
import hospital_diagnostics.client_app as hospital_client  # noqa: E402
import hospital_diagnostics.server_app as hospital_server  # noqa: E402
from bank_fraud.settings import SCHEMA as BANK_SCHEMA  # noqa: E402
from hospital_diagnostics.settings import SCHEMA as HOSPITAL_SCHEMA  # noqa: E402
from hospital_diagnostics.settings import load_settings  # noqa: E402

SITES = 3
SETUP = "collective public key of key set"


def _run(tmp_path, schema, server, client, *, shares=None, policy=None, **overrides):
    """Run one app in-process; return its results folder.

    ``policy``: node-config ``policy-*`` keys every site sets.
    """
    run_config = schema.defaults()
    run_config.update({"num-server-rounds": 2, "output-dir": str(tmp_path / "out")})
    run_config.update({k.replace("_", "-"): v for k, v in overrides.items()})
    configs = {}
    for i in range(SITES):
        # site-name names the key holders in the set-up log (and seeds training)
        configs[i + 1] = {
            "partition-id": i,
            "num-partitions": SITES,
            "site-name": f"site-{i}",
        }
        if shares is not None:
            folder = shares / f"site{i}"
            folder.mkdir(parents=True, mode=0o700)
            configs[i + 1]["ckks-threshold-dir"] = str(folder)
        configs[i + 1].update(policy or {})
    grid = InProcessGrid(
        dict.fromkeys(configs, client.app), node_configs=configs, run_config=run_config
    )
    server.app(grid, Context(1, 0, {}, RecordDict(), run_config))
    return tmp_path / "out"


def _last_round(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())["rounds"][-1]


def _assert_shares_stay_at_the_sites(shares: Path, out: Path) -> None:
    files = sorted(shares.glob("site*/*.share"))
    # one key set for the statistics and the training rounds: one share a site
    assert [f.parent.name for f in files] == [f"site{i}" for i in range(SITES)]
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert not list(out.rglob("*.share"))


def _assert_same_scaler(recipe: dict, plain: dict) -> None:
    """Equal to the plaintext pooled scaler up to the secure sum's noise.

    Measured: mean within 2e-12 of each feature's scale, scale within 3e-12
    relative (the second secure sum works in units of the spread).
    """
    scale = np.asarray(plain["feature-scale"])
    error = np.abs(np.subtract(recipe["feature-mean"], plain["feature-mean"]))
    assert (error <= 1e-9 * scale).all(), (error / scale).max()
    np.testing.assert_allclose(recipe["feature-scale"], scale, rtol=1e-9)


def _assert_threshold_log(caplog) -> None:
    setups = [r.getMessage() for r in caplog.records if SETUP in r.getMessage()]
    assert len(setups) == 1, setups  # the statistics round made the key set
    assert "from 3 sites: site-0, site-1, site-2" in setups[0]
    text = caplog.text
    assert "pooled over 3" in text and "threshold-CKKS secure sums" in text
    assert "secure sum: aggregate of 3 updates decrypted by all 3 sites" in text
    for server_round in (1, 2):
        assert f"round {server_round}: aggregate of 3 updates decrypted by all 3" in (
            text
        )


def test_hospital_app_under_threshold_ckks_equals_plaintext(tmp_path, caplog):
    plain = _run(tmp_path / "plain", HOSPITAL_SCHEMA, hospital_server, hospital_client)
    with caplog.at_level(logging.INFO, logger="flwr"):
        out = _run(
            tmp_path / "thr",
            HOSPITAL_SCHEMA,
            hospital_server,
            hospital_client,
            shares=tmp_path / "shares",
            # Sites that refuse plaintext updates and more than 2 train rounds
            # take part: key generation, statistics and decryptions are neither.
            policy={"policy-require-ckks": True, "policy-max-train-rounds": 2},
            secure_aggregation="ckks-threshold",
        )
    _assert_threshold_log(caplog)
    _assert_shares_stay_at_the_sites(tmp_path / "shares", out)
    # The server holds the plaintext aggregate (SecAgg's semantics): the pooled
    # scaler and the final model are written as in a plaintext run.
    recipe, recipe_plain = (
        json.loads((folder / "preprocessing.json").read_text())
        for folder in (out, plain)
    )
    _assert_same_scaler(recipe, recipe_plain)
    model, model_plain = (
        torch.load(folder / "final_model.pt") for folder in (out, plain)
    )
    for name, tensor in model_plain.items():
        difference = (tensor - model[name]).abs().max()
        assert difference <= 1e-5 and tensor.abs().max() > 0.1, (name, difference)
    a, b = _last_round(plain), _last_round(out)
    for key in ("auroc", "sensitivity", "specificity", "accuracy"):
        assert b["aggregated"]["evaluate"][key] == pytest.approx(
            a["aggregated"]["evaluate"][key], abs=1e-4
        )
    assert b["aggregated"]["train"]["ckks-summed"] == SITES


def test_bank_app_under_threshold_ckks_equals_plaintext(tmp_path, caplog):
    small = {"simulation-scale": 0.2, "min-nodes": SITES}
    plain = _run(tmp_path / "plain", BANK_SCHEMA, bank_server, bank_client, **small)
    with caplog.at_level(logging.INFO, logger="flwr"):
        out = _run(
            tmp_path / "thr",
            BANK_SCHEMA,
            bank_server,
            bank_client,
            shares=tmp_path / "shares",
            secure_aggregation="ckks-threshold",
            **small,
        )
    _assert_threshold_log(caplog)
    _assert_shares_stay_at_the_sites(tmp_path / "shares", out)
    recipe, recipe_plain = (
        json.loads((folder / "preprocessing.json").read_text())
        for folder in (out, plain)
    )
    _assert_same_scaler(recipe, recipe_plain)
    assert (out / "final_model.pt").is_file()
    a, b = _last_round(plain), _last_round(out)
    assert b["aggregated"]["evaluate"]["auprc"] == pytest.approx(
        a["aggregated"]["evaluate"]["auprc"], abs=1e-3
    )


# ------------------------------------------------------------- settings
def test_ckks_threshold_is_a_valid_setting_and_a_typo_names_the_choices():
    assert load_settings({"secure-aggregation": "ckks-threshold"})[
        "secure-aggregation"
    ] == ("ckks-threshold")
    with pytest.raises(ConfigError) as err:
        load_settings({"secure-aggregation": "ckks-treshold"})
    assert "secure-aggregation='ckks-treshold'" in str(err.value)
    assert "'none', 'ckks', 'ckks-threshold'" in str(err.value)


def test_the_apps_no_longer_offer_the_tenseal_wire():
    for schema in (HOSPITAL_SCHEMA, BANK_SCHEMA):
        with pytest.raises(ConfigError, match=r"choose one of: 'packed', 'seeded'$"):
            schema.validate({"ckks-wire": "tenseal"})


def test_threshold_needs_two_sites_in_min_nodes(tmp_path):
    from flwr_ext.appkit.strategies import build_strategy

    settings = load_settings(
        {"secure-aggregation": "ckks-threshold", "min-nodes": 1, "strategy": "fedavg"}
    )
    with pytest.raises(ConfigError, match="min-nodes=1"):
        build_strategy(settings)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam"])
def test_the_base_strategies_are_wrapped_by_name(name):
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

    from flwr_ext.appkit.strategies import build_strategy
    from flwr_ext.strategy import ThresholdHomomorphicAggregation

    settings = load_settings(
        {"secure-aggregation": "ckks-threshold", "strategy": name, "min-nodes": 3}
    )
    strategy = build_strategy(settings)
    assert isinstance(strategy, ThresholdHomomorphicAggregation)
    inner = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam}[name]
    assert type(strategy.strategy) is inner
    assert strategy.min_sites == 3 and strategy.min_replies == 2


@pytest.mark.parametrize(
    ("strategy", "reason"),
    [("krum", "Krum"), ("dp-fedavg", "record-level DP-SGD under ckks")],
)
def test_compositions_the_library_refuses_fail_at_start(tmp_path, strategy, reason):
    with pytest.raises(ConfigError) as err:
        _run(
            tmp_path,
            HOSPITAL_SCHEMA,
            hospital_server,
            hospital_client,
            shares=tmp_path / "shares",
            secure_aggregation="ckks-threshold",
            strategy=strategy,
        )
    text = str(err.value)
    assert "secure-aggregation='ckks-threshold'" in text and reason in text
    assert not list((tmp_path / "shares").rglob("*.share"))  # refused before setup


# ---------------------------------------------------- the site's side
X = np.arange(12.0).reshape(4, 3)


def _ask(handler, config: dict) -> Message:
    """Send one QUERY through a real grid to ``handler``; return the reply."""
    grid = InProcessGrid({1: handler})
    (reply,) = grid.send_and_receive(
        [
            Message(
                RecordDict({"config": ConfigRecord(config)}),
                dst_node_id=1,
                message_type=MessageType.QUERY,
            )
        ]
    )
    return reply


def _threshold_query(step: str, *, sum_op: bool = True, **values) -> dict:
    from flwr_ext.he.threshold_protocol import KEY_OP, OP_SUM

    config = {"query": THRESHOLD_STATS_QUERY, "step": step, **values}
    if sum_op:
        config[KEY_OP] = OP_SUM
    return config


@pytest.mark.parametrize(
    ("secure", "config", "refusal"),
    [
        ("ckks", {"query": "feature-stats"}, "refusing a plaintext"),
        ("ckks-threshold", {"query": "feature-stats"}, "refusing a plaintext"),
        ("none", _threshold_query("moments"), "refusing a threshold-CKKS"),
        ("ckks-threshold", {"query": "other"}, "unknown query"),
    ],
)
def test_a_site_answers_statistics_only_in_the_runs_mode(secure, config, refusal):
    """A coordinator cannot downgrade a CKKS run's statistics to plaintext."""
    reply = _ask(lambda m, c: answer_feature_stats(m, c, X, secure), config)
    assert reply.has_error() and refusal in reply.error.reason


def test_a_threshold_query_without_the_secure_sum_announcement_is_refused():
    # ckks_mod encrypts only a query announced as a secure sum: without it the
    # answer would leave in plaintext.
    reply = _ask(
        lambda m, c: reply_threshold_stats(m, X),
        _threshold_query("moments", sum_op=False),
    )
    assert reply.has_error() and "plaintext; refused" in reply.error.reason
    ok = _ask(lambda m, c: reply_threshold_stats(m, X), _threshold_query("moments"))
    assert not ok.has_error()
    record = ok.content.metric_records["stats"]
    assert record["rows"] == pytest.approx(4 / 1000)
    np.testing.assert_allclose(record["feature-sum"], X.sum(axis=0) / 1000)


@pytest.mark.parametrize(
    "values",
    [
        {"feature-mean": [0.0, 0.0], "feature-rms": [1.0, 1.0, 1.0]},
        {"feature-mean": [0.0, 0.0, float("nan")], "feature-rms": [1.0, 1.0, 1.0]},
        {"feature-mean": [0.0, 0.0, 0.0], "feature-rms": [1.0, 0.0, 1.0]},
        {"feature-mean": [0, 0, 0], "feature-rms": [1.0, 1.0, 1.0]},
        {"feature-mean": [0.0, 0.0, 0.0]},
        {},
        {"feature-mean": [0.0] * 3, "feature-rms": [1.0] * 3},
        {"feature-mean": [0.0] * 3, "feature-rms": [1.0] * 3, "row-unit": 0.0},
        {"feature-mean": [0.0] * 3, "feature-rms": [1.0] * 3, "row-unit": 1},
    ],
)
def test_hostile_spread_queries_are_refused_before_computing(values):
    reply = _ask(
        lambda m, c: reply_threshold_stats(m, X), _threshold_query("spread", **values)
    )
    assert reply.has_error()
    assert "'feature-" in reply.error.reason or "'row-unit'" in reply.error.reason


@pytest.mark.parametrize(
    ("run_config", "node_config"),
    [
        ({"secure-aggregation": "ckks-threshold"}, {}),
        # a site with a share folder, whatever the run config says
        ({"secure-aggregation": "none"}, {"ckks-threshold-dir": "/secure/shares"}),
    ],
)
def test_a_threshold_site_never_sends_a_plaintext_update(
    run_config, node_config, monkeypatch
):
    """A train instruction without the collective key (a coordinator that wraps
    nothing) is refused before the site trains."""
    monkeypatch.delenv("FLWR_EXT_CKKS_CONTEXT", raising=False)
    monkeypatch.delenv("FLWR_EXT_CKKS_THRESHOLD_DIR", raising=False)
    from flwr.app import Array, ArrayRecord, MetricRecord
    from flwr.clientapp import ClientApp

    from flwr_ext.mods.secure_aggregation import secure_aggregation_mod

    trained = []
    app = ClientApp(mods=[secure_aggregation_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        trained.append(msg)
        return Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({"w": Array(X)}),
                    "metrics": MetricRecord({"num-examples": 4}),
                }
            ),
            reply_to=msg,
        )

    grid = InProcessGrid({1: app}, run_config=run_config, node_configs={1: node_config})
    instruction = Message(
        RecordDict({"arrays": ArrayRecord({"w": Array(X)}), "config": ConfigRecord()}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    (reply,) = grid.send_and_receive([instruction])
    assert reply.has_error() and "refusing to send the update" in reply.error.reason
    assert not trained


@pytest.mark.parametrize("op", ["keygen", "decrypt"])
def test_a_key_generation_instruction_the_clientapp_answers_is_not_sent(op):
    """A coordinator marks a train instruction as key generation for a site whose
    pipeline has no ckks_mod: the ClientApp trains on it, and the site policy
    (which skips key-generation and decryption exchanges) must not let that
    reply out as if it were ckks_mod's."""
    from flwr.app import Array, ArrayRecord, MetricRecord
    from flwr.clientapp import ClientApp

    from flwr_ext.he.threshold_protocol import KEY_KEYSET, KEY_OP
    from flwr_ext.mods.site_policy import site_policy_mod

    app = ClientApp(mods=[site_policy_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({"w": Array(X)}),
                    "metrics": MetricRecord({"num-examples": 4}),
                }
            ),
            reply_to=msg,
        )

    grid = InProcessGrid({1: app}, node_configs={1: {"policy-require-ckks": True}})
    config = ConfigRecord({KEY_OP: op, KEY_KEYSET: "ab" * 16})
    instruction = Message(
        RecordDict({"arrays": ArrayRecord({"w": Array(X)}), "config": config}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    (reply,) = grid.send_and_receive([instruction])
    assert reply.has_error() and "answered by the ClientApp" in reply.error.reason
