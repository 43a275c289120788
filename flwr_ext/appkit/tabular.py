"""A site's tabular data: schema, CSV loading with clear errors, splits, partitions.

In a deployment every site (hospital, bank) points its SuperNode at its own CSV
file (node config ``data-path``). The consortium agrees on a :class:`TabularSchema`
- the label column, the value that means "positive", the feature columns in model
order, and columns to ignore (e.g. a patient id) - and :func:`load_csv` reads a
file against it. Every way a file can be wrong gets an error that names the file,
the column, the row and what to do: a missing or empty file, missing or unexpected
columns, duplicate headers, empty or non-numeric cells, a label column with a
single class or more than two values.

For simulation, :func:`dirichlet_partition` splits one bundled dataset across
sites non-IID (different sizes and class mixes, seeded), and
:func:`stratified_split` gives each site its own held-out test rows.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "SchemaError",
    "summarise",
    "TabularData",
    "TabularSchema",
    "dirichlet_partition",
    "load_csv",
    "stratified_split",
]


class SchemaError(ValueError):
    """A data file that does not match the agreed schema (message says how)."""


@dataclass(frozen=True)
class TabularSchema:
    """Which columns of a site's CSV are the label and the features.

    Parameters
    ----------
    label : str
        Name of the label column.
    features : sequence of str
        Feature columns, in the order the model expects them.
    positive_label : str
        The label value meaning the positive class (e.g. ``"M"``, ``"1"``,
        ``"malignant"``); compared as text after stripping. Every other value is
        the negative class - but the column must hold exactly two distinct
        values, so a typo such as ``"m "`` vs ``"M"`` cannot silently become a
        third, negative class.
    ignore : sequence of str (default: ())
        Columns present in the file that the model must not use (ids, dates).
        Any other column not in ``features`` is an error, so a site cannot
        silently train on a different set of columns than the others.
    """

    label: str
    features: tuple[str, ...]
    positive_label: str = "1"
    ignore: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        object.__setattr__(self, "positive_label", str(self.positive_label).strip())
        if not self.label.strip():
            raise SchemaError("schema: the label column name is empty")
        if not self.features:
            raise SchemaError("schema: no feature columns")
        names = [self.label, *self.features, *self.ignore]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise SchemaError(
                f"schema: columns {duplicates} appear more than once among the "
                "label, feature and ignored columns"
            )

    @classmethod
    def from_json(cls, path: str | Path) -> TabularSchema:
        """Read a schema from a JSON file.

        The file holds ``{"label": ..., "features": [...], "positive_label": ...,
        "ignore": [...]}`` (the last two optional).
        """
        path = Path(path)
        if not path.is_file():
            raise SchemaError(f"schema file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SchemaError(f"schema file {path} is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise SchemaError(f"schema file {path} must hold a JSON object")
        unknown = set(data) - {"label", "features", "positive_label", "ignore"}
        if unknown or "label" not in data or "features" not in data:
            raise SchemaError(
                f"schema file {path} must have keys 'label' and 'features' (and "
                f"optionally 'positive_label', 'ignore'); got {sorted(data)}"
            )
        if not isinstance(data["features"], list) or not all(
            isinstance(f, str) for f in data["features"]
        ):
            raise SchemaError(f"schema file {path}: 'features' must be a list of names")
        return cls(
            label=str(data["label"]),
            features=tuple(data["features"]),
            positive_label=str(data.get("positive_label", "1")),
            ignore=tuple(str(c) for c in data.get("ignore", [])),
        )

    @staticmethod
    def parse_columns(text: str) -> tuple[str, ...]:
        """Split a comma-separated column list (as given in a run config)."""
        return tuple(part.strip() for part in text.split(",") if part.strip())

    def to_json(self) -> str:
        """Return the schema as JSON (the inverse of :meth:`from_json`)."""
        return json.dumps(
            {
                "label": self.label,
                "features": list(self.features),
                "positive_label": self.positive_label,
                "ignore": list(self.ignore),
            },
            indent=2,
        )


@dataclass(frozen=True)
class TabularData:
    """Features and labels of one site.

    Attributes
    ----------
    x : np.ndarray
        ``(n_rows, n_features)`` float32, columns in schema order.
    y : np.ndarray
        ``(n_rows,)`` int64 labels, 1 = positive class.
    source : str
        Where the rows came from (a path, or a description of a partition).
    """

    x: np.ndarray
    y: np.ndarray
    source: str

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: np.ndarray) -> TabularData:
        """Return the rows at ``index``."""
        return TabularData(self.x[index], self.y[index], self.source)


def load_csv(path: str | Path, schema: TabularSchema) -> TabularData:
    """Read a site's CSV file against ``schema``.

    The file needs a header row; cells are separated by commas (quoted cells
    may contain commas). Feature cells must be finite numbers; the label column
    must hold exactly two distinct values, one of them ``schema.positive_label``.

    Raises
    ------
    SchemaError
        Naming the file (and row/column where relevant) for: a missing path, a
        directory, an empty file or one with only a header, duplicate, missing or
        unexpected columns, ragged rows, empty or non-numeric feature cells, an
        empty label, a label column with one class or more than two values.
    """
    path = Path(path)
    if not path.exists():
        raise SchemaError(
            f"data file {path} does not exist; set the SuperNode's node config "
            "data-path to the absolute path of this site's CSV file"
        )
    if not path.is_file():
        raise SchemaError(f"data path {path} is not a file")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise SchemaError(f"data file {path} could not be read as CSV: {err}") from err
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise SchemaError(f"data file {path} is empty (expected a header row and data)")
    header = [name.strip() for name in rows[0]]
    body = rows[1:]
    if not body:
        raise SchemaError(f"data file {path} has a header but no data rows")
    _check_header(path, header, schema)
    columns = {name: i for i, name in enumerate(header)}
    feature_idx = [columns[name] for name in schema.features]
    label_idx = columns[schema.label]

    x = np.empty((len(body), len(feature_idx)), dtype=np.float64)
    raw_labels: list[str] = []
    for r, row in enumerate(body):
        line = r + 2  # 1-based, after the header
        if len(row) != len(header):
            raise SchemaError(
                f"data file {path}, line {line}: {len(row)} cells but the header "
                f"has {len(header)} columns"
            )
        for j, c in enumerate(feature_idx):
            x[r, j] = _number(path, line, header[c], row[c])
        label = row[label_idx].strip()
        if not label:
            raise SchemaError(
                f"data file {path}, line {line}: empty label in column '{schema.label}'"
            )
        raw_labels.append(label)
    y = _binary_labels(path, schema, raw_labels)
    return TabularData(x.astype(np.float32), y, str(path))


def _check_header(path: Path, header: list[str], schema: TabularSchema) -> None:
    duplicates = sorted({n for n in header if header.count(n) > 1})
    if duplicates:
        raise SchemaError(f"data file {path}: duplicate columns {duplicates}")
    present = set(header)
    missing = [c for c in (schema.label, *schema.features) if c not in present]
    known = {schema.label, *schema.features, *schema.ignore}
    extra = [c for c in header if c not in known]
    problems = []
    if missing:
        problems.append(f"missing columns {missing}")
    if extra:
        problems.append(
            f"unexpected columns {extra} (drop them from the file, or list them "
            "in the schema's ignored columns)"
        )
    if problems:
        raise SchemaError(
            f"data file {path} does not match the schema: {'; '.join(problems)}. "
            f"Expected label '{schema.label}' and {len(schema.features)} features "
            f"{list(schema.features)}"
        )


def _number(path: Path, line: int, column: str, cell: str) -> float:
    text = cell.strip()
    if not text:
        raise SchemaError(
            f"data file {path}, line {line}, column '{column}': empty cell; every "
            "feature needs a number (impute missing values before federating)"
        )
    try:
        value = float(text)
    except ValueError:
        raise SchemaError(
            f"data file {path}, line {line}, column '{column}': {text!r} is not a "
            "number"
        ) from None
    if not math.isfinite(value):
        raise SchemaError(
            f"data file {path}, line {line}, column '{column}': {text!r} is not a "
            "finite number"
        )
    return value


def _binary_labels(path: Path, schema: TabularSchema, labels: list[str]) -> np.ndarray:
    distinct = sorted(set(labels))
    if len(distinct) > 2:
        raise SchemaError(
            f"data file {path}: label column '{schema.label}' has {len(distinct)} "
            f"distinct values {distinct[:10]}; a binary task needs exactly two"
        )
    if schema.positive_label not in distinct:
        raise SchemaError(
            f"data file {path}: label column '{schema.label}' never holds the "
            f"positive label {schema.positive_label!r} (values: {distinct}); check "
            "the schema's positive label"
        )
    if len(distinct) == 1:
        raise SchemaError(
            f"data file {path}: label column '{schema.label}' holds a single class "
            f"({distinct[0]!r}); a site needs rows of both classes to train and "
            "to be evaluated"
        )
    return np.array([lab == schema.positive_label for lab in labels], dtype=np.int64)


def stratified_split(
    y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into (train, test), keeping both classes in each.

    Each class contributes ``round(test_fraction * n_class)`` test rows, at
    least one, and keeps at least one training row.

    Raises
    ------
    ValueError
        If a class has fewer than 2 rows (it cannot be in both splits).
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for label in (0, 1):
        rows = np.flatnonzero(y == label)
        if rows.size < 2:
            raise ValueError(
                f"class {label} has {rows.size} row(s); a site needs at least 2 rows "
                "of each class (one to train on, one to test on)"
            )
        rows = rng.permutation(rows)
        k = min(max(1, round(test_fraction * rows.size)), rows.size - 1)
        test.append(rows[:k])
        train.append(rows[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def dirichlet_partition(
    y: np.ndarray,
    num_partitions: int,
    *,
    alpha: float,
    seed: int,
    min_per_class: int = 5,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Split row indices across sites, non-IID by class mix and size.

    For each class, the share of its rows each site receives is drawn from a
    symmetric Dirichlet(``alpha``) distribution, as in Flower Datasets'
    ``DirichletPartitioner``: sites differ both in size and in class mix, more so
    for small ``alpha``. Draws that leave a site with fewer than
    ``min_per_class`` rows of a class are rejected (seeded, so the result is
    reproducible).

    Returns
    -------
    list of np.ndarray
        ``num_partitions`` sorted index arrays, disjoint, covering every row.

    Raises
    ------
    ValueError
        If no valid draw is found (too many partitions for the data), with the
        largest feasible number of partitions.
    """
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    y = np.asarray(y)
    classes = [np.flatnonzero(y == label) for label in (0, 1)]
    smallest = min(c.size for c in classes)
    if smallest < num_partitions * min_per_class:
        raise ValueError(
            f"cannot give {num_partitions} sites {min_per_class} rows of each class: "
            f"the smaller class has {smallest} rows (at most "
            f"{smallest // min_per_class} sites)"
        )
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        ok = True
        for rows in classes:
            rows = rng.permutation(rows)
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = np.floor(np.cumsum(shares)[:-1] * rows.size).astype(int)
            chunks = np.split(rows, cuts)
            if min(chunk.size for chunk in chunks) < min_per_class:
                ok = False
                break
            for site, chunk in enumerate(chunks):
                parts[site].append(chunk)
        if ok:
            return [np.sort(np.concatenate(p)) for p in parts]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split into {num_partitions} sites gave every "
        f"site {min_per_class} rows of each class in {max_tries} draws; use a "
        "larger alpha or fewer partitions"
    )


def summarise(
    data: TabularData, labels: Sequence[str] = ("negative", "positive")
) -> str:
    """One line describing rows and class mix, e.g. for a site's log."""
    positives = int(data.y.sum())
    return (
        f"{len(data)} rows, {positives} {labels[1]} "
        f"({positives / max(len(data), 1):.0%}), {len(data) - positives} {labels[0]}"
    )
