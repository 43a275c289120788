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
  results), and only the sites can decrypt the pooled scaler.

With ``standardisation = "site"`` nothing happens here: each site standardises
with its own statistics.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO
from pathlib import Path
from typing import Any, Literal

from flwr.app import ConfigRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from ..strategy.robust_strategies import ROBUST_STRATEGIES
from .encrypted_stats import request_encrypted_feature_stats, save_encrypted_scaler
from .standardisation import combine, request_feature_stats

__all__ = ["prepare_feature_scaling"]


def prepare_feature_scaling(
    grid: Grid,
    settings: Mapping[str, Any],
    num_features: int,
    config: ConfigRecord,
    results_dir: Path,
    *,
    sites: str = "sites",
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
    """
    if settings["standardisation"] != "federated":
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
