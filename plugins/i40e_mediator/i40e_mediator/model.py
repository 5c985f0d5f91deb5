"""A software model of the X710 VF's PCI identity and BARs (its behaviour comes later)."""

from __future__ import annotations

from typing import Any

VENDOR_ID = 0x8086
DEVICE_ID = 0x154C
CLASS_ETHERNET = 0x020000
BAR0_SIZE = 64 * 1024
BAR3_SIZE = 16 * 1024
MSIX_VECTORS = 5
MSIX_PBA_OFFSET = 0x2000


def spec() -> dict[str, Any]:
    """The VF's PCI function as plain data: BAR0 registers, BAR3 MSI-X."""
    return {
        "vendor_id": VENDOR_ID,
        "device_id": DEVICE_ID,
        "class_code": CLASS_ETHERNET,
        "subsystem_vendor_id": VENDOR_ID,
        "subsystem_id": 0x0000,
        "revision": 0x02,
        "bars": [
            {"index": 0, "size": BAR0_SIZE, "kind": "mem64", "prefetchable": True},
            {"index": 3, "size": BAR3_SIZE, "kind": "mem64", "prefetchable": True},
        ],
        "msix": {
            "vectors": MSIX_VECTORS,
            "table_bar": 3,
            "table_offset": 0,
            "pba_bar": 3,
            "pba_offset": MSIX_PBA_OFFSET,
        },
    }


def create() -> tuple[dict[str, Any], Any]:
    """The ``vfio_mediate.devices`` factory: the spec and (for now) no behaviour object."""
    return spec(), None
