"""``flwr-ext simulate APP``: run a Flower app in simulation and report the outcome.

Unlike a bare ``flwr run``, this waits for the run to finish, exits non-zero if
it failed, prints the ServerApp log, and leaves no Flower process behind. It starts
a private simulation SuperLink (own ``FLWR_HOME`` and port), so it never touches
``~/.flwr`` or a SuperLink the user already runs.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

from ..launch import simulate

__all__ = ["register"]

#: ``flwr-ext simulate --help``: plain text (the module docstring is reST).
DESCRIPTION = """\
Run a Flower app in Flower's Simulation Engine and report the outcome.

Unlike a bare `flwr run`, this waits for the run to finish, prints the
ServerApp log, exits 1 if the run failed (a ServerApp error, or a strategy
whose rounds never produced a model), and leaves no Flower process behind. It
starts a private simulation SuperLink (its own FLWR_HOME and port), so it never
touches ~/.flwr or a SuperLink you already run.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``simulate`` sub-command."""
    parser = subparsers.add_parser(
        "simulate",
        help="run a Flower app in Flower's Simulation Engine and wait for the result",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "app", type=Path, help="the Flower app folder (has pyproject.toml)"
    )
    parser.add_argument(
        "--num-supernodes", type=int, default=3, help="simulated SuperNodes (default 3)"
    )
    parser.add_argument(
        "-c",
        "--run-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a run config value, TOML syntax: -c num-server-rounds=5 "
        "-c 'strategy=\"krum\"' (repeatable)",
    )
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds to wait (default 3600)"
    )
    parser.set_defaults(handler=_run)


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    """Parse ``KEY=VALUE`` strings whose values are TOML (``5``, ``"x"``, ``true``)."""
    overrides: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"run config override {pair!r} is not KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare word: treat it as a string
        overrides[key.strip()] = value
    return overrides


def declared_run_config(app: Path) -> set[str]:
    """Return the run-config keys ``app/pyproject.toml`` declares.

    Nested tables count with dotted names, as Flower flattens them.
    """
    with (app / "pyproject.toml").open("rb") as handle:
        project = tomllib.load(handle)
    table = project.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})
    keys: set[str] = set()

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}{key}.", inner)
        else:
            keys.add(prefix[:-1])

    walk("", table)
    return keys


def check_overrides_declared(app: Path, overrides: dict[str, object]) -> None:
    """Raise ValueError naming every override key the app does not declare.

    Flower refuses such a run with "[code: 15] Invalid run configuration." and
    names the key only in the SuperLink's log; this says which key, where to
    declare it, and (for the attack mod's keys) the lines to add.
    """
    from ..attacks.mod import RUN_CONFIG_KEYS, RUN_CONFIG_TOML

    missing = sorted(set(overrides) - declared_run_config(app))
    if not missing:
        return
    message = (
        f"run config key(s) {', '.join(repr(k) for k in missing)} not declared in "
        f"{app / 'pyproject.toml'} [tool.flwr.app.config]: Flower refuses a key "
        "the app does not declare. Add each with its default value there"
    )
    if set(missing) & set(RUN_CONFIG_KEYS):
        message += (
            ". The attack mod (flwr_ext.attacks.byzantine_mod) needs all three of "
            f"its keys:\n{RUN_CONFIG_TOML}"
        )
    raise ValueError(message)


def _run(args: argparse.Namespace) -> int:
    app = Path(args.app).resolve()
    if not (app / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{app} is not a Flower app folder (no pyproject.toml)")
    if args.num_supernodes < 1:
        raise ValueError(f"--num-supernodes must be >= 1, got {args.num_supernodes}")
    overrides = parse_overrides(args.run_config)
    check_overrides_declared(app, overrides)
    print(
        f"flwr-ext simulate: running {app.name} with {args.num_supernodes} "
        "simulated SuperNodes in Flower's Simulation Engine...",
        flush=True,
    )
    outcome = simulate(
        app,
        num_supernodes=args.num_supernodes,
        run_config=overrides,
        timeout=args.timeout,
    )
    sys.stdout.write(outcome.log)
    print(
        f"\nflwr-ext simulate: run {outcome.run_id} {outcome.status} "
        f"in {outcome.elapsed_s:.0f} s"
        + (f" ({outcome.details})" if not outcome.completed else "")
    )
    return 0 if outcome.completed else 1
