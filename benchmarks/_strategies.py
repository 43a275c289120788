"""The strategies the robustness benchmark compares, built for ``n`` clients and ``f``.

Flower's built-ins are configured the way their docstrings ask (``f`` as
``num_malicious_nodes``, ``beta = f / n`` for the trimmed mean); ours are the
drop-in classes of :mod:`flwr_ext.strategy` wrapping a plain ``FedAvg``, each with
and without nearest-neighbour mixing. Every strategy skips federated evaluation
(the benchmark evaluates the global model on the server).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    Strategy,
)
from flwr.serverapp.strategy import Krum as FlowerKrum
from flwr.serverapp.strategy import MultiKrum as FlowerMultiKrum

from flwr_ext.aggregation import (
    AdaptiveRobustClipping,
    AggregationResult,
    Bucketing,
    CenteredClippingRule,
    MedianNormEqualization,
    NearestNeighborMixing,
    PreAggregationChain,
)
from flwr_ext.strategy import (
    CenteredClipping,
    GeometricMedian,
    Krum,
    Median,
    MultiKrum,
    RobustAggregation,
    TrimmedMean,
)

__all__ = ["STRATEGIES", "StrategyConfig", "strategy_config"]


@dataclass(frozen=True)
class StrategyConfig:
    """One row of the results table.

    Attributes
    ----------
    key : str
        Command-line id, e.g. ``ours-trimmed-mean-nnm``.
    label : str
        Row label in tables and plots.
    ours : bool
        True for flwr-ext strategies.
    build : Callable[[int, int, float], Strategy]
        ``build(num_clients, num_byzantine, fraction)``; a fresh strategy per run.
    client_momentum : float or None
        ``beta`` of :func:`flwr_ext.mods.momentum_mod` on every client (the
        defence has a client half); None: no momentum.
    """

    key: str
    label: str
    ours: bool
    build: Callable[[int, int, float], Strategy]
    client_momentum: float | None = None


def _common(n: int) -> dict:
    return {"fraction_evaluate": 0.0, "min_available_nodes": n}


def _fedavg(n: int) -> FedAvg:
    return FedAvg(**_common(n))


def _bulyan(n: int, f: int, _fraction: float) -> Bulyan:
    # Bulyan needs n >= 4f + 3 valid replies; beyond that it never aggregates, so
    # it gets the largest f it is defined for (4 of 20).
    return Bulyan(**_common(n), num_malicious_nodes=min(f, (n - 3) // 4))


_FLOWER: list[StrategyConfig] = [
    StrategyConfig("flwr-fedavg", "FedAvg (Flower)", False, lambda n, f, b: _fedavg(n)),
    StrategyConfig(
        "flwr-fedadam", "FedAdam (Flower)", False, lambda n, f, b: FedAdam(**_common(n))
    ),
    StrategyConfig(
        "flwr-krum",
        "Krum (Flower)",
        False,
        lambda n, f, b: FlowerKrum(**_common(n), num_malicious_nodes=f),
    ),
    StrategyConfig(
        "flwr-multikrum",
        "MultiKrum (Flower)",
        False,
        lambda n, f, b: FlowerMultiKrum(
            **_common(n), num_malicious_nodes=f, num_nodes_to_select=n - f
        ),
    ),
    StrategyConfig("flwr-bulyan", "Bulyan (Flower)", False, _bulyan),
    StrategyConfig(
        "flwr-trimmedavg",
        "FedTrimmedAvg (Flower)",
        False,
        lambda n, f, b: FedTrimmedAvg(**_common(n), beta=b),
    ),
    StrategyConfig(
        "flwr-median",
        "FedMedian (Flower)",
        False,
        lambda n, f, b: FedMedian(**_common(n)),
    ),
]


def _ours(
    key: str, label: str, make: Callable[..., Strategy], **fixed: object
) -> list[StrategyConfig]:
    """Our strategy ``make`` without and with NNM."""

    def plain(n: int, f: int, b: float) -> Strategy:
        return make(_fedavg(n), **_params(fixed, f, b))

    def nnm(n: int, f: int, b: float) -> Strategy:
        params = _params(fixed, f, b)
        params["num_byzantine"] = f
        return make(_fedavg(n), pre_aggregation="nnm", **params)

    return [
        StrategyConfig(f"ours-{key}", label, True, plain),
        StrategyConfig(f"ours-{key}-nnm", f"{label} + NNM", True, nnm),
    ]


def _params(fixed: dict, f: int, b: float) -> dict:
    """Resolve the placeholders ``"f"`` and ``"fraction"`` in fixed parameters."""
    resolved = {"f": f, "fraction": b}
    return {
        k: resolved.get(v, v) if isinstance(v, str) else v for k, v in fixed.items()
    }


_OURS: list[StrategyConfig] = [
    *_ours("krum", "Krum", Krum, num_byzantine="f"),
    *_ours("multikrum", "MultiKrum", MultiKrum, num_byzantine="f"),
    *_ours("trimmed-mean", "TrimmedMean", TrimmedMean, beta="fraction"),
    *_ours("median", "Median", Median),
    *_ours("geometric-median", "GeometricMedian", GeometricMedian),
    *_ours("centered-clipping", "CenteredClipping", CenteredClipping),
]

#: Client momentum ``beta`` of the momentum rows (see docs/robustness.md).
MOMENTUM = 0.5


def _cc_previous(
    pre: Callable[[int], object] | None = None,
    radius_quantile: float = 0.5,
    iterations: int = 3,
    opposed: bool = False,
) -> Callable:
    def build(n: int, f: int, _b: float) -> Strategy:
        pre_aggregation = None if pre is None else pre(f)
        if opposed:
            return RobustAggregation(
                _fedavg(n),
                OpposedFilterCC(
                    f, radius_quantile=radius_quantile, iterations=iterations
                ),
                pre_aggregation=pre_aggregation,  # type: ignore[arg-type]
            )
        return CenteredClipping(
            _fedavg(n),
            centre="previous",
            radius_quantile=radius_quantile,
            iterations=iterations,
            pre_aggregation=pre_aggregation,  # type: ignore[arg-type]
        )

    return build


class OpposedFilterCC(CenteredClippingRule):
    """CC around the previous aggregate after dropping rows that oppose it.

    A rejected candidate, kept to reproduce docs/robustness.md.

    Rows whose inner product with the previous aggregate is negative are
    dropped, the most negative first, at most ``max_opposed`` a round (never
    all), then centered clipping runs on the rest (``centre="previous"``).
    It beats every attack of the benchmark that ignores it (the line-searched
    IPM's rows all oppose the honest mean), and collapses under
    ``ipm-opt-evasive``, which removes that opposition: the honest rows it
    then drops raise the Byzantine share. Benchmark-only for that reason.
    """

    def __init__(
        self, max_opposed: int, *, radius_quantile: float = 0.5, iterations: int = 3
    ) -> None:
        super().__init__(
            centre="previous", radius_quantile=radius_quantile, iterations=iterations
        )
        self.max_opposed = max_opposed

    def min_clients(self) -> int:
        """``max_opposed + 1``: a round never drops every row."""
        return self.max_opposed + 1

    def excluding_faulty(self, num_excluded: int) -> OpposedFilterCC:
        """Drop up to ``num_excluded`` fewer opposed rows."""
        if num_excluded <= 0:
            return self
        return OpposedFilterCC(
            max(0, self.max_opposed - num_excluded),
            radius_quantile=self.radius_quantile,
            iterations=self.iterations,
        )

    def aggregate_stateful(
        self,
        updates: np.ndarray,
        weights: np.ndarray,
        state: np.ndarray | None,
        *,
        overwrite_updates: bool = False,
        check_finite: bool = True,
    ) -> tuple[AggregationResult, np.ndarray | None]:
        """Drop the opposed rows, then clip around ``state`` (see the class)."""
        keep = np.ones(len(updates), dtype=bool)
        if isinstance(state, np.ndarray) and state.shape == (updates.shape[1],):
            keep = opposed_filter(np.asarray(updates), state, self.max_opposed)
        result, new_state = super().aggregate_stateful(
            updates[keep], np.asarray(weights)[keep], state, check_finite=check_finite
        )
        return AggregationResult(result.value, keep), new_state


def opposed_filter(
    updates: np.ndarray, reference: np.ndarray, max_dropped: int
) -> np.ndarray:
    """Mask of the rows kept: up to ``max_dropped`` rows opposing ``reference`` go.

    A row opposes the reference when its inner product with it is negative; the
    most negative go first, never every row. A zero or non-finite reference
    keeps every row.
    """
    n = updates.shape[0]
    keep = np.ones(n, dtype=bool)
    norm = float(np.linalg.norm(reference))
    if max_dropped <= 0 or not np.isfinite(norm) or norm == 0.0:
        return keep
    with np.errstate(over="ignore", invalid="ignore"):
        proj = np.nan_to_num(updates @ (reference / norm), nan=0.0)
    order = np.argsort(proj, kind="stable")[: min(max_dropped, n - 1)]
    keep[order[proj[order] < 0.0]] = False
    return keep


def _arc(f: int) -> AdaptiveRobustClipping:
    return AdaptiveRobustClipping(f)


def _arc_nnm(f: int) -> PreAggregationChain:
    return PreAggregationChain([AdaptiveRobustClipping(f), NearestNeighborMixing(f)])


def _tm_arc_nnm(n: int, f: int, b: float) -> Strategy:
    return TrimmedMean(_fedavg(n), beta=b, pre_aggregation=_arc_nnm(f))


def _fedavgm_at(lr: float, momentum: float = 0.9) -> Callable[[int], FedAvgM]:
    """Flower's FedAvgM with server learning rate ``lr`` and ``momentum``."""
    return lambda n: FedAvgM(
        **_common(n), server_learning_rate=lr, server_momentum=momentum
    )


def _tm_arc_nnm_server(lr: float, momentum: float) -> Callable:
    """TrimmedMean + ARC + NNM around Flower's FedAvgM (server step / momentum)."""
    inner = _fedavgm_at(lr, momentum)

    def build(n: int, f: int, b: float) -> Strategy:
        return TrimmedMean(inner(n), beta=b, pre_aggregation=_arc_nnm(f))

    return build


#: Flower's FedAvgM as the server-momentum rows use it (momentum 0.9, lr 0.5).
_fedavgm = _fedavgm_at(0.5)


def _tm_arc_nnm_over(extra: int) -> Callable:
    """TrimmedMean + ARC + NNM built for ``f + extra`` (over-estimating ``f``)."""

    def build(n: int, f: int, _b: float) -> Strategy:
        g = f + extra
        return TrimmedMean(_fedavg(n), beta=g / n, pre_aggregation=_arc_nnm(g))

    return build


def _normeq_nnm(f: int) -> PreAggregationChain:
    return PreAggregationChain([MedianNormEqualization(), NearestNeighborMixing(f)])


def _tm_normeq(
    inner: Callable[[int], Strategy], *, nnm: bool = True, trim: bool = True
) -> Callable[[int, int, float], Strategy]:
    """TrimmedMean (or, ``trim=False``, the mean) after norm equalization (+ NNM)."""

    def build(n: int, f: int, b: float) -> Strategy:
        pre = _normeq_nnm(f) if nnm else MedianNormEqualization()
        return TrimmedMean(inner(n), beta=b if trim else 0.0, pre_aggregation=pre)

    return build


def _tm_arc_clips_more(
    inner: Callable[[int], Strategy], arc_extra: int, *, trim: bool = True
) -> Callable[[int, int, float], Strategy]:
    """TrimmedMean (or the mean) + ARC for ``f + arc_extra`` + NNM for ``f``.

    Only ARC is built for more rows (it clips more); :func:`_tm_arc_nnm_over`
    builds every stage for ``f + extra``.
    """

    def build(n: int, f: int, b: float) -> Strategy:
        pre = PreAggregationChain(
            [AdaptiveRobustClipping(f + arc_extra), NearestNeighborMixing(f)]
        )
        return TrimmedMean(inner(n), beta=b if trim else 0.0, pre_aggregation=pre)

    return build


def _fedadam_adaptive(n: int) -> FedAdam:
    """Flower's FedAdam with the step the screen used (eta 0.03, tau 1e-9)."""
    return FedAdam(**_common(n), eta=0.03, tau=1e-9)


_ADAPTIVE_DEFENCES: list[StrategyConfig] = [
    StrategyConfig("ours-cc-previous", "CC (previous centre)", True, _cc_previous()),
    StrategyConfig(
        "ours-cc-previous-arc", "CC (previous) + ARC", True, _cc_previous(_arc)
    ),
    StrategyConfig(
        "ours-cc-previous-arc-q40",
        "CC (previous, radius q=0.4) + ARC",
        True,
        _cc_previous(_arc, radius_quantile=0.4),
    ),
    StrategyConfig(
        "ours-cc-previous-arc-q40-momentum",
        f"CC (previous, radius q=0.4) + ARC + client momentum {MOMENTUM}",
        True,
        _cc_previous(_arc, radius_quantile=0.4),
        client_momentum=MOMENTUM,
    ),
    StrategyConfig(
        "ours-cc-previous-arc-q40-opposed",
        "CC (previous, radius q=0.4, drop opposed) + ARC",
        True,
        _cc_previous(_arc, radius_quantile=0.4, opposed=True),
    ),
    StrategyConfig(
        "ours-cc-previous-arc-q40-l1",
        "CC (previous, radius q=0.4, L=1) + ARC",
        True,
        _cc_previous(_arc, radius_quantile=0.4, iterations=1),
    ),
    StrategyConfig(
        "ours-cc-previous-arc-q40-l10",
        "CC (previous, radius q=0.4, L=10) + ARC",
        True,
        _cc_previous(_arc, radius_quantile=0.4, iterations=10),
    ),
    StrategyConfig(
        "ours-cc-previous-arc-q40-momentum09",
        "CC (previous, radius q=0.4) + ARC + client momentum 0.9",
        True,
        _cc_previous(_arc, radius_quantile=0.4),
        client_momentum=0.9,
    ),
    StrategyConfig(
        "ours-cc-previous-arc-nnm",
        "CC (previous) + ARC + NNM",
        True,
        _cc_previous(_arc_nnm),
    ),
    StrategyConfig(
        "ours-cc-previous-bucketing",
        "CC (previous) + bucketing s=2",
        True,
        _cc_previous(lambda f: Bucketing(2)),
    ),
    StrategyConfig(
        "ours-cc-previous-momentum",
        f"CC (previous) + client momentum {MOMENTUM}",
        True,
        _cc_previous(),
        client_momentum=MOMENTUM,
    ),
    StrategyConfig(
        "ours-cc-previous-arc-momentum",
        f"CC (previous) + ARC + client momentum {MOMENTUM}",
        True,
        _cc_previous(_arc),
        client_momentum=MOMENTUM,
    ),
    StrategyConfig(
        "ours-trimmed-mean-arc-nnm", "TrimmedMean + ARC + NNM", True, _tm_arc_nnm
    ),
    StrategyConfig(
        "ours-trimmed-mean-arc",
        "TrimmedMean + ARC",
        True,
        lambda n, f, b: TrimmedMean(_fedavg(n), beta=b, pre_aggregation=_arc(f)),
    ),
    StrategyConfig(
        "ours-trimmed-mean-arc-nnm-momentum",
        f"TrimmedMean + ARC + NNM + client momentum {MOMENTUM}",
        True,
        _tm_arc_nnm,
        client_momentum=MOMENTUM,
    ),
    # Candidates of the f = 30 % search after the evasive attacks
    # (docs/robustness.md, validation candidate table).
    StrategyConfig(
        "ours-trimmed-mean-arc-nnm-momentum09",
        "TrimmedMean + ARC + NNM + client momentum 0.9",
        True,
        _tm_arc_nnm,
        client_momentum=0.9,
    ),
    StrategyConfig(
        "ours-trimmed-mean-arc-nnm-fedavgm05",
        "TrimmedMean + ARC + NNM, FedAvgM (server momentum 0.5)",
        True,
        _tm_arc_nnm_server(1.0, 0.5),
    ),
    StrategyConfig(
        "ours-trimmed-mean-arc-nnm-fedavgm09",
        "TrimmedMean + ARC + NNM, FedAvgM (server momentum 0.9, lr 0.1)",
        True,
        _tm_arc_nnm_server(0.1, 0.9),
    ),
    StrategyConfig(
        "ours-trimmed-mean-arc-nnm-fedavgm09-lr1",
        "TrimmedMean + ARC + NNM, FedAvgM (server momentum 0.9, lr 1)",
        True,
        _tm_arc_nnm_server(1.0, 0.9),
    ),
    StrategyConfig(
        "ours-trimmed-mean-arc-nnm-fedavgm07-lr1",
        "TrimmedMean + ARC + NNM, FedAvgM (server momentum 0.7, lr 1)",
        True,
        _tm_arc_nnm_server(1.0, 0.7),
    ),
    StrategyConfig(
        "ours-trimmed-mean-arc-nnm-fedavgm09-lr05",
        "TrimmedMean + ARC + NNM, FedAvgM (server momentum 0.9, lr 0.5)",
        True,
        _tm_arc_nnm_server(0.5, 0.9),
    ),
    StrategyConfig(
        "ours-trimmed-mean-arc-nnm-fedavgm095-lr1",
        "TrimmedMean + ARC + NNM, FedAvgM (server momentum 0.95, lr 1)",
        True,
        _tm_arc_nnm_server(1.0, 0.95),
    ),
    StrategyConfig(
        "ours-trimmed-mean-arc-nnm-fedavgm08-lr1",
        "TrimmedMean + ARC + NNM, FedAvgM (server momentum 0.8, lr 1)",
        True,
        _tm_arc_nnm_server(1.0, 0.8),
    ),
    StrategyConfig(
        "ours-trimmed-mean-arc-nnm-fedavgm09-lr03",
        "TrimmedMean + ARC + NNM, FedAvgM (server momentum 0.9, lr 0.3)",
        True,
        _tm_arc_nnm_server(0.3, 0.9),
    ),
    StrategyConfig(
        "ours-trimmed-mean-arc-nnm-slr2",
        "TrimmedMean + ARC + NNM, server learning rate 2",
        True,
        _tm_arc_nnm_server(2.0, 0.0),
    ),
    StrategyConfig(
        "ours-trimmed-mean-arc-nnm-slr5",
        "TrimmedMean + ARC + NNM, server learning rate 5",
        True,
        _tm_arc_nnm_server(5.0, 0.0),
    ),
    StrategyConfig(
        "ours-trimmed-mean-arc-fedavgm09-lr05",
        "TrimmedMean + ARC, FedAvgM (server momentum 0.9, lr 0.5)",
        True,
        lambda n, f, b: TrimmedMean(_fedavgm(n), beta=b, pre_aggregation=_arc(f)),
    ),
    StrategyConfig(
        "ours-trimmed-mean-arc-nnm-f1-fedavgm09-lr05",
        "TrimmedMean + ARC + NNM built for f + 1, FedAvgM (momentum 0.9, lr 0.5)",
        True,
        lambda n, f, b: TrimmedMean(
            _fedavgm(n), beta=(f + 1) / n, pre_aggregation=_arc_nnm(f + 1)
        ),
    ),
    StrategyConfig(
        "ours-median-arc-nnm-fedavgm09-lr05",
        "Median + ARC + NNM, FedAvgM (server momentum 0.9, lr 0.5)",
        True,
        lambda n, f, b: Median(_fedavgm(n), pre_aggregation=_arc_nnm(f)),
    ),
    StrategyConfig(
        "ours-cc-previous-arc-nnm-fedavgm09-lr05",
        "CC (previous) + ARC + NNM, FedAvgM (server momentum 0.9, lr 0.5)",
        True,
        lambda n, f, b: CenteredClipping(
            _fedavgm(n), centre="previous", pre_aggregation=_arc_nnm(f)
        ),
    ),
    StrategyConfig(
        "ours-cc-previous-arc-q40-fedavgm09-lr05",
        "CC (previous, radius q=0.4) + ARC, FedAvgM (server momentum 0.9, lr 0.5)",
        True,
        lambda n, f, b: CenteredClipping(
            _fedavgm(n),
            centre="previous",
            radius_quantile=0.4,
            pre_aggregation=_arc(f),
        ),
    ),
    StrategyConfig(
        "ours-trimmed-mean-f2-arc-nnm-fedavgm09-lr05",
        "TrimmedMean trimming f + 2 + ARC + NNM, FedAvgM (momentum 0.9, lr 0.5)",
        True,
        lambda n, f, b: TrimmedMean(
            _fedavgm(n), beta=(f + 2) / n, pre_aggregation=_arc_nnm(f)
        ),
    ),
    StrategyConfig(
        "ours-trimmed-mean-arc-f2-nnm-fedavgm09-lr05",
        "TrimmedMean + ARC clipping for f + 2 + NNM, FedAvgM (momentum 0.9, lr 0.5)",
        True,
        _tm_arc_clips_more(_fedavgm, 2),
    ),
    StrategyConfig(
        "ours-trimmed-mean-arc-f4-nnm-fedavgm09-lr05",
        "TrimmedMean + ARC clipping for f + 4 + NNM, FedAvgM (momentum 0.9, lr 0.5)",
        True,
        _tm_arc_clips_more(_fedavgm, 4),
    ),
    StrategyConfig(
        "ours-trimmed-mean-arc-f4-nnm",
        "TrimmedMean + ARC clipping for f + 4 + NNM",
        True,
        _tm_arc_clips_more(_fedavg, 4),
    ),
    StrategyConfig(
        "ours-mean-arc-f4-nnm-fedavgm09-lr05",
        "Mean + ARC clipping for f + 4 + NNM, FedAvgM (momentum 0.9, lr 0.5)",
        True,
        _tm_arc_clips_more(_fedavgm, 4, trim=False),
    ),
    StrategyConfig(
        "ours-trimmed-mean-arc-f4-nnm-fedadam",
        "TrimmedMean + ARC clipping for f + 4 + NNM, FedAdam (eta 0.03, tau 1e-9)",
        True,
        _tm_arc_clips_more(_fedadam_adaptive, 4),
    ),
    StrategyConfig(
        "ours-trimmed-mean-normeq",
        "TrimmedMean + norm equalization, FedAvgM (momentum 0.9, lr 0.5)",
        True,
        _tm_normeq(_fedavgm, nnm=False),
    ),
    StrategyConfig(
        "ours-trimmed-mean-normeq-nnm",
        "TrimmedMean + norm equalization + NNM",
        True,
        _tm_normeq(_fedavg),
    ),
    *(
        StrategyConfig(
            f"ours-trimmed-mean-normeq-nnm-fedavgm09-lr{tag}",
            f"TrimmedMean + norm equalization + NNM, FedAvgM (momentum 0.9, lr {lr})",
            True,
            _tm_normeq(_fedavgm_at(lr)),
        )
        for tag, lr in (("03", 0.3), ("05", 0.5), ("1", 1.0))
    ),
    StrategyConfig(
        "ours-mean-normeq-nnm-fedavgm09-lr05",
        "Mean + norm equalization + NNM, FedAvgM (momentum 0.9, lr 0.5)",
        True,
        _tm_normeq(_fedavgm, trim=False),
    ),
    StrategyConfig(
        "ours-trimmed-mean-arc-nnm-slr05",
        "TrimmedMean + ARC + NNM, server learning rate 0.5",
        True,
        _tm_arc_nnm_server(0.5, 0.0),
    ),
    StrategyConfig(
        "ours-trimmed-mean-arc-nnm-f1",
        "TrimmedMean + ARC + NNM built for f + 1",
        True,
        _tm_arc_nnm_over(1),
    ),
    StrategyConfig(
        "ours-trimmed-mean-arc-nnm-f2",
        "TrimmedMean + ARC + NNM built for f + 2",
        True,
        _tm_arc_nnm_over(2),
    ),
    StrategyConfig(
        "ours-median-arc-nnm",
        "Median + ARC + NNM",
        True,
        lambda n, f, b: Median(_fedavg(n), pre_aggregation=_arc_nnm(f)),
    ),
    StrategyConfig(
        "ours-geometric-median-arc-nnm",
        "GeometricMedian + ARC + NNM",
        True,
        lambda n, f, b: GeometricMedian(_fedavg(n), pre_aggregation=_arc_nnm(f)),
    ),
    StrategyConfig(
        "ours-cc-previous-arc-nnm-momentum09",
        "CC (previous) + ARC + NNM + client momentum 0.9",
        True,
        _cc_previous(_arc_nnm),
        client_momentum=0.9,
    ),
]


def _byzfl(n: int, f: int, _b: float) -> Strategy:
    from benchmarks._byzfl import byzfl_arc_nnm_trmean

    return byzfl_arc_nnm_trmean(_fedavg(n), f)


_PEERS: list[StrategyConfig] = [
    StrategyConfig(
        "byzfl-arc-nnm-trmean", "ByzFL 0.0.11: ARC + NNM + TrMean", False, _byzfl
    ),
]

#: Every configuration, Flower's first, in table order.
STRATEGIES: tuple[StrategyConfig, ...] = (
    *_FLOWER,
    *_OURS,
    *_ADAPTIVE_DEFENCES,
    *_PEERS,
)


def strategy_config(key: str) -> StrategyConfig:
    """Look up a configuration by its key (the error lists the valid keys)."""
    for config in STRATEGIES:
        if config.key == key:
            return config
    raise KeyError(
        f"unknown strategy {key!r}; choose from {', '.join(s.key for s in STRATEGIES)}"
    )
