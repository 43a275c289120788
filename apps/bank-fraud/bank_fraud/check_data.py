"""Check a bank's CSV against the consortium's schema before joining a run.

Run it where the file is, with the run config the consortium agreed on::

    python -m bank_fraud.check_data /data/transactions.csv
    python -m bank_fraud.check_data /data/creditcard.csv -c 'data-format="creditcard"'
    python -m bank_fraud.check_data /data/export.csv --schema-path /data/schema.json

It reads the file exactly as the ClientApp will (same schema, log transform and
split) and prints what each split holds - or the error the ClientApp would
reply with, naming the column and row. Exit status 0 if the file is usable, 1 if
not. Nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

from flwr_ext.appkit.config import ConfigError
from flwr_ext.appkit.site import SiteSpec
from flwr_ext.appkit.tabular import SchemaError

from .settings import SCHEMA, load_settings
from .task import data_spec, describe_rows, load_site_data

__all__ = ["main"]


def _overrides(pairs: Sequence[str]) -> dict[str, object]:
    values: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise ConfigError("run config", [f"{pair!r} is not KEY=VALUE"])
        try:
            values[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[key.strip()] = raw
    return values


def main(argv: Sequence[str] | None = None) -> int:
    """Check one CSV file; print a summary or the error. Return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("path", type=Path, help="the bank's CSV file")
    parser.add_argument(
        "--schema-path",
        type=Path,
        default=None,
        help="JSON column schema (as node config schema-path)",
    )
    parser.add_argument(
        "-c",
        "--run-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run config override (TOML value)",
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings({**SCHEMA.defaults(), **_overrides(args.run_config)})
        site = SiteSpec(
            "check",
            args.path.resolve(),
            None,
            None,
            args.schema_path.resolve() if args.schema_path else None,
        )
        spec = data_spec(settings, site)
        data = load_site_data(site, settings)
    except (ConfigError, SchemaError, ValueError) as err:
        print(f"NOT USABLE: {err}", file=sys.stderr)
        return 1
    print(f"{args.path}: usable")
    print(
        f"  label '{spec.schema.label}' (fraud = {spec.schema.positive_label!r}), "
        f"{len(spec.schema.features)} features, log1p on "
        f"{', '.join(spec.log_columns) or 'none'}"
    )
    split = f"by time column '{spec.time_column}'" if spec.time_column else "stratified"
    print(f"  split {split}:")
    for name in ("train", "validation", "test"):
        print(f"    {name:<10} {describe_rows(getattr(data, name))}")
    return 0


if __name__ == "__main__":  # pragma: no cover - command line
    raise SystemExit(main())
