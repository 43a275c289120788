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

from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Strategy,
)
from flwr.serverapp.strategy import Krum as FlowerKrum
from flwr.serverapp.strategy import MultiKrum as FlowerMultiKrum

from flwr_ext.aggregation import (
    AdaptiveRobustClipping,
    Bucketing,
    NearestNeighborMixing,
    PreAggregationChain,
)
from flwr_ext.strategy import (
    CenteredClipping,
    GeometricMedian,
    Krum,
    Median,
    MultiKrum,
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
    pre: Callable[[int], object] | None = None, radius_quantile: float = 0.5
) -> Callable:
    def build(n: int, f: int, _b: float) -> Strategy:
        return CenteredClipping(
            _fedavg(n),
            centre="previous",
            radius_quantile=radius_quantile,
            pre_aggregation=None if pre is None else pre(f),  # type: ignore[arg-type]
        )

    return build


def _arc(f: int) -> AdaptiveRobustClipping:
    return AdaptiveRobustClipping(f)


def _arc_nnm(f: int) -> PreAggregationChain:
    return PreAggregationChain([AdaptiveRobustClipping(f), NearestNeighborMixing(f)])


def _tm_arc_nnm(n: int, f: int, b: float) -> Strategy:
    return TrimmedMean(_fedavg(n), beta=b, pre_aggregation=_arc_nnm(f))


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
        "ours-trimmed-mean-arc-nnm-momentum",
        f"TrimmedMean + ARC + NNM + client momentum {MOMENTUM}",
        True,
        _tm_arc_nnm,
        client_momentum=MOMENTUM,
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
