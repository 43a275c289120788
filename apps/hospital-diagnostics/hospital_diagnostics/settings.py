"""Every run-config key of the app, with its type, default and valid values.

The schema is the single source of truth: the ServerApp and the ClientApp both
validate ``context.run_config`` against it at start-up (a typo fails the run
before any training, listing the valid choices), ``pyproject.toml`` repeats the
defaults (a unit test keeps the two identical), and the README's table is
rendered from it (``python -m hospital_diagnostics.settings --write-readme``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

from flwr_ext.appkit.config import ConfigError, ConfigSchema, Option, Settings
from flwr_ext.appkit.results import OUTPUT_OPTIONS
from flwr_ext.appkit.strategy_options import ATTACK_OPTIONS, STRATEGY_OPTIONS
from flwr_ext.appkit.torch_train import DPSGD_OPTIONS, TRAINING_OPTIONS

__all__ = [
    "APP_NAME",
    "EVALUATION_METRICS",
    "SCHEMA",
    "check_server_settings",
    "load_settings",
]

APP_NAME = "hospital-diagnostics"

#: Metrics every site reports and the server pools (see flwr_ext.appkit.metrics).
EVALUATION_METRICS = ("auroc", "sensitivity", "specificity", "accuracy")

_APP_OPTIONS = (
    Option(
        "hidden-units",
        int,
        16,
        "hidden units of the one-hidden-layer network (0: logistic regression)",
        min=0,
    ),
    Option(
        "standardisation",
        str,
        "federated",
        "feature scaling: 'federated' (one scaler from all sites' sums) or "
        "'site' (each site on its own rows)",
        choices=("federated", "site"),
    ),
    Option(
        "test-fraction",
        float,
        0.3,
        "share of each site's rows held out for evaluation (per class)",
        min=0.0,
        max=1.0,
        min_exclusive=True,
        max_exclusive=True,
    ),
    Option(
        "partition-alpha",
        float,
        1.0,
        "simulation: Dirichlet alpha of the non-IID split (smaller: more skew)",
        min=0.0,
        min_exclusive=True,
    ),
    Option(
        "decision-threshold",
        float,
        0.5,
        "predicted probability at or above which a case is called malignant",
        min=0.0,
        max=1.0,
        min_exclusive=True,
        max_exclusive=True,
    ),
    Option(
        "metric-bins",
        int,
        200,
        "score histogram bins per class sent for the pooled AUROC",
        min=10,
        max=10000,
    ),
    Option("label-column", str, "diagnosis", "deployment: the label column of the CSV"),
    Option(
        "positive-label",
        str,
        "M",
        "deployment: label value meaning malignant (other value: benign)",
    ),
    Option(
        "feature-columns",
        str,
        "",
        "deployment: comma-separated feature columns in model order; empty: the "
        "30 WDBC columns (radius_mean ... fractal_dimension_worst)",
    ),
    Option(
        "ignore-columns",
        str,
        "id",
        "deployment: comma-separated columns present in the CSV but not used",
    ),
)

#: The app's full run-config schema.
SCHEMA = ConfigSchema(
    [
        *TRAINING_OPTIONS,
        *STRATEGY_OPTIONS,
        *DPSGD_OPTIONS,
        *OUTPUT_OPTIONS,
        *_APP_OPTIONS,
        *ATTACK_OPTIONS,
    ]
).with_defaults({"min-nodes": 3})


def load_settings(run_config: Mapping[str, object]) -> Settings:
    """Validate a run config: types, choices and ranges of every key.

    Combinations of strategy settings are checked by the ServerApp when it
    builds the strategy (:func:`flwr_ext.appkit.strategies.build_strategy`),
    before any round.

    Raises
    ------
    ConfigError
        Listing every problem, with the valid choices.
    """
    return SCHEMA.validate(run_config)


def check_server_settings(settings: Settings) -> None:
    """Refuse, at ServerApp start-up, combinations the sites could not honour.

    Strategy combinations are checked by ``build_strategy``; this adds the
    app's own: record-level DP-SGD does not combine with FedProx's proximal
    term (not offered under DP-SGD).
    """
    if settings["dp-sgd"] and settings["strategy"] == "fedprox":
        raise ConfigError(
            "run config",
            [
                "dp-sgd=true with strategy='fedprox': the proximal term is not "
                "part of the DP-SGD training loop; use fedavg (or a robust rule)"
            ],
        )


def write_readme_table(readme: Path) -> None:
    """Replace the run-config table of the app's README with the schema's."""
    start, end = "<!-- run-config:start -->", "<!-- run-config:end -->"
    text = readme.read_text()
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{SCHEMA.markdown_table()}\n{end}{tail}")


if __name__ == "__main__":  # pragma: no cover - documentation helper
    # python -m hospital_diagnostics.settings [--write-readme]
    if "--write-readme" in sys.argv:
        write_readme_table(Path(__file__).resolve().parents[1] / "README.md")
    else:
        print(SCHEMA.markdown_table())
