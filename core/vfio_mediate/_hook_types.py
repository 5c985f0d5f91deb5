"""The types of what the core hands a mediator's hooks: protocols and plain-data shapes.

A mediator imports nothing of vfio-mediate at run time; for its type checker it may import
these from ``vfio_mediate.hookspecs`` under ``typing.TYPE_CHECKING``.
"""

from __future__ import annotations

from typing import Any, Protocol, TypedDict

from ._model import DmaAccess

__all__ = ["Device", "DirtyPageLog", "DmaAccess", "RegionInfoData"]


class RegionInfoData(TypedDict):
    """A region's info as plain data (``mediator_get_region_info``, ``mediator_device_regions``).

    ``flags``: READ 1 | WRITE 2 | MMAP 4; ``sparse_mmap``: the ``[offset, size]`` areas a client
    may map (``None``: all of the region when MMAP is set); ``type``: ``[type, subtype]`` of a
    device-specific region; ``offset``: the region's offset in the device file.
    """

    index: int
    flags: int
    size: int
    offset: int
    sparse_mmap: list[list[int]] | None
    type: list[int] | None
    msix_mappable: bool


class Device(Protocol):
    """What ``mediator_open`` receives: a device's identity and its own (default) handlers.

    The handlers are safe to call from any thread and from any hook, as long as the device is
    open (from ``mediator_open`` until ``mediator_release`` returns).
    """

    @property
    def name(self) -> str: ...
    @property
    def vendor_id(self) -> int: ...
    @property
    def device_id(self) -> int: ...
    @property
    def subsystem_vendor_id(self) -> int: ...
    @property
    def subsystem_id(self) -> int: ...
    @property
    def class_code(self) -> int:
        """24 bits: class, subclass, prog-if."""
        ...

    @property
    def revision(self) -> int: ...
    @property
    def dma(self) -> DmaAccess | None:
        """The device's DMA (read and write of guest memory at IOVAs), or ``None``."""
        ...

    @property
    def model(self) -> Any:
        """The behaviour object of an emulated device model (a ``DeviceModel``), or ``None``."""
        ...

    def read(self, index: int, offset: int, count: int, /) -> bytes:
        """The device's own read of region ``index``."""
        ...

    def write(self, index: int, offset: int, data: bytes, /) -> int:
        """The device's own write of region ``index``; returns the bytes written."""
        ...

    def mmap(self, index: int, offset: int, length: int, /) -> tuple[int, int]:
        """The device's own mapping of a region area: ``(fd, file_offset)``."""
        ...

    def region_info(self, index: int) -> RegionInfoData:
        """The device's own info of region ``index``."""
        ...


class DirtyPageLog(Protocol):
    """The log ``mediator_dma_logging_start`` receives and ``mediator_dma_logging_report``
    marks before each report."""

    @property
    def page_size(self) -> int: ...
    @property
    def ranges(self) -> list[tuple[int, int]]:
        """The logged IOVA ranges, ``(iova, length)``."""
        ...

    def mark(self, iova: int, length: int) -> None:
        """Record that the device wrote (or may write) ``[iova, iova + length)``; outside the
        logged ranges it is ignored. Thread-safe: call it from any thread, a model's too."""
        ...
