"""A software PCI function: config space that behaves like hardware, BARs in shareable memory,
MSI-X, DMA through a ``DmaSpace``, and the device's behaviour from an optional model object."""

from __future__ import annotations

import bisect
import contextlib
import errno
import mmap
import os
import struct
import threading
from collections.abc import Sequence
from typing import Any, final

from ._backend import DeviceIdentity, RegionMapping, Trigger
from ._dma import DmaMapping, DmaSpace, RemoteMemory, anonymous_memory
from ._dma_view import DmaView
from ._errors import AccessError, DeviceSpecError
from ._model import ModelMethods
from ._pages import areas_of_pages, pages_of
from ._regions import Reader, Writer, out_of_range
from ._spec import MSIX_ENTRY_SIZE, BarSpec, DeviceSpec
from .uapi import (
    PAGE_SIZE,
    PCI_EXP_CONFIG_SPACE_SIZE,
    PCI_NUM_REGIONS,
    DeviceFlag,
    DeviceInfo,
    IrqIndex,
    IrqInfo,
    IrqInfoFlag,
    RegionFlag,
    RegionIndex,
    RegionInfo,
    SparseMmapArea,
)

__all__ = ["DeviceBus", "EmulatedPciDevice", "PciConfig"]

_CONFIG = int(RegionIndex.CONFIG)  # an enum member's lookup costs more than the rest of a read
_CONFIG_REGISTER = {1: struct.Struct("B"), 2: struct.Struct("<H"), 4: struct.Struct("<I")}
"""The sizes a guest writes config space in, each merged with its mask in one go."""


class PciConfig:
    """Offsets and bits of the type 0 config header and the capabilities this device has."""

    VENDOR_ID = 0x00
    DEVICE_ID = 0x02
    COMMAND = 0x04
    STATUS = 0x06
    REVISION = 0x08
    CLASS_CODE = 0x09
    CACHE_LINE_SIZE = 0x0C
    LATENCY_TIMER = 0x0D
    HEADER_TYPE = 0x0E
    BAR0 = 0x10
    SUBSYSTEM_VENDOR_ID = 0x2C
    SUBSYSTEM_ID = 0x2E
    ROM_ADDRESS = 0x30
    CAPABILITIES = 0x34
    INTERRUPT_LINE = 0x3C
    INTERRUPT_PIN = 0x3D

    COMMAND_IO = 1 << 0
    COMMAND_MEMORY = 1 << 1
    COMMAND_MASTER = 1 << 2
    COMMAND_INTX_DISABLE = 1 << 10
    COMMAND_PARITY = 1 << 6
    COMMAND_SERR = 1 << 8
    COMMAND_WRITABLE = (
        COMMAND_IO
        | COMMAND_MEMORY
        | COMMAND_MASTER
        | COMMAND_PARITY
        | COMMAND_SERR
        | COMMAND_INTX_DISABLE
    )
    STATUS_CAP_LIST = 1 << 4

    BAR_IO = 0x1
    BAR_MEM64 = 0x4
    BAR_PREFETCH = 0x8

    CAP_ID_PCIE = 0x10
    CAP_ID_MSIX = 0x11
    MSIX_CAP = 0x40
    MSIX_CONTROL = 2
    MSIX_TABLE = 4
    MSIX_PBA = 8
    MSIX_ENABLE = 1 << 15
    MSIX_FUNCTION_MASK = 1 << 14
    MSIX_ENTRY_SIZE = MSIX_ENTRY_SIZE
    MSIX_ENTRY_CONTROL = 12
    MSIX_ENTRY_MASKED = 1 << 0
    PCIE_DEVCTL = 0x08
    PCIE_LNKCTL = 0x10


_MSIX_CONTROL = PciConfig.MSIX_CAP + PciConfig.MSIX_CONTROL
_MSIX_END = _MSIX_CONTROL + 2 + 4
"""Past the last end offset of a config write of at most 4 bytes that touches MSI-X control."""


class DeviceBus:
    """What a device model gets from the bus it sits on: DMA, interrupts, its BAR memory."""

    def __init__(self, device: EmulatedPciDevice) -> None:
        self._device = device
        self._dma = DmaView(device.dma)

    @property
    def dma(self) -> DmaView:
        """The device's DMA: reads and writes of its address space."""
        return self._dma

    def bar(self, index: int) -> memoryview:
        """The memory of BAR ``index`` (shared with every client that maps it)."""
        return self._device.bar_memory(index)

    def raise_msix(self, vector: int) -> None:
        """Raise MSI-X ``vector``: fire its trigger, or mark it pending if it has none or is
        masked."""
        self._device.raise_msix(vector)

    @property
    def bus_master(self) -> bool:
        """Whether the command register lets the device do DMA."""
        return self._device.config_word(PciConfig.COMMAND) & PciConfig.COMMAND_MASTER != 0


@final
class EmulatedPciDevice:
    """A PCIe function built from a ``DeviceSpec``: the backend of a ``MediatedDevice``.

    ``model`` is the device's behaviour, an object with any of the methods of ``DeviceModel``
    (``attach``, ``bar_read``, ``bar_write``, ``mmap_areas``, ``reset``; plain Python, so a vendor
    package can ship one without importing vfio-mediate), looked up once here.
    """

    def __init__(self, spec: DeviceSpec, model: Any = None) -> None:
        self.spec = spec
        self.name = spec.name
        self.identity = DeviceIdentity(
            spec.vendor_id,
            spec.device_id,
            spec.subsystem_vendor_id,
            spec.subsystem_id,
            spec.class_code,
            spec.revision,
        )
        self.model = model
        self.dma = DmaSpace()
        # Interrupts are triggers the function calls; its DMA space watches no IOMMU.
        self.direct_irqs = False
        self.iommu_dirty_tracking = False
        self._lock = threading.RLock()
        self._bars: dict[int, tuple[BarSpec, int, mmap.mmap, memoryview]] = {}
        self._triggers: dict[int, dict[int, Trigger]] = {index: {} for index in IrqIndex}
        try:
            for bar in spec.bars:
                fd, mapped = anonymous_memory(
                    max(bar.size, PAGE_SIZE), f"{spec.name}-bar{bar.index}"
                )
                self._bars[bar.index] = (bar, fd, mapped, memoryview(mapped))
            self._irq_counts: dict[int, int] = {
                int(index): self.irq_info(index).count for index in IrqIndex
            }
            self._config = bytearray(PCI_EXP_CONFIG_SPACE_SIZE)
            self._wmask = bytearray(PCI_EXP_CONFIG_SPACE_SIZE)
            self._build_config()
            self._methods = ModelMethods.of(model)
            self._bar_read = self._methods.bar_read
            self._bar_write = self._methods.bar_write
            if self._methods.attach is not None:
                self._methods.attach(DeviceBus(self))
            self._computed = {bar.index: self._computed_reads(bar) for bar in spec.bars}
        except BaseException:
            self.close()
            raise

    # -- config space ------------------------------------------------------------------

    def _put(self, offset: int, fmt: str, value: int, wmask: int = 0) -> None:
        struct.pack_into("<" + fmt, self._config, offset, value)
        struct.pack_into("<" + fmt, self._wmask, offset, wmask)

    def _build_config(self) -> None:
        spec, c = self.spec, PciConfig
        self._put(c.VENDOR_ID, "H", spec.vendor_id)
        self._put(c.DEVICE_ID, "H", spec.device_id)
        self._put(c.COMMAND, "H", 0, c.COMMAND_WRITABLE)
        self._put(c.STATUS, "H", c.STATUS_CAP_LIST)
        self._put(c.REVISION, "B", spec.revision)
        self._config[c.CLASS_CODE : c.CLASS_CODE + 3] = spec.class_code.to_bytes(3, "little")
        self._put(c.CACHE_LINE_SIZE, "B", 0, 0xFF)
        self._put(c.LATENCY_TIMER, "B", 0, 0xFF)
        self._put(c.SUBSYSTEM_VENDOR_ID, "H", spec.subsystem_vendor_id)
        self._put(c.SUBSYSTEM_ID, "H", spec.subsystem_id)
        self._put(c.INTERRUPT_LINE, "B", 0, 0xFF)
        self._put(c.INTERRUPT_PIN, "B", spec.interrupt_pin)
        for bar in spec.bars:
            at = c.BAR0 + 4 * bar.index
            if bar.kind == "io":
                self._put(at, "I", c.BAR_IO, ~(bar.size - 1) & 0xFFFFFFFC)
                continue
            bits = (c.BAR_MEM64 if bar.kind == "mem64" else 0) | (
                c.BAR_PREFETCH if bar.prefetchable else 0
            )
            mask = ~(bar.size - 1) & 0xFFFF_FFFF_FFFF_FFF0
            self._put(at, "I", bits, mask & 0xFFFFFFF0)
            if bar.kind == "mem64":
                self._put(at + 4, "I", 0, mask >> 32)
        pcie = c.MSIX_CAP
        if spec.msix is not None:
            pcie = c.MSIX_CAP + 0x10
            msix = spec.msix
            self._put(c.MSIX_CAP, "B", c.CAP_ID_MSIX)
            self._put(c.MSIX_CAP + 1, "B", pcie)
            self._put(
                c.MSIX_CAP + c.MSIX_CONTROL,
                "H",
                msix.vectors - 1,
                c.MSIX_ENABLE | c.MSIX_FUNCTION_MASK,
            )
            self._put(c.MSIX_CAP + c.MSIX_TABLE, "I", msix.table_offset | msix.table_bar)
            self._put(c.MSIX_CAP + c.MSIX_PBA, "I", msix.pba_offset | msix.pba_bar)
        self._put(c.CAPABILITIES, "B", c.MSIX_CAP)
        self._put(pcie, "B", c.CAP_ID_PCIE)
        self._put(pcie + 2, "H", 0x0002)  # capability version 2, PCI Express endpoint
        self._put(pcie + c.PCIE_DEVCTL, "H", 0, 0x7FFF)  # bit 15 (FLR) is not offered
        self._put(pcie + c.PCIE_LNKCTL, "H", 0, 0x0FFF)
        self._config_defaults = bytes(self._config)

    def config_word(self, offset: int) -> int:
        """A 16-bit config register's current value."""
        return int.from_bytes(self._config[offset : offset + 2], "little")

    def _config_write(self, offset: int, data: bytes) -> None:
        config, wmask = self._config, self._wmask
        register = _CONFIG_REGISTER.get(len(data))
        if register is not None:
            unpack = register.unpack_from
            (mask,), (old,), (new,) = unpack(wmask, offset), unpack(config, offset), unpack(data)
            register.pack_into(config, offset, (old & ~mask) | (new & mask))
            return
        for i, value in enumerate(data, offset):
            config[i] = (config[i] & ~wmask[i]) | (value & wmask[i])

    # -- regions -----------------------------------------------------------------------

    def device_info(self) -> DeviceInfo:
        """A resettable PCI device with the nine vfio-pci regions and five IRQ indexes."""
        return DeviceInfo(
            flags=DeviceFlag.PCI | DeviceFlag.RESET,
            num_regions=PCI_NUM_REGIONS,
            num_irqs=len(IrqIndex),
        )

    def region_info(self, index: int) -> RegionInfo:
        """CONFIG (4 KiB), each BAR with the areas the model lets clients map, empty others."""
        if index == RegionIndex.CONFIG:
            return RegionInfo(
                index=index,
                flags=RegionFlag.READ | RegionFlag.WRITE,
                size=PCI_EXP_CONFIG_SPACE_SIZE,
            )
        entry = self._bars.get(index)
        if entry is None:
            return RegionInfo(index=index)
        bar = entry[0]
        flags = RegionFlag.READ | RegionFlag.WRITE
        if bar.kind == "io" or bar.size < PAGE_SIZE:
            return RegionInfo(index=index, flags=flags, size=bar.size)
        areas = self._mmap_areas(index, bar)
        if not areas:
            return RegionInfo(index=index, flags=flags, size=bar.size)
        sparse = (
            None
            if areas == [(0, bar.size)]
            else tuple(SparseMmapArea(offset=o, size=s) for o, s in areas)
        )
        return RegionInfo(
            index=index, flags=flags | RegionFlag.MMAP, size=bar.size, sparse_mmap=sparse
        )

    def _mmap_areas(self, index: int, bar: BarSpec) -> list[tuple[int, int]]:
        """Mappable pages: the model's choice, less the MSI-X table and PBA pages (trapped, as
        vfio-pci does, so that masking and pending bits stay the device's)."""
        chosen = self._methods.mmap_areas
        areas = chosen(index) if chosen is not None else None
        pages: set[int] = set()
        for offset, size in [(0, bar.size)] if areas is None else areas:
            pages.update(pages_of(offset, size))
        msix = self.spec.msix
        if msix is not None:
            for bar_index, offset, size in (
                (msix.table_bar, msix.table_offset, msix.table_size),
                (msix.pba_bar, msix.pba_offset, msix.pba_size),
            ):
                if bar_index == index:
                    pages.difference_update(pages_of(offset, size))
        return areas_of_pages(pages)

    def bar_memory(self, index: int) -> memoryview:
        """The shared memory of BAR ``index``."""
        entry = self._bars.get(index)
        if entry is None:
            raise AccessError(errno.EINVAL, f"{self.name} has no BAR{index}")
        return entry[3][: entry[0].size]

    def _computed_reads(self, bar: BarSpec) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """The model's computed ranges of ``bar`` as the sorted starts and ends of disjoint
        ranges, or ``None`` when every read goes to the model."""
        computed_reads = self._methods.computed_reads
        if computed_reads is None or self._bar_read is None:
            return None
        ranges = computed_reads(bar.index)
        if ranges is None:
            return None
        merged: list[list[int]] = []
        try:
            for offset, size in sorted((int(o), int(n)) for o, n in ranges):
                if offset < 0 or size <= 0 or offset + size > bar.size:
                    raise ValueError(f"range {offset:#x}+{size:#x} outside the BAR")
                if merged and offset <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], offset + size)
                else:
                    merged.append([offset, offset + size])
        except (TypeError, ValueError) as exc:
            raise DeviceSpecError(
                f"{self.name}: the model's computed_reads({bar.index}) returned "
                f"{ranges!r:.60}, not (offset, size) ranges of the BAR: {exc}"
            ) from exc
        return tuple(start for start, _ in merged), tuple(end for _, end in merged)

    def region_handlers(self, index: int, size: int) -> tuple[Reader, Writer] | None:
        """Bound ``read(offset, count)`` and ``write(offset, data)`` of region ``index`` (of
        ``size`` bytes), each refusing an access outside it, for the regions with a shorter
        path than ``read``/``write`` (config space, a BAR's reads); ``None`` for the others."""
        if index == _CONFIG:
            return self._config_handlers(index, size)
        entry = self._bars.get(index)
        if entry is None:
            return None
        memory, bar_read, write, name = entry[2], self._bar_read, self.write, self.name
        acquire, release = self._lock.acquire, self._lock.release
        computed = self._computed.get(index)
        starts, ends = computed if computed is not None else ((), ())
        after = bisect.bisect_right
        last = len(ends)

        def read_bar(offset: int, count: int) -> bytes:
            if offset < 0 or count <= 0 or offset + count > size:
                raise out_of_range(index, offset, count, size)
            if bar_read is None:
                return memory[offset : offset + count]
            if computed is not None:
                at = after(ends, offset)  # the first computed range that ends past offset
                if at == last or starts[at] >= offset + count:
                    return memory[offset : offset + count]
            acquire()
            try:
                value = bar_read(index, offset, count)
                if value is None:
                    return memory[offset : offset + count]
            finally:
                release()
            if len(value) != count:
                raise AccessError(
                    errno.EIO, f"{name}: model read {len(value)} bytes for a {count}-byte read"
                )
            return bytes(value)

        def write_bar(offset: int, data: bytes) -> int:
            if offset < 0 or not data or offset + len(data) > size:
                raise out_of_range(index, offset, len(data), size)
            return write(index, offset, data)

        return read_bar, write_bar

    def _config_handlers(self, index: int, size: int) -> tuple[Reader, Writer]:
        config, write = self._config, self.write
        # Bound methods in a try: a ``with`` block costs twice as much on every write.
        acquire, release = self._lock.acquire, self._lock.release
        # An aligned write of 1, 2 or 4 bytes is one cell of a view of that size, merged with
        # the cell's write mask (fixed once the device is built). The views and the data are
        # read in native order: the merge is bitwise, so any one order is the bytes' own.
        whole, wmask = memoryview(config), memoryview(self._wmask)
        views = {
            1: (whole.cast("B"), wmask.cast("B"), struct.Struct("=B").unpack),
            2: (whole.cast("H"), wmask.cast("H"), struct.Struct("=H").unpack),
            4: (whole.cast("I"), wmask.cast("I"), struct.Struct("=I").unpack),
        }
        # Per size, per offset written so far that takes the short path: its cell.
        spots: dict[int, dict[int, tuple[memoryview, int, int, int, Any]]] = {
            count: {} for count in views
        }

        def read_config(offset: int, count: int) -> bytes:
            if offset < 0 or count <= 0 or offset + count > size:
                raise out_of_range(index, offset, count, size)
            return whole[offset : offset + count].tobytes()

        def first_write(offset: int, data: bytes) -> int:
            end = offset + len(data)
            if offset < 0 or not data or end > size:
                raise out_of_range(index, offset, len(data), size)
            if offset % len(data) or len(data) not in views or _MSIX_CONTROL < end < _MSIX_END:
                return write(index, offset, data)  # unaligned, or may unmask MSI-X
            values, masks, unpack = views[len(data)]
            at = offset // len(data)
            spots[len(data)][offset] = (values, at, ~masks[at], masks[at], unpack)
            return write_config(offset, data)

        def write_config(offset: int, data: bytes) -> int:
            cells = spots.get(len(data))
            spot = None if cells is None else cells.get(offset)
            if spot is None:
                return first_write(offset, data)
            values, at, keep, mask, unpack = spot
            acquire()
            try:
                values[at] = (values[at] & keep) | (unpack(data)[0] & mask)
            finally:
                release()
            return len(data)

        return read_config, write_config

    def read(self, index: int, offset: int, count: int) -> bytes:
        """Read config space or a BAR (through the model for its registers)."""
        if index == _CONFIG:
            return bytes(self._config[offset : offset + count])
        entry = self._bars.get(index)
        if entry is None:
            raise AccessError(errno.EINVAL, f"{self.name}: region {index} has no memory")
        bar_read = self._bar_read
        if bar_read is not None:
            lock = self._lock
            lock.acquire()  # not ``with``: it costs twice as much on every read
            try:
                value = bar_read(index, offset, count)
                if value is None:
                    return entry[2][offset : offset + count]  # an mmap slice is bytes: one copy
            finally:
                lock.release()
            if len(value) != count:
                raise AccessError(
                    errno.EIO, f"{self.name}: model read {len(value)} bytes for a {count}-byte read"
                )
            return bytes(value)
        return entry[2][offset : offset + count]

    def write(self, index: int, offset: int, data: bytes) -> int:
        """Write config space (writable bits only) or a BAR (through the model)."""
        if index == _CONFIG:
            with self._lock:
                self._config_write(offset, data)
            if (
                offset < _MSIX_CONTROL + 2
                and offset + len(data) > _MSIX_CONTROL
                and self.spec.msix is not None
            ):
                self._deliver_pending(range(self.spec.msix.vectors))  # function unmasked?
            return len(data)
        entry = self._bars.get(index)
        if entry is None:
            raise AccessError(errno.EINVAL, f"{self.name}: region {index} has no memory")
        with self._lock:
            if self._msix_pba_hit(index, offset, len(data)):
                return len(data)  # the PBA is read-only
            if self._bar_write is None or not self._bar_write(index, offset, bytes(data)):
                entry[3][offset : offset + len(data)] = data
        msix = self.spec.msix
        if (
            msix is not None
            and msix.table_bar == index
            and _overlaps(offset, len(data), msix.table_offset, msix.table_size)
        ):
            first = max(0, offset - msix.table_offset) // PciConfig.MSIX_ENTRY_SIZE
            last = (offset + len(data) - 1 - msix.table_offset) // PciConfig.MSIX_ENTRY_SIZE
            self._deliver_pending(range(first, min(last, msix.vectors - 1) + 1))
        return len(data)

    def _deliver_pending(self, vectors: range) -> None:
        """Fire the pending vectors among ``vectors`` that a trigger and no mask hold back
        any more (an unmask delivers what was held, as MSI-X requires)."""
        for vector in vectors:
            with self._lock:
                if not self._vector_pending(vector) or self._msix_masked(vector):
                    continue
                trigger = self._triggers[IrqIndex.MSIX].get(vector)
                if trigger is None:
                    continue
                self._take_pending(vector)
            trigger()

    def _msix_pba_hit(self, index: int, offset: int, count: int) -> bool:
        msix = self.spec.msix
        return (
            msix is not None
            and msix.pba_bar == index
            and _overlaps(offset, count, msix.pba_offset, msix.pba_size)
        )

    def mmap(self, index: int, offset: int, length: int) -> RegionMapping:
        """A BAR's memfd; the file offset equals the offset in the BAR."""
        entry = self._bars.get(index)
        if entry is None:
            raise AccessError(errno.EINVAL, f"{self.name}: region {index} cannot be mapped")
        return RegionMapping(entry[1], offset)

    # -- interrupts --------------------------------------------------------------------

    def irq_info(self, index: int) -> IrqInfo:
        """INTx when the spec has a pin, MSI-X with the spec's vectors, one ERR and one REQ vector,
        no MSI."""
        if index == IrqIndex.INTX:
            count = 1 if self.spec.interrupt_pin else 0
            return IrqInfo(
                index=index,
                count=count,
                flags=IrqInfoFlag.EVENTFD | IrqInfoFlag.MASKABLE | IrqInfoFlag.AUTOMASKED,
            )
        if index == IrqIndex.MSIX:
            count = self.spec.msix.vectors if self.spec.msix else 0
            return IrqInfo(
                index=index, count=count, flags=IrqInfoFlag.EVENTFD | IrqInfoFlag.NORESIZE
            )
        if index in (IrqIndex.ERR, IrqIndex.REQ):
            # One vector each, as vfio-pci offers a PCIe function: a VMM registers its error
            # and device-request notifiers on them (QEMU warns when it cannot).
            return IrqInfo(index=index, count=1, flags=IrqInfoFlag.EVENTFD)
        if index == IrqIndex.MSI:
            return IrqInfo(index=index, count=0, flags=IrqInfoFlag.EVENTFD)
        raise AccessError(errno.EINVAL, f"no IRQ index {index}")

    def _vectors(self, index: int) -> int:
        count = self._irq_counts.get(index)
        if count is None:
            raise AccessError(errno.EINVAL, f"no IRQ index {index}")
        return count

    def set_irq_triggers(self, index: int, start: int, triggers: Sequence[Trigger | None]) -> None:
        """Set or unset the triggers of vectors ``start`` onward; raise pending ones."""
        count = self._vectors(index)
        if start + len(triggers) > count:
            raise AccessError(
                errno.EINVAL, f"IRQ index {index} has {count} vectors, not {start + len(triggers)}"
            )
        table = self._triggers[index]
        with self._lock:
            for vector, trigger in enumerate(triggers, start):
                if trigger is None:
                    table.pop(vector, None)
                else:
                    table[vector] = trigger
                    if index == IrqIndex.MSIX and self._take_pending(vector):
                        trigger()

    def set_irq_eventfds(self, index: int, start: int, fds: Sequence[int]) -> None:
        """Signal eventfds (``-1`` unsets a vector) from the device's triggers; the caller
        keeps ownership of the fds."""
        self.set_irq_triggers(index, start, [None if fd < 0 else _EventfdSignal(fd) for fd in fds])

    def dma_map(
        self, iova: int, size: int, fd: int, offset: int = 0, *, readable: bool = True,
        writable: bool = True,
    ) -> DmaMapping:  # fmt: skip
        """Map client memory into the device's ``DmaSpace``."""
        return self.dma.map_fd(iova, size, fd, offset, readable=readable, writable=writable)

    def dma_map_remote(
        self, iova: int, size: int, remote: RemoteMemory, *, readable: bool = True,
        writable: bool = True,
    ) -> DmaMapping:  # fmt: skip
        """Map memory reached by messages into the device's ``DmaSpace``."""
        return self.dma.map_remote(iova, size, remote, readable=readable, writable=writable)

    def dma_unmap(self, iova: int, size: int) -> None:
        """Unmap from the device's ``DmaSpace``."""
        self.dma.unmap(iova, size)

    def fire_irqs(self, index: int, start: int, count: int) -> None:
        """Raise vectors ``start`` to ``start + count - 1`` of ``index``."""
        if start < 0 or count < 0 or start + count > self._vectors(index):
            raise AccessError(errno.EINVAL, f"IRQ index {index} has no vector {start + count - 1}")
        for vector in range(start, start + count):
            if index == IrqIndex.MSIX:
                self.raise_msix(vector)
            else:
                trigger = self._triggers[index].get(vector)
                if trigger is not None:
                    trigger()

    def _msix_masked(self, vector: int) -> bool:
        msix = self.spec.msix
        assert msix is not None
        control = self.config_word(PciConfig.MSIX_CAP + PciConfig.MSIX_CONTROL)
        table = self._bars[msix.table_bar][3]
        entry = (
            msix.table_offset + vector * PciConfig.MSIX_ENTRY_SIZE + PciConfig.MSIX_ENTRY_CONTROL
        )
        return bool(
            control & PciConfig.MSIX_FUNCTION_MASK or table[entry] & PciConfig.MSIX_ENTRY_MASKED
        )

    def _vector_pending(self, vector: int) -> bool:
        msix = self.spec.msix
        assert msix is not None
        pba = self._bars[msix.pba_bar][3]
        return bool(pba[msix.pba_offset + vector // 8] & 1 << (vector % 8))

    def raise_msix(self, vector: int) -> None:
        """Fire MSI-X ``vector``'s trigger, or set its pending bit when it is masked or unset."""
        msix = self.spec.msix
        if msix is None or not 0 <= vector < msix.vectors:
            raise AccessError(errno.EINVAL, f"{self.name} has no MSI-X vector {vector}")
        with self._lock:
            trigger = self._triggers[IrqIndex.MSIX].get(vector)
            if trigger is None or self._msix_masked(vector):
                pba = self._bars[msix.pba_bar][3]
                pba[msix.pba_offset + vector // 8] |= 1 << (vector % 8)
                return
        trigger()

    def _take_pending(self, vector: int) -> bool:
        msix = self.spec.msix
        assert msix is not None
        pba = self._bars[msix.pba_bar][3]
        at, bit = msix.pba_offset + vector // 8, 1 << (vector % 8)
        pending = pba[at] & bit
        pba[at] &= ~bit & 0xFF
        return bool(pending)

    # -- lifetime ----------------------------------------------------------------------

    def reset(self) -> None:
        """Function reset: config space to its defaults, BAR memory cleared, model reset."""
        with self._lock:
            self._config[:] = self._config_defaults
            for _, _, _, view in self._bars.values():
                view[:] = bytes(len(view))
            if self._methods.reset is not None:
                self._methods.reset()

    def close(self) -> None:
        """Unmap and close the BAR memory and every DMA mapping."""
        self.dma.unmap_all()
        for _, fd, mapped, view in self._bars.values():
            view.release()
            # A model may still hold a view of the memory: then it is freed with the last view.
            with contextlib.suppress(BufferError):
                mapped.close()
            os.close(fd)
        self._bars.clear()


class _EventfdSignal:
    """A trigger that adds 1 to an eventfd it does not own (never blocking on a full one)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __call__(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.fd, (1).to_bytes(8, "little"))


def _overlaps(offset: int, count: int, start: int, size: int) -> bool:
    return offset < start + size and start < offset + count
