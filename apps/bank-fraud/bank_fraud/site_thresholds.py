"""Each bank's metrics at its decision threshold, added to a run's history.

After the run, the ServerApp knows each round's threshold (pooled, or each
bank's own) and, through :class:`flwr_ext.appkit.recorder.RecordingGrid`
``(keep_lists=HISTOGRAM_KEYS)``, each bank's test and validation histograms.
:func:`add_site_threshold_metrics` adds every bank's precision, recall, F1 and
alert rate at its threshold to the history written to the results folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr_ext.appkit.metrics import (
    BinaryStats,
    OperatingPoint,
    counts_at,
    score_bin_edges,
)
from flwr_ext.appkit.recorder import RecordingGrid

from .thresholds import ThresholdRule, nearest_edge, own_threshold_index
from .validation_histograms import VAL_KEYS, validation_stats

__all__ = ["HISTOGRAM_KEYS", "SiteEvaluation", "add_site_threshold_metrics"]

#: Keys the RecordingGrid must keep (``keep_lists``) for
#: :func:`add_site_threshold_metrics`.
HISTOGRAM_KEYS = ("hist-pos", "hist-neg", *VAL_KEYS)


@dataclass(frozen=True)
class SiteEvaluation:
    """One site's test statistics in one round, and its point at the threshold."""

    test: BinaryStats
    point: OperatingPoint


def add_site_threshold_metrics(
    history: list[dict[str, Any]],
    grid: RecordingGrid,
    rule: ThresholdRule,
    *,
    selection: str = "federated",
) -> dict[int, dict[str, SiteEvaluation]]:
    """Add each site's metrics at its threshold to a run's history, in place.

    Parameters
    ----------
    history : list of dict
        :func:`flwr_ext.appkit.results.round_history` entries; each site's
        ``evaluate`` dict gains ``threshold``, ``precision``, ``recall``,
        ``f1``, ``alert-rate`` and ``fpr``, and its ``tp``, ``fp``, ``tn``,
        ``fn`` become the counts at that threshold.
    grid : RecordingGrid
        The grid the run went through, created with ``keep_lists=HISTOGRAM_KEYS``.
    rule : ThresholdRule
        The run's rule.
    selection : {"federated", "site"}
        ``"federated"``: every site at the round's aggregated ``threshold``;
        ``"site"``: each site at the threshold of its own validation rows.

    Returns
    -------
    dict
        Round -> site -> :class:`SiteEvaluation` (for curves of the final model).
    """
    out: dict[int, dict[str, SiteEvaluation]] = {}
    for entry in history:
        server_round = entry["round"]
        record = grid.phases.get("evaluate", {}).get(server_round)
        lists = grid.node_lists("evaluate", server_round)
        if record is None or not lists:
            continue
        threshold = (entry["aggregated"].get("evaluate") or {}).get("threshold")
        if selection == "federated" and threshold is None:
            continue  # no pooled threshold this round (no valid evaluation)
        for node_id, values in sorted(lists.items()):
            scalars = record.per_node.get(node_id, {})
            try:
                test = BinaryStats.from_metrics(
                    {**{k: scalars.get(k) for k in ("tp", "fp", "tn", "fn")},
                     **values}
                )  # fmt: skip
            except (ValueError, TypeError):
                continue
            val = None
            try:
                val = validation_stats(values)
            except ValueError:
                val = None
            if selection == "federated":
                edges = score_bin_edges(test.num_bins)
                point = counts_at(test, nearest_edge(edges, float(threshold)))
            else:
                point = counts_at(test, own_threshold_index(test.num_bins, val, rule))
            site = grid.site_of(node_id)
            metrics = entry["sites"].setdefault(site, {"node-id": node_id})
            metrics.setdefault("evaluate", {}).update(
                {**point.metrics(), **point.counts()}
            )
            out.setdefault(server_round, {})[site] = SiteEvaluation(test, point)
    return out
