"""Helpers of the i40e tests: a VF with its memory, the DMA ground truth, bitmaps."""

from __future__ import annotations

from dataclasses import dataclass, field

from i40e_mediator import registers as r
from i40e_mediator.guest import Guest
from i40e_mediator.model import I40eVf

from vfio_mediate import EmulatedPciDevice, MediatedDevice
from vfio_mediate._dirty import bitmap_pages
from vfio_mediate.uapi import PAGE_SIZE, IrqIndex

GUEST_IOVA = 0x4000_0000
MEMORY_SIZE = 2 << 20


@dataclass
class Vf:
    """One VF: the emulated function, the mediated device in front of it, guest memory."""

    backend: EmulatedPciDevice
    device: MediatedDevice
    memory: memoryview
    iova: int = GUEST_IOVA
    interrupts: list[int] = field(default_factory=list)

    @property
    def model(self) -> I40eVf:
        """The VF's behaviour object."""
        model = self.backend.model
        assert isinstance(model, I40eVf)
        return model

    def guest(self, **options: int) -> Guest:
        """A started guest driver on this VF."""
        guest = Guest(self.device, self.memory, self.iova, **options)
        guest.start()
        return guest

    def count_interrupts(self) -> None:
        """Record every MSI-X vector raised in ``interrupts``."""
        self.device.set_irq_triggers(
            IrqIndex.MSIX,
            0,
            [lambda v=v: self.interrupts.append(v) for v in range(r.MSIX_VECTORS)],
        )

    def reg(self, offset: int) -> int:
        """Read a BAR0 register through the mediated device."""
        return int.from_bytes(self.device.read(r.BAR0, offset, 4), "little")

    def set_reg(self, offset: int, value: int) -> None:
        """Write a BAR0 register through the mediated device."""
        self.device.write(r.BAR0, offset, value.to_bytes(4, "little"))

    def mem(self, iova: int, length: int) -> bytes:
        """Guest memory at ``iova``."""
        return bytes(self.memory[iova - self.iova : iova - self.iova + length])

    def mem_u64(self, iova: int) -> int:
        """A little-endian 64-bit word of guest memory."""
        return int.from_bytes(self.mem(iova, 8), "little")


class WriteRecorder:
    """The ground truth: every page the device wrote by DMA (``DmaSpace.watch``)."""

    def __init__(self) -> None:
        self.pages: set[int] = set()
        self.recording = True

    def __call__(self, iova: int, length: int) -> None:
        if self.recording:
            self.pages.update(range(iova // PAGE_SIZE, (iova + length - 1) // PAGE_SIZE + 1))

    def take(self) -> set[int]:
        """The pages written since the last call (IOVA page numbers)."""
        pages, self.pages = self.pages, set()
        return pages


def report(vf: Vf, iova: int = GUEST_IOVA, length: int = MEMORY_SIZE) -> set[int]:
    """Read and clear ``vf``'s dirty bitmap: the IOVA page numbers reported."""
    bitmap = vf.device.dma_logging_report(iova, length, PAGE_SIZE)
    return {iova // PAGE_SIZE + page for page in bitmap_pages(bitmap)}
