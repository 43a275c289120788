"""A seeded generator of card transactions with fraud injected by named typologies.

No real transaction-level fraud data ships in any installable package, so the
app's offline default is this generator. It is a *model of the problem*, not of
any real bank: its purpose is a federation in which the three facts that make a
fraud consortium worth having are true and measurable.

1. **Fraud is rare** - 0.4 % to 0.9 % of a bank's transactions.
2. **Banks differ** - in customer mix (a neobank's students buy differently
   from a credit union's retirees), in fraud rate, and in which fraud
   typologies they have seen.
3. **Each bank alone misses patterns** - every bank's history (its training
   and validation period) lacks at least one typology that the *next* period
   (its test period) brings: fraud rings move from bank to bank. A bank can only
   learn to catch a typology it has not seen yet from the banks that have.

Transactions
------------
Each row is one card transaction, described by the features a bank's fraud
feature store typically computes (:data:`FEATURES`, in model order):

``amount``
    Transaction amount in the account's currency (> 0).
``hour``
    Local time of day in hours, ``[0, 24)``.
``distance_km``
    Distance between the transaction and the customer's home (card present:
    the terminal; online: the IP geolocation), km, ``>= 0``.
``new_device``
    1 if an online transaction comes from a device never seen for this card,
    else 0 (always 0 for card-present transactions).
``txn_count_1h``, ``txn_count_24h``
    Transactions on the card in the preceding hour / 24 hours (velocity).
``amount_24h``
    Total amount spent on the card in the preceding 24 hours.
``secs_since_last``
    Seconds since the card's previous transaction.
``avg_amount_90d``
    The customer's average transaction amount over the last 90 days.
``mcc_<category>``
    One-hot merchant category (:data:`CATEGORIES`): grocery, restaurant, fuel,
    retail, electronics, travel, digital_goods, cash_atm.
``channel_<channel>``
    One-hot channel (:data:`CHANNELS`): chip, contactless, magstripe (a swiped
    card, rare in chip markets), online (card not present).

Besides the features each row has a ``time`` (seconds since the start of the
60-day extract; used to split by time, never a feature), the label
``is_fraud`` (1 = fraud), and the ``typology`` that generated it (``legit`` or a
typology name; for analysis only - a real bank does not know it in advance).

Customers (legitimate behaviour)
--------------------------------
Every legitimate transaction comes from a customer of one of four segments
(:data:`SEGMENTS`); the segments are also the fraud victims. Each segment
includes behaviour that *looks* like one fraud typology, so no single feature
separates fraud from legitimate spending:

``everyday``
    Salaried customers: groceries, restaurants, fuel, retail; daytime; near
    home; contactless and chip. Occasionally a new phone (``new_device``).
``retiree``
    Daytime, chip, groceries and retail, few online purchases, low velocity.
``student``
    Small amounts, evenings, online and contactless, many digital goods; 6 % of
    their transactions are in-game purchase *bursts* (several small
    digital-goods payments within the hour - like card testing) and new devices
    are common.
``traveller``
    Frequent business travellers: high amounts on travel, restaurants and
    electronics, far from home, abroad on magstripe terminals now and then -
    like a counterfeit card.

Fraud typologies
----------------
``card-testing``
    Stolen card numbers are tested with bursts of tiny online payments (0.5-5)
    at digital-goods and online retail merchants, minutes or seconds apart
    (4-25 transactions in the hour), from new devices, at any hour; a few
    larger purchases follow once a card is known to work.
``account-takeover``
    A fraudster who took over the customer's online account spends several
    times the customer's usual amount on electronics, travel and retail,
    online, from a new device, far away, mostly at night.
``merchant-compromise``
    Cards skimmed at a compromised merchant are cloned and used in person:
    cash withdrawals (round amounts) and electronics, on magstripe (or chip
    fallback) terminals, hundreds of km from home, in the evening, with high
    24-hour velocity.

Banks
-----
:data:`BANKS` (the four profiles; more banks cycle through them):

=============  =====  ======  ==========================  ====================
bank           rows   fraud   customers                   typologies in history
=============  =====  ======  ==========================  ====================
high-street    13500  0.6 %   everyday, retirees          ATO, merchant comp.
neobank        12000  0.9 %   students, everyday          card testing, ATO
travel-card    10500  0.7 %   travellers, everyday        merchant comp., card
                                                          testing
credit-union   9000   0.5 %   retirees, everyday          ATO
=============  =====  ======  ==========================  ====================

Time: rows are spread uniformly over 60 days. The typologies a bank has not
seen ("emerging") appear only in the last :data:`EMERGING_WINDOW` (20 %) of the
period, where they make up half of the bank's fraud (the fraud rate stays the
same). With the app's default split by time (the last 25 % of rows for testing)
they are absent from training and validation and present in the test period.

Everything is drawn from ``numpy.random.default_rng`` seeded with ``(seed,
bank index)``: the same seed gives the same rows on every machine.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "BANKS",
    "CATEGORIES",
    "CHANNELS",
    "EMERGING_WINDOW",
    "FEATURES",
    "LOG_FEATURES",
    "NUMERIC_FEATURES",
    "PERIOD_S",
    "SEGMENTS",
    "TYPOLOGIES",
    "BankProfile",
    "Transactions",
    "bank_profile",
    "generate_bank",
    "write_transactions_csv",
]

CATEGORIES = (
    "grocery", "restaurant", "fuel", "retail", "electronics", "travel",
    "digital_goods", "cash_atm",
)  # fmt: skip
CHANNELS = ("chip", "contactless", "magstripe", "online")
NUMERIC_FEATURES = (
    "amount", "hour", "distance_km", "new_device", "txn_count_1h",
    "txn_count_24h", "amount_24h", "secs_since_last", "avg_amount_90d",
)  # fmt: skip
#: Feature columns in model order.
FEATURES: tuple[str, ...] = (
    *NUMERIC_FEATURES,
    *(f"mcc_{c}" for c in CATEGORIES),
    *(f"channel_{c}" for c in CHANNELS),
)
#: Heavy-tailed, non-negative features the app log-transforms (log1p).
LOG_FEATURES = (
    "amount", "distance_km", "txn_count_1h", "txn_count_24h", "amount_24h",
    "secs_since_last", "avg_amount_90d",
)  # fmt: skip
TYPOLOGIES = ("card-testing", "account-takeover", "merchant-compromise")
LEGIT = "legit"
#: Length of the generated extract, seconds (60 days).
PERIOD_S = 60 * 86_400.0
#: Emerging typologies appear in this last fraction of the period only.
EMERGING_WINDOW = 0.2
#: Share of a bank's fraud that is emerging, inside the emerging window.
EMERGING_SHARE = 0.5


# ----------------------------------------------------------------- segments
@dataclass(frozen=True)
class Segment:
    """Legitimate spending behaviour of one customer segment."""

    name: str
    typical_amount: float  # median of the customers' 90-day average amount
    amount_sigma: float  # spread of one transaction around the customer's mean
    hour_mean: float
    hour_sd: float
    categories: Mapping[str, float]  # probabilities over CATEGORIES
    online: float  # share of non-forced-channel transactions made online
    card_present: Mapping[str, float]  # chip / contactless / magstripe shares
    distance_km: float  # median distance from home, card present
    distance_sigma: float
    new_device: float  # P(new device) for an online transaction
    rate_1h: float  # mean transactions in the previous hour
    rate_24h: float  # mean further transactions in the previous 24 hours
    burst: float  # P(an in-game purchase burst), students only


SEGMENTS: dict[str, Segment] = {
    s.name: s
    for s in (
        Segment(
            "everyday", 38.0, 0.8, 14.0, 3.5,
            {"grocery": .30, "restaurant": .18, "fuel": .12, "retail": .22,
             "electronics": .04, "travel": .03, "digital_goods": .05,
             "cash_atm": .06},
            .12, {"chip": .45, "contactless": .53, "magstripe": .02},
            6.0, 1.0, .03, .25, 2.0, 0.0,
        ),
        Segment(
            "retiree", 30.0, 0.7, 12.0, 2.5,
            {"grocery": .40, "restaurant": .10, "fuel": .10, "retail": .25,
             "electronics": .03, "travel": .04, "digital_goods": .01,
             "cash_atm": .07},
            .05, {"chip": .75, "contactless": .22, "magstripe": .03},
            4.0, 0.9, .02, .10, 1.2, 0.0,
        ),
        Segment(
            "student", 14.0, 0.9, 19.0, 4.5,
            {"grocery": .20, "restaurant": .22, "fuel": .02, "retail": .16,
             "electronics": .05, "travel": .03, "digital_goods": .28,
             "cash_atm": .04},
            .35, {"chip": .25, "contactless": .73, "magstripe": .02},
            5.0, 1.1, .10, .60, 3.5, .06,
        ),
        Segment(
            "traveller", 95.0, 0.9, 13.0, 5.0,
            {"grocery": .08, "restaurant": .25, "fuel": .08, "retail": .12,
             "electronics": .10, "travel": .30, "digital_goods": .02,
             "cash_atm": .05},
            .25, {"chip": .62, "contactless": .30, "magstripe": .08},
            180.0, 1.6, .06, .35, 3.0, 0.0,
        ),
    )
}  # fmt: skip

#: Amount multiplier per merchant category (relative to the customer's mean).
_CATEGORY_AMOUNT = {
    "grocery": 1.0, "restaurant": 0.8, "fuel": 1.3, "retail": 1.2,
    "electronics": 3.0, "travel": 3.5, "digital_goods": 0.3, "cash_atm": 2.0,
}  # fmt: skip


# -------------------------------------------------------------------- banks
@dataclass(frozen=True)
class BankProfile:
    """One bank of the generated consortium.

    Attributes
    ----------
    name : str
        Profile name (``high-street``, ``neobank``...).
    description : str
        One line for logs and docs.
    rows : int
        Transactions in its 60-day extract (before ``scale``).
    fraud_rate : float
        Share of fraudulent transactions.
    customers : Mapping[str, float]
        Share of each segment among its transactions.
    seen : Mapping[str, float]
        Typologies in its history, with their share of its fraud.
    """

    name: str
    description: str
    rows: int
    fraud_rate: float
    customers: Mapping[str, float]
    seen: Mapping[str, float]

    @property
    def emerging(self) -> tuple[str, ...]:
        """Typologies this bank has not seen; they arrive in its test period."""
        return tuple(t for t in TYPOLOGIES if t not in self.seen)


BANKS: tuple[BankProfile, ...] = (
    BankProfile(
        "high-street", "high-street bank: salaried customers and retirees",
        13500, 0.006, {"everyday": .57, "retiree": .30, "student": .07,
                      "traveller": .06},
        {"account-takeover": .5, "merchant-compromise": .5},
    ),
    BankProfile(
        "neobank", "app-only neobank: students and young professionals",
        12000, 0.009, {"student": .55, "everyday": .37, "traveller": .08},
        {"card-testing": .6, "account-takeover": .4},
    ),
    BankProfile(
        "travel-card", "premium travel card issuer: frequent travellers",
        10500, 0.007, {"traveller": .50, "everyday": .42, "retiree": .08},
        {"merchant-compromise": .6, "card-testing": .4},
    ),
    BankProfile(
        "credit-union", "regional credit union: retirees and local families",
        9000, 0.005, {"retiree": .50, "everyday": .46, "student": .04},
        {"account-takeover": 1.0},
    ),
)  # fmt: skip


def bank_profile(index: int) -> BankProfile:
    """Return the profile of bank ``index`` (profiles repeat after four banks)."""
    if index < 0:
        raise ValueError(f"bank index must be >= 0, got {index}")
    return BANKS[index % len(BANKS)]


@dataclass(frozen=True)
class Transactions:
    """Generated transactions of one bank, in time order.

    Attributes
    ----------
    x : np.ndarray
        ``(n, len(FEATURES))`` float32 features, columns as :data:`FEATURES`.
    y : np.ndarray
        ``(n,)`` int64, 1 = fraud.
    time : np.ndarray
        ``(n,)`` float64 seconds since the start of the extract, increasing.
    typology : np.ndarray
        ``(n,)`` str: ``"legit"`` or the typology of a fraudulent row.
    bank : BankProfile
        The profile the rows were generated from.
    """

    x: np.ndarray
    y: np.ndarray
    time: np.ndarray
    typology: np.ndarray
    bank: BankProfile

    def __len__(self) -> int:
        return int(self.y.shape[0])


def generate_bank(index: int, *, seed: int, scale: float = 1.0) -> Transactions:
    """Generate bank ``index``'s 60-day extract.

    Parameters
    ----------
    index : int
        Bank number (0, 1, ...); the profile is ``bank_profile(index)``.
    seed : int
        Seed; the rows depend only on ``(seed, index, scale)``.
    scale : float (default: 1.0)
        Multiplies the profile's row count (e.g. 0.25 for fast tests). Each
        bank gets at least 40 fraudulent rows, so every split has some.

    Returns
    -------
    Transactions
        Rows sorted by time.
    """
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    profile = bank_profile(index)
    rng = np.random.default_rng([int(seed), int(index), 20_240_601])
    rows = max(round(profile.rows * scale), 2000)
    n_fraud = max(round(rows * profile.fraud_rate), 40)
    time = np.sort(rng.uniform(0.0, PERIOD_S, rows))
    is_fraud = np.zeros(rows, dtype=bool)
    is_fraud[rng.choice(rows, n_fraud, replace=False)] = True
    typology = np.full(rows, LEGIT, dtype=object)
    typology[is_fraud] = _assign_typologies(profile, time[is_fraud], rng)

    segments = rng.choice(
        list(profile.customers), size=rows, p=_normalised(profile.customers)
    )
    columns = _legit(segments, rng)
    for name in TYPOLOGIES:
        rows_of = np.flatnonzero(typology == name)
        if rows_of.size:
            _inject(name, columns, rows_of, rng)
    x = np.column_stack([columns[f] for f in FEATURES]).astype(np.float32)
    labels = is_fraud.astype(np.int64)
    return Transactions(x, labels, time, typology.astype(str), profile)


def _normalised(weights: Mapping[str, float]) -> np.ndarray:
    values = np.asarray(list(weights.values()), dtype=np.float64)
    return values / values.sum()


def _assign_typologies(
    profile: BankProfile, times: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Typology of each fraudulent row: seen ones, plus emerging ones late."""
    seen = list(profile.seen)
    out = rng.choice(seen, size=times.size, p=_normalised(profile.seen)).astype(object)
    emerging = profile.emerging
    if emerging:
        late = np.flatnonzero(times >= (1.0 - EMERGING_WINDOW) * PERIOD_S)
        chosen = late[rng.random(late.size) < EMERGING_SHARE]
        out[chosen] = rng.choice(list(emerging), size=chosen.size)
    return out


def _one_hot(
    columns: dict[str, np.ndarray], prefix: str, names: Sequence[str], values
) -> None:
    for name in names:
        columns[f"{prefix}_{name}"] = (values == name).astype(np.float64)


def _legit(segments: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Columns of legitimate transactions of customers in ``segments``."""
    n = segments.size
    col = {name: np.zeros(n) for name in NUMERIC_FEATURES}
    category = np.empty(n, dtype=object)
    channel = np.empty(n, dtype=object)
    for name, seg in SEGMENTS.items():
        idx = np.flatnonzero(segments == name)
        k = idx.size
        if k == 0:
            continue
        mean = seg.typical_amount * rng.lognormal(0.0, 0.45, k)
        cats = rng.choice(CATEGORIES, size=k, p=[seg.categories[c] for c in CATEGORIES])
        multiplier = np.array([_CATEGORY_AMOUNT[c] for c in cats])
        amount = mean * multiplier * rng.lognormal(-0.3, seg.amount_sigma, k)
        online = rng.random(k) < seg.online
        present = rng.choice(
            list(seg.card_present), size=k, p=_normalised(seg.card_present)
        )
        chan = np.where(online, "online", present).astype(object)
        chan[cats == "digital_goods"] = "online"
        atm = cats == "cash_atm"
        chan[atm & (chan == "online")] = "chip"
        amount[atm] = np.maximum(20.0, np.round(amount[atm] / 20.0) * 20.0)
        is_online = chan == "online"
        distance = np.where(
            is_online,
            rng.lognormal(np.log(25.0), 1.0, k),
            rng.lognormal(np.log(seg.distance_km), seg.distance_sigma, k),
        )
        new_device = is_online & (rng.random(k) < seg.new_device)
        count_1h = rng.poisson(seg.rate_1h, k).astype(np.float64)
        burst = rng.random(k) < seg.burst
        if burst.any():
            b = int(burst.sum())
            count_1h[burst] += rng.integers(3, 14, b)
            cats[burst] = "digital_goods"
            chan[burst] = "online"
            amount[burst] = rng.uniform(0.99, 9.99, b).round(2)
            new_device[burst] = rng.random(b) < 0.15
        count_24h = count_1h + rng.poisson(seg.rate_24h, k)
        gap_mean = 86_400.0 / (count_24h + 1.0)
        gap = rng.exponential(gap_mean)
        gap[burst] = rng.exponential(240.0, int(burst.sum())) + 20.0
        col["amount"][idx] = np.maximum(amount, 0.5).round(2)
        col["hour"][idx] = np.mod(rng.normal(seg.hour_mean, seg.hour_sd, k), 24.0)
        col["distance_km"][idx] = distance
        col["new_device"][idx] = new_device
        col["txn_count_1h"][idx] = count_1h
        col["txn_count_24h"][idx] = count_24h
        col["amount_24h"][idx] = (count_24h - count_1h) * mean * rng.lognormal(
            0.0, 0.4, k
        ) + count_1h * np.where(burst, 5.0, mean)
        col["secs_since_last"][idx] = np.clip(gap, 5.0, 30 * 86_400.0)
        col["avg_amount_90d"][idx] = mean
        category[idx] = cats
        channel[idx] = chan
    _one_hot(col, "mcc", CATEGORIES, category)
    _one_hot(col, "channel", CHANNELS, channel)
    return col


def _set_category(
    col: dict[str, np.ndarray], rows: np.ndarray, values: np.ndarray, prefix: str,
    names: Sequence[str],
) -> None:  # fmt: skip
    for name in names:
        col[f"{prefix}_{name}"][rows] = (values == name).astype(np.float64)


def _inject(
    typology: str,
    col: dict[str, np.ndarray],
    rows: np.ndarray,
    rng: np.random.Generator,
) -> None:
    """Overwrite ``rows`` with fraud of ``typology`` (the victim's mean stays)."""
    k = rows.size
    mean = col["avg_amount_90d"][rows]
    if typology == "card-testing":
        cats = rng.choice(
            CATEGORIES, size=k, p=_probs(digital_goods=0.6, retail=0.3, electronics=0.1)
        )
        chan = np.full(k, "online", dtype=object)
        tiny = rng.random(k) < 0.85
        amount = np.where(tiny, rng.uniform(0.5, 5.0, k), rng.uniform(20.0, 150.0, k))
        new_device = rng.random(k) < 0.45
        hour = rng.uniform(0.0, 24.0, k)
        distance = rng.lognormal(np.log(40.0), 1.2, k)
        count_1h = rng.integers(4, 26, k).astype(np.float64)
        count_24h = count_1h + rng.poisson(3.0, k)
        amount_24h = count_24h * rng.uniform(1.0, 6.0, k)
        gap = rng.exponential(45.0, k) + 3.0
    elif typology == "account-takeover":
        probs = _probs(electronics=0.35, travel=0.2, retail=0.3, digital_goods=0.15)
        cats = rng.choice(CATEGORIES, size=k, p=probs)
        chan = np.where(rng.random(k) < 0.9, "online", "contactless").astype(object)
        amount = mean * rng.lognormal(np.log(5.0), 0.6, k)
        new_device = (chan == "online") & (rng.random(k) < 0.9)
        night = rng.random(k) < 0.6
        hour = np.where(
            night, rng.uniform(0.0, 6.0, k), np.mod(rng.normal(14.0, 5.0, k), 24.0)
        )
        distance = rng.lognormal(np.log(120.0), 1.3, k)
        count_1h = rng.poisson(1.0, k).astype(np.float64)
        count_24h = count_1h + rng.poisson(2.0, k)
        amount_24h = count_24h * mean + amount * rng.uniform(0.0, 2.0, k)
        gap = rng.exponential(1800.0, k) + 10.0
    elif typology == "merchant-compromise":
        probs = _probs(cash_atm=0.45, electronics=0.3, retail=0.2, fuel=0.05)
        cats = rng.choice(CATEGORIES, size=k, p=probs)
        chan = rng.choice(
            ("magstripe", "chip", "contactless"), size=k, p=(0.55, 0.35, 0.10)
        ).astype(object)
        amount = rng.lognormal(np.log(220.0), 0.6, k)
        atm = cats == "cash_atm"
        amount[atm] = np.maximum(20.0, np.round(amount[atm] / 20.0) * 20.0)
        new_device = np.zeros(k, dtype=bool)
        hour = np.mod(rng.normal(21.0, 3.0, k), 24.0)
        distance = rng.lognormal(np.log(500.0), 1.0, k)
        count_1h = rng.poisson(1.5, k).astype(np.float64)
        count_24h = count_1h + rng.poisson(4.0, k)
        amount_24h = count_24h * 180.0 * rng.lognormal(0.0, 0.4, k)
        gap = rng.exponential(1200.0, k) + 30.0
    else:  # pragma: no cover - TYPOLOGIES is closed
        raise ValueError(f"unknown typology {typology!r}")
    col["amount"][rows] = np.maximum(amount, 0.5).round(2)
    col["hour"][rows] = hour
    col["distance_km"][rows] = distance
    col["new_device"][rows] = new_device
    col["txn_count_1h"][rows] = count_1h
    col["txn_count_24h"][rows] = count_24h
    col["amount_24h"][rows] = amount_24h
    col["secs_since_last"][rows] = gap
    _set_category(col, rows, cats, "mcc", CATEGORIES)
    _set_category(col, rows, chan, "channel", CHANNELS)


def _probs(**shares: float) -> list[float]:
    return [shares.get(c, 0.0) for c in CATEGORIES]


def write_transactions_csv(
    path: str | Path, data: Transactions, *, with_typology: bool = True
) -> Path:
    """Write a bank's rows as a CSV in the app's default ``transactions`` schema.

    Columns: ``transaction_id``, ``time``, ``is_fraud`` (0/1), the
    :data:`FEATURES`, and (optionally) ``typology``. This is the file a
    SuperNode's ``data-path`` points at in the deployment walk-through and tests.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        header = ["transaction_id", "time", "is_fraud", *FEATURES]
        writer.writerow([*header, "typology"] if with_typology else header)
        for i in range(len(data)):
            row = [f"{data.bank.name}-{i + 1:06d}", f"{data.time[i]:.0f}",
                   int(data.y[i]), *(f"{v:.6g}" for v in data.x[i])]  # fmt: skip
            writer.writerow([*row, data.typology[i]] if with_typology else row)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Write one CSV per generated bank (``python -m bank_fraud.generator``)."""
    parser = argparse.ArgumentParser(
        description="Write each generated bank's transactions as its own CSV file "
        "(the app's 'transactions' format), e.g. to try a deployment."
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--banks", type=int, default=len(BANKS))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args(argv)
    for index in range(args.banks):
        data = generate_bank(index, seed=args.seed, scale=args.scale)
        path = write_transactions_csv(
            args.out / f"bank-{index}-{data.bank.name}.csv", data
        )
        print(f"{path}: {len(data)} transactions, {int(data.y.sum())} fraudulent")
    return 0


if __name__ == "__main__":  # pragma: no cover - command line
    raise SystemExit(main())
