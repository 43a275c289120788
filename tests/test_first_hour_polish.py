"""Issue 14, item 5: what a new user meets in the first hour, small things.

Logging left alone on import, readable reprs, errors that never suggest a
composition that is then refused, ``flwr-ext --version``, plain-text CLI help with
the exit codes, key-file errors that speak the caller's language (API or CLI).
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.serverapp.strategy import FedAvg

import flwr_ext
from flwr_ext.aggregation import (
    CenteredClippingRule,
    CoordinateMedian,
    GeometricMedianRule,
    KrumRule,
    NearestNeighborMixing,
    TrimmedMeanRule,
)
from flwr_ext.cli import build_parser, main
from flwr_ext.strategy import (
    ROBUST_STRATEGIES,
    CenteredClipping,
    DistributedDP,
    DPFedAvg,
    Krum,
    TrimmedMean,
)

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ logging
MODULES = (
    "flwr_ext",
    "flwr_ext.strategy",
    "flwr_ext.privacy",
    "flwr_ext.mods",
    "flwr_ext.appkit.strategies",
    # The package front files are lazy: these import Opacus themselves.
    "flwr_ext.strategy.dp_fedavg",
    "flwr_ext.privacy.dpsgd",
)


def test_importing_flwr_ext_configures_no_logging():
    """Opacus's import-time basicConfig doubled every ServerApp log line."""
    code = "import importlib, logging\nroot = logging.getLogger()\n" + "".join(
        f"importlib.import_module({m!r}); print({m!r}, len(root.handlers), "
        "root.level)\n"
        for m in MODULES
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == [f"{m} 0 {logging.WARNING}" for m in MODULES], out


def test_a_flower_log_line_is_printed_once(capfd):
    """The symptom itself: one `flwr` log record, one line on stderr."""
    code = (
        "import flwr_ext.strategy\n"
        "from logging import INFO\n"
        "from flwr.supercore import log\n"
        "log(INFO, 'one line please')\n"
    )
    err = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stderr
    assert err.count("one line please") == 1, err


def test_an_application_handler_added_before_import_is_kept():
    code = (
        "import logging\n"
        "logging.basicConfig()\n"
        "import flwr_ext.strategy\n"
        "print(len(logging.getLogger().handlers))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "1"


# -------------------------------------------------------------------- repr
def _no_default_repr(obj: object) -> str:
    text = repr(obj)
    assert " object at 0x" not in text, text
    return text


def test_rules_and_pre_aggregation_have_readable_reprs():
    assert repr(NearestNeighborMixing(num_byzantine=2)) == (
        "NearestNeighborMixing(num_byzantine=2)"
    )
    for rule in (
        KrumRule(1),
        TrimmedMeanRule(0.2),
        CoordinateMedian(),
        GeometricMedianRule(),
        CenteredClippingRule(),
    ):
        assert _no_default_repr(rule).startswith(type(rule).__name__ + "(")


def test_wrappers_have_readable_reprs(tmp_path):
    text = _no_default_repr(
        TrimmedMean(beta=0.2, pre_aggregation="nnm", num_byzantine=2)
    )
    assert text == (
        "TrimmedMean(FedAvg, rule=TrimmedMeanRule(beta=0.2), "
        "pre_aggregation=NearestNeighborMixing(num_byzantine=2), "
        "weighting='uniform')"
    )
    for name, cls in ROBUST_STRATEGIES.items():
        assert _no_default_repr(cls()).startswith(cls.__name__ + "(FedAvg"), name
    _no_default_repr(DPFedAvg(FedAvg(), num_clients=10, noise_multiplier=1.0,
                              clipping_norm=1.0))  # fmt: skip
    _no_default_repr(DistributedDP(FedAvg(), clipping_norm=1.0, min_clients=3,
                                   noise_multiplier=1.0))  # fmt: skip
    from flwr_ext.he import SERVER_FILE, create_keys
    from flwr_ext.strategy import HomomorphicAggregation

    create_keys(tmp_path, "compact")
    text = _no_default_repr(HomomorphicAggregation(FedAvg(), tmp_path / SERVER_FILE))
    assert text.startswith("HomomorphicAggregation(FedAvg, mode='encrypted'")


def test_the_robust_log_line_explains_flowers_received_1_result(caplog):
    from flwr.app import ConfigRecord

    from .conftest import StaticGrid, model, reply_to

    strategy = Krum(num_byzantine=1)
    msgs = strategy.configure_train(
        1, model(), ConfigRecord(), StaticGrid([1, 2, 3, 4, 5])
    )
    with caplog.at_level(logging.INFO, logger="flwr"):
        strategy.aggregate_train(1, [reply_to(m, model(1.0)) for m in msgs])
    assert "FedAvg then receives the robust aggregate as 1 result" in caplog.text


# ------------------------------------------------------------- composition
def _refusal(factory) -> str:
    with pytest.raises(ValueError) as err:
        factory()
    return str(err.value)


def test_no_error_suggests_a_composition_that_is_then_refused():
    """CenteredClipping(DPFedAvg(...)) said 'put the DP wrapper outside'..."""
    dp = dict(num_clients=10, noise_multiplier=1.0, clipping_norm=1.0)
    robust_over_dp = _refusal(lambda: CenteredClipping(DPFedAvg(FedAvg(), **dp)))
    dp_over_robust = _refusal(lambda: DPFedAvg(CenteredClipping(), **dp))  # refused
    for message in (robust_over_dp, dp_over_robust):
        assert "outside" not in message.lower(), message
        # ... the sound answer instead: record-level DP-SGD with the robust rule
        assert "make_private" in message and "robust rule on the server" in message


def test_the_suggested_composition_is_accepted():
    """Robust rule on the server + DP-SGD in the ClientApp: the apps allow it."""
    from flwr_ext.appkit.strategies import build_strategy

    sys.path.insert(0, str(ROOT / "apps" / "hospital-diagnostics"))
    try:
        from hospital_diagnostics.settings import check_server_settings, load_settings
    finally:
        sys.path.pop(0)
    settings = load_settings(
        {"strategy": "centered-clipping", "dp-sgd": True, "min-nodes": 3}
    )
    check_server_settings(settings)
    assert isinstance(build_strategy(settings), CenteredClipping)


# -------------------------------------------------------------------- CLI
def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"flwr-ext {flwr_ext.__version__}"


def _help_texts() -> dict[str, str]:
    parser = build_parser()
    texts = {"flwr-ext": parser.format_help()}
    subparsers = next(
        a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"
    )
    for name, sub in subparsers.choices.items():
        texts[name] = sub.format_help()
        for action in sub._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for inner, leaf in action.choices.items():
                    texts[f"{name} {inner}"] = leaf.format_help()
    return texts


def test_cli_help_is_plain_text():
    texts = _help_texts()
    assert {"keys", "simulate", "keys create"} <= set(texts)
    for name, text in texts.items():
        assert not re.search(r"``|:(func|mod|class|meth|data):`", text), (name, text)


def test_cli_help_documents_the_exit_codes():
    text = _help_texts()["flwr-ext"]
    assert "exit status" in text
    for code, meaning in (("0", "success"), ("1", "run failed"), ("2", "usage")):
        assert re.search(rf"^\s*{code}\s+.*{meaning}", text, re.M), text
    readme = (ROOT / "README.md").read_text()
    assert "exit code" in readme.lower() and "`2`" in readme


def test_key_file_errors_speak_api_or_cli_not_both(tmp_path, capsys):
    from flwr_ext.he import create_keys

    assert main(["keys", "create", "--out", str(tmp_path), "--profile", "compact"]) == 0
    capsys.readouterr()
    assert main(["keys", "create", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and "overwrite=True" not in err
    with pytest.raises(FileExistsError) as api:
        create_keys(tmp_path, "compact")
    assert "overwrite=True" in str(api.value) and "--force" not in str(api.value)
