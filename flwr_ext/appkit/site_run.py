"""The frame a template's ServerApp runs in: results folder, site grids, failure record.

Both templates' ``main`` did the same before talking to a site, and it is easy to
get subtly wrong (the order of the grid wrappers matters, and the failure record
must see the recording grid). :func:`run_with_sites` does it once:

1. open the results folder from run config ``output-dir``
   (:func:`~flwr_ext.appkit.results.resolve_output_dir`): an unwritable folder
   fails here, before any training;
2. wrap Flower's grid, innermost first: :class:`RestartAwareGrid` (a reply lost
   to a SuperNode restart is given up at once, not after ``round-timeout``),
   :class:`RecordingGrid` (every site's metrics per round, and who dropped out),
   :class:`DeadlineGrid` (a phase waits at most ``node-wait-timeout`` for an
   absent site, then goes on with ``min-nodes`` sites or fails naming it);
3. run the app's ``body`` inside :func:`failure_recorded`, so a run that fails
   still writes its results folder and a ``status=failed`` summary line.

Usage, in a ServerApp's ``main``::

    settings = load_settings(context.run_config)
    run_with_sites(APP_NAME, grid, context, settings, body)

where ``body(run)`` gets a :class:`SiteRun` and does the statistics round,
``strategy.start(grid=run.grid, ...)`` and writes the results.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid
from flwr.supercore import log

from .failure import failure_recorded
from .liveness import DeadlineGrid, RestartAwareGrid
from .recorder import RecordingGrid
from .results import ResultsWriter, resolve_output_dir

__all__ = ["SiteRun", "run_with_sites"]


@dataclass(frozen=True)
class SiteRun:
    """What a ServerApp's body works with.

    Attributes
    ----------
    grid : DeadlineGrid
        The grid to give the strategy and the statistics round.
    recording : RecordingGrid
        Per-site metrics per round and the sites that dropped out
        (:func:`~flwr_ext.appkit.results.round_history` reads it).
    writer : ResultsWriter
        The run's results folder.
    started : float
        ``time.monotonic()`` when the run started (for the wall time in results).
    """

    grid: DeadlineGrid
    recording: RecordingGrid
    writer: ResultsWriter
    started: float


def run_with_sites(
    app_name: str,
    grid: Grid,
    context: Context,
    settings: Mapping[str, Any],
    body: Callable[[SiteRun], None],
    *,
    keep_lists: Sequence[str] = (),
) -> None:
    """Open the results folder, wrap ``grid`` for sites, run ``body`` recorded.

    Parameters
    ----------
    app_name : str
        The app's name in the log and the summary line.
    grid : Grid
        Flower's grid, as ``ServerApp.main`` receives it.
    context : Context
        The ServerApp's context (its ``run_id`` names the run).
    settings : Mapping
        The validated run config; reads ``output-dir``, ``min-nodes`` and
        ``node-wait-timeout``; written to ``metrics.json`` if the run fails.
    body : callable
        The app's run: ``body(SiteRun)``. Whatever it raises is recorded
        (results folder, ``status=failed`` summary line), then re-raised so
        that Flower marks the run failed too.
    keep_lists : sequence of str
        List metrics the recording grid keeps (e.g. score histograms).
    """
    started = time.monotonic()
    writer = ResultsWriter(
        resolve_output_dir(settings["output-dir"], app_name, context.run_id)
    )
    log(INFO, "%s: results will be written to %s", app_name, writer.directory)
    recording = RecordingGrid(RestartAwareGrid(grid), keep_lists=keep_lists)
    with failure_recorded(
        app_name, context.run_id, writer, recording, run_info={"run-config": settings}
    ):
        deadline = DeadlineGrid(
            recording,
            min_nodes=settings["min-nodes"],
            wait_s=settings["node-wait-timeout"],
        )
        body(SiteRun(deadline, recording, writer, started))
