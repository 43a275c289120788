"""ByzFL 0.0.11's own aggregators as a peer row of the robustness benchmark.

ByzFL (https://byzfl.epfl.ch, the EPFL library behind "Fixing by Mixing" and
ARC) ships numpy/torch aggregators and pre-aggregators. Its top-level package
imports torchvision (for its benchmark datasets), which this project does not
install; its ``byzfl.aggregators`` subpackage needs only numpy, scipy and torch.
:func:`load_aggregators` therefore registers a bare ``byzfl`` package object (no
``__init__`` run) and imports ``byzfl.aggregators`` from the installed files.

The peer strategy is ByzFL's recommended recipe, ``ARC(f) -> NNM(f) -> TrMean(f)``
(trimmed mean dropping ``f`` per side), run by ByzFL's code on the round's update
matrix. It sits behind flwr-ext's reply validation
(:class:`~flwr_ext.strategy.RobustAggregation`, which ByzFL does not have), so its
row measures ByzFL's aggregation, not Flower's parsing. Install with the
benchmark-only extra: ``pip install -e ".[bench]"`` (``byzfl==0.0.11``, installed
here with ``--no-deps``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable, Sequence

import numpy as np
from flwr.serverapp.strategy import Strategy

from flwr_ext.aggregation import AggregationRule
from flwr_ext.strategy import RobustAggregation

__all__ = ["ByzFLRule", "available", "byzfl_arc_nnm_trmean", "load_aggregators"]

VERSION = "0.0.11"


def available() -> bool:
    """Return True if the ``byzfl`` distribution is installed."""
    return importlib.util.find_spec("byzfl") is not None


def load_aggregators() -> types.ModuleType:
    """Import ``byzfl.aggregators`` without running ``byzfl/__init__.py``.

    Raises
    ------
    ImportError
        If ByzFL is not installed (``pip install byzfl==0.0.11``).
    """
    if "byzfl.aggregators" in sys.modules:
        return sys.modules["byzfl.aggregators"]
    spec = importlib.util.find_spec("byzfl")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("ByzFL is not installed: pip install byzfl==0.0.11")
    if "byzfl" not in sys.modules:
        package = types.ModuleType("byzfl")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["byzfl"] = package
    return importlib.import_module("byzfl.aggregators")


class ByzFLRule(AggregationRule):
    """ByzFL pre-aggregators then a ByzFL aggregator, as a flwr-ext rule.

    ByzFL's ARC clips the rows of the array it is given in place: the rule hands
    ByzFL a float64 copy, so the wrapper's guarantees (inputs unmodified, float64
    out) hold.
    """

    name = "byzfl"

    def __init__(
        self,
        label: str,
        pre: Sequence[Callable[[np.ndarray], np.ndarray]],
        aggregator: Callable[[np.ndarray], np.ndarray],
        min_rows: int,
    ) -> None:
        self.label = label
        self.pre = tuple(pre)
        self.aggregator = aggregator
        self.min_rows = min_rows

    def min_clients(self) -> int:
        """Fewest rows ByzFL's steps accept."""
        return self.min_rows

    def _params(self) -> dict[str, object]:
        return {"recipe": self.label}

    def _aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        rows = np.array(updates, dtype=np.float64, copy=True)
        for step in self.pre:
            rows = np.asarray(step(rows), dtype=np.float64)
        return np.asarray(self.aggregator(rows), dtype=np.float64)


def byzfl_arc_nnm_trmean(inner: Strategy, f: int) -> RobustAggregation:
    """ByzFL's ``ARC(f) -> NNM(f) -> TrMean(f)`` behind flwr-ext's validation."""
    agg = load_aggregators()
    rule = ByzFLRule(
        f"ARC({f}) -> NNM({f}) -> TrMean({f})",
        [agg.ARC(f=f), agg.NNM(f=f)],
        agg.TrMean(f=f),
        min_rows=2 * f + 1,
    )
    return RobustAggregation(inner, rule)
