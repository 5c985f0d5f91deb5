"""What a device model implements (``DeviceModel``) and the bus it gets (``Bus``), and the one
place the core reads a model's methods (``ModelMethods``).

A model is plain Python, shipped by a vendor package that imports nothing of vfio-mediate: these
protocols say what the core calls and hands in, for the vendor's type checker (import them under
``TYPE_CHECKING``). Every method is optional; the core looks each up once, when it builds the
device, never per access.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, final

__all__ = ["Bus", "DeviceModel", "DmaAccess", "ModelMethods"]


class DmaAccess(Protocol):
    """The device's DMA: guest memory at IOVAs, as an IOMMU lets a device reach it.

    Both raise ``OSError`` (``EFAULT``: not mapped, ``EPERM``: the mapping forbids it).
    """

    def read(self, iova: int, length: int) -> bytes:
        """Read ``length`` bytes at ``iova``."""
        ...

    def write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``iova``."""
        ...


class Bus(Protocol):
    """What a model gets from the bus it sits on (``attach``)."""

    @property
    def dma(self) -> DmaAccess:
        """The device's DMA."""
        ...

    def bar(self, index: int) -> memoryview:
        """BAR ``index``'s memory, shared with every client that maps it."""
        ...

    def raise_msix(self, vector: int) -> None:
        """Raise MSI-X ``vector`` (pending while masked or without a trigger)."""
        ...

    @property
    def bus_master(self) -> bool:
        """Whether the command register lets the device do DMA."""
        ...


class DeviceModel(Protocol):
    """A device's behaviour: the methods the core calls, each optional.

    - ``attach(bus)``: called once, when the device is built, with its ``Bus``;
    - ``bar_read(bar, offset, count)``: a read of a trapped BAR register: exactly ``count``
      bytes, or ``None`` to read the BAR's memory;
    - ``computed_reads(bar)``: the ``(offset, size)`` ranges of BAR ``bar`` whose reads
      ``bar_read`` computes, asked once when the device is built (``None``: any read may be).
      A read that touches none of them reads the BAR's memory without calling ``bar_read``,
      so ``bar_read`` must answer ``None`` for every such read;
    - ``bar_write(bar, offset, data)``: a write of a trapped BAR register: ``True`` when the
      model handled it, ``False`` to store it in the BAR's memory;
    - ``mmap_areas(bar)``: the ``(offset, size)`` areas of BAR ``bar`` a client may map
      (``None``: all of it); the rest is trapped and reaches ``bar_read``/``bar_write``;
    - ``reset()``: a function reset, after the core cleared config space and BAR memory.

    ``bar_read`` and ``bar_write`` run under the device's lock, one at a time. Refuse an access
    with ``OSError`` and an errno.
    """

    def attach(self, bus: Bus) -> None:
        """Keep the bus."""
        ...

    def bar_read(self, bar: int, offset: int, count: int) -> bytes | None:
        """A register read, or ``None``."""
        ...

    def computed_reads(self, bar: int) -> list[tuple[int, int]] | None:
        """The ranges of BAR ``bar`` ``bar_read`` computes, or ``None`` for all of it."""
        ...

    def bar_write(self, bar: int, offset: int, data: bytes) -> bool:
        """A register write; whether the model handled it."""
        ...

    def mmap_areas(self, bar: int) -> list[tuple[int, int]] | None:
        """The mappable areas of BAR ``bar``, or ``None`` for all of it."""
        ...

    def reset(self) -> None:
        """Reset registers and queues."""
        ...


@final
@dataclass(frozen=True, slots=True)
class ModelMethods:
    """The ``DeviceModel`` methods a model object has (``None`` for each it lacks)."""

    attach: Callable[[Bus], None] | None = None
    bar_read: Callable[[int, int, int], bytes | None] | None = None
    computed_reads: Callable[[int], list[tuple[int, int]] | None] | None = None
    bar_write: Callable[[int, int, bytes], bool] | None = None
    mmap_areas: Callable[[int], list[tuple[int, int]] | None] | None = None
    reset: Callable[[], None] | None = None

    @classmethod
    def of(cls, model: Any) -> ModelMethods:
        """Look up each method of ``model`` (``None``: a device without behaviour)."""
        if model is None:
            return cls()
        return cls(
            getattr(model, "attach", None),
            getattr(model, "bar_read", None),
            getattr(model, "computed_reads", None),
            getattr(model, "bar_write", None),
            getattr(model, "mmap_areas", None),
            getattr(model, "reset", None),
        )
