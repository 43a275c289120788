"""Precision-recall curves of a model, pooled and per site, as a PNG.

For a rare positive class (fraud, a rare disease) the precision-recall curve is
the picture that matters: how many alerts are real at each level of recall.
The curves are drawn from the sites' test-score histograms
(:class:`~flwr_ext.appkit.metrics.BinaryStats`), one point per bin edge - the
same statistics the pooled AUPRC is computed from, so the picture and the
number agree. An optional marker shows each curve's operating point (the
chosen threshold).

Drawn on matplotlib's Agg canvas directly, as :mod:`flwr_ext.appkit.plots`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from flwr_ext.appkit.metrics import (
    METRICS,
    BinaryStats,
    OperatingPoint,
    operating_curve,
)
from flwr_ext.safe_files import atomic_open

__all__ = ["plot_pr_curves", "pr_points"]


def pr_points(stats: BinaryStats) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(recall, precision)`` at every bin edge, recall increasing.

    Starts at recall 0 (precision of the highest non-empty threshold) and
    ends at recall 1 (precision = prevalence). Edges that flag nothing are
    skipped.
    """
    curve = operating_curve(stats)
    flagged = (curve.tp + curve.fp) > 0
    recall = curve.recall[flagged][::-1]
    precision = curve.precision[flagged][::-1]
    if recall.size == 0:
        return np.array([0.0]), np.array([1.0])
    prevalence = stats.positives / max(stats.positives + stats.negatives, 1)
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[precision[0]], precision, [prevalence]])
    return recall, precision


def plot_pr_curves(
    curves: Mapping[str, BinaryStats],
    path: str | Path,
    *,
    title: str,
    highlight: str | None = None,
    operating_points: Mapping[str, OperatingPoint] | None = None,
    xlabel: str = "recall",
    ylabel: str = "precision",
) -> Path | None:
    """Draw one precision-recall curve per entry of ``curves`` and save a PNG.

    Parameters
    ----------
    curves : Mapping[str, BinaryStats]
        Label -> test statistics (e.g. ``"federation (pooled)"`` and each site).
        Entries without positives are skipped; the legend gives each AUPRC.
    path : str or Path
        PNG file to write.
    title : str
        Figure title.
    highlight : str, optional
        Label drawn thick and black (the pooled curve).
    operating_points : Mapping[str, OperatingPoint], optional
        Label -> the point at the chosen threshold, drawn as a marker.
    xlabel, ylabel : str
        Axis labels (e.g. "recall (share of fraud caught)").

    Returns
    -------
    Path or None
        The PNG, or None if no curve could be drawn.
    """
    drawable = {k: v for k, v in curves.items() if v.positives and v.negatives}
    if not drawable:
        return None
    figure = Figure(figsize=(6.4, 5.0), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    auprc = METRICS["auprc"].from_stats
    points = operating_points or {}
    for label, stats in drawable.items():
        recall, precision = pr_points(stats)
        strong = label == highlight
        line = axes.step(
            recall,
            precision,
            where="post",
            linewidth=2.5 if strong else 1.2,
            color="black" if strong else None,
            alpha=1.0 if strong else 0.8,
            label=f"{label} (AUPRC {auprc(stats):.3f})",
        )[0]
        point = points.get(label)
        if point is not None and np.isfinite(point.precision):
            axes.plot(
                [point.recall],
                [point.precision],
                marker="o",
                markersize=8 if strong else 6,
                color=line.get_color(),
                markeredgecolor="black",
            )
    if points:
        axes.plot([], [], marker="o", linestyle="", color="grey",
                  markeredgecolor="black", label="chosen threshold")  # fmt: skip
    axes.set_xlim(0.0, 1.02)
    axes.set_ylim(0.0, 1.05)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    path = Path(path)
    # private (0600), atomic, a symlink at ``path`` replaced, never followed
    with atomic_open(path, "wb", overwrite=True) as handle:
        figure.savefig(handle, format=path.suffix.lstrip(".") or "png")
    return path
