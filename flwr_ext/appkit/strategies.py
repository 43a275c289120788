"""Build the server strategy chain an app's run config asks for (ServerApp only).

The run-config keys and their own checks live in
:mod:`flwr_ext.appkit.strategy_options` (light: every ClientApp validates them);
this module imports every wrapper, the DP ones (Opacus) and the CKKS one included,
and is imported by ServerApps only.

One name -> builder table (:data:`BUILDERS`) turns ``strategy`` into the base
strategy; ``secure-aggregation = "ckks"`` then wraps it in
:class:`~flwr_ext.strategy.HomomorphicAggregation`, ``"ckks-threshold"`` in
:class:`~flwr_ext.strategy.ThresholdHomomorphicAggregation`
(:data:`SECURE_BUILDERS`; the sites' ClientApp needs ``flwr_ext.mods.ckks_mod``).
Whether the chain is sound - a robust rule or central DP over ciphertexts - is
decided by the library alone
(:func:`~flwr_ext.strategy.composition.check_composition`); this module surfaces its
refusal as the run's :class:`~flwr_ext.appkit.config.ConfigError`.

The apps do not offer :class:`~flwr_ext.strategy.DistributedDP` (user-level DP
under CKKS): a consortium has a handful of sites, and user-level DP must hide a
whole site (``docs/privacy.md``: at ε = 4 over 10 silos, 0.40 test accuracy for
user-level DP against 0.89 for record-level DP-SGD). Record-level DP-SGD
(``dp-sgd = true``, each site's own ε) protects a patient or a card holder and
combines with ``ckks``. A custom ServerApp can still wrap
``HomomorphicAggregation`` in ``DistributedDP``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, Strategy

from ..strategy.composition import Role, check_composition
from ..strategy.dp_fedavg import DPFedAvg
from ..strategy.homomorphic import HomomorphicAggregation
from ..strategy.robust_strategies import ROBUST_STRATEGIES
from ..strategy.threshold_homomorphic import ThresholdHomomorphicAggregation
from .config import ConfigError
from .strategy_options import (
    check_strategy_settings,
    robust_options,
    robust_server_step,
)

__all__ = ["BUILDERS", "SECURE_BUILDERS", "build_strategy"]

MetricsAggrFn = Callable[[list[RecordDict], str], MetricRecord]
#: ``(settings, FedAvg keyword arguments) -> strategy``.
Builder = Callable[[Mapping[str, Any], dict[str, Any]], Strategy]


def _dp_fedavg(settings: Mapping[str, Any], kwargs: dict[str, Any]) -> Strategy:
    epsilon = settings["dp-fedavg-epsilon"]
    return DPFedAvg(
        FedAvg(**kwargs),
        num_clients=settings["dp-fedavg-num-clients"] or settings["min-nodes"],
        clipping_norm=settings["dp-fedavg-clipping-norm"],
        noise_multiplier=None if epsilon else settings["dp-fedavg-noise-multiplier"],
        target_epsilon=epsilon or None,
        num_rounds=settings["num-server-rounds"] if epsilon else None,
        delta=settings["dp-fedavg-delta"],
    )


def _robust_builder(name: str) -> Builder:
    def build(settings: Mapping[str, Any], kwargs: dict[str, Any]) -> Strategy:
        server_step = robust_server_step(settings)
        inner = (
            FedAvg(**kwargs)
            if server_step is None
            else FedAvgM(
                server_learning_rate=server_step[0],
                server_momentum=server_step[1],
                **kwargs,
            )
        )
        return ROBUST_STRATEGIES[name](inner, **robust_options(settings))

    return build


#: ``strategy`` run-config value -> builder of the (unencrypted) strategy.
BUILDERS: dict[str, Builder] = {
    "fedavg": lambda settings, kwargs: FedAvg(**kwargs),
    "fedprox": lambda s, kwargs: FedProx(proximal_mu=s["proximal-mu"], **kwargs),
    "fedadam": lambda s, kwargs: FedAdam(eta=s["server-learning-rate"], **kwargs),
    **{name: _robust_builder(name) for name in ROBUST_STRATEGIES},
    "dp-fedavg": _dp_fedavg,
}


def build_strategy(
    settings: Mapping[str, Any],
    *,
    train_metrics_aggr_fn: MetricsAggrFn | None = None,
    evaluate_metrics_aggr_fn: MetricsAggrFn | None = None,
) -> Strategy:
    """Return the strategy chain the run config asks for.

    Parameters
    ----------
    settings : Mapping
        Validated run config holding
        :data:`~flwr_ext.appkit.strategy_options.STRATEGY_OPTIONS` (and
        ``num-server-rounds``).
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn : callable, optional
        Flower metric aggregators for the base strategy (e.g.
        :func:`flwr_ext.appkit.metrics.make_metrics_aggregator`).

    Raises
    ------
    ConfigError
        On inconsistent settings (:func:`check_strategy_settings`), a parameter a
        wrapper refuses, or a composition the library refuses (its reason).
    """
    check_strategy_settings(settings)
    name = settings["strategy"]
    kwargs = _fedavg_kwargs(settings, train_metrics_aggr_fn, evaluate_metrics_aggr_fn)
    secure = settings["secure-aggregation"]
    strategy: Strategy | None = None
    try:
        strategy = BUILDERS[name](settings, kwargs)
        if secure in SECURE_BUILDERS:
            wrapper, build = SECURE_BUILDERS[secure]
            check_composition(wrapper.__name__, Role.HOMOMORPHIC, strategy)
            strategy = build(strategy, settings)
    except ValueError as err:
        problem = f"strategy={name!r} with secure-aggregation={secure!r}: {err}"
        if isinstance(strategy, DPFedAvg) and secure in SECURE_BUILDERS:
            problem += f" {_DP_UNDER_CKKS}"
        raise ConfigError("run config", [problem]) from err
    return strategy


#: What these apps offer instead of central DP under CKKS (see the module doc).
_DP_UNDER_CKKS = (
    "These apps offer record-level DP-SGD under ckks and ckks-threshold instead: "
    "strategy='fedavg', dp-sgd=true."
)


def _fedavg_kwargs(
    settings: Mapping[str, Any],
    train_fn: MetricsAggrFn | None,
    evaluate_fn: MetricsAggrFn | None,
) -> dict[str, Any]:
    min_nodes = settings["min-nodes"]
    return {
        "fraction_train": settings["fraction-train"],
        "fraction_evaluate": 1.0,
        "min_train_nodes": min_nodes,
        "min_evaluate_nodes": min_nodes,
        "min_available_nodes": min_nodes,
        "train_metrics_aggr_fn": train_fn,
        "evaluate_metrics_aggr_fn": evaluate_fn,
    }


def _homomorphic(strategy: Strategy, settings: Mapping[str, Any]) -> Strategy:
    context = Path(settings["ckks-server-context"]).expanduser()
    if not context.is_file():
        raise ConfigError(
            "run config",
            [
                f"ckks-server-context='{context}' does not exist on the machine "
                "running the ServerApp; create keys with `flwr-ext keys create "
                "--out DIR` and pass DIR/server-context.ckks"
            ],
        )
    return HomomorphicAggregation(strategy, context, wire=settings["ckks-wire"])


def _threshold(strategy: Strategy, settings: Mapping[str, Any]) -> Strategy:
    """Multiparty CKKS: every connected site becomes a key holder at set-up.

    ``min-nodes`` sites must take part in the key generation; aggregates of
    fewer than 2 updates are never decrypted; the set-up and each collective
    decryption wait ``round-timeout`` seconds for the sites.
    """
    return ThresholdHomomorphicAggregation(
        strategy,
        min_sites=settings["min-nodes"],
        min_replies=2,
        setup_timeout=settings["round-timeout"],
        decrypt_timeout=settings["round-timeout"],
    )


#: ``secure-aggregation`` run-config value -> (wrapper class, builder).
SECURE_BUILDERS: dict[
    str, tuple[type[Strategy], Callable[[Strategy, Mapping[str, Any]], Strategy]]
] = {
    "ckks": (HomomorphicAggregation, _homomorphic),
    "ckks-threshold": (ThresholdHomomorphicAggregation, _threshold),
}
