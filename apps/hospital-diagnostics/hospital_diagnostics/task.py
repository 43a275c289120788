"""The task: malignant vs benign from 30 tumour measurements, and a small network.

Data
----
Offline default (simulation): the Wisconsin Diagnostic Breast Cancer set that ships
with scikit-learn (569 cases, 212 malignant), split across ``num-partitions``
hospitals non-IID - each hospital's share of malignant and of benign cases is drawn
from a Dirichlet(``partition-alpha``) distribution, so hospitals differ in size and
case mix (seeded by ``seed``). Each hospital then holds out ``test-fraction`` of
its own rows, per class, for evaluation.

Deployment: each hospital's SuperNode points node config ``data-path`` at its own
CSV file with the columns of :func:`schema_for` (by default ``diagnosis`` with
``M``/``B``, and the 30 WDBC measurements named ``radius_mean`` ...
``fractal_dimension_worst``; an ``id`` column is ignored).

Label 1 is malignant (the positive class) everywhere in this app - note that
scikit-learn's own encoding is the opposite (0 = malignant).

Model
-----
One hidden layer of ``hidden-units`` ReLU units and one output logit (0 hidden
units: logistic regression). 513 parameters by default.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flwr_ext.appkit.site import SiteSpec
from flwr_ext.appkit.tabular import (
    TabularData,
    TabularSchema,
    dirichlet_partition,
    load_csv,
    site_data_error,
    stratified_split,
)

__all__ = [
    "WDBC_FEATURES",
    "SiteData",
    "load_site_data",
    "make_model",
    "schema_for",
    "wdbc",
    "write_csv",
]

_MEASURES = (
    "radius", "texture", "perimeter", "area", "smoothness", "compactness",
    "concavity", "concave_points", "symmetry", "fractal_dimension",
)  # fmt: skip
#: The 30 WDBC feature columns, in scikit-learn's order (means, errors, worst).
WDBC_FEATURES: tuple[str, ...] = tuple(
    f"{measure}_{kind}" for kind in ("mean", "se", "worst") for measure in _MEASURES
)
#: Fewest rows of each class a simulated hospital gets (train + test).
MIN_ROWS_PER_CLASS = 8


@functools.cache
def wdbc() -> TabularData:
    """Return the bundled WDBC data: ``x`` (569, 30) float32, ``y`` 1 = malignant."""
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    return TabularData(
        x.astype(np.float32), (1 - y).astype(np.int64), "scikit-learn WDBC"
    )


@functools.cache
def _partitions(num_partitions: int, alpha: float, seed: int) -> tuple[np.ndarray, ...]:
    return tuple(
        dirichlet_partition(
            wdbc().y,
            num_partitions,
            alpha=alpha,
            seed=seed,
            min_per_class=MIN_ROWS_PER_CLASS,
        )
    )


def schema_for(
    settings: Mapping[str, Any], site: SiteSpec | None = None
) -> TabularSchema:
    """Return the column schema: the site's schema file, else the run config's."""
    if site is not None and site.schema_path is not None:
        return TabularSchema.from_json(site.schema_path)
    features = TabularSchema.parse_columns(settings["feature-columns"]) or WDBC_FEATURES
    return TabularSchema(
        label=settings["label-column"],
        features=features,
        positive_label=settings["positive-label"],
        ignore=TabularSchema.parse_columns(settings["ignore-columns"]),
    )


@dataclass(frozen=True)
class SiteData:
    """One hospital's rows, split into training and held-out test rows."""

    name: str
    train: TabularData
    test: TabularData

    @property
    def num_features(self) -> int:
        """Feature columns."""
        return int(self.train.x.shape[1])


def load_site_data(site: SiteSpec, settings: Mapping[str, Any]) -> SiteData:
    """Load a hospital's rows (its partition, or its CSV) and split them.

    Raises
    ------
    SchemaError
        For a CSV that does not match the schema, or a site too small to hold
        out rows of both classes.
    """
    if site.simulated:
        assert site.partition_id is not None and site.num_partitions is not None
        rows = _partitions(
            site.num_partitions, settings["partition-alpha"], settings["seed"]
        )[site.partition_id]
        data = wdbc().subset(rows)
        data = TabularData(data.x, data.y, f"WDBC partition {site.partition_id}")
    else:
        assert site.data_path is not None
        data = load_csv(site.data_path, schema_for(settings, site))
    try:
        train, test = stratified_split(
            data.y, settings["test-fraction"], settings["seed"]
        )
    except ValueError as err:
        raise site_data_error(
            "too-few-rows",
            "too few rows of a class to hold out test rows of both classes",
            f"{data.source}: {err}",
        ) from None
    return SiteData(site.name, data.subset(train), data.subset(test))


def make_model(num_features: int, hidden_units: int, seed: int) -> nn.Module:
    """Build a one-hidden-layer network (or logistic regression), seeded weights."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if hidden_units == 0:
            return nn.Sequential(nn.Linear(num_features, 1))
        return nn.Sequential(
            nn.Linear(num_features, hidden_units),
            nn.ReLU(),
            nn.Linear(hidden_units, 1),
        )
    finally:
        torch.random.set_rng_state(generator_state)


def write_csv(
    path: str | Path,
    data: TabularData,
    *,
    features: tuple[str, ...] = WDBC_FEATURES,
    label: str = "diagnosis",
    labels: tuple[str, str] = ("B", "M"),
    ids: bool = True,
) -> Path:
    """Write rows as a hospital CSV in this app's default schema.

    Used by the tests and the README's deployment walk-through to give each
    simulated hospital a file of its own (``id``, ``diagnosis`` = M/B, features).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow((["id"] if ids else []) + [label, *features])
        for i, (row, y) in enumerate(zip(data.x, data.y, strict=True)):
            writer.writerow(
                ([i + 1] if ids else []) + [labels[int(y)], *[f"{v:.6g}" for v in row]]
            )
    return path
