"""Build the server strategy an app's run config asks for.

One run-config key, ``strategy``, picks the aggregation; others tune it:

=====================  ========================================================
``strategy``           what the server does with the sites' updates
=====================  ========================================================
``fedavg``             Flower's ``FedAvg`` (weighted by each site's rows)
``fedprox``            Flower's ``FedProx`` (``proximal-mu`` sent to sites)
``fedadam``            Flower's ``FedAdam`` (``server-learning-rate``)
``krum`` ...           a robust rule of :data:`flwr_ext.strategy.ROBUST_STRATEGIES`
                       wrapping ``FedAvg`` (``num-byzantine``, ``trim-beta``,
                       ``robust-pre-aggregation``)
``dp-fedavg``          central user-level DP (``flwr_ext.strategy.DPFedAvg``)
=====================  ========================================================

``secure-aggregation = "ckks"`` wraps the result in
``flwr_ext.strategy.HomomorphicAggregation`` (the server only ever adds
ciphertexts; the sites' ClientApp needs ``flwr_ext.mods.ckks_mod``). Unsound
combinations - a robust rule over ciphertexts, say - are refused when the run
starts by :mod:`flwr_ext.strategy.composition`, and so are settings that would
silently give no protection (:func:`check_strategy_settings`).

Apps add :data:`STRATEGY_OPTIONS` (and :data:`ATTACK_OPTIONS` for the Byzantine
simulation) to their :class:`~flwr_ext.appkit.config.ConfigSchema` and call
:func:`build_strategy` in their ServerApp.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from ..attacks import MOD_ATTACKS
from .config import ConfigError, Option

if TYPE_CHECKING:
    from ..strategy.robust import RobustAggregation

__all__ = [
    "ATTACK_OPTIONS",
    "BASE_STRATEGIES",
    "DP_STRATEGIES",
    "ROBUST_NAMES",
    "SECURE_AGGREGATION",
    "STRATEGY_CHOICES",
    "STRATEGY_OPTIONS",
    "build_strategy",
    "check_strategy_settings",
]

MetricsAggrFn = Callable[[list[RecordDict], str], MetricRecord]

BASE_STRATEGIES = ("fedavg", "fedprox", "fedadam")
#: Names of :data:`flwr_ext.strategy.ROBUST_STRATEGIES` (a test keeps them equal).
#: Spelt out so that validating a run config - which every ClientApp does - does
#: not import the strategy package (and Opacus, SciPy, TenSEAL with it): on a
#: SuperNode that starts one ClientApp process per message that is seconds per
#: message.
ROBUST_NAMES = (
    "krum",
    "multi-krum",
    "trimmed-mean",
    "median",
    "geometric-median",
    "centered-clipping",
)
DP_STRATEGIES = ("dp-fedavg",)
#: Every value ``strategy`` accepts.
STRATEGY_CHOICES: tuple[str, ...] = (
    *BASE_STRATEGIES,
    *ROBUST_NAMES,
    *DP_STRATEGIES,
)
SECURE_AGGREGATION = ("none", "ckks")


def _absolute_or_empty(value: str) -> str | None:
    if value and not Path(value).expanduser().is_absolute():
        return "must be an absolute path (the ServerApp does not run in your folder)"
    return None


#: Run-config options of the server strategy.
STRATEGY_OPTIONS: tuple[Option, ...] = (
    Option("strategy", str, "fedavg", "server aggregation", choices=STRATEGY_CHOICES),
    Option(
        "secure-aggregation",
        str,
        "none",
        "encrypt updates so the server only adds ciphertexts",
        choices=SECURE_AGGREGATION,
    ),
    Option(
        "ckks-server-context",
        str,
        "",
        "ckks: absolute path of server-context.ckks (flwr-ext keys create) on the "
        "SuperLink's machine",
        check=_absolute_or_empty,
    ),
    Option(
        "ckks-wire",
        str,
        "packed",
        "ckks: ciphertext wire format ('packed' aggregates fastest; 'seeded' has the "
        "smallest uplink; 'tenseal' chunks are plain TenSEAL vectors)",
        choices=("packed", "seeded", "tenseal"),
    ),
    Option(
        "fraction-train",
        float,
        1.0,
        "fraction of connected sites sampled per round",
        min=0.0,
        max=1.0,
        min_exclusive=True,
    ),
    Option(
        "min-nodes",
        int,
        2,
        "sites that must be connected (and are sampled at least) per round",
        min=1,
    ),
    Option(
        "round-timeout",
        float,
        600.0,
        "seconds the server waits for replies in a round; late sites are left out",
        min=0.0,
        min_exclusive=True,
    ),
    Option(
        "node-wait-timeout",
        float,
        120.0,
        "seconds a round waits for sites that are not connected; then it goes on "
        "without them if min-nodes remain, else the run fails naming them",
        min=0.0,
        min_exclusive=True,
    ),
    Option("proximal-mu", float, 0.1, "FedProx proximal term weight", min=0.0),
    Option(
        "server-learning-rate",
        float,
        0.01,
        "FedAdam server learning rate (eta)",
        min=0.0,
        min_exclusive=True,
    ),
    Option(
        "num-byzantine",
        int,
        0,
        "Byzantine sites a robust rule must tolerate (krum, multi-krum, nnm)",
        min=0,
    ),
    Option(
        "trim-beta",
        float,
        0.34,
        "trimmed-mean: fraction trimmed from each end",
        min=0.0,
        max=0.5,
        max_exclusive=True,
    ),
    Option(
        "robust-pre-aggregation",
        str,
        "none",
        "nearest-neighbour mixing before the robust rule",
        choices=("none", "nnm"),
    ),
    Option(
        "dp-fedavg-noise-multiplier",
        float,
        1.0,
        "dp-fedavg: Gaussian noise std in units of the clipping norm (used when "
        "dp-fedavg-epsilon is 0)",
        min=0.0,
        min_exclusive=True,
    ),
    Option(
        "dp-fedavg-epsilon",
        float,
        0.0,
        "dp-fedavg: target epsilon over num-server-rounds (calibrates the noise "
        "and stops training at the budget); 0: use dp-fedavg-noise-multiplier",
        min=0.0,
    ),
    Option(
        "dp-fedavg-clipping-norm",
        float,
        1.0,
        "dp-fedavg: L2 bound on each site's model update",
        min=0.0,
        min_exclusive=True,
    ),
    Option(
        "dp-fedavg-delta",
        float,
        1e-5,
        "dp-fedavg: delta of the client-level (epsilon, delta)",
        min=0.0,
        max=1.0,
        min_exclusive=True,
        max_exclusive=True,
    ),
    Option(
        "dp-fedavg-num-clients",
        int,
        0,
        "dp-fedavg: sites in the federation, the public denominator of the "
        "noised mean; 0: min-nodes",
        min=0,
    ),
)


#: Run-config options read by :func:`flwr_ext.attacks.byzantine_mod` in simulation.
ATTACK_OPTIONS: tuple[Option, ...] = (
    Option(
        "attack",
        str,
        "none",
        "simulation only: attack run by the sites in attack-partition-ids",
        choices=MOD_ATTACKS,
    ),
    Option(
        "attack-strength",
        float,
        0.0,
        "simulation only: the attack's parameter (e.g. scaling factor); 0: the "
        "attack's default",
    ),
    Option(
        "attack-partition-ids",
        str,
        "",
        "simulation only: comma-separated partition ids that attack, e.g. '0,2'",
        check=lambda v: (
            None
            if all(p.strip().isdigit() for p in v.split(",") if p.strip())
            else "must be comma-separated non-negative integers"
        ),
    ),
)


def check_strategy_settings(settings: Mapping[str, Any]) -> None:
    """Refuse settings that are valid one by one but wrong together.

    Raises
    ------
    ConfigError
        For a robust rule or DP with ``secure-aggregation="ckks"`` (the server
        cannot inspect or clip ciphertexts), a robust rule that needs more
        replies per round than ``min-nodes`` guarantees, or a trimmed mean that
        would trim nothing with ``min-nodes`` sites.
    """
    problems = []
    name = settings["strategy"]
    secure = settings["secure-aggregation"]
    min_nodes = settings["min-nodes"]
    if secure == "ckks" and name in ROBUST_NAMES:
        problems.append(
            f"strategy={name!r} with secure-aggregation='ckks': a robust rule must "
            "compare individual updates, but the server holds only ciphertexts; "
            "use strategy='fedavg' with ckks, or secure-aggregation='none'"
        )
    if name in ROBUST_NAMES and secure != "ckks":
        strategy = _robust(name, settings, _fedavg_kwargs(settings, None, None))
        needed = strategy.min_valid_replies()
        if needed > min_nodes:
            problems.append(
                f"strategy={name!r} with num-byzantine={settings['num-byzantine']} "
                f"needs {needed} valid replies per round but min-nodes={min_nodes}: "
                f"set min-nodes >= {needed}, lower num-byzantine, or use 'median'"
            )
        if name == "trimmed-mean":
            from ..aggregation.trimmed_mean import num_trimmed

            if num_trimmed(settings["trim-beta"], min_nodes) == 0:
                problems.append(
                    f"trim-beta={settings['trim-beta']} trims no update with "
                    f"min-nodes={min_nodes} sites (floor(beta * n) = 0), so it would "
                    f"be plain averaging; use trim-beta >= {1 / min_nodes:.2f}"
                )
    if secure == "ckks" and name in DP_STRATEGIES:
        problems.append(
            f"strategy={name!r} with secure-aggregation='ckks': the server cannot "
            "clip or noise encrypted updates; use record-level DP-SGD (dp-sgd=true) "
            "with ckks instead"
        )
    if secure == "ckks":
        context = settings["ckks-server-context"]
        if not context:
            problems.append(
                "secure-aggregation='ckks' needs ckks-server-context: the absolute "
                "path of server-context.ckks from `flwr-ext keys create --out DIR`"
            )
    if problems:
        raise ConfigError("run config", problems)


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
        Validated run config holding :data:`STRATEGY_OPTIONS`.
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn : callable, optional
        Flower metric aggregators for the base strategy (e.g.
        :func:`flwr_ext.appkit.metrics.make_metrics_aggregator`).

    Raises
    ------
    ConfigError
        On inconsistent settings (:func:`check_strategy_settings`) or a defence
        that this installation of flwr-ext does not provide.
    """
    check_strategy_settings(settings)
    name = settings["strategy"]
    kwargs = _fedavg_kwargs(settings, train_metrics_aggr_fn, evaluate_metrics_aggr_fn)
    strategy: Strategy
    if name == "fedprox":
        strategy = FedProx(proximal_mu=settings["proximal-mu"], **kwargs)
    elif name == "fedadam":
        strategy = FedAdam(eta=settings["server-learning-rate"], **kwargs)
    elif name in ROBUST_NAMES:
        strategy = _robust(name, settings, kwargs)
    elif name == "dp-fedavg":
        strategy = _dp_fedavg(FedAvg(**kwargs), settings)
    else:
        strategy = FedAvg(**kwargs)
    if settings["secure-aggregation"] == "ckks":
        strategy = _homomorphic(strategy, settings)
    return strategy


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


def _robust(
    name: str, settings: Mapping[str, Any], kwargs: dict[str, Any]
) -> RobustAggregation:
    from ..strategy import ROBUST_STRATEGIES

    cls = ROBUST_STRATEGIES[name]
    accepted = inspect.signature(cls.__init__).parameters
    options: dict[str, Any] = {}
    if "beta" in accepted:
        options["beta"] = settings["trim-beta"]
    if "num_byzantine" in accepted:
        options["num_byzantine"] = settings["num-byzantine"]
    if settings["robust-pre-aggregation"] == "nnm":
        options["pre_aggregation"] = "nnm"
        options["num_byzantine"] = settings["num-byzantine"]
    return cls(FedAvg(**kwargs), **options)


def _dp_fedavg(base: Strategy, settings: Mapping[str, Any]) -> Strategy:
    try:
        from ..strategy import DPFedAvg
    except ImportError:
        raise ConfigError(
            "run config",
            [
                "strategy='dp-fedavg' needs flwr_ext.strategy.DPFedAvg, which this "
                "installation of flwr-ext does not provide"
            ],
        ) from None
    epsilon = settings["dp-fedavg-epsilon"]
    num_clients = settings["dp-fedavg-num-clients"] or settings["min-nodes"]
    try:
        return DPFedAvg(
            base,
            num_clients=num_clients,
            clipping_norm=settings["dp-fedavg-clipping-norm"],
            noise_multiplier=None
            if epsilon
            else settings["dp-fedavg-noise-multiplier"],
            target_epsilon=epsilon or None,
            num_rounds=settings["num-server-rounds"] if epsilon else None,
            delta=settings["dp-fedavg-delta"],
        )
    except ValueError as err:
        raise ConfigError("run config", [f"strategy='dp-fedavg': {err}"]) from err


def _homomorphic(strategy: Strategy, settings: Mapping[str, Any]) -> Strategy:
    from ..strategy import HomomorphicAggregation

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
