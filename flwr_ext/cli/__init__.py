"""``flwr-ext`` command line: one sub-command per module in this package.

Each sub-command module exposes ``register(subparsers)`` which adds its parser and
sets ``handler`` (a function ``(args) -> int`` returning the exit code).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import keys, simulate

__all__ = ["main"]

_COMMANDS = (simulate, keys)


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="flwr-ext",
        description="Tools for flwr-ext: run apps in simulation, manage CKKS keys.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in _COMMANDS:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flwr-ext`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except (ValueError, FileNotFoundError, RuntimeError, TimeoutError) as err:
        print(f"flwr-ext {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
