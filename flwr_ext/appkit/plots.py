"""PNG plots of per-round metrics (matplotlib, Agg canvas: no display needed).

Figures are drawn on matplotlib's Agg canvas directly (``Figure`` +
``FigureCanvasAgg``), so plotting never changes the global backend of a process
that imports this module and never needs a display - a ServerApp runs headless.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..safe_files import atomic_open

__all__ = ["plot_bars", "plot_rounds"]


def _figure(width: float = 7.0, height: float = 4.2) -> Any:
    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def plot_rounds(
    history: Sequence[Mapping[str, Any]],
    metric: str,
    path: str | Path,
    *,
    phase: str = "evaluate",
    title: str | None = None,
    ylabel: str | None = None,
    aggregate_label: str = "federation (pooled)",
    extra_series: Mapping[str, Sequence[tuple[int, float]]] | None = None,
) -> Path | None:
    """Plot ``metric`` per round: one thin line per site, a thick one for all.

    Parameters
    ----------
    history : sequence of dict
        :func:`flwr_ext.appkit.results.round_history` entries.
    metric : str
        Metric key, e.g. ``"auroc"`` or ``"epsilon"``.
    path : str or Path
        PNG file to write.
    phase : {"evaluate", "train"} (default: "evaluate")
        Which replies the metric comes from.
    extra_series : mapping, optional
        More named ``[(round, value), ...]`` lines (e.g. a server-side ε).

    Returns
    -------
    Path or None
        The PNG written, or None if no round has the metric (nothing drawn).
    """
    aggregate: list[tuple[int, float]] = []
    sites: dict[str, list[tuple[int, float]]] = {}
    for entry in history:
        value = (entry["aggregated"].get(phase) or {}).get(metric)
        if value is not None:
            aggregate.append((entry["round"], float(value)))
        for site, data in entry["sites"].items():
            site_value = (data.get(phase) or {}).get(metric)
            if site_value is not None:
                sites.setdefault(site, []).append((entry["round"], float(site_value)))
    extra = {k: list(v) for k, v in (extra_series or {}).items() if v}
    if not aggregate and not sites and not extra:
        return None
    figure = _figure()
    axes = figure.add_subplot(1, 1, 1)
    for site, points in sorted(sites.items()):
        xs, ys = zip(*points, strict=True)
        axes.plot(xs, ys, marker="o", markersize=3, linewidth=1, alpha=0.8, label=site)
    if aggregate:
        xs, ys = zip(*aggregate, strict=True)
        axes.plot(
            xs, ys, color="black", linewidth=2.5, marker="s", label=aggregate_label
        )
    for name, points in extra.items():
        xs, ys = zip(*points, strict=True)
        axes.plot(xs, ys, linewidth=2, linestyle="--", marker="^", label=name)
    axes.set_xlabel("round")
    axes.set_ylabel(ylabel or metric)
    axes.set_title(title or f"{metric} per round")
    axes.grid(True, alpha=0.3)
    rounds = sorted({r for entry in history for r in [entry["round"]]})
    if rounds and len(rounds) <= 30:
        axes.set_xticks(rounds)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    path = Path(path)
    # private (0600), atomic, a symlink at ``path`` replaced, never followed
    with atomic_open(path, "wb", overwrite=True) as handle:
        figure.savefig(handle, format=path.suffix.lstrip(".") or "png")
    return path


def plot_bars(
    labels: Sequence[str],
    values: Sequence[float],
    path: str | Path,
    *,
    title: str,
    ylabel: str,
    errors: Sequence[float] | None = None,
    ylim: tuple[float, float] | None = None,
    reference: float | None = None,
    reference_label: str = "",
) -> Path:
    """Draw a labelled bar chart (e.g. a benchmark table) and save it as PNG."""
    figure = _figure(width=max(6.0, 0.9 * len(labels) + 2), height=4.5)
    axes = figure.add_subplot(1, 1, 1)
    positions = list(range(len(labels)))
    bars = axes.bar(positions, values, yerr=errors, capsize=3, color="#4C72B0")
    for bar, value in zip(bars, values, strict=True):
        axes.annotate(
            f"{value:.3f}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    if reference is not None:
        axes.axhline(reference, color="black", linestyle="--", linewidth=1,
                     label=reference_label)  # fmt: skip
        if reference_label:
            axes.legend(fontsize=8)
    axes.set_xticks(positions)
    axes.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    if ylim is not None:
        axes.set_ylim(*ylim)
    axes.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    # private (0600), atomic, a symlink at ``path`` replaced, never followed
    with atomic_open(path, "wb", overwrite=True) as handle:
        figure.savefig(handle, format=path.suffix.lstrip(".") or "png")
    return path
