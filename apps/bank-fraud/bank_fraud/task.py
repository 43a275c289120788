"""The task: fraud vs legitimate card transactions, per bank, and a small network.

Data
----
Each bank holds its own transactions; nothing is pooled. A bank's rows come from

- **simulation** (node config ``partition-id``/``num-partitions``): bank
  ``partition-id`` of the seeded generator (:mod:`bank_fraud.generator`: four
  bank profiles that differ in customers, fraud rate and the fraud typologies
  they have seen), or - with run config ``simulation-csv`` - a non-IID
  Dirichlet share of one CSV file (e.g. the public credit-card benchmark);
- **deployment** (node config ``data-path``): the bank's own CSV file.

A CSV is read against a column layout, :data:`DATA_FORMATS`:

``transactions`` (default; :func:`bank_fraud.generator.write_transactions_csv`)
    label ``is_fraud`` (1 = fraud), time ``time`` (any increasing number:
    seconds, a Unix time stamp), the 21 features of
    :data:`bank_fraud.generator.FEATURES`; ``transaction_id`` and ``typology``
    are ignored if present.
``creditcard`` (the public credit-card fraud benchmark's file)
    label ``Class`` (1 = fraud), time ``Time``, features ``V1`` ... ``V28`` and
    ``Amount``.

Run config (``label-column``, ``feature-columns``...) or a node's JSON
``schema-path`` overrides the columns. Rows are split per bank into training,
validation (to choose the decision threshold) and test rows - by default **by
time**: the latest ``test-fraction`` of rows are the test period, the
``validation-fraction`` before them validation, so the model is judged on a
period it has never seen (:mod:`bank_fraud.splits`). The time column is
never a feature. Heavy-tailed columns (``log-columns``: amounts, distances,
counts) go through ``log(1 + x)`` before the federated standardisation.

Model
-----
A multilayer perceptron: ``hidden-layers`` ReLU layers (default 32 and 16 units)
and one output logit, 1,249 parameters for the 21 transaction features. The
probability of fraud is ``sigmoid(logit)``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flwr_ext.appkit.site import SiteSpec
from flwr_ext.appkit.tabular import (
    SchemaError,
    TabularData,
    TabularSchema,
    dirichlet_partition,
    load_csv,
    site_data_error,
)

from .generator import (
    FEATURES as TRANSACTION_FEATURES,
)
from .generator import (
    LOG_FEATURES,
    Transactions,
    generate_bank,
)
from .settings import parse_hidden_layers
from .splits import stratified_split3, temporal_split

__all__ = [
    "CREDITCARD_FEATURES",
    "DATA_FORMATS",
    "DataFormat",
    "DataSpec",
    "SiteData",
    "data_spec",
    "describe_rows",
    "generated_bank",
    "load_bank_csv",
    "load_site_data",
    "make_model",
]

#: Features of the public credit-card benchmark (PCA components and amount).
CREDITCARD_FEATURES: tuple[str, ...] = (*(f"V{i}" for i in range(1, 29)), "Amount")


@dataclass(frozen=True)
class DataFormat:
    """A column layout: which columns are label, time and features."""

    label: str
    positive_label: str
    features: tuple[str, ...]
    time_column: str
    log_columns: tuple[str, ...]
    ignore: tuple[str, ...] = ()


#: The column layouts of run config ``data-format``.
DATA_FORMATS: dict[str, DataFormat] = {
    "transactions": DataFormat(
        label="is_fraud",
        positive_label="1",
        features=TRANSACTION_FEATURES,
        time_column="time",
        log_columns=LOG_FEATURES,
        ignore=("transaction_id", "typology"),
    ),
    "creditcard": DataFormat(
        label="Class",
        positive_label="1",
        features=CREDITCARD_FEATURES,
        time_column="Time",
        log_columns=("Amount",),
    ),
}


@dataclass(frozen=True)
class DataSpec:
    """How a bank's file is read: the column schema, time and log columns."""

    schema: TabularSchema
    time_column: str | None
    log_columns: tuple[str, ...] = field(default_factory=tuple)


def _columns(text: str) -> tuple[str, ...]:
    return TabularSchema.parse_columns(text)


def data_spec(settings: Mapping[str, Any], site: SiteSpec | None = None) -> DataSpec:
    """Return how to read a bank's data (columns, time column, log columns).

    The run config overrides the data format's defaults; a node's
    ``schema-path`` file overrides both for the columns.

    Raises
    ------
    SchemaError
        If the time column is also a feature, or a log column is not a feature.
    """
    fmt = DATA_FORMATS[settings["data-format"]]
    if site is not None and site.schema_path is not None:
        schema = TabularSchema.from_json(site.schema_path)
    else:
        schema = TabularSchema(
            label=settings["label-column"] or fmt.label,
            features=_columns(settings["feature-columns"]) or fmt.features,
            positive_label=settings["positive-label"] or fmt.positive_label,
            ignore=_columns(settings["ignore-columns"]) or fmt.ignore,
        )
    time_column: str | None = settings["time-column"] or fmt.time_column
    if settings["split"] != "time":
        # Not used to split, but the column may well be in the file: ignore it.
        if time_column not in (*schema.features, *schema.ignore, schema.label):
            schema = TabularSchema(
                label=schema.label,
                features=schema.features,
                positive_label=schema.positive_label,
                ignore=(*schema.ignore, time_column),
            )
        time_column = None
    if settings["log-columns"].strip() == "-":
        log_columns: tuple[str, ...] = ()
    else:
        log_columns = _columns(settings["log-columns"]) or tuple(
            c for c in fmt.log_columns if c in schema.features
        )
    if time_column is not None and time_column in schema.features:
        raise SchemaError(
            f"time column '{time_column}' is also a feature; a model that sees "
            "the time learns the period, not the fraud - drop it from the features"
        )
    unknown = [c for c in log_columns if c not in schema.features]
    if unknown:
        raise SchemaError(
            f"log-columns {unknown} are not feature columns "
            f"({', '.join(schema.features)})"
        )
    return DataSpec(schema, time_column, log_columns)


def load_bank_csv(path: str | Path, spec: DataSpec) -> tuple[TabularData, np.ndarray]:
    """Read a bank's CSV: features (log columns transformed), labels, times.

    Returns
    -------
    (TabularData, np.ndarray)
        The rows and their times (``arange(n)``, the file order, without a
        time column).

    Raises
    ------
    SchemaError
        Naming the file, column and row for anything :func:`load_csv` refuses,
        a missing or non-numeric time column, or a negative value in a log
        column.
    """
    schema = spec.schema
    if spec.time_column is not None:
        load_schema = TabularSchema(
            label=schema.label,
            features=(*schema.features, spec.time_column),
            positive_label=schema.positive_label,
            ignore=tuple(c for c in schema.ignore if c != spec.time_column),
        )
    else:
        load_schema = schema
    try:
        data = load_csv(path, load_schema)
    except SchemaError as err:
        missing = re.search(r"missing columns (\[[^\]]*\])", str(err))
        if (
            spec.time_column is not None
            and missing
            and repr(spec.time_column) in missing.group(1)
        ):
            hint = (
                f" (the time column '{spec.time_column}' orders the rows for "
                "split='time'; set time-column, or split='stratified')"
            )
            raise SchemaError(
                f"{err}{hint}",
                code=err.code,
                detail=f"{err.detail}{hint}",
                line=err.line,
                column=err.column,
            ) from None
        raise
    n_features = len(schema.features)
    if spec.time_column is not None:
        times = data.x[:, n_features].astype(np.float64)
        data = TabularData(data.x[:, :n_features], data.y, data.source)
    else:
        times = np.arange(len(data), dtype=np.float64)
    return _log_transform(data, schema.features, spec.log_columns), times


def _log_transform(
    data: TabularData, features: Sequence[str], log_columns: Sequence[str]
) -> TabularData:
    if not log_columns:
        return data
    x = data.x.astype(np.float64, copy=True)
    for name in log_columns:
        j = list(features).index(name)
        negative = np.flatnonzero(x[:, j] < 0)
        if negative.size:
            raise site_data_error(
                "negative-value",
                f"negative value(s), the first at data row {negative[0] + 1}; "
                "log-columns must be >= 0 - remove it from log-columns",
                f"{data.source}: column '{name}' has {negative.size} negative "
                f"value(s) (first at data row {negative[0] + 1}: "
                f"{x[negative[0], j]:g})",
                column=name,
            )
        x[:, j] = np.log1p(x[:, j])
    return TabularData(x.astype(np.float32), data.y, data.source)


@functools.cache
def generated_bank(index: int, seed: int, scale: float) -> Transactions:
    """Return generated bank ``index`` (cached: every round reuses it)."""
    return generate_bank(index, seed=seed, scale=scale)


@functools.cache
def _simulation_csv(path: str, spec: DataSpec) -> tuple[TabularData, np.ndarray]:
    return load_bank_csv(path, spec)


@functools.cache
def _csv_partitions(
    path: str, spec: DataSpec, num: int, alpha: float, seed: int
) -> tuple[np.ndarray, ...]:
    data, _ = _simulation_csv(path, spec)
    return tuple(dirichlet_partition(data.y, num, alpha=alpha, seed=seed,
                                     min_per_class=10))  # fmt: skip


@dataclass(frozen=True)
class SiteData:
    """One bank's rows, split into training, validation and test rows.

    Attributes
    ----------
    name : str
        The bank's name in logs and results.
    train, validation, test : TabularData
        Features (log columns transformed, not yet standardised) and labels.
    description : str
        Where the rows come from (a profile, a file).
    """

    name: str
    train: TabularData
    validation: TabularData
    test: TabularData
    description: str = ""

    @property
    def num_features(self) -> int:
        """Feature columns."""
        return int(self.train.x.shape[1])


def _simulated(site: SiteSpec, settings: Mapping[str, Any], spec: DataSpec):
    assert site.partition_id is not None and site.num_partitions is not None
    if settings["simulation-csv"]:
        path = settings["simulation-csv"]
        data, times = _simulation_csv(path, spec)
        rows = _csv_partitions(
            path, spec, site.num_partitions, settings["partition-alpha"],
            settings["seed"],
        )[site.partition_id]  # fmt: skip
        part = TabularData(data.x[rows], data.y[rows], f"{path} partition "
                           f"{site.partition_id}")  # fmt: skip
        return part, times[rows], f"partition {site.partition_id} of {path}"
    if settings["data-format"] != "transactions":
        raise SchemaError(
            f"data-format='{settings['data-format']}' in simulation needs "
            "simulation-csv='/abs/path/file.csv' (the generator writes the "
            "'transactions' format)"
        )
    bank = generated_bank(
        site.partition_id, settings["seed"], settings["simulation-scale"]
    )
    columns = list(TRANSACTION_FEATURES)
    missing = [c for c in spec.schema.features if c not in columns]
    if missing:
        raise SchemaError(
            f"feature-columns {missing} are not produced by the generator "
            f"(it writes {', '.join(columns)})"
        )
    x = bank.x[:, [columns.index(c) for c in spec.schema.features]]
    source = f"generated bank {site.partition_id} ({bank.bank.name})"
    data = _log_transform(
        TabularData(x, bank.y, source), spec.schema.features, spec.log_columns
    )
    return data, bank.time, bank.bank.description


def load_site_data(site: SiteSpec, settings: Mapping[str, Any]) -> SiteData:
    """Load a bank's rows (generated, a share of a CSV, or its CSV) and split them.

    Raises
    ------
    SchemaError
        For a file that does not match the schema, or a bank whose training or
        test rows lack fraud (or legitimate) rows - it could neither learn nor
        be evaluated.
    """
    spec = data_spec(settings, site)
    if site.simulated:
        data, times, description = _simulated(site, settings, spec)
    else:
        assert site.data_path is not None
        data, times = load_bank_csv(site.data_path, spec)
        description = str(site.data_path)
    if settings["split"] == "time":
        train, validation, test = temporal_split(
            times, settings["validation-fraction"], settings["test-fraction"]
        )
    else:
        try:
            train, validation, test = stratified_split3(
                data.y, settings["validation-fraction"], settings["test-fraction"],
                settings["seed"],
            )  # fmt: skip
        except ValueError as err:
            raise site_data_error(
                "too-few-rows",
                "too few rows of a class to split into training, validation and "
                "test rows",
                f"{data.source}: {err}",
            ) from None
    for part, rows in (("training", train), ("test", test)):
        labels = data.y[rows]
        if labels.min(initial=1) == labels.max(initial=0):
            what = "fraud" if labels.max(initial=0) == 0 else "legitimate"
            raise site_data_error(
                "single-class-split",
                f"the {part} rows of this bank hold no {what} transaction; a bank "
                "needs both classes to "
                + ("learn" if part == "training" else "be evaluated")
                + " (more rows, or a different test-fraction/split)",
                f"{data.source}: the {part} rows ({rows.size} of {len(data)}) hold "
                f"no {what} transaction",
            )
    return SiteData(
        site.name,
        data.subset(train),
        data.subset(validation),
        data.subset(test),
        description,
    )


def make_model(num_features: int, hidden_layers: str | Sequence[int], seed: int):
    """Build the MLP (seeded weights): ReLU layers of ``hidden_layers`` units."""
    sizes = (
        parse_hidden_layers(hidden_layers)
        if isinstance(hidden_layers, str)
        else tuple(hidden_layers)
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        layers: list[nn.Module] = []
        width = num_features
        for units in sizes:
            layers += [nn.Linear(width, units), nn.ReLU()]
            width = units
        layers.append(nn.Linear(width, 1))
        return nn.Sequential(*layers)
    finally:
        torch.random.set_rng_state(state)


def describe_rows(data: TabularData) -> str:
    """Return e.g. ``"8100 rows, 37 fraud (0.46 %)"`` (rare rates need decimals)."""
    frauds = int(data.y.sum())
    share = 100.0 * frauds / max(len(data), 1)
    return f"{len(data)} rows, {frauds} fraud ({share:.2f} %)"
