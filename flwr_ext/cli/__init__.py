"""``flwr-ext`` command line: one sub-command per module in this package.

Each sub-command module exposes ``register(subparsers)`` which adds its parser and
sets ``handler`` (a function ``(args) -> int`` returning the exit code).

Exit codes (also in ``flwr-ext --help`` and the README): 0 success; 1 the run
failed or did not finish; 2 a usage or input error (a bad argument, a missing or
invalid file: argparse's own code for usage errors).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from . import keys, simulate

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

_COMMANDS = (simulate, keys)

EPILOG = """\
exit status:
  0  success
  1  the run failed, or did not finish in time (flwr-ext simulate)
  2  usage or input error (a bad argument, a missing or invalid file)
"""


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="flwr-ext",
        description="Tools for flwr-ext: run apps in simulation, manage CKKS keys.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in _COMMANDS:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flwr-ext`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except (TimeoutError, RuntimeError) as err:
        print(f"flwr-ext {args.command}: the run failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    except (ValueError, OSError) as err:
        print(f"flwr-ext {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
