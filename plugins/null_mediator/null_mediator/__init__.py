"""The null mediator: the reference plugin and a template for vendors.

It claims every device, but last (``trylast``), so any vendor mediator that targets a device
wins over it. It passes every access through and counts what it saw, per device.

A mediator is plain pluggy: it makes its own marker for the ``vfio_mediate`` project and never
imports ``vfio_mediate``. Everything it needs arrives as arguments.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import pluggy

__all__ = ["NullHandle", "hookimpl"]

hookimpl = pluggy.HookimplMarker("vfio_mediate")
logger = logging.getLogger(__name__)


class NullHandle:
    """Per-device state: the device's name and counts of what the mediator saw."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.reads: Counter[int] = Counter()
        self.writes: Counter[int] = Counter()
        self.region_infos = 0

    def __repr__(self) -> str:
        reads, writes = sum(self.reads.values()), sum(self.writes.values())
        return f"<NullHandle {self.name} reads={reads} writes={writes}>"


@hookimpl
def mediator_targets() -> list[dict[str, Any]]:
    """Any device: a plain function with one memory BAR serves as the example."""
    return [
        {
            "name": "null-example",
            "vendor_id": 0x1AF4,
            "device_id": 0x10F0,
            "class_code": 0xFF0000,
            "bars": [{"index": 0, "size": 0x1000, "kind": "mem32"}],
        }
    ]


@hookimpl(trylast=True)
def mediator_open(device: Any) -> NullHandle:
    """Claim any device (the registry asks us last)."""
    logger.debug("null mediator claims %s", device.name)
    return NullHandle(device.name)


@hookimpl
def mediator_release(handle: NullHandle) -> None:
    """Nothing to free; log what was seen."""
    logger.debug("null mediator releases %r", handle)


@hookimpl
def mediator_get_region_info(handle: NullHandle, info: dict[str, Any]) -> None:
    """Keep every region as the device presents it."""
    handle.region_infos += 1


@hookimpl
def mediator_rw(
    handle: NullHandle, index: int, offset: int, count: int, data: bytes | None, is_write: bool
) -> None:
    """Count the access and pass it through."""
    if is_write:
        handle.writes[index] += 1
    else:
        handle.reads[index] += 1
