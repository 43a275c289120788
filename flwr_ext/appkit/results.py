"""The results folder of a run: per-round metrics (JSON, CSV), final model, summary.

A ServerApp runs in the SuperLink's working directory (or a SuperExec's), which is
not where the user is, so relative paths are unsafe. The run config key
``output-dir`` takes an *absolute* folder; left empty, results go to
:func:`default_output_root` ``/<app>/<UTC time>-run-<run id>``:

- ``$FLWR_EXT_OUTPUT_ROOT`` if set (the ServerApp inherits the environment of the
  SuperLink it runs under), else
- ``$XDG_DATA_HOME/flwr-ext/outputs``, else ``~/.local/share/flwr-ext/outputs``.

Not under ``$FLWR_HOME``: tools such as ``flwr-ext simulate`` use a throw-away
Flower home that is deleted after the run.

The folder holds (:class:`ResultsWriter`):

``metrics.json``
    Everything: the validated run config, and per round the aggregated and the
    per-site train/evaluate metrics, the nodes that dropped out, wall times.
``metrics.csv``
    One row per (round, site, phase), ``site = "all"`` for the aggregate; one
    column per metric. Opens in any spreadsheet.
``final_model.npz``
    The final global arrays (``numpy.load`` gives name -> array); apps may add a
    framework-specific copy (e.g. ``final_model.pt``).
``*.png``
    Plots (:mod:`flwr_ext.appkit.plots`).

Every run writes into a **fresh** folder: one that already holds files (another
run's results) is refused unless ``ResultsWriter(..., overwrite=True)``. The folder
is ``0700`` and every file ``0600`` (a final model can leak training data; metrics
are per site), written atomically under a random temporary name and never through
a symlink (:mod:`flwr_ext.safe_files`).

:func:`summary_line` formats the one line a ServerApp logs last, which the user
(or a test) reads with ``flwr log`` even from a remote SuperLink.
"""

from __future__ import annotations

import csv
import json
import math
import os
import secrets
import shlex
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Result

from ..safe_files import (
    UnsafePathError,
    atomic_open,
    create_private_dir,
    write_bytes,
    write_text,
)
from .config import Option
from .recorder import RecordingGrid

__all__ = [
    "OUTPUT_OPTIONS",
    "ResultsWriter",
    "default_output_root",
    "resolve_output_dir",
    "round_history",
    "parse_summary",
    "summary_line",
]

#: Environment variable that overrides the default results root.
OUTPUT_ROOT_ENV = "FLWR_EXT_OUTPUT_ROOT"
#: Prefix of the summary line (tests and users grep for it).
SUMMARY_PREFIX = "flwr-ext result:"


def _absolute_or_empty(value: str) -> str | None:
    if value and not Path(value).expanduser().is_absolute():
        return (
            "must be an absolute path (the ServerApp's working directory is the "
            "SuperLink's, not yours) or empty for the default results folder"
        )
    return None


#: Run-config options every app that writes results has.
OUTPUT_OPTIONS = (
    Option(
        "output-dir",
        str,
        "",
        "absolute results folder; empty: $FLWR_EXT_OUTPUT_ROOT or "
        "~/.local/share/flwr-ext/outputs, then <app>/<time>-run-<id>",
        check=_absolute_or_empty,
    ),
)


def default_output_root() -> Path:
    """Return the folder under which runs without ``output-dir`` write results."""
    root = os.environ.get(OUTPUT_ROOT_ENV)
    if root:
        return Path(root).expanduser().resolve()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return (base / "flwr-ext" / "outputs").resolve()


def resolve_output_dir(value: str, app_name: str, run_id: int) -> Path:
    """Return the absolute results folder for a run (not created yet).

    Parameters
    ----------
    value : str
        The run config's ``output-dir``: an absolute path, or ``""`` for
        ``default_output_root()/<app_name>/<UTC time>-run-<run_id>``.
    """
    if value:
        path = Path(value).expanduser()
        if not path.is_absolute():
            raise ValueError(f"output-dir={value!r} {_absolute_or_empty(value)}")
        return path
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return default_output_root() / app_name / f"{stamp}-run-{run_id}"


class ResultsWriter:
    """Write a run's results into one fresh, private folder.

    Parameters
    ----------
    directory : Path
        Absolute folder; created ``0700`` (with parents). It must not exist yet,
        or be empty: a folder holding another run's files is refused. Creating it,
        and a test write, happen here, so an unusable folder fails at start-up,
        not after training.
    overwrite : bool (default: False)
        Allow a folder that already holds files, and replace files of the same
        name in it (atomically; a symlink is replaced, never followed).

    Raises
    ------
    UnsafePathError
        The folder is a symlink, not a folder, or holds files (and not
        ``overwrite``).
    OSError
        The folder cannot be created or written.
    """

    def __init__(self, directory: Path, *, overwrite: bool = False) -> None:
        directory = Path(directory)
        if not directory.is_absolute():
            raise ValueError(f"results folder must be absolute, got {directory}")
        try:
            create_private_dir(directory, fresh=not overwrite, claim=True)
            probe = write_bytes(
                directory / f".write-test-{secrets.token_hex(6)}", b"ok"
            )
            probe.unlink()
        except UnsafePathError as err:
            raise UnsafePathError(
                f"{err}; set run config output-dir to a new absolute folder"
            ) from err
        except OSError as err:
            raise OSError(
                f"cannot write results to {directory}: {err}; set run config "
                "output-dir to a writable absolute folder"
            ) from err
        self.directory = directory
        self.overwrite = overwrite

    def path(self, name: str) -> Path:
        """Absolute path of ``name`` inside the results folder."""
        return self.directory / name

    def open(self, name: str, mode: str = "wb") -> AbstractContextManager[IO]:
        """Open ``name`` for writing: private, atomic, never through a symlink.

        For writers that need a file object::

            with writer.open("final_model.pt") as handle:
                torch.save(state_dict, handle)
        """
        return atomic_open(self.path(name), mode, overwrite=self.overwrite)  # type: ignore[call-overload]

    def write_json(self, name: str, data: object) -> Path:
        """Write ``data`` as indented JSON (NaN/Inf become null)."""
        return write_text(
            self.path(name),
            json.dumps(_jsonable(data), indent=2) + "\n",
            overwrite=self.overwrite,
        )

    def write_metrics(
        self,
        history: Sequence[Mapping[str, Any]],
        *,
        run: Mapping[str, Any],
        json_name: str = "metrics.json",
        csv_name: str = "metrics.csv",
    ) -> tuple[Path, Path]:
        """Write the per-round history (:func:`round_history`) as JSON and CSV.

        ``run`` (app, run id, config, totals...) goes at the top of the JSON.
        """
        json_path = self.write_json(json_name, {**run, "rounds": list(history)})
        rows = []
        for entry in history:
            for phase in ("train", "evaluate"):
                aggregated = entry["aggregated"].get(phase) or {}
                if aggregated:
                    rows.append(
                        {"round": entry["round"], "site": "all", "node-id": "",
                         "phase": phase, **aggregated}
                    )  # fmt: skip
                for site, data in entry["sites"].items():
                    metrics = data.get(phase) or {}
                    if metrics:
                        rows.append(
                            {"round": entry["round"], "site": site,
                             "node-id": data["node-id"], "phase": phase, **metrics}
                        )  # fmt: skip
        fixed = ["round", "site", "node-id", "phase"]
        extra = sorted({k for row in rows for k in row} - set(fixed))
        csv_path = self.path(csv_name)
        with self.open(csv_name, "w") as handle:
            writer = csv.DictWriter(handle, fieldnames=fixed + extra, restval="")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _csv_value(v) for k, v in row.items()})
        return json_path, csv_path

    def write_arrays(self, arrays: ArrayRecord, name: str = "final_model.npz") -> Path:
        """Save an ArrayRecord as a ``.npz`` archive (array name -> array)."""
        path = self.path(name)
        with self.open(name) as handle:
            named: dict[str, Any] = {key: a.numpy() for key, a in arrays.items()}
            np.savez(handle, **named)
        return path


def round_history(
    grid: RecordingGrid, result: Result | None = None
) -> list[dict[str, Any]]:
    """Combine a :class:`RecordingGrid` and Flower's ``Result`` per round.

    Each entry: ``{"round", "aggregated": {"train", "evaluate"}, "sites": {name:
    {"node-id", "train", "evaluate"}}, "dropped": [{"node-id", "site", "phase",
    "reason"}], "seconds": {"train", "evaluate"}}``. Aggregated metrics are the
    strategy's (``result.train_metrics_clientapp`` and
    ``result.evaluate_metrics_clientapp``); per-site ones are the replies'.
    Rounds before training (round 0, e.g. a statistics query) are left out.
    """
    aggregated = {
        "train": result.train_metrics_clientapp if result else {},
        "evaluate": result.evaluate_metrics_clientapp if result else {},
    }
    rounds = {
        r
        for phase in ("train", "evaluate")
        for r in (*grid.phases.get(phase, {}), *aggregated[phase])
        if r > 0
    }
    dropouts = grid.dropouts()
    history = []
    for server_round in sorted(rounds):
        entry: dict[str, Any] = {
            "round": server_round,
            "aggregated": {},
            "sites": {},
            "dropped": [
                {k: v for k, v in event.items() if k != "round"}
                for event in dropouts
                if event["round"] == server_round
            ],
            "seconds": {},
        }
        for phase in ("train", "evaluate"):
            metrics = aggregated[phase].get(server_round)
            if metrics is not None:
                entry["aggregated"][phase] = _scalars(metrics)
            record = grid.phases.get(phase, {}).get(server_round)
            if record is None:
                continue
            entry["seconds"][phase] = record.seconds
            for node_id, values in record.per_node.items():
                site = entry["sites"].setdefault(
                    grid.site_of(node_id), {"node-id": node_id}
                )
                site[phase] = dict(values)
        entry["sites"] = dict(sorted(entry["sites"].items()))
        history.append(entry)
    return history


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def summary_line(app_name: str, fields: Mapping[str, object]) -> str:
    """Format ``flwr-ext result: app=<name> key=value ...`` on one line.

    Floats get 4 decimals; strings with spaces, quotes or backslashes are quoted
    (JSON style), so that :func:`parse_summary` reads every value back.
    """
    parts = [f"app={app_name}"]
    for key, value in fields.items():
        if isinstance(value, float):
            text = "nan" if math.isnan(value) else f"{value:.4f}"
        else:
            text = str(value)
            if not text or any(c.isspace() or c in "\"'\\" for c in text):
                text = json.dumps(text, ensure_ascii=False)
        parts.append(f"{key}={text}")
    return f"{SUMMARY_PREFIX} {' '.join(parts)}"


def parse_summary(log: str, app_name: str) -> dict[str, str]:
    """Read back the last :func:`summary_line` of ``app_name`` in a run's log.

    Returns its ``key=value`` fields (values as strings, quotes removed), without
    ``app``. Raises ``ValueError`` - ending with the log's last lines - if the log
    holds no such line (the run failed or was stopped before its end).
    """
    marker = f"{SUMMARY_PREFIX} app={app_name} "
    lines = [line for line in log.splitlines() if marker in line]
    if not lines:
        tail = "\n".join(log.splitlines()[-20:])
        raise ValueError(
            f"no '{marker.strip()}' line in the log: the run did not finish; "
            f"its log ends:\n{tail}"
        )
    text = lines[-1][lines[-1].index(marker) + len(marker) :]
    return dict(part.split("=", 1) for part in shlex.split(text))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else repr(value)
    return value
