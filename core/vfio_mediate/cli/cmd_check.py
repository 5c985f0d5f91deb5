"""``vfio-mediate check``: run the plugin conformance suite on an installed mediator."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from typing import Any

PLUGIN = "vfio_mediate.conformance"
"""The suite's pytest plugin (also the name of its ``pytest11`` entry point). Not imported
here: it needs pytest and hypothesis, which the other commands must not."""
NEEDS = ("pytest", "hypothesis")


def register(subparsers: Any) -> None:
    """Add the ``check`` subcommand."""
    parser = subparsers.add_parser(
        "check",
        help="run the conformance suite on an installed mediator",
        description="Check the mediator installed under entry point NAME against every rule of "
        "the hook contract (the conformance suite, run by pytest). Arguments after NAME go to "
        "pytest, e.g. -x, -q, -k rw. The exit status is pytest's.",
    )
    parser.add_argument("name", metavar="NAME", help="the mediator's entry-point name")
    rest = parser.add_argument("pytest_args", nargs=argparse.REMAINDER, help="arguments for pytest")
    rest.required = False  # argparse would name it among the missing arguments without NAME
    parser.set_defaults(func=run)


def command(name: str, pytest_args: list[str]) -> list[str]:
    """The pytest command line that checks mediator ``name``: the suite alone."""
    return [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        PLUGIN,
        "--mediator",
        name,
        "--conformance-only",
        *pytest_args,
    ]


def run(args: argparse.Namespace) -> int:
    """Run pytest in a fresh interpreter, not with ``pytest.main`` here: pytest rewrites the
    assertions of plugin packages as it imports them, and this process has already imported
    vfio_mediate (pytest would warn that it cannot)."""
    missing = [module for module in NEEDS if importlib.util.find_spec(module) is None]
    if missing:
        print(
            f"vfio-mediate: error: check needs {' and '.join(missing)}: "
            "pip install 'vfio-mediate[check]'",
            file=sys.stderr,
        )
        return 2
    return subprocess.run(command(args.name, args.pytest_args), check=False).returncode
