"""A failed run is a result too: its results folder and summary line say what happened.

Without this, a ServerApp that raises (a statistics round with too few valid
replies, sites that stay away past ``node-wait-timeout``, a strategy error)
leaves an *empty* results folder and a log ending in a traceback; the operator
learns neither which rounds completed nor which site failed, nor why.

:func:`failure_recorded` wraps the part of a ServerApp that talks to the sites::

    recording = RecordingGrid(grid)
    with failure_recorded(APP_NAME, context.run_id, writer, recording):
        ...  # statistics round, strategy.start(), writing the results

If anything raises inside, it writes ``metrics.json`` / ``metrics.csv`` with
``"status": "failed"``, the error, the rounds completed so far with every site's
metrics, and every site that failed or stayed away - by site name, with the
reason in the site's own words (its error reply, which names it: see
:mod:`flwr_ext.appkit.site_errors`) - then logs the summary line::

    flwr-ext result: app=hospital-diagnostics run=12 status=failed rounds=0
        failed=st-marys reason="site 'st-marys': SchemaError: ..." error="..."
        output=/srv/results/run-1

and re-raises, so that Flower records the run as ``finished:failed`` too.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Iterator
from logging import ERROR, INFO
from typing import Any

from flwr.supercore import log

from .recorder import RecordingGrid
from .results import ResultsWriter, round_history, summary_line

__all__ = ["failed_sites", "failure_recorded"]

_MAX_TEXT = 400


def failed_sites(recording: RecordingGrid) -> dict[str, str]:
    """Site name -> the last reason it failed or stayed away, in round order."""
    sites: dict[str, str] = {}
    for event in recording.dropouts():
        sites[str(event["site"])] = str(event["reason"])
    return sites


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 3] + "..."


@contextlib.contextmanager
def failure_recorded(
    app_name: str,
    run_id: int,
    writer: ResultsWriter,
    recording: RecordingGrid,
    *,
    run_info: dict[str, Any] | None = None,
) -> Iterator[None]:
    """Record a failure inside the block as a results folder and a summary line.

    Parameters
    ----------
    app_name : str
        The app's name in the summary line.
    run_id : int
        Flower's run id.
    writer : ResultsWriter
        The run's results folder.
    recording : RecordingGrid
        The grid that recorded the sites' replies so far.
    run_info : dict, optional
        Extra fields for the top of ``metrics.json`` (e.g. the run config).
    """
    started = time.monotonic()
    try:
        yield
    except BaseException as err:
        if isinstance(err, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        _record(app_name, run_id, writer, recording, err, started, run_info or {})
        raise


def _record(
    app_name: str,
    run_id: int,
    writer: ResultsWriter,
    recording: RecordingGrid,
    err: BaseException,
    started: float,
    run_info: dict[str, Any],
) -> None:
    """Write what is known about the failed run; never raise from here."""
    error = _one_line(f"{type(err).__name__}: {err}")
    sites = failed_sites(recording)
    try:
        history = round_history(recording, None)
    except Exception:  # the failure itself must still be logged
        history = []
    completed = [
        entry["round"]
        for entry in history
        if "evaluate" in entry.get("seconds", {}) and entry.get("sites")
    ]
    seconds = time.monotonic() - started
    run = {
        "app": app_name,
        "run-id": run_id,
        **run_info,
        "status": "failed",
        "error": error,
        "traceback": traceback.format_exception(err)[-6:],
        "rounds-completed": len(completed),
        "failed-sites": [
            {"site": site, "reason": reason} for site, reason in sites.items()
        ],
        "dropped-out": recording.dropouts(),
        "wall-time-s": seconds,
    }
    try:
        writer.write_metrics(history, run=run)
    except Exception as write_err:  # report, then re-raise the cause
        log(ERROR, "%s: could not write the failed run's results: %s", app_name,
            write_err)  # fmt: skip
    fields: dict[str, object] = {
        "run": run_id,
        "status": "failed",
        "rounds": len(completed),
        "failed": ",".join(sites) or "none",
    }
    if sites:
        fields["reason"] = _one_line(next(reversed(sites.values())))
    fields["error"] = error
    fields["seconds"] = f"{seconds:.1f}"
    fields["output"] = str(writer.directory)
    log(ERROR, "%s: the run failed: %s", app_name, error)
    log(INFO, summary_line(app_name, fields))
