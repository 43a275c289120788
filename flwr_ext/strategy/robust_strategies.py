"""Drop-in robust strategies: one line replaces ``FedAvg(...)`` in a ServerApp.

Each class is :class:`~flwr_ext.strategy.robust.RobustAggregation` with one rule
from :mod:`flwr_ext.aggregation`. The first argument is the Flower strategy to wrap
and defaults to ``FedAvg()``, so both forms work::

    strategy = TrimmedMean(beta=0.2)
    strategy = TrimmedMean(FedAdam(eta=0.01), beta=0.2, pre_aggregation="nnm",
                           num_byzantine=2)
"""

from __future__ import annotations

from typing import Literal

from flwr.serverapp.strategy import FedAvg, Strategy

from ..aggregation import (
    CenteredClippingRule,
    CoordinateMedian,
    GeometricMedianRule,
    KrumRule,
    PreAggregation,
    TrimmedMeanRule,
)
from ..aggregation.trimmed_mean import num_trimmed
from .robust import NamedPreAggregation, RobustAggregation, Weighting

__all__ = [
    "ROBUST_STRATEGIES",
    "CenteredClipping",
    "GeometricMedian",
    "Krum",
    "Median",
    "MultiKrum",
    "TrimmedMean",
]

PreAggregationArg = PreAggregation | NamedPreAggregation | None

_COMMON_DOC = """    strategy : Strategy, optional
        Flower strategy to wrap (sampling, config, server optimiser, evaluation).
        Defaults to ``FedAvg()``.
    pre_aggregation : "nnm", PreAggregation or None (default: None)
        ``"nnm"`` applies nearest-neighbour mixing before the rule (recommended on
        non-IID data; needs ``num_byzantine``).
    weighting : {"uniform", "capped"} (default: "uniform")
        Claimed ``num-examples`` are not trusted: see
        :class:`~flwr_ext.strategy.robust.RobustAggregation`.
    weight_cap : float (default: 2.0)
        Cap, in multiples of the median claim, for ``weighting="capped"``.
    discount_rejected : bool (default: True)
        Replies rejected for their content prove their senders Byzantine, so
        ``f``-based rules run with ``f`` minus their number for that round: see
        :class:`~flwr_ext.strategy.robust.RobustAggregation`.
"""


class Krum(RobustAggregation):
    """Krum: the single update closest to its ``n - f - 2`` nearest neighbours.

    Parameters
    ----------
    num_byzantine : int (default: 1)
        ``f``, Byzantine clients to tolerate; a round needs ``2f + 3`` valid
        replies, or it keeps the previous global model.
    """

    __doc__ = (__doc__ or "") + _COMMON_DOC

    def __init__(
        self,
        strategy: Strategy | None = None,
        *,
        num_byzantine: int = 1,
        pre_aggregation: PreAggregationArg = None,
        weighting: Weighting = "uniform",
        weight_cap: float = 2.0,
        discount_rejected: bool = True,
    ) -> None:
        super().__init__(
            strategy if strategy is not None else FedAvg(),
            KrumRule(num_byzantine, num_selected=1),
            pre_aggregation=pre_aggregation,
            num_byzantine=num_byzantine,
            weighting=weighting,
            weight_cap=weight_cap,
            discount_rejected=discount_rejected,
        )


class MultiKrum(RobustAggregation):
    """Multi-Krum: the mean of the ``m`` updates with the lowest Krum scores.

    Parameters
    ----------
    num_byzantine : int (default: 1)
        ``f``; a round needs ``2f + 3`` valid replies.
    num_selected : int or None (default: None)
        ``m``; ``None`` selects ``n - f`` of the round's ``n`` valid replies.
    """

    __doc__ = (__doc__ or "") + _COMMON_DOC

    def __init__(
        self,
        strategy: Strategy | None = None,
        *,
        num_byzantine: int = 1,
        num_selected: int | None = None,
        pre_aggregation: PreAggregationArg = None,
        weighting: Weighting = "uniform",
        weight_cap: float = 2.0,
        discount_rejected: bool = True,
    ) -> None:
        super().__init__(
            strategy if strategy is not None else FedAvg(),
            KrumRule(num_byzantine, num_selected=num_selected),
            pre_aggregation=pre_aggregation,
            num_byzantine=num_byzantine,
            weighting=weighting,
            weight_cap=weight_cap,
            discount_rejected=discount_rejected,
        )


class TrimmedMean(RobustAggregation):
    """Coordinate-wise trimmed mean.

    Parameters
    ----------
    beta : float (default: 0.2)
        Fraction trimmed from each end of every coordinate, in ``[0, 0.5)``.
    num_byzantine : int or None (default: None)
        Needed only with ``pre_aggregation="nnm"``.
    """

    __doc__ = (__doc__ or "") + _COMMON_DOC

    def __init__(
        self,
        strategy: Strategy | None = None,
        *,
        beta: float = 0.2,
        num_byzantine: int | None = None,
        pre_aggregation: PreAggregationArg = None,
        weighting: Weighting = "uniform",
        weight_cap: float = 2.0,
        discount_rejected: bool = True,
    ) -> None:
        super().__init__(
            strategy if strategy is not None else FedAvg(),
            TrimmedMeanRule(beta),
            pre_aggregation=pre_aggregation,
            num_byzantine=num_byzantine,
            weighting=weighting,
            weight_cap=weight_cap,
            discount_rejected=discount_rejected,
        )
        self.beta = beta

    def trimmed_per_side(self, num_replies: int) -> int:
        """Return how many updates each end of a coordinate loses for ``num_replies``.

        ``0`` means the rule would be plain averaging for that many replies.
        """
        return num_trimmed(self.beta, num_replies)


class Median(RobustAggregation):
    """Coordinate-wise median.

    Parameters
    ----------
    num_byzantine : int or None (default: None)
        Needed only with ``pre_aggregation="nnm"``.
    """

    __doc__ = (__doc__ or "") + _COMMON_DOC

    def __init__(
        self,
        strategy: Strategy | None = None,
        *,
        num_byzantine: int | None = None,
        pre_aggregation: PreAggregationArg = None,
        weighting: Weighting = "uniform",
        weight_cap: float = 2.0,
        discount_rejected: bool = True,
    ) -> None:
        super().__init__(
            strategy if strategy is not None else FedAvg(),
            CoordinateMedian(),
            pre_aggregation=pre_aggregation,
            num_byzantine=num_byzantine,
            weighting=weighting,
            weight_cap=weight_cap,
            discount_rejected=discount_rejected,
        )


class GeometricMedian(RobustAggregation):
    """Geometric median by smoothed Weiszfeld (RFA).

    Parameters
    ----------
    max_iter : int (default: 100)
        Cap on Weiszfeld iterations.
    tol : float (default: 1e-7)
        Iteration stops when a step moves the estimate by less than ``tol`` times
        the weighted mean distance from the estimate to the updates.
    num_byzantine : int or None (default: None)
        Needed only with ``pre_aggregation="nnm"``.
    """

    __doc__ = (__doc__ or "") + _COMMON_DOC

    def __init__(
        self,
        strategy: Strategy | None = None,
        *,
        max_iter: int = 100,
        tol: float = 1e-7,
        num_byzantine: int | None = None,
        pre_aggregation: PreAggregationArg = None,
        weighting: Weighting = "uniform",
        weight_cap: float = 2.0,
        discount_rejected: bool = True,
    ) -> None:
        super().__init__(
            strategy if strategy is not None else FedAvg(),
            GeometricMedianRule(max_iter=max_iter, tol=tol),
            pre_aggregation=pre_aggregation,
            num_byzantine=num_byzantine,
            weighting=weighting,
            weight_cap=weight_cap,
            discount_rejected=discount_rejected,
        )


class CenteredClipping(RobustAggregation):
    """Centered clipping (Karimireddy et al., 2021).

    Parameters
    ----------
    tau : float or None (default: None)
        Clipping radius (L2 norm of an update); ``None`` adapts it each iteration
        to the median distance to the centre.
    iterations : int (default: 3)
        Clipping iterations per round.
    centre : {"median", "previous"} (default: "median")
        ``"previous"`` clips around the previous round's aggregate, which the
        strategy keeps across rounds (:meth:`export_state` /
        :meth:`import_state` save and restore it with the run).
    radius_quantile : float in (0, 1] (default: 0.5)
        With ``tau=None``, the radius is this quantile of the distances to the
        centre (0.5: the median; smaller clips more rows).
    num_byzantine : int or None (default: None)
        Needed only with ``pre_aggregation="nnm"``.
    """

    __doc__ = (__doc__ or "") + _COMMON_DOC

    def __init__(
        self,
        strategy: Strategy | None = None,
        *,
        tau: float | None = None,
        iterations: int = 3,
        centre: Literal["median", "previous"] = "median",
        radius_quantile: float = 0.5,
        num_byzantine: int | None = None,
        pre_aggregation: PreAggregationArg = None,
        weighting: Weighting = "uniform",
        weight_cap: float = 2.0,
        discount_rejected: bool = True,
    ) -> None:
        super().__init__(
            strategy if strategy is not None else FedAvg(),
            CenteredClippingRule(
                tau=tau,
                iterations=iterations,
                centre=centre,
                radius_quantile=radius_quantile,
            ),
            pre_aggregation=pre_aggregation,
            num_byzantine=num_byzantine,
            weighting=weighting,
            weight_cap=weight_cap,
            discount_rejected=discount_rejected,
        )


#: Run-config names of the drop-in robust strategies (used by the app templates).
ROBUST_STRATEGIES: dict[str, type[RobustAggregation]] = {
    "krum": Krum,
    "multi-krum": MultiKrum,
    "trimmed-mean": TrimmedMean,
    "median": Median,
    "geometric-median": GeometricMedian,
    "centered-clipping": CenteredClipping,
}
