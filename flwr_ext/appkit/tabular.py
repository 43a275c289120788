"""A site's tabular data: schema, CSV loading with clear errors, splits, partitions.

In a deployment every site (hospital, bank) points its SuperNode at its own CSV
file (node config ``data-path``). The consortium agrees on a :class:`TabularSchema`
- the label column, the value that means "positive", the feature columns in model
order, and columns to ignore (e.g. a patient id) - and :func:`load_csv` reads a
file against it. Every way a file can be wrong gets an error with a code, the line
and the column, and what to do: a missing or empty file, missing or unexpected
columns, duplicate headers, empty, non-numeric or out-of-range cells (checked after
the cast to float32, the training dtype), a label column with a single class or more
than two values.

**Nothing about the site's data travels in an error.** Such an error ends up in the
error reply the coordinator receives (Flower sends ``str(exception)``), so
``str(SchemaError)`` holds only a code (``not-a-number``...), a line number and a
column named by the consortium's schema - never a cell value, a label value, an
unexpected header (the first line of whatever file the site was pointed at) or the
path. The full description, with the path and the offending value, is the error's
``detail`` and is written to the site's own log when the error is raised.

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
from logging import ERROR
from pathlib import Path

import numpy as np
from flwr.supercore import log

__all__ = [
    "SchemaError",
    "site_data_error",
    "summarise",
    "TabularData",
    "TabularSchema",
    "dirichlet_partition",
    "load_csv",
    "stratified_split",
]


_FLOAT32_MAX = float(np.finfo(np.float32).max)


class SchemaError(ValueError):
    """A data file that does not match the agreed schema.

    ``str(error)`` is safe to send to the coordinator: a code, the line and the
    column, what to do. ``detail`` (the site's log only) adds the path and the
    offending values.

    Parameters
    ----------
    message : str
        The shareable description (no cell values, no file contents).
    code : str (default: "schema")
        Machine-readable reason, e.g. ``"not-a-number"``, ``"out-of-range"``.
    detail : str, optional
        Full description for the site's own log; default ``message``.
    line : int, optional
        1-based line of the file (the header is line 1).
    column : str, optional
        Column name from the schema (never a name read from the file).
    """

    def __init__(
        self,
        message: str,
        *,
        code: str = "schema",
        detail: str | None = None,
        line: int | None = None,
        column: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.detail = message if detail is None else detail
        self.line = line
        self.column = column

    @property
    def public_reason(self) -> str:
        """The message that may leave the site (what ``str()`` returns)."""
        return str(self)

    def __reduce__(self):
        return (_rebuild_schema_error, (str(self), self.code, self.detail,
                                        self.line, self.column))  # fmt: skip


def _rebuild_schema_error(
    message: str, code: str, detail: str, line: int | None, column: str | None
) -> SchemaError:
    return SchemaError(message, code=code, detail=detail, line=line, column=column)


def site_data_error(
    code: str,
    public: str,
    detail: str,
    *,
    line: int | None = None,
    column: str | None = None,
) -> SchemaError:
    """Build a :class:`SchemaError` about a site's data; log its detail locally.

    Parameters
    ----------
    code : str
        Machine-readable reason (``"not-a-number"``...).
    public : str
        What may reach the coordinator: no cell or label value, no file content,
        no path, no row counts.
    detail : str
        The full story (path, values) - written to the site's log now.
    line, column : optional
        1-based line, and a column named by the schema.
    """
    where = "".join(
        [
            f", line {line}" if line is not None else "",
            f", column '{column}'" if column is not None else "",
        ]
    )
    message = f"site data error [{code}]{where}: {public}"
    log(ERROR, "site data error [%s]%s: %s", code, where, detail)
    return SchemaError(message, code=code, detail=detail, line=line, column=column)


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
    may contain commas). Feature cells must be numbers that are finite in
    float32, the training dtype (checked after the cast); the label column must
    hold exactly two distinct values, one of them ``schema.positive_label``.

    Raises
    ------
    SchemaError
        With a ``code``, the line and the column (never a value from the file;
        the full ``detail`` goes to the site's log) for: a missing path
        (``file-missing``), a directory (``not-a-file``), an unreadable file
        (``unreadable``), an empty file or one with only a header (``empty``,
        ``no-rows``), duplicate, missing or unexpected columns
        (``duplicate-columns``, ``columns-mismatch``), ragged rows
        (``ragged-row``), empty, non-numeric, non-finite or out-of-float32-range
        feature cells (``empty-cell``, ``not-a-number``, ``not-finite``,
        ``out-of-range``), an empty label (``empty-label``), a label column with
        one class, without the positive label or with more than two values
        (``single-class``, ``positive-label-missing``, ``label-classes``).
    """
    path = Path(path)
    if not path.exists():
        raise site_data_error(
            "file-missing",
            "the data file does not exist; set the SuperNode's node config "
            "data-path to the absolute path of this site's CSV file",
            f"data file {path} does not exist",
        )
    if not path.is_file():
        raise site_data_error(
            "not-a-file", "the data path is not a file", f"data path {path}"
        )
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise site_data_error(
            "unreadable",
            f"the data file could not be read as UTF-8 CSV ({type(err).__name__})",
            f"data file {path} could not be read as CSV: {err}",
        ) from None
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise site_data_error(
            "empty",
            "the data file is empty (expected a header row and data)",
            f"data file {path} is empty",
        )
    header = [name.strip() for name in rows[0]]
    body = rows[1:]
    if not body:
        raise site_data_error(
            "no-rows",
            "the data file has a header but no data rows",
            f"data file {path} has a header but no data rows",
        )
    _check_header(path, header, schema)
    columns = {name: i for i, name in enumerate(header)}
    feature_idx = [columns[name] for name in schema.features]
    label_idx = columns[schema.label]

    x = np.empty((len(body), len(feature_idx)), dtype=np.float64)
    raw_labels: list[str] = []
    for r, row in enumerate(body):
        line = r + 2  # 1-based, after the header
        if len(row) != len(header):
            raise site_data_error(
                "ragged-row",
                f"{len(row)} cells but the header has {len(header)} columns",
                f"data file {path}, line {line}: {len(row)} cells, header "
                f"{len(header)}",
                line=line,
            )
        for j, c in enumerate(feature_idx):
            x[r, j] = _number(path, line, header[c], row[c])
        label = row[label_idx].strip()
        if not label:
            raise site_data_error(
                "empty-label",
                "empty label",
                f"data file {path}, line {line}: empty label",
                line=line,
                column=schema.label,
            )
        raw_labels.append(label)
    y = _binary_labels(path, schema, raw_labels)
    # Range check in the training dtype: 1e39 is finite in float64, inf in float32.
    with np.errstate(over="ignore"):
        x32 = x.astype(np.float32)
    bad = np.argwhere(~np.isfinite(x32))
    if bad.size:
        r, j = (int(v) for v in bad[0])
        column = schema.features[j]
        raise site_data_error(
            "out-of-range",
            f"a value outside float32's range (|x| > {_FLOAT32_MAX:.3g}); "
            f"{len(bad)} such cell(s) in the file",
            f"data file {path}, line {r + 2}, column '{column}': {x[r, j]!r} is "
            "outside float32's range",
            line=r + 2,
            column=column,
        )
    return TabularData(x32, y, str(path))


def _check_header(path: Path, header: list[str], schema: TabularSchema) -> None:
    """Compare the header with the schema; name only the schema's columns."""
    known = {schema.label, *schema.features, *schema.ignore}
    duplicates = sorted({n for n in header if header.count(n) > 1})
    if duplicates:
        named = [n for n in duplicates if n in known]
        positions = [i + 1 for i, n in enumerate(header) if n in duplicates]
        raise site_data_error(
            "duplicate-columns",
            f"duplicate columns at positions {positions}"
            + (f" ({named})" if named else ""),
            f"data file {path}: duplicate columns {duplicates}",
        )
    present = set(header)
    missing = [c for c in (schema.label, *schema.features) if c not in present]
    extra = [i + 1 for i, c in enumerate(header) if c not in known]
    problems = []
    if missing:
        problems.append(f"missing columns {missing}")
    if extra:
        problems.append(
            f"{len(extra)} unexpected column(s) at positions {extra[:20]} (drop "
            "them from the file, or list them in the schema's ignored columns)"
        )
    if problems:
        raise site_data_error(
            "columns-mismatch",
            f"the header does not match the schema: {'; '.join(problems)}. "
            f"Expected label '{schema.label}' and {len(schema.features)} features "
            f"{list(schema.features)}",
            f"data file {path}: header {header}",
        )


def _number(path: Path, line: int, column: str, cell: str) -> float:
    text = cell.strip()
    if not text:
        raise site_data_error(
            "empty-cell",
            "empty cell; every feature needs a number (impute missing values "
            "before federating)",
            f"data file {path}, line {line}, column '{column}': empty cell",
            line=line,
            column=column,
        )
    try:
        value = float(text)
    except ValueError:
        raise site_data_error(
            "not-a-number",
            "not a number",
            f"data file {path}, line {line}, column '{column}': {text!r} is not a "
            "number",
            line=line,
            column=column,
        ) from None
    if not math.isfinite(value):
        raise site_data_error(
            "not-finite",
            "not a finite number",
            f"data file {path}, line {line}, column '{column}': {text!r} is not finite",
            line=line,
            column=column,
        )
    return value


def _binary_labels(path: Path, schema: TabularSchema, labels: list[str]) -> np.ndarray:
    """Map labels to 0/1; errors name counts and the schema's label, no values."""
    distinct = sorted(set(labels))
    if len(distinct) > 2:
        raise site_data_error(
            "label-classes",
            f"label column '{schema.label}' has {len(distinct)} distinct values; a "
            "binary task needs exactly two",
            f"data file {path}: label values {distinct[:10]}",
            column=schema.label,
        )
    if schema.positive_label not in distinct:
        raise site_data_error(
            "positive-label-missing",
            f"label column '{schema.label}' never holds the positive label "
            f"{schema.positive_label!r}; check the schema's positive label",
            f"data file {path}: label values {distinct}",
            column=schema.label,
        )
    if len(distinct) == 1:
        raise site_data_error(
            "single-class",
            f"label column '{schema.label}' holds a single class; a site needs "
            "rows of both classes to train and to be evaluated",
            f"data file {path}: only label {distinct[0]!r}",
            column=schema.label,
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
