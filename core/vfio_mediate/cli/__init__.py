"""The ``vfio-mediate`` command. Each subcommand lives in a ``cmd_*`` module of this package
with a ``register(subparsers)`` function; errors end as one line and a non-zero exit."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

from .._errors import VfioMediateError

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    """The parser with every subcommand found in this package."""
    parser = argparse.ArgumentParser(
        prog="vfio-mediate",
        description="Mediate VFIO devices through vendor plugins and serve them over vfio-user.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if module.name.startswith("cmd_"):
            importlib.import_module(f"{__name__}.{module.name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        status: int = args.func(args)
    except (VfioMediateError, OSError) as exc:
        print(f"vfio-mediate: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status
