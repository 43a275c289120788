import json

import numpy as np
import pytest

from flwr_ext.appkit.tabular import (
    SchemaError,
    TabularSchema,
    dirichlet_partition,
    load_csv,
    stratified_split,
)

SCHEMA = TabularSchema(
    label="diagnosis", features=("a", "b"), positive_label="M", ignore=("id",)
)


def _write(tmp_path, text, name="site.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_loads_features_in_schema_order_and_encodes_the_positive_label(tmp_path):
    path = _write(tmp_path, "b,id,diagnosis,a\n2,7,M,1\n4,8,B,3.5\n6,9,M,-1e2\n")
    data = load_csv(path, SCHEMA)
    np.testing.assert_array_equal(data.x, [[1, 2], [3.5, 4], [-100, 6]])
    assert data.x.dtype == np.float32
    np.testing.assert_array_equal(data.y, [1, 0, 1])
    assert len(data) == 3 and data.source == str(path)


def test_quoted_cells_bom_and_blank_lines_are_fine(tmp_path):
    path = tmp_path / "s.csv"
    path.write_bytes(b'\xef\xbb\xbf"diagnosis","a","b"\n\n"M"," 1 ","2"\nB,3,4\n\n')
    assert load_csv(path, SCHEMA).x.shape == (2, 2)


@pytest.mark.parametrize(
    ("text", "message", "detail"),
    [
        ("", r"\[empty\].*is empty", None),
        ("\n\n", r"\[empty\].*is empty", None),
        ("diagnosis,a,b\n", "header but no data rows", None),
        ("diagnosis,a\nM,1\nB,2\n", r"missing columns \['b'\]", None),
        (
            "diagnosis,a,b,age\nM,1,2,3\nB,1,2,3\n",
            r"1 unexpected column\(s\) at positions \[4\]",
            "'age'",
        ),
        (
            "diagnosis,a,a,b\nM,1,1,2\nB,1,1,2\n",
            r"duplicate columns at positions \[2, 3\] \(\['a'\]\)",
            None,  # 'a' is a schema column: it may be named
        ),
        (
            "diagnosis,a,b\nM,1,2\nB,x,2\n",
            r"\[not-a-number\], line 3, column 'a': not a number",
            "'x' is not a number",
        ),
        ("diagnosis,a,b\nM,1,2\nB,,2\n", r"line 3, column 'a': empty cell", None),
        ("diagnosis,a,b\nM,1,2\nB,inf,2\n", "not a finite number", "'inf'"),
        ("diagnosis,a,b\nM,1,2\nB,1\n", "line 3: 2 cells but the header has 3", None),
        (
            "diagnosis,a,b\nM,1,2\n,1,2\n",
            "line 3, column 'diagnosis': empty label",
            None,
        ),
        ("diagnosis,a,b\nM,1,2\nM,3,4\n", "single class", "'M'"),
        ("diagnosis,a,b\nB,1,2\nB,3,4\n", "never holds the positive label 'M'", "'B'"),
        ("diagnosis,a,b\nM,1,2\nB,3,4\nm,5,6\n", "3 distinct values", "'m'"),
    ],
)
def test_every_bad_file_gets_a_specific_error(tmp_path, text, message, detail):
    """The message (sent to the coordinator) names code, line and schema column;
    the detail (the site's log) adds the path and the values."""
    path = _write(tmp_path, text)
    with pytest.raises(SchemaError, match=message) as err:
        load_csv(path, SCHEMA)
    assert str(path) in err.value.detail and str(path) not in str(err.value)
    if detail is not None:
        assert detail in err.value.detail and detail not in str(err.value)


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(SchemaError, match="does not exist; set the SuperNode"):
        load_csv(tmp_path / "nope.csv", SCHEMA)
    with pytest.raises(SchemaError, match="is not a file"):
        load_csv(tmp_path, SCHEMA)


def test_binary_file_is_reported_not_crashing(tmp_path):
    path = tmp_path / "x.csv"
    path.write_bytes(b"\xff\xfe\x00garbage\x00")
    with pytest.raises(SchemaError, match="could not be read as UTF-8 CSV"):
        load_csv(path, SCHEMA)


def test_schema_validation_and_json_round_trip(tmp_path):
    with pytest.raises(SchemaError, match="more than once"):
        TabularSchema("y", ("a", "y"))
    with pytest.raises(SchemaError, match="no feature"):
        TabularSchema("y", ())
    path = tmp_path / "schema.json"
    path.write_text(SCHEMA.to_json())
    assert TabularSchema.from_json(path) == SCHEMA
    path.write_text(json.dumps({"label": "y"}))
    with pytest.raises(SchemaError, match="must have keys"):
        TabularSchema.from_json(path)
    path.write_text("{oops")
    with pytest.raises(SchemaError, match="not valid JSON"):
        TabularSchema.from_json(path)
    with pytest.raises(SchemaError, match="does not exist"):
        TabularSchema.from_json(tmp_path / "none.json")
    assert TabularSchema.parse_columns(" a, b ,,c ") == ("a", "b", "c")


def test_stratified_split_keeps_both_classes_on_both_sides():
    y = np.array([0] * 10 + [1] * 3)
    train, test = stratified_split(y, 0.3, seed=0)
    assert set(np.r_[train, test]) == set(range(13)) and not set(train) & set(test)
    for part in (train, test):
        assert set(y[part]) == {0, 1}
    assert np.array_equal(stratified_split(y, 0.3, 0)[1], test)  # seeded
    with pytest.raises(ValueError, match="at least 2 rows of each class"):
        stratified_split(np.array([0, 0, 0, 1]), 0.3, 0)


def test_dirichlet_partition_is_non_iid_disjoint_complete_and_seeded():
    rng = np.random.default_rng(0)
    y = (rng.random(600) < 0.35).astype(int)
    parts = dirichlet_partition(y, 4, alpha=0.5, seed=3, min_per_class=5)
    joined = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(joined, np.arange(600))
    sizes = [len(p) for p in parts]
    mixes = [y[p].mean() for p in parts]
    assert max(sizes) > 1.5 * min(sizes) and max(mixes) - min(mixes) > 0.1
    assert all(min((y[p] == 0).sum(), (y[p] == 1).sum()) >= 5 for p in parts)
    again = dirichlet_partition(y, 4, alpha=0.5, seed=3, min_per_class=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    with pytest.raises(ValueError, match="at most"):
        dirichlet_partition(y, 100, alpha=1.0, seed=0, min_per_class=5)
