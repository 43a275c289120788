"""hospital-diagnostics: settings, data, and the whole app in-process.

The in-process runs drive the app's real ServerApp and ClientApp (mods included)
through flwr_ext.inprocess.InProcessGrid: real Flower strategies and Messages, no
Ray or SuperLink (those are in tests/e2e/test_hospital_*.py).
"""

import json
import logging
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from flwr_ext.appkit.config import ConfigError
from flwr_ext.appkit.site import SiteSpec, site_from_context
from flwr_ext.appkit.tabular import SchemaError
from flwr_ext.inprocess import InProcessGrid

APP = Path(__file__).resolve().parents[1] / "apps" / "hospital-diagnostics"
sys.path.insert(0, str(APP))

from hospital_diagnostics.client_app import app as client_app  # noqa: E402
from hospital_diagnostics.server_app import app as server_app  # noqa: E402
from hospital_diagnostics.settings import SCHEMA, load_settings  # noqa: E402
from hospital_diagnostics.task import (  # noqa: E402
    WDBC_FEATURES,
    load_site_data,
    wdbc,
    write_csv,
)

SUMMARY = "flwr-ext result: app=hospital-diagnostics"


def _settings(**overrides):
    return load_settings({k.replace("_", "-"): v for k, v in overrides.items()})


def test_pyproject_run_config_equals_the_validated_schema_defaults():
    pyproject = tomllib.loads((APP / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == SCHEMA.defaults()


def test_bad_run_config_fails_listing_the_valid_choices():
    with pytest.raises(ConfigError) as err:
        load_settings({"strategy": "fedavgg", "secure-aggregation": "paillier",
                       "local-epochs": 0, "output-dir": "results"})  # fmt: skip
    text = str(err.value)
    assert "'trimmed-mean'" in text and "'krum'" in text and "'ckks'" in text
    assert "local-epochs=0 must be >= 1" in text
    assert "output-dir='results' must be an absolute path" in text


def test_simulated_hospitals_are_non_iid_disjoint_and_hold_out_both_classes():
    settings = _settings()
    sites = [
        load_site_data(SiteSpec(f"h{i}", None, i, 3, None), settings) for i in range(3)
    ]
    sizes = [len(s.train) + len(s.test) for s in sites]
    assert sum(sizes) == len(wdbc())
    mixes = [np.r_[s.train.y, s.test.y].mean() for s in sites]
    assert max(sizes) > 2 * min(sizes) and max(mixes) - min(mixes) > 0.05
    rows = [tuple(r) for s in sites for part in (s.train, s.test) for r in part.x]
    assert len(set(rows)) == len(rows)  # no row in two places
    for site in sites:
        assert set(site.test.y) == {0, 1} and set(site.train.y) == {0, 1}
    assert wdbc().y.sum() == 212  # label 1 = malignant (sklearn's 0)


def test_a_hospital_csv_loads_like_its_partition(tmp_path):
    settings = _settings()
    simulated = load_site_data(SiteSpec("h1", None, 1, 3, None), settings)
    rows = np.r_[simulated.train.x, simulated.test.x]
    labels = np.r_[simulated.train.y, simulated.test.y]
    from flwr_ext.appkit.tabular import TabularData

    path = write_csv(tmp_path / "h1.csv", TabularData(rows, labels, "h1"))
    loaded = load_site_data(SiteSpec("h1", path, None, None, None), settings)
    assert len(loaded.train) + len(loaded.test) == len(rows)
    np.testing.assert_allclose(
        np.sort(np.r_[loaded.train.x, loaded.test.x], axis=0),
        np.sort(rows, axis=0),
        rtol=1e-5,
    )


def test_csv_with_wrong_columns_names_file_and_columns(tmp_path):
    path = tmp_path / "site.csv"
    path.write_text("diagnosis,radius_mean\nM,1\nB,2\n")
    with pytest.raises(SchemaError, match="missing columns") as err:
        load_site_data(SiteSpec("x", path, None, None, None), _settings())
    assert str(path) in err.value.detail and "texture_mean" in str(err.value)


def test_schema_file_on_the_node_overrides_the_run_config(tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"label": "dx", "positive_label": "1",
                                  "features": list(WDBC_FEATURES)}))  # fmt: skip
    path = write_csv(tmp_path / "s.csv", wdbc().subset(np.arange(60)), label="dx",
                     labels=("0", "1"), ids=False)  # fmt: skip
    context = Context(1, 7, {"data-path": str(path), "schema-path": str(schema)},
                      RecordDict(), {})  # fmt: skip
    site = site_from_context(context, name_prefix="hospital")
    assert site.name == "node-7" and site.schema_path == schema
    assert len(load_site_data(site, _settings()).test) > 0


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({}, "no data: set data-path"),
        ({"partition-id": 3, "num-partitions": 3}, "must be < num-partitions"),
        ({"data-path": "site.csv"}, "must be an absolute path"),
        ({"partition-id": "0", "num-partitions": 3}, "must be an integer"),
    ],
)
def test_node_config_errors(node_config, message):
    with pytest.raises(ConfigError, match=message):
        site_from_context(Context(1, 1, node_config, RecordDict(), {}))


# ------------------------------------------------------------- in-process runs
class SilencingGrid(InProcessGrid):
    """Node ``silent`` stops answering from round ``from_round`` on (a crash)."""

    silent: int | None = None
    from_round = 2

    def push_messages(self, messages):
        ids = []
        for i, message in enumerate(messages):
            config = message.content.config_records.get("config", {})
            if (
                int(message.metadata.dst_node_id) == self.silent
                and int(config.get("server-round", 0)) >= self.from_round
            ):
                ids.append(f"lost-{id(message)}-{i}")
                continue
            ids.extend(super().push_messages([message]))
        return ids


def run_in_process(tmp_path, *, num_sites=3, node_configs=None, silent=None,
                   **overrides):  # fmt: skip
    run_config = SCHEMA.defaults()
    run_config.update({"num-server-rounds": 3, "output-dir": str(tmp_path / "out")})
    run_config.update({k.replace("_", "-"): v for k, v in overrides.items()})
    configs = node_configs or {
        i + 1: {"partition-id": i, "num-partitions": num_sites}
        for i in range(num_sites)
    }
    grid = SilencingGrid(
        dict.fromkeys(configs, client_app), node_configs=configs, run_config=run_config
    )
    grid.silent = silent
    server_app(grid, Context(1, 0, {}, RecordDict(), run_config))
    return tmp_path / "out"


def _summary(caplog) -> dict[str, str]:
    line = next(r.getMessage() for r in caplog.records if SUMMARY in r.getMessage())
    return dict(part.split("=", 1) for part in line.split()[2:])


def test_whole_app_in_process_writes_results_and_a_summary(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="flwr"):
        out = run_in_process(tmp_path)
    summary = _summary(caplog)
    assert float(summary["auroc"]) > 0.97 and summary["sites"] == "3"
    assert summary["output"] == str(out) and summary["dropped"] == "none"
    for name in ("metrics.json", "metrics.csv", "final_model.npz",
                 "final_model.pt", "auroc.png"):  # fmt: skip
        assert (out / name).is_file(), name
    data = json.loads((out / "metrics.json").read_text())
    last = data["rounds"][-1]
    assert set(last["sites"]) == {"hospital-0", "hospital-1", "hospital-2"}
    for site in last["sites"].values():
        assert {"auroc", "sensitivity", "specificity", "accuracy"} <= set(
            site["evaluate"]
        )
        assert site["train"]["num-examples"] > 0
    assert float(summary["auroc"]) == pytest.approx(
        last["aggregated"]["evaluate"]["auroc"], abs=1e-4
    )
    assert data["run-config"]["strategy"] == "fedavg"


def test_a_robust_rule_with_a_byzantine_hospital_in_process(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="flwr"):
        run_in_process(tmp_path, num_sites=4, strategy="median", min_nodes=3,
                       attack="scaling", attack_strength=-20.0,
                       attack_partition_ids="1")  # fmt: skip
    assert float(_summary(caplog)["auroc"]) > 0.95


def test_a_hospital_that_stops_answering_is_named_and_the_run_completes(
    tmp_path, caplog
):
    with caplog.at_level(logging.INFO, logger="flwr"):
        out = run_in_process(tmp_path, min_nodes=2, silent=2, round_timeout=5.0)
    text = caplog.text
    assert "round 2 train: node 2 (hospital-1) sent no reply" in text
    summary = _summary(caplog)
    assert summary["dropped"] == "hospital-1" and summary["sites"] == "2"
    data = json.loads((out / "metrics.json").read_text())
    assert data["dropped-out"] == [{"node-id": 2, "site": "hospital-1"}]
    assert float(summary["auroc"]) > 0.95


def test_a_hospital_with_a_broken_csv_is_named_and_left_out(tmp_path, caplog):
    good = [
        write_csv(tmp_path / f"h{i}.csv", wdbc().subset(np.arange(i, 569, 3)))
        for i in range(2)
    ]
    broken = tmp_path / "h2.csv"
    broken.write_text("diagnosis,radius_mean\nM,1\nB,2\n")
    configs = {
        1: {"data-path": str(good[0]), "site-name": "north"},
        2: {"data-path": str(good[1]), "site-name": "south"},
        3: {"data-path": str(broken), "site-name": "east"},
    }
    with caplog.at_level(logging.INFO, logger="flwr"):
        run_in_process(tmp_path, node_configs=configs, min_nodes=2)
    # The site names itself in its error reply (site_errors_mod): the log and
    # the summary say "east", not a node id.
    assert "node 3 (east) replied with an error: site 'east'" in caplog.text
    assert "missing columns" in caplog.text
    assert _summary(caplog)["sites"] == "2"
    assert _summary(caplog)["dropped"] == "east"


def test_start_up_fails_before_training_on_a_bad_config(tmp_path):
    with pytest.raises(ConfigError, match="choose one of"):
        run_in_process(tmp_path, strategy="avg")
    assert not (tmp_path / "out").exists()


def test_readme_run_config_table_is_the_schema():
    readme = (APP / "README.md").read_text()
    start, end = "<!-- run-config:start -->\n", "\n<!-- run-config:end -->"
    table = readme.split(start, 1)[1].split(end, 1)[0]
    assert table == SCHEMA.markdown_table(), (
        "README out of date: python -m hospital_diagnostics.settings --write-readme"
    )


def test_record_level_dp_sgd_reports_each_hospitals_epsilon(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="flwr"):
        out = run_in_process(tmp_path, num_server_rounds=2, local_epochs=1,
                             dp_sgd=True, dp_sgd_epsilon=2.0)  # fmt: skip
    summary = _summary(caplog)
    assert 0 < float(summary["epsilon"]) <= 2.0 + 1e-6
    data = json.loads((out / "metrics.json").read_text())
    per_site = [
        s["train"]["dp-record-epsilon"] for s in data["rounds"][-1]["sites"].values()
    ]
    assert len(per_site) == 3 and max(per_site) == pytest.approx(
        float(summary["epsilon"]), abs=1e-4
    )
    first = data["rounds"][0]["aggregated"]["train"]["dp-record-epsilon"]
    assert first < float(summary["epsilon"])  # cumulative over rounds
    assert (out / "epsilon.png").is_file()


def test_central_dp_fedavg_reports_the_client_level_epsilon(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="flwr"):
        out = run_in_process(tmp_path, strategy="dp-fedavg", num_server_rounds=2)
    assert float(_summary(caplog)["client-epsilon"]) > 0
    assert (out / "epsilon.png").is_file()


def test_server_refuses_dp_sgd_with_fedprox(tmp_path):
    with pytest.raises(ConfigError, match="proximal term"):
        run_in_process(tmp_path, dp_sgd=True, strategy="fedprox")


def test_ckks_in_process_equals_plaintext_and_a_hospital_can_decrypt_the_results(
    tmp_path,
):
    from hospital_diagnostics.decrypt import decrypt_results

    from flwr_ext.he import create_keys

    keys = create_keys(tmp_path / "keys")
    plain = run_in_process(tmp_path / "plain")
    configs = {
        i + 1: {
            "partition-id": i,
            "num-partitions": 3,
            "ckks-context": str(keys.secret),
        }
        for i in range(3)
    }
    encrypted = run_in_process(
        tmp_path / "ckks",
        node_configs=configs,
        secure_aggregation="ckks",
        ckks_server_context=str(keys.server),
    )
    assert not (encrypted / "final_model.pt").exists()
    a = json.loads((plain / "metrics.json").read_text())["rounds"][-1]
    b = json.loads((encrypted / "metrics.json").read_text())["rounds"][-1]
    for key in ("auroc", "sensitivity", "specificity", "accuracy"):
        assert (
            abs(a["aggregated"]["evaluate"][key] - b["aggregated"]["evaluate"][key])
            <= 1e-4
        )
    out = decrypt_results(encrypted, keys.secret)
    import torch

    w_plain = torch.load(plain / "final_model.pt")
    w_ckks = torch.load(out / "final_model.pt")
    for name, tensor in w_plain.items():
        assert torch.allclose(tensor, w_ckks[name], atol=1e-4), name
    recipe_plain = json.loads((plain / "preprocessing.json").read_text())
    recipe_ckks = json.loads((out / "preprocessing.json").read_text())
    np.testing.assert_allclose(
        recipe_ckks["feature-mean"], recipe_plain["feature-mean"], rtol=1e-5
    )
    np.testing.assert_allclose(
        recipe_ckks["feature-scale"], recipe_plain["feature-scale"], rtol=1e-3
    )
