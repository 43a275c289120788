"""Issue 10, item 8: nothing about a site's data travels in an error reply.

Each attack plants a secret in a site's file - a patient identifier in a feature
cell, a secret on the first line of a file the site was pointed at by mistake,
label values - and runs the real hospital ClientApp (mods included) on a real train
instruction. The error reply that would reach the coordinator must name a code and
the line/column, never the secret; the site's own log keeps the details. A cell of
``1e39`` is finite as float64 but ``inf`` in float32: it must be refused at load
time (range checks after the cast), with its line and column.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType

from flwr_ext.appkit.tabular import SchemaError, TabularSchema, load_csv

APP = Path(__file__).resolve().parents[1] / "apps" / "hospital-diagnostics"
sys.path.insert(0, str(APP))

from hospital_diagnostics.client_app import app as client_app  # noqa: E402
from hospital_diagnostics.settings import SCHEMA  # noqa: E402
from hospital_diagnostics.task import wdbc, write_csv  # noqa: E402

SECRET = "PATIENT-4711-JANE-DOE"
SCHEMA_AB = TabularSchema(label="diagnosis", features=("a", "b"), positive_label="M")


def _hospital_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "site.csv", wdbc().subset(np.arange(0, 569, 3)))


def _replace_cell(path: Path, line: int, column: str, value: str) -> None:
    rows = path.read_text().splitlines()
    header = rows[0].split(",")
    cells = rows[line - 1].split(",")
    cells[header.index(column)] = value
    rows[line - 1] = ",".join(cells)
    path.write_text("\n".join(rows) + "\n")


def _train_reply(data_path: Path, node_config: dict | None = None) -> Message:
    """Send the real hospital ClientApp a train instruction; return its reply."""
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"data-path": str(data_path), **(node_config or {})},
        state=RecordDict(),
        run_config=SCHEMA.defaults(),
    )
    msg = Message(
        RecordDict({"config": ConfigRecord({"server-round": 1})}),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    try:
        return client_app(msg, context)
    except Exception as err:  # what Flower's ClientApp runtime sends on a raise
        from flwr.app import Error

        return Message(
            Error(code=2, reason=str(type(err)) + ":<'" + str(err) + "'>"),
            reply_to=msg,
        )


def _wire_text(reply: Message) -> str:
    """Everything in the reply that would travel to the server."""
    assert reply.has_error()
    return f"{reply.error.code} {reply.error.reason}"


# ------------------------------------------- through the real ClientApp
def test_a_patient_id_in_a_feature_cell_never_reaches_the_server(tmp_path, caplog):
    path = _hospital_csv(tmp_path)
    _replace_cell(path, 5, "radius_mean", SECRET)
    with caplog.at_level(logging.ERROR):
        reply = _train_reply(path)
    text = _wire_text(reply)
    assert SECRET not in text
    assert "not-a-number" in text and "line 5" in text and "radius_mean" in text
    assert SECRET in caplog.text  # the site's own log has the detail


def test_the_first_line_of_a_wrong_file_never_reaches_the_server(tmp_path, caplog):
    """A site pointed at the wrong file: its first line used to be echoed as the
    'unexpected columns'."""
    path = tmp_path / "notes.csv"
    path.write_text(f"{SECRET},diagnosis\nx,M\ny,B\n")
    with caplog.at_level(logging.ERROR):
        reply = _train_reply(path)
    text = _wire_text(reply)
    assert SECRET not in text
    assert "columns" in text  # a code saying the header does not match
    assert SECRET in caplog.text


def test_label_values_never_reach_the_server(tmp_path):
    path = _hospital_csv(tmp_path)
    _replace_cell(path, 4, "diagnosis", SECRET)
    text = _wire_text(_train_reply(path))
    assert SECRET not in text
    assert "3 distinct values" in text


def test_a_cell_beyond_float32_is_refused_at_load_with_line_and_column(tmp_path):
    """1e39 is finite in float64: it used to pass, become inf in float32 and abort
    the run with "'feature-sum' holds NaN or Inf"."""
    path = _hospital_csv(tmp_path)
    _replace_cell(path, 6, "texture_mean", "1e39")
    text = _wire_text(_train_reply(path))
    assert "out-of-range" in text and "line 6" in text and "texture_mean" in text
    assert "1e39" not in text


def test_redaction_holds_without_site_policy_mod(tmp_path):
    """str() of a data error is itself safe: Flower's runtime sends str(exception)."""
    path = tmp_path / "s.csv"
    path.write_text(f"diagnosis,a,b\nM,1,2\nB,{SECRET},2\n")
    with pytest.raises(SchemaError) as err:
        load_csv(path, SCHEMA_AB)
    assert SECRET not in str(err.value) and SECRET not in repr(err.value)
    assert err.value.code == "not-a-number"
    assert (err.value.line, err.value.column) == (3, "a")
    assert SECRET in err.value.detail and str(path) in err.value.detail


# ---------------------------------------------------------- load_csv
@pytest.mark.parametrize(
    ("text", "code", "secret_in_file"),
    [
        (f"diagnosis,a,b,{SECRET}\nM,1,2,3\nB,1,2,3\n", "columns-mismatch", True),
        (f"diagnosis,a,{SECRET},{SECRET}\nM,1,1,2\n", "duplicate-columns", True),
        (f"diagnosis,a,b\nM,1,2\nB,{SECRET},2\n", "not-a-number", True),
        (f"diagnosis,a,b\nM,1,2\nB,nan{SECRET},2\n", "not-a-number", True),
        ("diagnosis,a,b\nM,1,2\nB,inf,2\n", "not-finite", False),
        ("diagnosis,a,b\nM,1,2\nB,-3.5e38,2\n", "out-of-range", False),
        (
            f"diagnosis,a,b\n{SECRET},1,2\n{SECRET},3,4\n",
            "positive-label-missing",
            True,
        ),
        (f"diagnosis,a,b\nM,1,2\nB,3,4\n{SECRET},5,6\n", "label-classes", True),
        ("diagnosis,a,b\nM,1,2\nM,3,4\n", "single-class", False),
    ],
)
def test_every_data_error_has_a_code_and_quotes_nothing(
    tmp_path, text, code, secret_in_file
):
    path = tmp_path / "s.csv"
    path.write_text(text)
    with pytest.raises(SchemaError) as err:
        load_csv(path, SCHEMA_AB)
    assert err.value.code == code
    assert code in str(err.value)
    assert SECRET not in str(err.value)
    if secret_in_file:
        assert SECRET in err.value.detail
    assert err.value.public_reason == str(err.value)


def test_undecodable_bytes_are_not_quoted(tmp_path):
    path = tmp_path / "x.csv"
    path.write_bytes(b"diagnosis,a,b\nM,1,2\nB,\xff\xfe,2\n")
    with pytest.raises(SchemaError) as err:
        load_csv(path, SCHEMA_AB)
    assert err.value.code == "unreadable"
    assert "0xff" not in str(err.value) and "position" not in str(err.value)


def test_node_config_errors_name_keys_not_the_sites_values(tmp_path, caplog):
    """A relative data-path naming a cohort is refused without echoing it."""
    with caplog.at_level(logging.ERROR):
        reply = _train_reply(Path(f"relative/{SECRET}.csv"))
    text = _wire_text(reply)
    assert SECRET not in text
    assert "data-path must be an absolute path" in text
    assert SECRET in caplog.text
