"""``vfio-mediate probe``: which mediator claims a device, and the regions it presents."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .._device import MediatedDevice
from .._device_factory import create_device
from .._entry_points import default_device_model
from .._registry import MediatorRegistry
from ..uapi import PCI_NUM_REGIONS, RegionFlag, RegionIndex, RegionInfo
from ._defaults import DEFAULT_DEVICE_HELP


def register(subparsers: Any) -> None:
    """Add the ``probe`` subcommand."""
    parser = subparsers.add_parser(
        "probe",
        help="show which mediator claims a device and its region table",
        description="Open a device once, as a VMM would, and show the winner and its regions. "
        "Refuses while an installed mediator failed to load (VFIO_MEDIATE_DISABLE=NAME leaves "
        "it out).",
    )
    parser.add_argument(
        "--device",
        metavar="SPEC",
        help=(
            "a device model name, a TOML spec file or the PCI address of a device bound to "
            f"vfio-pci (0000:01:10.0) ({DEFAULT_DEVICE_HELP})"
        ),
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)


def region_name(index: int) -> str:
    """``BAR0``, ``CONFIG``, ... or ``DEV9`` for device-specific regions."""
    return RegionIndex(index).name if index < PCI_NUM_REGIONS else f"DEV{index}"


def region_row(info: RegionInfo, mediated: bool) -> dict[str, Any]:
    """One region as plain data for the report."""
    return {
        "index": info.index,
        "name": region_name(info.index),
        "size": info.size,
        "flags": [str(flag.name).lower() for flag in RegionFlag if info.wire_flags & flag],
        "mmap_areas": [[a.offset, a.size] for a in info.mmap_areas()],
        "type": None if info.type is None else [info.type.type, info.type.subtype],
        "mediated": mediated,
    }


def run(args: argparse.Namespace) -> int:
    """Open the device under every installed mediator and report the winner; refuses while
    an installed mediator failed to load (the device could be its and show "passthrough")."""
    registry = MediatorRegistry.from_entry_points()
    registry.require_loaded()
    backend = create_device(args.device or default_device_model())
    try:
        with MediatedDevice(backend, registry) as device:
            winner = device.mediator
            report: dict[str, Any] = {
                "device": device.name,
                "vendor_id": backend.identity.vendor_id,
                "device_id": backend.identity.device_id,
                "mediator": winner.name if winner else None,
                "distribution": winner.distribution if winner else None,
                "dirty_tracking": device.dma_logging_source,
                "kernel_migration": getattr(backend, "migration_feature", None),
                "regions": [
                    region_row(info, info.index in device.mediated_regions)
                    for info in device.regions
                ],
            }
    finally:
        backend.close()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    who = f"{report['mediator']} ({report['distribution']})" if winner else "none (passthrough)"
    print(f"device {report['device']} {report['vendor_id']:04x}:{report['device_id']:04x}")
    print(f"mediator {who}")
    print(f"{'REGION':<8} {'SIZE':>10}  {'FLAGS':<22} {'MEDIATED':<9} MMAP AREAS")
    for row in report["regions"]:
        if not row["size"]:
            continue
        areas = ", ".join(f"{o:#x}+{s:#x}" for o, s in row["mmap_areas"]) or "-"
        flags = "|".join(row["flags"])
        mediated = "yes" if row["mediated"] else "no"
        print(f"{row['name']:<8} {row['size']:>#10x}  {flags:<22} {mediated:<9} {areas}")
    return 0
