"""The narrow interface between ``MediatedDevice`` and the device behind it (its backend)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

from ._dma import DmaMapping, DmaSpace, RemoteMemory
from .uapi import DeviceInfo, IrqInfo, RegionInfo

__all__ = ["DeviceBackend", "DeviceIdentity", "RegionMapping", "Trigger"]

Trigger = Callable[[], None]
"""Raises one interrupt (e.g. writes 1 to an eventfd)."""


class RegionMapping(NamedTuple):
    """Where a client maps a region area: ``length`` bytes of file ``fd`` from ``file_offset``.

    The fd stays owned by the device; a client that keeps it must ``os.dup`` it.
    """

    fd: int
    file_offset: int


class DeviceIdentity(NamedTuple):
    """The PCI identity a mediator sees at open."""

    vendor_id: int
    device_id: int
    subsystem_vendor_id: int
    subsystem_id: int
    class_code: int
    revision: int


@runtime_checkable
class DeviceBackend(Protocol):
    """ "The physical device" behind a ``MediatedDevice``: an emulated PCI function
    (``EmulatedPciDevice``), a device bound to vfio-pci (``VfioPciDevice``), or later a remote
    vfio-user device.

    A backend owns DMA mapping (``dma_map``/``dma_unmap``: a real device maps into its IOMMU)
    and interrupt routing (``set_irq_eventfds`` takes raw eventfds; ``set_irq_triggers`` takes
    callables); ``direct_irqs`` and ``iommu_dirty_tracking`` say what it offers beyond that.

    Region accesses arrive already checked against the region's size. Errors are ``OSError``
    with an errno.
    """

    @property
    def name(self) -> str:
        """The device's name (for logs and errors)."""

    @property
    def identity(self) -> DeviceIdentity:
        """The PCI identity mediators see at open."""

    @property
    def dma(self) -> DmaSpace | None:
        """The DMA address space the device writes guest memory through, if any."""

    @property
    def model(self) -> Any:
        """The behaviour object of an emulated device model, or ``None``."""

    @property
    def direct_irqs(self) -> bool:
        """Whether the device signals eventfds itself (a device bound to vfio-pci): then
        ``MediatedDevice`` gives it the client's eventfds (``set_irq_eventfds``) unless the
        mediator observes the vector, and no Python runs per interrupt."""

    @property
    def iommu_dirty_tracking(self) -> bool:
        """Whether the device's IOMMU can report the pages it dirtied (type1's
        ``VFIO_IOMMU_DIRTY_PAGES``), for a device whose mediator cannot."""

    def device_info(self) -> DeviceInfo:
        """Flags, number of regions and of IRQ indexes."""

    def region_info(self, index: int) -> RegionInfo:
        """The device's own info of region ``index`` (``index < num_regions``)."""

    def read(self, index: int, offset: int, count: int) -> bytes:
        """Read ``count`` bytes of region ``index`` at ``offset``."""

    def write(self, index: int, offset: int, data: bytes) -> int:
        """Write ``data`` to region ``index`` at ``offset``; returns the bytes written."""

    def mmap(self, index: int, offset: int, length: int) -> RegionMapping:
        """Where a client maps ``length`` bytes of region ``index`` at ``offset``."""

    def irq_info(self, index: int) -> IrqInfo:
        """The IRQ index's info."""

    def set_irq_triggers(self, index: int, start: int, triggers: Sequence[Trigger | None]) -> None:
        """Set (or with ``None`` unset) the triggers of vectors ``start`` onward."""

    def set_irq_eventfds(self, index: int, start: int, fds: Sequence[int]) -> None:
        """Route vectors ``start`` onward to eventfds (``-1`` unsets one). The caller keeps
        ownership of the fds. A real device hands them to the kernel (the interrupt never
        passes through Python); an emulated one signals them from its triggers."""

    def fire_irqs(self, index: int, start: int, count: int) -> None:
        """Raise vectors ``start`` to ``start + count - 1`` (VFIO_IRQ_SET_DATA_NONE|TRIGGER)."""

    def dma_map(
        self, iova: int, size: int, fd: int, offset: int = 0, *, readable: bool = True,
        writable: bool = True,
    ) -> DmaMapping:  # fmt: skip
        """Give the device ``size`` bytes of file ``fd`` from ``offset`` at ``iova``: in
        ``dma`` (the server's view) and, for a real device, in its IOMMU at the same IOVA.
        The caller keeps ownership of ``fd``."""

    def dma_map_remote(
        self, iova: int, size: int, remote: RemoteMemory, *, readable: bool = True,
        writable: bool = True,
    ) -> DmaMapping:  # fmt: skip
        """Give the device memory reached by messages; a real device refuses (``ENOTSUP``)."""

    def dma_unmap(self, iova: int, size: int) -> None:
        """Take back the mapping that is exactly ``[iova, iova + size)`` (IOMMU first)."""

    def reset(self) -> None:
        """Reset the device (``VFIO_DEVICE_RESET``)."""

    def close(self) -> None:
        """Free what the device holds (memory, fds)."""
