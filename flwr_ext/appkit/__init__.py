"""What Flower app templates share: config validation, data, metrics, results, plots.

The two templates (``apps/hospital-diagnostics``, ``apps/bank-fraud``) are ordinary
Flower apps; this package is what they have in common, so a fix or a new metric
lands in both. One concept per module:

- :mod:`~flwr_ext.appkit.config` - typed run/node-config schemas
  (:class:`ConfigSchema`, :class:`Option`); validation at start-up lists every
  problem and the valid choices.
- :mod:`~flwr_ext.appkit.strategy_options` - the strategy's run-config options
  (``fedavg``/``fedprox``/``fedadam``, the robust rules, ``dp-fedavg``,
  ``secure-aggregation``) and the checks of the run config itself (light: every
  ClientApp validates them).
- :mod:`~flwr_ext.appkit.strategies` - the ServerApp's strategy chain from run
  config, one builder per name; unsound chains are refused by
  :mod:`flwr_ext.strategy.composition`, whose reason the run's error carries.
- :mod:`~flwr_ext.appkit.site` - a site's identity and data source from its
  node config (``partition-id`` in simulation, ``data-path`` in deployment).
- :mod:`~flwr_ext.appkit.tabular` - CSV loading against a schema with clear
  errors, stratified splits, non-IID Dirichlet partitions.
- :mod:`~flwr_ext.appkit.standardisation` - one feature scaler for all sites from
  federated sums (a QUERY round), or per site.
- :mod:`~flwr_ext.appkit.encrypted_stats` - the same statistics round under CKKS:
  the server adds ciphertexts, only the sites decrypt the pooled scaler.
- :mod:`~flwr_ext.appkit.scaling` - the ServerApp's scaling step before round 1:
  plaintext or encrypted statistics round, as the run config asks.
- :mod:`~flwr_ext.appkit.torch_train` - the local training loop (SGD, FedProx
  term, DP-SGD) and scoring for a binary PyTorch model.
- :mod:`~flwr_ext.appkit.metrics` - binary metrics per site and pooled from
  summable statistics (AUROC, sensitivity, specificity, accuracy, precision, F1,
  AUPRC, recall at 1 % FPR), as Flower metric aggregators; confusion counts and
  rates at a threshold (:class:`~flwr_ext.appkit.metrics.OperatingPoint`) and
  along all bin edges (:func:`~flwr_ext.appkit.metrics.operating_curve`).
- :mod:`~flwr_ext.appkit.recorder` - :class:`RecordingGrid`, a Grid wrapper that
  keeps per-site metrics per round (and, on request, chosen list metrics such
  as score histograms) and names sites that drop out.
- :mod:`~flwr_ext.appkit.results` - the results folder (absolute ``output-dir``
  with a documented default), metrics JSON/CSV, final model, summary line.
- :mod:`~flwr_ext.appkit.liveness` - :class:`DeadlineGrid`: waiting for sites
  with a deadline (``node-wait-timeout``), then on without them (``min-nodes``)
  or a failure naming them - never Flower's endless wait.
- :mod:`~flwr_ext.appkit.failure` - a failed run still writes its results folder
  and a ``status=failed`` summary line naming the site at fault.
- :mod:`~flwr_ext.appkit.site_run` - the frame both ServerApps run in: results
  folder, the restart-aware, recording and deadline grids, the failure record.
- :mod:`~flwr_ext.appkit.site_errors` - the client mod that makes a site's error
  replies name the site.
- :mod:`~flwr_ext.appkit.site_state` - what a site keeps in its ``state-dir`` to
  rejoin a CKKS run after its SuperNode restarts.
- :mod:`~flwr_ext.appkit.plots` - PNG plots on matplotlib's Agg canvas.

- :mod:`~flwr_ext.appkit.ckks_results` - a data owner decrypts a CKKS run's
  model and scaler.

What only one template uses lives in that template (the bank app's losses,
time splits, thresholds and PR curves are in ``apps/bank-fraud/bank_fraud/``).

Nothing here reads files or environment variables at import time.
"""

from .config import ConfigError, ConfigSchema, Option, Settings
from .metrics import METRICS, BinaryMetric, BinaryStats, make_metrics_aggregator
from .recorder import RecordingGrid
from .results import (
    ResultsWriter,
    parse_summary,
    resolve_output_dir,
    round_history,
    summary_line,
)
from .site import SiteSpec, site_from_context
from .tabular import SchemaError, TabularData, TabularSchema, load_csv

__all__ = [
    "METRICS",
    "BinaryMetric",
    "BinaryStats",
    "ConfigError",
    "ConfigSchema",
    "Option",
    "ResultsWriter",
    "RecordingGrid",
    "SchemaError",
    "Settings",
    "SiteSpec",
    "TabularData",
    "TabularSchema",
    "load_csv",
    "make_metrics_aggregator",
    "resolve_output_dir",
    "round_history",
    "site_from_context",
    "parse_summary",
    "summary_line",
]
