"""The server's feature-scaling step before training, shared by the app templates.

With ``standardisation = "federated"`` the ServerApp asks every site for its
training rows' feature statistics before round 1 and turns them into one scaler
for all sites (no site ever sees another's rows or statistics):

- in plaintext (:mod:`flwr_ext.appkit.standardisation`), the server combines the
  sites' statistics - pooled, or by coordinate-wise median when a robust strategy
  is configured (a Byzantine site cannot drag the scaler) - and sends the scaler
  to the sites in the train and evaluate config;
- under CKKS (:mod:`flwr_ext.appkit.encrypted_stats`), the statistics are summed
  encrypted, the server keeps only the encrypted sums (written next to the run's
  results), and only the sites can decrypt the pooled scaler;
- under threshold CKKS (:mod:`flwr_ext.appkit.threshold_stats`), the statistics
  are summed under the collective key and only the sums are decrypted, by all
  key holders together: the server learns the pooled scaler (and sends it like
  in plaintext), never one site's statistics.

With ``standardisation = "site"`` nothing happens here: each site standardises
with its own statistics.

The site's side of all three is :func:`answer_feature_stats`, which answers only
in the form the run's ``secure-aggregation`` asks for: a coordinator cannot get a
site's statistics in plaintext by sending the plaintext query in a CKKS run.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from ..mods.site_policy import ShareableError
from ..strategy.robust_strategies import ROBUST_STRATEGIES
from .encrypted_stats import (
    is_encrypted_stats_query,
    reply_encrypted_stats,
    request_encrypted_feature_stats,
    save_encrypted_scaler,
    scaler_from_state,
)
from .site_state import save_scaler
from .standardisation import (
    combine,
    is_stats_query,
    reply_feature_stats,
    request_feature_stats,
)
from .threshold_stats import (
    SecureSummer,
    is_threshold_stats_query,
    reply_threshold_stats,
    request_threshold_feature_stats,
)

__all__ = ["answer_feature_stats", "prepare_feature_scaling"]

#: The statistics query each ``secure-aggregation`` mode answers.
_QUERY_OF_MODE = {
    "none": "plaintext",
    "ckks": "CKKS",
    "ckks-threshold": "threshold-CKKS",
}


def prepare_feature_scaling(
    grid: Grid,
    settings: Mapping[str, Any],
    num_features: int,
    config: ConfigRecord,
    results_dir: Path,
    *,
    sites: str = "sites",
    strategy: Strategy | None = None,
) -> None:
    """Run the federated statistics round that the run's settings ask for.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid.
    settings : Mapping
        The app's validated run config; reads ``standardisation``,
        ``secure-aggregation``, ``ckks-server-context``, ``ckks-wire``,
        ``min-nodes``, ``round-timeout`` and ``strategy``.
    num_features : int
        Number of feature columns every site holds.
    config : ConfigRecord
        The config sent with every train and evaluate instruction; a plaintext
        scaler is added to it (mean and spread per feature).
    results_dir : Path
        Where the encrypted sums are written under CKKS.
    sites : str (default: "sites")
        What the log calls the sites ("hospitals", "banks").
    strategy : Strategy, optional
        The run's strategy chain; under ``secure-aggregation="ckks-threshold"``
        it is the :class:`~flwr_ext.strategy.ThresholdHomomorphicAggregation`
        whose secure sum (and key-generation setup) the statistics use.
    """
    if settings["standardisation"] != "federated":
        return
    if settings["secure-aggregation"] == "ckks-threshold":
        if not callable(getattr(strategy, "secure_sum", None)):
            raise TypeError(
                "secure-aggregation='ckks-threshold' needs the run's "
                "ThresholdHomomorphicAggregation strategy for the statistics round"
            )
        request_threshold_feature_stats(
            cast(SecureSummer, strategy),
            grid,
            num_features,
            timeout=settings["round-timeout"],
            sites=sites,
        ).to_config(config)
        return
    if settings["secure-aggregation"] == "ckks":
        sums = request_encrypted_feature_stats(
            grid,
            settings["ckks-server-context"],
            num_features,
            wire=settings["ckks-wire"],
            min_nodes=settings["min-nodes"],
            timeout=settings["round-timeout"],
        )
        save_encrypted_scaler(*sums, results_dir)
        return
    stats = request_feature_stats(
        grid,
        num_features,
        min_nodes=settings["min-nodes"],
        timeout=settings["round-timeout"],
    )
    method: Literal["median", "pooled"] = (
        "median" if settings["strategy"] in ROBUST_STRATEGIES else "pooled"
    )
    combine([s for _, s in stats], method).to_config(config)
    log(INFO, "feature scaling: %s of %d %s' statistics", method, len(stats), sites)


def answer_feature_stats(
    msg: Message, context: Context, x_train: np.ndarray, secure: str
) -> Message:
    """ClientApp side: answer the statistics query of the run's mode, only it.

    Parameters
    ----------
    msg : Message
        The server's QUERY.
    context : Context
        The site's context (the CKKS round keeps the scaler in its state and,
        with a ``state-dir``, on disk).
    x_train : np.ndarray
        ``(rows, features)`` training rows, as the model sees them.
    secure : str
        The run's validated ``secure-aggregation``.

    Raises
    ------
    ShareableError
        For a query of another mode than ``secure`` (e.g. the plaintext query in
        a CKKS run: the statistics would leave in plaintext) or an unknown one.
    """
    kinds = (
        ("plaintext", is_stats_query(msg)),
        ("CKKS", is_encrypted_stats_query(msg)),
        ("threshold-CKKS", is_threshold_stats_query(msg)),
    )
    kind = next((name for name, match in kinds if match), None)
    if kind is None:
        raise ShareableError(
            "unknown query; this ClientApp answers feature statistics only"
        )
    if kind != _QUERY_OF_MODE[secure]:
        raise ShareableError(
            f"refusing a {kind} feature-statistics query: this run's "
            f"secure-aggregation is {secure!r}"
        )
    if kind == "plaintext":
        return reply_feature_stats(msg, x_train)
    if kind == "threshold-CKKS":
        return reply_threshold_stats(msg, x_train)
    reply = reply_encrypted_stats(msg, context, x_train)
    scaler = scaler_from_state(context)
    if scaler is not None:  # kept on disk, to rejoin after a restart
        save_scaler(context, scaler)
    return reply
