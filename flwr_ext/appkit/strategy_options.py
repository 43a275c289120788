"""The run-config options of the server strategy, and their run-config-level checks.

One run-config key, ``strategy``, picks the aggregation; others tune it:

=====================  ========================================================
``strategy``           what the server does with the sites' updates
=====================  ========================================================
``fedavg``             Flower's ``FedAvg`` (weighted by each site's rows)
``fedprox``            Flower's ``FedProx`` (``proximal-mu`` sent to sites)
``fedadam``            Flower's ``FedAdam`` (``server-learning-rate``)
``krum`` ...           a robust rule of :data:`flwr_ext.strategy.ROBUST_STRATEGIES`
                       wrapping ``FedAvg`` (``num-byzantine``, ``trim-beta``,
                       ``robust-pre-aggregation``), or Flower's ``FedAvgM``
                       with ``robust-server-momentum`` /
                       ``robust-server-learning-rate``
``dp-fedavg``          central user-level DP (``flwr_ext.strategy.DPFedAvg``)
=====================  ========================================================

``secure-aggregation = "ckks"`` wraps the result in
``flwr_ext.strategy.HomomorphicAggregation`` (one key set the sites share, made
with ``flwr-ext keys create``); ``"ckks-threshold"`` in
``flwr_ext.strategy.ThresholdHomomorphicAggregation`` (each site makes its own
secret share at a setup round; only aggregates are decrypted, by all sites
together, and the server holds them in plaintext - SecAgg's semantics). Apps add
:data:`STRATEGY_OPTIONS` (and :data:`ATTACK_OPTIONS` for the Byzantine simulation)
to their :class:`~flwr_ext.appkit.config.ConfigSchema`; the ServerApp builds the chain
with :func:`flwr_ext.appkit.strategies.build_strategy`.

This module is what a ClientApp imports to validate the run config, so it stays
light: the robust rules' names come from
:mod:`flwr_ext.strategy.robust_strategies` (numpy and Flower only); the DP and CKKS
wrappers (Opacus, TenSEAL) are imported by the ServerApp's builder only. Which
*pairs* of defences are sound is decided by
:func:`flwr_ext.strategy.composition.check_composition` alone, when the ServerApp
builds the chain; :func:`check_strategy_settings` checks only what the run config
itself gets wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..attacks import MOD_ATTACKS
from ..strategy.robust import NAMED_PRE
from ..strategy.robust_strategies import ROBUST_STRATEGIES, TrimmedMean
from .config import ConfigError, Option

__all__ = [
    "ATTACK_OPTIONS",
    "BASE_STRATEGIES",
    "CKKS_WIRES",
    "DP_STRATEGIES",
    "PRE_AGGREGATIONS",
    "SECURE_AGGREGATION",
    "STRATEGY_CHOICES",
    "STRATEGY_OPTIONS",
    "check_strategy_settings",
    "robust_options",
]

BASE_STRATEGIES = ("fedavg", "fedprox", "fedadam")
#: ``robust-pre-aggregation`` values: none, NNM, or norm equalization then NNM.
PRE_AGGREGATIONS = ("none", *NAMED_PRE)
DP_STRATEGIES = ("dp-fedavg",)
#: Every value ``strategy`` accepts.
STRATEGY_CHOICES: tuple[str, ...] = (
    *BASE_STRATEGIES,
    *ROBUST_STRATEGIES,
    *DP_STRATEGIES,
)
SECURE_AGGREGATION = ("none", "ckks", "ckks-threshold")
#: Wire formats offered to the apps: ``packed`` and ``seeded`` beat the library's
#: ``tenseal`` format on uplink, client and server time in every measured row of
#: docs/secure-aggregation.md, so the apps do not offer it.
CKKS_WIRES = ("packed", "seeded")


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
        "encrypt updates so the server only adds ciphertexts ('ckks': one key "
        "set the sites share; 'ckks-threshold': each site holds a key share, "
        "only aggregates are decrypted, by all sites together)",
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
        "smallest uplink)",
        choices=CKKS_WIRES,
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
        "before the robust rule: nearest-neighbour mixing, or median norm "
        "equalization then NNM (the recommended chain, docs/robustness.md)",
        choices=PRE_AGGREGATIONS,
    ),
    Option(
        "robust-server-momentum",
        float,
        0.0,
        "robust rules: momentum of the server step on the robust aggregate "
        "(Flower's FedAvgM; 0.9 recommended); 0: no momentum",
        min=0.0,
        max=1.0,
        max_exclusive=True,
    ),
    Option(
        "robust-server-learning-rate",
        float,
        1.0,
        "robust rules: learning rate of that server step (FedAvgM; 0.3 "
        "recommended); 1 without momentum: FedAvg's step",
        min=0.0,
        min_exclusive=True,
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


#: Robust rule -> {constructor argument: run-config key} beyond the common ones.
_RULE_OPTIONS: dict[str, dict[str, str]] = {"trimmed-mean": {"beta": "trim-beta"}}


def robust_options(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of the robust rule ``settings["strategy"]`` names.

    Every rule of :data:`~flwr_ext.strategy.ROBUST_STRATEGIES` takes
    ``num_byzantine`` and ``pre_aggregation``; the table :data:`_RULE_OPTIONS`
    adds each rule's own run-config keys.
    """
    name = settings["strategy"]
    pre = settings["robust-pre-aggregation"]
    options: dict[str, Any] = {
        "num_byzantine": settings["num-byzantine"],
        "pre_aggregation": None if pre == "none" else pre,  # a wrapper's named chain
    }
    options.update(
        {arg: settings[key] for arg, key in _RULE_OPTIONS.get(name, {}).items()}
    )
    return options


def robust_server_step(settings: Mapping[str, Any]) -> tuple[float, float] | None:
    """``(learning rate, momentum)`` of FedAvgM around the robust rule, or None.

    None when the run config leaves both at FedAvg's step (learning rate 1,
    no momentum): the robust rule then wraps ``FedAvg`` as before.
    """
    lr = float(settings["robust-server-learning-rate"])
    momentum = float(settings["robust-server-momentum"])
    if lr == 1.0 and momentum == 0.0:
        return None
    return lr, momentum


def check_strategy_settings(settings: Mapping[str, Any]) -> None:
    """Refuse run-config values that are valid one by one but wrong together.

    Only what the run config itself gets wrong is checked here (it runs in every
    ClientApp too); whether two defences compose soundly - a robust rule or
    central DP over ciphertexts - is decided by
    :func:`flwr_ext.strategy.composition.check_composition` when the ServerApp
    builds the chain (:func:`flwr_ext.appkit.strategies.build_strategy`).

    Raises
    ------
    ConfigError
        For a robust rule that needs more replies per round than ``min-nodes``
        guarantees, a trimmed mean that would trim nothing with ``min-nodes``
        sites, ``secure-aggregation="ckks"`` without ``ckks-server-context``, or
        ``secure-aggregation="ckks-threshold"`` with ``min-nodes`` < 2 (an
        aggregate of one site is that site's update; sites refuse to decrypt it).
    """
    problems = []
    name = settings["strategy"]
    secure = settings["secure-aggregation"]
    min_nodes = settings["min-nodes"]
    pre = settings["robust-pre-aggregation"]
    if name in ROBUST_STRATEGIES and secure == "none":
        strategy = ROBUST_STRATEGIES[name](**robust_options(settings))
        needed = strategy.min_valid_replies()
        if needed > min_nodes:
            problems.append(
                f"strategy={name!r} with num-byzantine={settings['num-byzantine']} "
                f"needs {needed} valid replies per round but min-nodes={min_nodes}: "
                f"set min-nodes >= {needed}, lower num-byzantine, or use 'median'"
            )
        if isinstance(strategy, TrimmedMean) and not strategy.trimmed_per_side(
            min_nodes
        ):
            problems.append(
                f"trim-beta={settings['trim-beta']} trims no update with "
                f"min-nodes={min_nodes} sites (floor(beta * n) = 0), so it would "
                f"be plain averaging; use trim-beta >= {1 / min_nodes:.2f}"
            )
    server_step = robust_server_step(settings)
    if server_step is not None and name not in ROBUST_STRATEGIES:
        problems.append(
            f"robust-server-momentum={settings['robust-server-momentum']} and "
            f"robust-server-learning-rate={settings['robust-server-learning-rate']} "
            f"set the server step of a robust rule, but strategy={name!r}: pick a "
            "robust rule (e.g. 'trimmed-mean') or leave them at 0 and 1"
        )
    if pre != "none" and name not in ROBUST_STRATEGIES:
        problems.append(
            f"robust-pre-aggregation={pre!r} runs before a robust rule, but "
            f"strategy={name!r}: pick a robust rule or set it to 'none'"
        )
    if secure == "ckks" and not settings["ckks-server-context"]:
        problems.append(
            "secure-aggregation='ckks' needs ckks-server-context: the absolute "
            "path of server-context.ckks from `flwr-ext keys create --out DIR`"
        )
    if secure == "ckks-threshold" and min_nodes < 2:
        problems.append(
            f"secure-aggregation='ckks-threshold' with min-nodes={min_nodes}: the "
            "sites decrypt aggregates of at least 2 updates only; set min-nodes >= 2"
        )
    if problems:
        raise ConfigError("run config", problems)
