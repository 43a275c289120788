"""Every run-config key of the app, with its type, default and valid values.

The schema is the single source of truth: the ServerApp and the ClientApp both
validate ``context.run_config`` against it at start-up (a typo fails the run
before any training, listing the valid choices), ``pyproject.toml`` repeats the
defaults (a unit test keeps the two identical), and the README's table is
rendered from it (``python -m bank_fraud.settings``).

Shared groups come from :mod:`flwr_ext.appkit` - training, server strategy and
its defences, DP-SGD, results folder, loss, decision threshold, attacks - so the
bank app offers exactly the hospital app's strategy / secure-aggregation / DP
choices; the keys below are the fraud-specific ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from flwr_ext.appkit.config import ConfigError, ConfigSchema, Option, Settings
from flwr_ext.appkit.results import OUTPUT_OPTIONS
from flwr_ext.appkit.strategy_options import (
    ATTACK_OPTIONS,
    STRATEGY_OPTIONS,
    check_strategy_settings,
)
from flwr_ext.appkit.torch_train import DPSGD_OPTIONS, TRAINING_OPTIONS

from .losses import LOSS_OPTIONS
from .thresholds import THRESHOLD_OPTIONS

__all__ = [
    "APP_NAME",
    "DATA_FORMATS",
    "EVALUATION_METRICS",
    "SCHEMA",
    "load_settings",
    "parse_hidden_layers",
]

APP_NAME = "bank-fraud"

#: Threshold-free metrics every bank reports and the server pools (see
#: flwr_ext.appkit.metrics); precision, recall, F1 and alert rate at the chosen
#: threshold come from bank_fraud.thresholds.
EVALUATION_METRICS = ("auprc", "recall-at-1pct-fpr", "auroc")

#: Column layouts the app knows (see bank_fraud.task.DATA_FORMATS for columns).
DATA_FORMATS = ("transactions", "creditcard")


def parse_hidden_layers(text: str) -> tuple[int, ...]:
    """Parse ``"32,16"`` into ``(32, 16)``; ``""`` is logistic regression."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(
            f"hidden-layers={text!r} must be comma-separated positive integers, "
            "e.g. '32,16' (empty: logistic regression)"
        )
    return tuple(int(p) for p in parts)


def _hidden_layers_error(value: str) -> str | None:
    try:
        parse_hidden_layers(value)
    except ValueError:
        return "must be comma-separated positive integers, e.g. '32,16'"
    return None


def _absolute_or_empty(value: str) -> str | None:
    if value and not Path(value).expanduser().is_absolute():
        return "must be an absolute path (the ClientApp does not run in your folder)"
    return None


_APP_OPTIONS = (
    Option(
        "hidden-layers",
        str,
        "32,16",
        "hidden units per ReLU layer of the network, comma-separated (empty: "
        "logistic regression)",
        check=_hidden_layers_error,
    ),
    Option(
        "standardisation",
        str,
        "federated",
        "feature scaling: 'federated' (one scaler from all banks' sums) or "
        "'site' (each bank on its own rows)",
        choices=("federated", "site"),
    ),
    Option(
        "data-format",
        str,
        "transactions",
        "column layout of the banks' data: 'transactions' (this app's schema, "
        "the generator's) or 'creditcard' (Time, V1-V28, Amount, Class)",
        choices=DATA_FORMATS,
    ),
    Option(
        "split",
        str,
        "time",
        "how each bank's rows are split: 'time' (latest rows for testing) or "
        "'stratified' (at random, per class)",
        choices=("time", "stratified"),
    ),
    Option(
        "test-fraction",
        float,
        0.25,
        "share of each bank's rows held out for testing (the latest, under "
        "split='time')",
        min=0.0,
        max=1.0,
        min_exclusive=True,
        max_exclusive=True,
    ),
    Option(
        "validation-fraction",
        float,
        0.15,
        "share of each bank's rows, before the test rows, used to choose the "
        "decision threshold",
        min=0.0,
        max=1.0,
        min_exclusive=True,
        max_exclusive=True,
    ),
    Option(
        "metric-bins",
        int,
        200,
        "score histogram bins per class sent for pooled metrics and thresholds",
        min=10,
        max=10000,
    ),
    Option(
        "label-column",
        str,
        "",
        "CSV label column (empty: the data format's, 'is_fraud' / 'Class')",
    ),
    Option(
        "positive-label",
        str,
        "",
        "CSV label value meaning fraud (empty: the format's, '1')",
    ),
    Option(
        "feature-columns",
        str,
        "",
        "comma-separated feature columns in model order (empty: the format's)",
    ),
    Option(
        "ignore-columns",
        str,
        "",
        "comma-separated CSV columns that are not used (empty: the format's)",
    ),
    Option(
        "time-column",
        str,
        "",
        "CSV column ordering rows in time, used by split='time' and never as a "
        "feature (empty: the format's, 'time' / 'Time')",
    ),
    Option(
        "log-columns",
        str,
        "",
        "comma-separated non-negative feature columns passed through log(1 + x) "
        "before scaling (empty: the format's; '-': none)",
    ),
    Option(
        "simulation-scale",
        float,
        1.0,
        "simulation: multiplies the generated banks' row counts",
        min=0.0,
        max=20.0,
        min_exclusive=True,
    ),
    Option(
        "simulation-csv",
        str,
        "",
        "simulation: absolute path of one CSV in data-format to split across "
        "the simulated banks instead of the generator",
        check=_absolute_or_empty,
    ),
    Option(
        "partition-alpha",
        float,
        1.0,
        "simulation-csv: Dirichlet alpha of the non-IID split (smaller: more skew)",
        min=0.0,
        min_exclusive=True,
    ),
)

#: The app's full run-config schema.
SCHEMA = ConfigSchema(
    [
        *TRAINING_OPTIONS,
        *STRATEGY_OPTIONS,
        *DPSGD_OPTIONS,
        *OUTPUT_OPTIONS,
        *LOSS_OPTIONS,
        *THRESHOLD_OPTIONS,
        *_APP_OPTIONS,
        *ATTACK_OPTIONS,
    ]
).with_defaults(
    {
        "num-server-rounds": 10,
        "local-epochs": 1,
        "learning-rate": 0.03,
        "batch-size": 64,
        "min-nodes": 3,
    }
)


def load_settings(run_config: Mapping[str, object]) -> Settings:
    """Validate a run config (types, choices, ranges, and combinations).

    Raises
    ------
    ConfigError
        Listing every problem, with the valid choices.
    """
    settings = SCHEMA.validate(run_config)
    check_strategy_settings(settings)
    problems = []
    if settings["dp-sgd"] and settings["strategy"] == "fedprox":
        problems.append(
            "dp-sgd=true with strategy='fedprox': the proximal term is not part of "
            "the DP-SGD training loop; use fedavg (or a robust rule)"
        )
    if settings["validation-fraction"] + settings["test-fraction"] >= 0.9:
        problems.append(
            f"validation-fraction + test-fraction = "
            f"{settings['validation-fraction'] + settings['test-fraction']:g} leaves "
            "under 10 % of each bank's rows for training; keep the sum below 0.9"
        )
    if problems:
        raise ConfigError("run config", problems)
    return settings


if __name__ == "__main__":  # pragma: no cover - documentation helper
    print(SCHEMA.markdown_table())
