"""``vfio-mediate list``: every installed mediator and device model, loaded or not."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .._entry_points import discover_device_models
from .._registry import MediatorRegistry


def register(subparsers: Any) -> None:
    """Add the ``list`` subcommand."""
    parser = subparsers.add_parser(
        "list",
        help="list installed mediators and device models",
        description="List every mediator (in the order they are asked) and device model, "
        "loaded or with the error that kept it out; the exit status is 1 if any failed to load.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print every plugin; exit status 1 when any failed to load (all are still listed)."""
    registry = MediatorRegistry.from_entry_points()
    records = [*registry.mediators, *registry.failures, *discover_device_models()]
    rows = [record.as_dict() for record in records]
    status = 1 if any(record.error is not None for record in records) else 0
    if args.json:
        print(json.dumps(rows, indent=2))
        return status
    print(f"{'NAME':<16} {'GROUP':<24} {'DISTRIBUTION':<24} {'PRIORITY':<9} STATUS")
    for row in rows:
        dist = f"{row['distribution'] or '-'} {row['version'] or ''}".strip()
        loaded = row["status"] if row["error"] is None else f"error: {row['error']}"
        priority = row["priority"] or "-"
        print(f"{row['name']:<16} {row['group']:<24} {dist:<24} {priority:<9} {loaded}")
    return status
