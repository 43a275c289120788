"""Several pre-aggregation steps in a row, e.g. ARC then NNM.

Allouah et al. (2024) recommend clipping (ARC) before nearest-neighbour mixing and
a robust rule; :class:`PreAggregationChain` composes any steps so that the chain is
itself one :class:`~flwr_ext.aggregation.base.PreAggregation` the strategy wrapper
accepts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import PreAggregation

__all__ = ["PreAggregationChain"]


class PreAggregationChain(PreAggregation):
    """Apply ``steps`` in order; each sees the previous step's output.

    Parameters
    ----------
    steps : sequence of PreAggregation
        At least one step.
    """

    name = "chain"

    def __init__(self, steps: Sequence[PreAggregation]) -> None:
        steps = tuple(steps)
        if not steps:
            raise ValueError("PreAggregationChain needs at least one step")
        for step in steps:
            if not isinstance(step, PreAggregation):
                raise TypeError(
                    f"every step must be a PreAggregation, got {type(step).__name__}"
                )
        self.steps: tuple[PreAggregation, ...] = steps

    def min_clients(self) -> int:
        """Return the largest ``min_clients`` of the steps."""
        return max(step.min_clients() for step in self.steps)

    def excluding_faulty(self, num_excluded: int) -> PreAggregationChain:
        """Return the chain of each step's ``excluding_faulty``."""
        steps = tuple(s.excluding_faulty(num_excluded) for s in self.steps)
        if all(a is b for a, b in zip(steps, self.steps, strict=True)):
            return self
        return PreAggregationChain(steps)

    def transform(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Run every step in turn; the input is never modified."""
        out = updates
        for step in self.steps:
            out = step.transform(out, weights)
        return out

    def __repr__(self) -> str:
        return f"PreAggregationChain([{', '.join(map(repr, self.steps))}])"
