"""bank-fraud: settings, data loading, and the whole app in-process.

The in-process runs drive the app's real ServerApp and ClientApp (mods included)
through flwr_ext.inprocess.InProcessGrid: real Flower strategies and Messages, no
Ray or SuperLink (those are in tests/e2e/test_bank_*.py). Generated banks are
scaled down (``simulation-scale``) so a run takes seconds.
"""

import csv
import json
import logging
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from flwr_ext.appkit.config import ConfigError
from flwr_ext.appkit.site import SiteSpec
from flwr_ext.appkit.tabular import SchemaError
from flwr_ext.inprocess import InProcessGrid

APP = Path(__file__).resolve().parents[1] / "apps" / "bank-fraud"
sys.path.insert(0, str(APP))

from bank_fraud.client_app import app as client_app  # noqa: E402
from bank_fraud.decrypt import main as decrypt_main  # noqa: E402
from bank_fraud.generator import (  # noqa: E402
    FEATURES,
    LOG_FEATURES,
    generate_bank,
    write_transactions_csv,
)
from bank_fraud.server_app import app as server_app  # noqa: E402
from bank_fraud.settings import SCHEMA, load_settings  # noqa: E402
from bank_fraud.task import (  # noqa: E402
    CREDITCARD_FEATURES,
    load_site_data,
    make_model,
)

SUMMARY = "flwr-ext result: app=bank-fraud"
SMALL = {"simulation-scale": 0.2}


def _settings(**overrides):
    return load_settings({k.replace("_", "-"): v for k, v in overrides.items()})


def _site(path=None, pid=None, num=None, schema=None, name="b"):
    return SiteSpec(name, path, pid, num, schema)


# ---------------------------------------------------------------- settings
def test_pyproject_run_config_equals_the_validated_schema_defaults():
    pyproject = tomllib.loads((APP / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == SCHEMA.defaults()
    assert pyproject["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "bank_fraud.server_app:app",
        "clientapp": "bank_fraud.client_app:app",
    }


def test_readme_documents_every_run_config_key_with_its_default():
    readme = (APP / "README.md").read_text()
    assert SCHEMA.markdown_table() in readme, "run: python -m bank_fraud.settings"


def test_bad_run_config_fails_listing_every_problem():
    with pytest.raises(ConfigError) as err:
        load_settings({"loss": "hinge", "threshold-rule": "best",
                       "hidden-layers": "32,x", "strategy": "fedavgg",
                       "simulation-csv": "a.csv"})  # fmt: skip
    text = str(err.value)
    assert "'focal'" in text and "'max-fpr'" in text and "'trimmed-mean'" in text
    assert "hidden-layers='32,x' must be comma-separated" in text
    assert "simulation-csv='a.csv' must be an absolute path" in text
    with pytest.raises(ConfigError, match="leaves under 10 %"):
        _settings(validation_fraction=0.4, test_fraction=0.5)
    with pytest.raises(ConfigError, match="did you mean 'positive-weight'"):
        load_settings({"positive-weigth": 3.0})


def test_model_size_and_logistic_regression():
    model = make_model(len(FEATURES), "32,16", seed=1)
    assert sum(p.numel() for p in model.parameters()) == 1249
    assert len(list(make_model(5, "", seed=1).parameters())) == 2


# -------------------------------------------------------------------- data
def test_simulated_banks_are_split_by_time_with_fraud_in_every_split():
    settings = _settings(**SMALL)
    for pid in range(4):
        data = load_site_data(_site(pid=pid, num=4), settings)
        n = len(data.train) + len(data.validation) + len(data.test)
        assert len(data.test) == round(0.25 * n)
        assert len(data.validation) == round(0.15 * n)
        assert data.train.y.sum() > 0 and data.test.y.sum() > 0
        assert data.num_features == len(FEATURES)
        amount = data.train.x[:, FEATURES.index("amount")]
        assert amount.max() < 15  # log1p-transformed


def test_a_bank_csv_loads_like_its_generated_partition(tmp_path):
    settings = _settings(**SMALL)
    simulated = load_site_data(_site(pid=2, num=4), settings)
    bank = generate_bank(2, seed=42, scale=0.2)
    path = write_transactions_csv(tmp_path / "bank-2.csv", bank)
    loaded = load_site_data(_site(path=path), settings)
    for part in ("train", "validation", "test"):
        a, b = getattr(simulated, part), getattr(loaded, part)
        np.testing.assert_array_equal(a.y, b.y)
        np.testing.assert_allclose(a.x, b.x, rtol=1e-4, atol=1e-5)


def _write_rows(path, header, rows):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, quoting=csv.QUOTE_NONNUMERIC)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_creditcard(path, n=600, seed=0):
    """A small file in the public benchmark's layout (Class quoted, as there)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.05).astype(int)
    y[:3], y[-40:-37] = 1, 1
    v = rng.normal(size=(n, 28)) + 2.0 * y[:, None]
    amount = rng.lognormal(3, 1, n)
    rows = [[float(t), *map(float, v[i]), float(amount[i]), str(y[i])]
            for i, t in enumerate(np.sort(rng.uniform(0, 172792, n)))]  # fmt: skip
    return _write_rows(path, ["Time", *CREDITCARD_FEATURES, "Class"], rows), amount


def test_the_public_credit_card_benchmark_format(tmp_path):
    path, amount = write_creditcard(tmp_path / "creditcard.csv")
    settings = _settings(data_format="creditcard")
    data = load_site_data(_site(path=path), settings)
    assert data.num_features == 29 and len(data.test) == 150
    all_x = np.concatenate([data.train.x, data.validation.x, data.test.x])
    np.testing.assert_allclose(
        np.sort(all_x[:, -1]), np.sort(np.log1p(amount)), rtol=1e-5
    )
    # The same file split across simulated banks (simulation-csv).
    sim = _settings(data_format="creditcard", simulation_csv=str(path),
                    split="stratified")  # fmt: skip
    sizes = [len(load_site_data(_site(pid=i, num=2), sim).test) for i in range(2)]
    assert sum(sizes) > 100


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h, r: (h[:1] + h[2:], [x[:1] + x[2:] for x in r]),
         "missing columns \\['time'\\].*time-column"),
        (lambda h, r: (h, [[*x[:3], -5.0, *x[4:]] if i == 7 else x
                           for i, x in enumerate(r)]),
         "column 'amount': negative value.*data row 8"),
        (lambda h, r: (h, [[*x[:1], "yesterday", *x[2:]] if i == 3 else x
                           for i, x in enumerate(r)]),
         "line 5, column 'time': not a number"),
        (lambda h, r: ([*h, "merchant_name"], [[*x, "shop"] for x in r]),
         "1 unexpected column\\(s\\) at positions"),
    ],
)  # fmt: skip
def test_bad_bank_files_get_errors_naming_file_column_and_row(tmp_path, edit, message):
    bank = generate_bank(0, seed=3, scale=0.01)
    good = write_transactions_csv(tmp_path / "good.csv", bank, with_typology=False)
    with good.open() as handle:
        header, *rows = list(csv.reader(handle))
    header, rows = edit(header, [list(r) for r in rows])
    path = tmp_path / "bank.csv"
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    with pytest.raises(SchemaError, match=message) as err:
        load_site_data(_site(path=path), _settings())
    # the site's log has the path (and any value); the shareable message has not
    assert str(path) in err.value.detail and str(path) not in str(err.value)


def test_column_settings_that_cannot_work_fail_clearly(tmp_path):
    bank = generate_bank(0, seed=3, scale=0.01)
    path = write_transactions_csv(tmp_path / "bank.csv", bank)
    with pytest.raises(SchemaError, match="time column 'time' is also a feature"):
        load_site_data(_site(path=path), _settings(feature_columns="time,amount"))
    with pytest.raises(SchemaError, match="log-columns \\['hour_x'\\] are not"):
        load_site_data(_site(path=path), _settings(log_columns="hour_x"))
    # A bank whose test period holds no fraud cannot be evaluated.
    quiet = tmp_path / "quiet.csv"
    text = path.read_text().splitlines()
    header = text[0].split(",")
    fraud = header.index("is_fraud")
    late = [",".join(c if j != fraud else "0" for j, c in enumerate(line.split(",")))
            for line in text[-600:]]  # fmt: skip
    quiet.write_text("\n".join([*text[:-600], *late]) + "\n")
    with pytest.raises(SchemaError, match=r"test rows .* hold no fraud transaction"):
        load_site_data(_site(path=quiet), _settings())


def test_schema_file_on_the_node_renames_the_columns(tmp_path):
    bank = generate_bank(1, seed=3, scale=0.01)
    path = write_transactions_csv(tmp_path / "bank.csv", bank, with_typology=False)
    text = path.read_text().replace("is_fraud", "label", 1)
    path.write_text(text)
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"label": "label", "features": list(FEATURES),
                                  "ignore": ["transaction_id"]}))  # fmt: skip
    data = load_site_data(_site(path=path, schema=schema), _settings())
    assert data.num_features == len(FEATURES) and len(data.test) == 500
    # Log columns default to the format's, restricted to the schema's features.
    assert all(name in FEATURES for name in LOG_FEATURES)


# ------------------------------------------------------------- in-process
def run_in_process(tmp_path, *, num_banks=4, node_configs=None, **overrides):
    run_config = SCHEMA.defaults()
    run_config.update({"num-server-rounds": 3, "output-dir": str(tmp_path / "out"),
                       **SMALL})  # fmt: skip
    run_config.update({k.replace("_", "-"): v for k, v in overrides.items()})
    configs = node_configs or {
        i + 1: {"partition-id": i, "num-partitions": num_banks}
        for i in range(num_banks)
    }
    grid = InProcessGrid(
        dict.fromkeys(configs, client_app), node_configs=configs, run_config=run_config
    )
    server_app(grid, Context(1, 0, {}, RecordDict(), run_config))
    return tmp_path / "out"


def _summary(caplog) -> dict[str, str]:
    line = next(r.getMessage() for r in caplog.records if SUMMARY in r.getMessage())
    return dict(part.split("=", 1) for part in line.split()[2:])


def test_whole_app_in_process_writes_results_and_a_summary(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="flwr"):
        out = run_in_process(tmp_path)
    summary = _summary(caplog)
    assert summary["sites"] == "4" and summary["dropped"] == "none"
    # Far above chance (the prevalence, ~2 %), though 3 short rounds on small banks
    assert float(summary["auprc"]) > 0.3 and float(summary["recall-at-1pct-fpr"]) > 0.3
    assert 0 < float(summary["threshold"]) < 1 and summary["output"] == str(out)
    for name in ("metrics.json", "metrics.csv", "final_model.npz", "final_model.pt",
                 "auprc.png", "recall-at-1pct-fpr.png", "pr_curve.png",
                 "preprocessing.json"):  # fmt: skip
        assert (out / name).is_file(), name
    data = json.loads((out / "metrics.json").read_text())
    last = data["rounds"][-1]
    pooled = last["aggregated"]["evaluate"]
    assert set(last["sites"]) == {"bank-0", "bank-1", "bank-2", "bank-3"}
    for key in ("auprc", "recall-at-1pct-fpr", "precision", "f1", "threshold"):
        assert float(summary[key]) == pytest.approx(pooled[key], abs=1e-4), key
    # Every bank is judged at the consortium's threshold; its counts add up to
    # the pooled ones, and its precision is its own tp / (tp + fp).
    for key in ("tp", "fp", "tn", "fn"):
        assert sum(s["evaluate"][key] for s in last["sites"].values()) == pooled[key]
    for site in last["sites"].values():
        metrics = site["evaluate"]
        assert metrics["threshold"] == pooled["threshold"]
        if metrics["tp"] + metrics["fp"]:
            assert metrics["precision"] == pytest.approx(
                metrics["tp"] / (metrics["tp"] + metrics["fp"])
            )
        assert 0 <= metrics["auprc"] <= 1
    preprocessing = json.loads((out / "preprocessing.json").read_text())
    assert preprocessing["features"] == list(FEATURES)
    assert preprocessing["threshold"] == pooled["threshold"]
    assert len(preprocessing["feature-mean"]) == len(FEATURES)


def test_each_bank_its_own_threshold_within_an_alert_budget(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="flwr"):
        out = run_in_process(
            tmp_path, threshold_selection="site", threshold_rule="max-fpr",
            threshold_max_fpr=0.02,
        )  # fmt: skip
    assert _summary(caplog)["threshold"] == "per-bank"
    last = json.loads((out / "metrics.json").read_text())["rounds"][-1]
    thresholds = {s["evaluate"]["threshold"] for s in last["sites"].values()}
    assert len(thresholds) > 1
    assert "threshold-site-mean" in last["aggregated"]["evaluate"]


def test_a_robust_rule_with_a_poisoning_bank_in_process(tmp_path, caplog):
    attack = {"attack": "scaling", "attack_strength": -20.0,
              "attack_partition_ids": "3"}  # fmt: skip
    results = {}
    for strategy in ("median", "fedavg"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="flwr"):
            run_in_process(tmp_path / strategy, strategy=strategy, **attack)
        results[strategy] = float(_summary(caplog)["auprc"])
        if strategy == "median":
            assert "[Median] round 3: received 4" in caplog.text
    # Bank 3 sends -20x its update: FedAvg follows it, the median does not.
    assert results["median"] > 0.3
    assert results["fedavg"] < results["median"] - 0.2, results


def test_a_bank_with_a_broken_csv_is_named_and_left_out(tmp_path, caplog):
    paths = [
        write_transactions_csv(tmp_path / f"b{i}.csv", generate_bank(i, seed=5,
                                                                     scale=0.2))
        for i in range(2)
    ]  # fmt: skip
    broken = tmp_path / "b2.csv"
    broken.write_text("is_fraud,amount\n1,3\n0,2\n")
    configs = {
        1: {"data-path": str(paths[0]), "site-name": "north"},
        2: {"data-path": str(paths[1]), "site-name": "south"},
        3: {"data-path": str(broken), "site-name": "east"},
    }
    with caplog.at_level(logging.INFO, logger="flwr"):
        run_in_process(tmp_path, node_configs=configs, min_nodes=2)
    assert "node 3 (east) replied with an error: site 'east'" in caplog.text
    assert "missing columns" in caplog.text
    summary = _summary(caplog)
    # It never answered successfully, but its error reply names it
    # (site_errors_mod): the site's name, never the node id.
    assert summary["sites"] == "2" and summary["dropped"] == "east"


def test_ckks_secure_aggregation_gives_the_plaintext_metrics(tmp_path, caplog):
    from flwr_ext.he import create_keys

    keys = create_keys(tmp_path / "keys")
    plain = run_in_process(tmp_path / "plain", num_server_rounds=2)
    configs = {i + 1: {"partition-id": i, "num-partitions": 4,
                       "ckks-context": str(keys.secret)} for i in range(4)}  # fmt: skip
    with caplog.at_level(logging.INFO, logger="flwr"):
        ckks = run_in_process(
            tmp_path / "ckks", num_server_rounds=2, node_configs=configs,
            secure_aggregation="ckks", ckks_server_context=str(keys.server),
        )  # fmt: skip
    assert (ckks / "final_model.ckks-model").is_file()
    assert not (ckks / "final_model.pt").exists()
    assert "encrypted feature statistics" in caplog.text
    preprocessing = json.loads((ckks / "preprocessing.json").read_text())
    assert "feature-mean" not in preprocessing  # the coordinator never saw it
    a = json.loads((plain / "metrics.json").read_text())["rounds"][-1]
    b = json.loads((ckks / "metrics.json").read_text())["rounds"][-1]
    for key in ("auprc", "recall-at-1pct-fpr", "precision", "f1", "threshold"):
        assert a["aggregated"]["evaluate"][key] == pytest.approx(
            b["aggregated"]["evaluate"][key], abs=1e-4
        ), key
    # A bank decrypts model and scaler: they match the plaintext run's.
    assert decrypt_main([str(ckks), "--context", str(keys.secret)]) == 0
    decrypted = json.loads((ckks / "decrypted" / "preprocessing.json").read_text())
    plain_recipe = json.loads((plain / "preprocessing.json").read_text())
    np.testing.assert_allclose(
        decrypted["feature-mean"], plain_recipe["feature-mean"], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        decrypted["feature-scale"], plain_recipe["feature-scale"], rtol=1e-4
    )
    assert decrypted["threshold"] == pytest.approx(plain_recipe["threshold"], abs=1e-4)
    want = torch.load(plain / "final_model.pt")
    got = torch.load(ckks / "decrypted" / "final_model.pt")
    for name, tensor in want.items():
        np.testing.assert_allclose(got[name].numpy(), tensor.numpy(), atol=1e-4)


def test_record_level_dp_sgd_reports_the_worst_banks_epsilon(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="flwr"):
        out = run_in_process(tmp_path, num_server_rounds=2, dp_sgd=True,
                             dp_sgd_epsilon=4.0)  # fmt: skip
    summary = _summary(caplog)
    assert 0 < float(summary["epsilon"]) <= 4.0 + 1e-6
    train = json.loads((out / "metrics.json").read_text())["rounds"][-1]["aggregated"]
    assert train["train"]["dp-record-epsilon"] == pytest.approx(
        float(summary["epsilon"]), abs=1e-4
    )
    assert (out / "epsilon.png").is_file()
    with pytest.raises(ConfigError, match="proximal term"):
        _settings(dp_sgd=True, strategy="fedprox")


def test_user_level_dp_fedavg_reports_the_client_epsilon(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="flwr"):
        run_in_process(tmp_path, num_server_rounds=2, strategy="dp-fedavg",
                       dp_fedavg_noise_multiplier=1.0,
                       dp_fedavg_num_clients=4)  # fmt: skip
    summary = _summary(caplog)
    assert float(summary["client-epsilon"]) > 0 and summary["sites"] == "4"


def test_start_up_fails_before_training_on_a_bad_config(tmp_path):
    with pytest.raises(ConfigError, match="choose one of"):
        run_in_process(tmp_path, threshold_rule="f2")
    assert not (tmp_path / "out").exists()


def test_a_nan_global_model_gets_a_clear_evaluate_error():
    from flwr.app import ArrayRecord, ConfigRecord, Message

    run_config = {**SCHEMA.defaults(), **SMALL, "standardisation": "site"}
    grid = InProcessGrid({1: client_app},
                         node_configs={1: {"partition-id": 0, "num-partitions": 4}},
                         run_config=run_config)  # fmt: skip
    model = make_model(len(FEATURES), "32,16", seed=1)
    state = {k: torch.full_like(v, float("nan")) for k, v in model.state_dict().items()}
    message = Message(
        RecordDict({"arrays": ArrayRecord(state),
                    "config": ConfigRecord({"server-round": 1})}),
        dst_node_id=1, message_type="evaluate",
    )  # fmt: skip
    (reply,) = grid.send_and_receive([message], timeout=30)
    assert reply.has_error()
    assert "scores are NaN/Inf" in reply.error.reason
