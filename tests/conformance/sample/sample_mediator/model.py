"""A small device that writes guest memory by DMA: the device model of the sample mediator.

BAR0 holds three registers on its first page, which stays trapped: ``DMA_ADDRESS`` (u64),
``DOORBELL`` (u32; any write makes the device write a 64-byte record at ``DMA_ADDRESS``) and
``RECORDS`` (u32, records written). A record it cannot write sets bit 0 of ``STATUS``.
"""

from __future__ import annotations

from typing import Any

VENDOR_ID = 0xC0DE
DMA_DEVICE_ID = 0x5A01
PLAIN_DEVICE_ID = 0x5A02
PAGE = 0x1000
BAR0_SIZE = 4 * PAGE
DMA_ADDRESS = 0x00
DOORBELL = 0x08
RECORDS = 0x0C
STATUS = 0x10
RECORD_SIZE = 64


def spec(device_id: int) -> dict[str, Any]:
    """The PCI function: BAR0 registers, BAR2 MSI-X, BAR4 a data buffer."""
    return {
        "vendor_id": VENDOR_ID,
        "device_id": device_id,
        "class_code": 0xFF0000,
        "bars": [
            {"index": 0, "size": BAR0_SIZE},
            {"index": 2, "size": PAGE},
            {"index": 4, "size": 2 * PAGE},
        ],
        "msix": {
            "vectors": 4,
            "table_bar": 2,
            "table_offset": 0,
            "pba_bar": 2,
            "pba_offset": 0x800,
        },
    }


class SampleDmaModel:
    """The device's behaviour: the doorbell's DMA write."""

    def __init__(self) -> None:
        self.bus: Any = None

    def attach(self, bus: Any) -> None:
        """Keep the bus: BAR memory and DMA."""
        self.bus = bus

    def bar_write(self, bar: int, offset: int, data: bytes) -> bool:
        """Store the write; a write that covers the doorbell rings it."""
        if bar != 0:
            return False
        registers = self.bus.bar(0)
        registers[offset : offset + len(data)] = data
        if offset <= DOORBELL < offset + len(data):
            self._ring(registers)
        return True

    def _ring(self, registers: Any) -> None:
        address = int.from_bytes(registers[DMA_ADDRESS : DMA_ADDRESS + 8], "little")
        count = int.from_bytes(registers[RECORDS : RECORDS + 4], "little")
        try:
            self.bus.dma.write(address, count.to_bytes(8, "little") * (RECORD_SIZE // 8))
        except OSError:
            registers[STATUS] |= 1
            return
        registers[RECORDS : RECORDS + 4] = ((count + 1) & 0xFFFF_FFFF).to_bytes(4, "little")

    def mmap_areas(self, bar: int) -> list[tuple[int, int]] | None:
        """BAR0's register page is trapped; the rest may be mapped."""
        return [(PAGE, BAR0_SIZE - PAGE)] if bar == 0 else None


def create() -> tuple[dict[str, Any], SampleDmaModel]:
    """The ``vfio_mediate.devices`` factory of ``sample-dma``."""
    return spec(DMA_DEVICE_ID), SampleDmaModel()
