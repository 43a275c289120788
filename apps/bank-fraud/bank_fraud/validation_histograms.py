"""What a bank adds to its evaluate reply for threshold selection.

Per-class histograms of its *validation* scores over the fixed bins of
:func:`flwr_ext.appkit.metrics.score_bin_edges` (keys ``val-hist-pos`` and
``val-hist-neg``): counts per bin, never a score or a row. The server reads them
back with :func:`validation_stats`, which parses a (possibly hostile) reply
totally and raises ``ValueError`` saying what is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from flwr_ext.appkit.metrics import BinaryStats

__all__ = [
    "KEY_VAL_NEG",
    "KEY_VAL_POS",
    "VAL_KEYS",
    "validation_metrics",
    "validation_stats",
]

#: MetricRecord keys of a site's validation-score histograms.
KEY_VAL_POS, KEY_VAL_NEG = "val-hist-pos", "val-hist-neg"
VAL_KEYS = (KEY_VAL_POS, KEY_VAL_NEG)


def validation_metrics(
    labels: np.ndarray, scores: np.ndarray, *, num_bins: int
) -> dict[str, list[int]]:
    """Return what a site adds to its evaluate reply: validation histograms."""
    stats = BinaryStats.from_scores(labels, scores, num_bins=num_bins)
    return {
        KEY_VAL_POS: [int(v) for v in stats.hist_pos],
        KEY_VAL_NEG: [int(v) for v in stats.hist_neg],
    }


def validation_stats(record: Mapping[str, Any]) -> BinaryStats:
    """Read a site's validation histograms; ``ValueError`` says what is wrong."""
    missing = [key for key in VAL_KEYS if key not in record]
    if missing:
        raise ValueError(f"missing validation histograms {missing}")
    hists = []
    for key in VAL_KEYS:
        value = record[key]
        if not isinstance(value, list) or len(value) < 2:
            raise ValueError(f"'{key}' must be a list of >= 2 counts")
        if not all(
            isinstance(v, (int, float))
            and not isinstance(v, bool)
            and math.isfinite(v)
            and v >= 0
            and v == int(v)
            for v in value
        ):
            raise ValueError(f"'{key}' must hold non-negative integer counts")
        hists.append([int(v) for v in value])
    positives, negatives = sum(hists[0]), sum(hists[1])
    return BinaryStats.from_metrics(
        {"tp": positives, "fn": 0, "fp": negatives, "tn": 0,
         "hist-pos": hists[0], "hist-neg": hists[1]}
    )  # fmt: skip
