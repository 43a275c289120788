import logging

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flwr_ext.appkit.standardisation import (
    FeatureStats,
    Standardizer,
    combine,
    is_stats_query,
    reply_feature_stats,
    request_feature_stats,
)
from flwr_ext.inprocess import InProcessGrid

RNG = np.random.default_rng(0)
SITES = [RNG.normal(loc, scale, size=(n, 3)) for loc, scale, n in
         [(0.0, 1.0, 50), (5.0, 2.0, 30), (-2.0, 0.5, 80)]]  # fmt: skip


def test_pooled_combination_equals_statistics_of_the_pooled_rows():
    pooled = np.concatenate(SITES)
    scaler = combine([FeatureStats.from_array(x) for x in SITES], "pooled")
    np.testing.assert_allclose(scaler.mean, pooled.mean(0), rtol=1e-12)
    np.testing.assert_allclose(scaler.scale, pooled.std(0), rtol=1e-10)
    z = scaler.transform(pooled)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-5)


def test_median_combination_resists_one_byzantine_site():
    stats = [FeatureStats.from_array(x) for x in SITES]
    poisoned = FeatureStats(10, np.full(3, 1e12), np.full(3, 1e30))
    honest = combine(stats, "median")
    attacked = combine([*stats, poisoned], "median")
    assert np.all(np.abs(attacked.mean) < 10) and np.all(attacked.scale < 10)
    assert np.all(np.abs(honest.mean) < 10)
    with pytest.raises(ValueError, match="pooled"):
        combine(stats, "mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no feature statistics"):
        combine([])


def test_constant_features_get_scale_one_not_nan():
    x = np.column_stack([np.ones(10), np.arange(10)])
    scaler = Standardizer.fit(FeatureStats.from_array(x))
    assert scaler.scale[0] == 1.0 and np.isfinite(scaler.transform(x)).all()


def test_config_round_trip_and_validation():
    scaler = combine([FeatureStats.from_array(x) for x in SITES])
    config = ConfigRecord()
    scaler.to_config(config)
    again = Standardizer.from_config(config)
    np.testing.assert_array_equal(again.mean, scaler.mean)
    assert Standardizer.from_config({}) is None
    with pytest.raises(ValueError, match="scale > 0"):
        Standardizer.from_config({"feature-mean": [0.0], "feature-scale": [0.0]})
    with pytest.raises(ValueError, match="3 features"):
        scaler.transform(np.zeros((2, 2)))


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"num-examples": 0, "feature-sum": [0.0] * 3, "feature-sumsq": [0.0] * 3},
         "positive integer"),
        ({"num-examples": 2, "feature-sum": [0.0] * 2, "feature-sumsq": [0.0] * 3},
         "list of 3"),
        ({"num-examples": 2, "feature-sum": [float("nan")] * 3,
          "feature-sumsq": [0.0] * 3}, "NaN"),
        ({"num-examples": 2, "feature-sum": [10.0] * 3, "feature-sumsq": [1.0] * 3},
         "negative variance"),
    ],
)  # fmt: skip
def test_malformed_statistics_are_rejected(record, message):
    with pytest.raises(ValueError, match=message):
        FeatureStats.from_metrics(record, 3)


def _client(x, *, bad: bool = False) -> ClientApp:
    app = ClientApp()

    @app.query()
    def query(msg, context):
        assert is_stats_query(msg)
        if bad:
            return Message(
                RecordDict({"stats": MetricRecord({"num-examples": 1})}),
                reply_to=msg,
            )
        return reply_feature_stats(msg, x)

    return app


def test_request_over_real_messages_drops_bad_and_missing_sites(caplog):
    grid = InProcessGrid(
        {1: _client(SITES[0]), 2: _client(SITES[1]), 3: _client(SITES[2]),
         4: _client(SITES[0], bad=True), 5: _client(SITES[0])}
    )  # fmt: skip
    grid.set_offline(5)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        replies = request_feature_stats(grid, 3, min_nodes=3, timeout=5)
    assert sorted(n for n, _ in replies) == [1, 2, 3]
    assert "reply from node 4 dropped" in caplog.text
    scaler = combine(s for _, s in replies)
    np.testing.assert_allclose(scaler.mean, np.concatenate(SITES).mean(0))
    with pytest.raises(RuntimeError, match="need 4"):
        request_feature_stats(grid, 3, min_nodes=4, timeout=5, wait_s=0)


# ------------------------------------------------------------ under CKKS
from flwr_ext.appkit.encrypted_stats import (  # noqa: E402
    decrypt_scaler,
    is_encrypted_stats_query,
    reply_encrypted_stats,
    request_encrypted_feature_stats,
    save_encrypted_scaler,
    scaler_from_state,
)


def _ckks_client(x) -> ClientApp:
    app = ClientApp()

    @app.query()
    def query(msg, context):
        assert is_encrypted_stats_query(msg)
        return reply_encrypted_stats(msg, context, x)

    return app


@pytest.fixture(scope="module")
def key_set(tmp_path_factory):
    from flwr_ext.he import create_keys

    return create_keys(tmp_path_factory.mktemp("keys") / "k")


def test_encrypted_statistics_give_every_site_the_pooled_scaler(key_set, tmp_path):
    nodes = {i + 1: _ckks_client(x) for i, x in enumerate(SITES)}
    configs = {n: {"ckks-context": str(key_set.secret)} for n in nodes}
    grid = InProcessGrid(nodes, node_configs=configs)
    means, spreads = request_encrypted_feature_stats(
        grid, key_set.server, 3, wire="tenseal", min_nodes=3, timeout=30
    )
    pooled = np.concatenate(SITES)
    for node in nodes:
        scaler = scaler_from_state(grid.context(node))
        np.testing.assert_allclose(scaler.mean, pooled.mean(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(scaler.scale, pooled.std(0), rtol=1e-4)
    # The server holds ciphertexts only; a data owner decrypts the same scaler.
    save_encrypted_scaler(means, spreads, tmp_path)
    decrypted = decrypt_scaler(tmp_path, key_set.secret)
    np.testing.assert_allclose(decrypted.scale, pooled.std(0), rtol=1e-4)


def test_encrypted_statistics_need_two_sites_and_the_sites_keys(key_set, tmp_path):
    from flwr_ext.he import create_keys

    other = create_keys(tmp_path / "other")
    nodes = {1: _ckks_client(SITES[0]), 2: _ckks_client(SITES[1]),
             3: _ckks_client(SITES[2])}  # fmt: skip
    configs = {1: {"ckks-context": str(key_set.secret)},
               2: {"ckks-context": str(key_set.secret)},
               3: {"ckks-context": str(other.secret)}}  # fmt: skip
    grid = InProcessGrid(nodes, node_configs=configs)
    # Node 3 holds another key set: it is dropped; two sites still suffice.
    request_encrypted_feature_stats(
        grid, key_set.server, 3, wire="tenseal", min_nodes=2, timeout=30
    )
    assert scaler_from_state(grid.context(1)) is not None
    assert scaler_from_state(grid.context(3)) is None
    lonely = InProcessGrid(
        {1: _ckks_client(SITES[0])},
        node_configs={1: {"ckks-context": str(key_set.secret)}},
    )
    with pytest.raises(RuntimeError, match="need 2"):
        request_encrypted_feature_stats(
            lonely, key_set.server, 3, wire="tenseal", min_nodes=1, timeout=30,
            wait_s=0,
        )  # fmt: skip
