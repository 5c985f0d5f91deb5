"""What a mediator and a device model see of a device's DMA space: reads and writes, nothing
else (no mapping, no unmapping, and no ``watch``, the write record tests judge logging by)."""

from __future__ import annotations

from typing import final

from ._dma import DmaSpace

__all__ = ["DmaView"]


@final
class DmaView:
    """``read(iova, length) -> bytes`` and ``write(iova, data)`` of a ``DmaSpace``, as a device
    reaches guest memory through an IOMMU; errors are the space's (``AccessError``: ``EFAULT``
    unmapped, ``EPERM`` forbidden)."""

    __slots__ = ("read", "write")

    def __init__(self, space: DmaSpace) -> None:
        # The space's bound methods: a DMA costs what it costs on the space. This is the
        # contract's surface, not a sandbox (plugins run in the core's process).
        self.read = space.read
        self.write = space.write

    def __repr__(self) -> str:
        return "<DmaView read/write>"
