"""The ``vfio-mediate`` command. Each subcommand lives in a ``cmd_*`` module of this package
with a ``register(subparsers)`` function; errors end as one line and a non-zero exit."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
from collections.abc import Sequence
from typing import NoReturn

from .. import _registry
from .._entry_points import load_entry_point
from .._errors import VfioMediateError

__all__ = ["main"]

_VERBOSE_HELP = "log more (-v info, -vv debug)"


class _Parser(argparse.ArgumentParser):
    """A parser whose usage errors are one line (naming the problem and where help is)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser with every subcommand found in this package."""
    parser = _Parser(
        prog="vfio-mediate",
        description="Mediate VFIO devices through vendor plugins and serve them over vfio-user.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help=_VERBOSE_HELP)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if module.name.startswith("cmd_"):
            importlib.import_module(f"{__name__}.{module.name}").register(subparsers)
    for subparser in subparsers.choices.values():
        # -v after the command as well as before it (counted together).
        subparser.add_argument(
            "-v", "--verbose", action="count", default=0, dest="verbose_after", help=_VERBOSE_HELP
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.verbose += args.verbose_after
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # Plugins that failed to load are the commands' own report (list's table, the refusal
        # of serve and probe): not a warning before it as well. The loggers are those of the
        # registry and of entry-point loading.
        for name in {_registry.__name__, load_entry_point.__module__}:
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        status: int = args.func(args)
    except BrokenPipeError:
        # The reader of our output went away (`probe --json | head`): what it did not read is
        # not an error of ours. Point stdout at /dev/null so the exit flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (VfioMediateError, OSError) as exc:
        print(f"vfio-mediate: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status
