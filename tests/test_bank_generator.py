"""bank-fraud's transaction generator: seeded, rare fraud, banks that differ.

The property the whole app template rests on is checked here: every bank's
history (training and validation rows under the default split by time) lacks a
typology that its test period brings, and another bank has seen it.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

APP = Path(__file__).resolve().parents[1] / "apps" / "bank-fraud"
sys.path.insert(0, str(APP))

from bank_fraud.generator import (  # noqa: E402
    BANKS,
    EMERGING_WINDOW,
    FEATURES,
    PERIOD_S,
    TYPOLOGIES,
    bank_profile,
    generate_bank,
)
from bank_fraud.splits import temporal_split  # noqa: E402

BANK_SETS = [generate_bank(i, seed=42) for i in range(4)]


def test_same_seed_same_rows_other_seed_other_rows():
    again = generate_bank(1, seed=42)
    np.testing.assert_array_equal(again.x, BANK_SETS[1].x)
    np.testing.assert_array_equal(again.typology, BANK_SETS[1].typology)
    other = generate_bank(1, seed=43)
    assert not np.array_equal(other.x[:100], again.x[:100])


def test_rows_are_valid_transactions_in_time_order():
    for data in BANK_SETS:
        assert data.x.shape == (len(data), len(FEATURES)) and data.x.dtype == np.float32
        assert np.isfinite(data.x).all() and np.all(np.diff(data.time) >= 0)
        column = {name: data.x[:, i] for i, name in enumerate(FEATURES)}
        assert (column["amount"] > 0).all() and (column["distance_km"] >= 0).all()
        assert ((column["hour"] >= 0) & (column["hour"] < 24)).all()
        assert (column["txn_count_24h"] >= column["txn_count_1h"]).all()
        mcc = data.x[:, [i for i, f in enumerate(FEATURES) if f.startswith("mcc_")]]
        channel = data.x[:, [i for i, f in enumerate(FEATURES)
                             if f.startswith("channel_")]]  # fmt: skip
        assert (mcc.sum(axis=1) == 1).all() and (channel.sum(axis=1) == 1).all()
        online = column["channel_online"] == 1
        assert (column["new_device"][~online] == 0).all()


def test_fraud_is_rare_and_the_banks_differ():
    rates = [data.y.mean() for data in BANK_SETS]
    assert all(0.002 <= r <= 0.01 for r in rates), rates
    assert max(rates) > 1.5 * min(rates)
    assert sum(len(d) for d in BANK_SETS) < 60_000  # "tens of thousands at most"
    for data in BANK_SETS:
        assert data.y.sum() >= 40
        assert set(np.unique(data.typology[data.y == 1])) <= set(TYPOLOGIES)
        assert (data.typology[data.y == 0] == "legit").all()
    online = [d.x[d.y == 0, FEATURES.index("channel_online")].mean() for d in BANK_SETS]
    amount = [np.median(d.x[d.y == 0, FEATURES.index("amount")]) for d in BANK_SETS]
    assert max(online) > 1.5 * min(online) and max(amount) > 1.5 * min(amount)


def test_each_bank_misses_a_typology_that_its_test_period_brings():
    seen_anywhere = set()
    for data in BANK_SETS:
        profile = data.bank
        assert profile.emerging, profile.name
        train, val, test = temporal_split(data.time, 0.15, 0.25)
        history = set(np.unique(data.typology[np.r_[train, val]])) - {"legit"}
        assert history == set(profile.seen), profile.name
        future = set(np.unique(data.typology[test])) - {"legit"}
        assert set(profile.emerging) <= future, profile.name
        late = data.time >= (1 - EMERGING_WINDOW) * PERIOD_S
        assert not np.isin(data.typology[~late], profile.emerging).any()
        seen_anywhere |= history
    assert seen_anywhere == set(TYPOLOGIES)
    # ... and every typology a bank misses is seen by another bank.
    for profile in BANKS:
        for typology in profile.emerging:
            assert any(typology in other.seen for other in BANKS if other != profile)


def test_profiles_cycle_and_scale_shrinks_but_keeps_enough_fraud():
    assert bank_profile(5) == bank_profile(1)
    with pytest.raises(ValueError, match=">= 0"):
        bank_profile(-1)
    small = generate_bank(0, seed=1, scale=0.01)
    assert len(small) == 2000 and small.y.sum() == 40
    with pytest.raises(ValueError, match="scale"):
        generate_bank(0, seed=1, scale=0.0)
