"""``MediatedDevice``: one device and, while it is open, the pieces its winning mediator drives.

Those pieces, each a module of its own: the winner (``WinningMediator``, absent when nobody
claimed the device), the region table (``RegionTable``), the migration state machine
(``DeviceMigration``), dirty logging (``DmaLogging``) and interrupt routing (``IrqRouting``).
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Any, final

from ._backend import DeviceBackend, RegionMapping, Trigger
from ._device_migration import DeviceMigration
from ._device_view import DeviceView
from ._dma import DmaMapping, DmaSpace, RemoteMemory
from ._dma_logging import DmaLogging
from ._entry_points import PluginRecord
from ._errors import AccessError, DeviceNotOpenError
from ._hook_types import Device
from ._irq_routing import IrqRouting
from ._regions import RegionEntry, RegionTable
from ._registry import MediatorRegistry
from ._rules import Rule
from ._winner import WinningMediator
from .uapi import PCI_NUM_REGIONS, DeviceInfo, IrqInfo, MigrationState, RegionInfo

__all__ = ["MediatedDevice"]

logger = logging.getLogger(__name__)


@final
class MediatedDevice:
    """A device whose accesses go first to the mediator that claimed it at open.

    ``open``/``close`` are use-counted: the first open asks the registry for a mediator (first
    match), the last close releases it. In between, ``read``/``write``/``mmap`` of a region go
    through a handler resolved at open: the backend's own for regions the mediator does not
    mediate (no plugin call), one direct call of the mediator's ``mediator_rw`` for the others.
    A device nobody claims is plain passthrough. Every operation but ``open`` on a device that
    is not open raises ``DeviceNotOpenError`` (``ENODEV``).

    Threads: open, close, region info, reset, migration and dirty logging are serialized by a
    lock; region accesses take no lock (they are the hot path), so a caller must not let an
    access run across the last ``close`` (the handle is released there).
    """

    def __init__(
        self,
        backend: DeviceBackend,
        registry: MediatorRegistry | None = None,
        *,
        name: str | None = None,
    ) -> None:
        self.backend = backend
        self.registry = registry if registry is not None else MediatorRegistry()
        self.name = name or backend.name
        self._lock = threading.RLock()
        self._opens = 0
        self._winner: WinningMediator | None = None
        self._regions: RegionTable | None = None
        self.region_handlers: dict[int, RegionEntry] = {}
        """Per region index, its size and its bound read and write handlers (bounds checked
        in them): the table's, replaced whole (never changed in place), so looked up without a
        lock; empty while closed. Callers on a hot path may call the handlers directly."""
        self._migration = DeviceMigration(self.name, None)
        self._logging = DmaLogging(self.name, None)
        self._irqs = IrqRouting(self.name, backend, None)

    def __repr__(self) -> str:
        winner = self._winner.record.name if self._winner else None
        return f"<MediatedDevice {self.name} open={self._opens} mediator={winner}>"

    # -- lifetime ----------------------------------------------------------------------

    def open(self) -> None:
        """Open the device; the first open runs the first-match search and builds the table."""
        with self._lock:
            if self._opens == 0:
                self._attach()
            self._opens += 1

    def close(self) -> None:
        """Close once; the last close releases the mediator exactly once."""
        with self._lock:
            self._require_open()
            self._opens -= 1
            if self._opens == 0:
                self._detach()

    def __enter__(self) -> MediatedDevice:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        """Whether the device has been opened more often than closed."""
        return self._opens > 0

    @property
    def mediator(self) -> PluginRecord | None:
        """The winning mediator, or ``None`` (plain passthrough or not open)."""
        return self._winner.record if self._winner else None

    @property
    def handle(self) -> Any:
        """The winning mediator's handle (for inspection; opaque to everyone else)."""
        return self._winner.handle if self._winner else None

    def _attach(self) -> None:
        view: Device = DeviceView(self.backend)  # the contract's type, checked here
        winner = WinningMediator.search(self.registry, view, self)
        if winner is not None:
            logger.info("%s claimed by mediator %s", self.name, winner.record.describe())
        try:
            regions = RegionTable(self.name, self.backend, winner)
        except BaseException:
            if winner is not None:
                winner.release()
            raise
        self._winner, self._regions, self.region_handlers = winner, regions, regions.entries
        self._migration = DeviceMigration(self.name, winner)
        self._logging = DmaLogging(self.name, winner, self.backend)
        self._irqs = IrqRouting(self.name, self.backend, winner)

    def _detach(self) -> None:
        winner = self._winner
        self.region_handlers, self._regions = {}, None
        self._logging.stop_quietly()
        self._migration = DeviceMigration(self.name, None)
        self._logging = DmaLogging(self.name, None)
        self._irqs.close()
        self._irqs = IrqRouting(self.name, self.backend, None)
        self._winner = None
        if winner is not None:
            winner.release()

    def _require_open(self) -> RegionTable:
        regions = self._regions
        if regions is None:
            raise DeviceNotOpenError(self.name)
        return regions

    # -- regions -----------------------------------------------------------------------

    def device_info(self) -> DeviceInfo:
        """The device's info; ``num_regions`` counts the mediator's own regions too."""
        own = self.backend.device_info()
        regions = max([own.num_regions - 1, *self.region_handlers]) + 1
        return own.model_copy(update={"num_regions": regions})

    def region_info(self, index: int) -> RegionInfo:
        """Region ``index``'s info, as the mediator presents it now (asked anew each time)."""
        with self._lock:
            regions = self._require_open()
            info = regions.refresh(index)
            self.region_handlers = regions.entries
            return info

    @property
    def regions(self) -> tuple[RegionInfo, ...]:
        """Every region's info, as of the last time it was asked (none while closed)."""
        regions = self._regions
        return () if regions is None else tuple(info for _, info in sorted(regions.infos.items()))

    @property
    def mediated_regions(self) -> frozenset[int]:
        """The region indexes whose accesses go to the mediator."""
        regions = self._regions
        return frozenset() if regions is None else regions.mediated

    def read(self, index: int, offset: int, count: int) -> bytes:
        """Read ``count`` bytes of region ``index`` at ``offset``."""
        entry = self.region_handlers.get(index)
        if entry is None:
            raise self._no_region(index)
        return entry[1](offset, count)  # the handler checks the bounds

    def write(self, index: int, offset: int, data: bytes) -> int:
        """Write ``data`` to region ``index`` at ``offset``; returns the bytes written."""
        entry = self.region_handlers.get(index)
        if entry is None:
            raise self._no_region(index)
        return entry[2](offset, data)

    def _no_region(self, index: int) -> AccessError:
        if not self._opens:
            return DeviceNotOpenError(self.name)
        return AccessError(errno.EINVAL, f"{self.name} has no region {index}")

    def mmap(self, index: int, offset: int, length: int) -> RegionMapping:
        """Where to map ``length`` bytes of region ``index`` at ``offset``, which must lie in
        one of the region's mmap-able areas."""
        with self._lock:
            regions = self._require_open()
            info = regions.infos.get(index)
            if info is None:
                raise AccessError(errno.EINVAL, f"{self.name} has no region {index}")
            if length <= 0 or not any(
                area.offset <= offset and offset + length <= area.end for area in info.mmap_areas()
            ):
                raise AccessError(
                    errno.EINVAL,
                    f"{self.name}: region {index} {offset:#x}+{length:#x} is not mmap-able",
                )
            winner = self._winner
            if winner is not None and index in regions.mediated:
                answer = winner.call("mediator_mmap", index, offset, length)
                if answer is not None:
                    if not (
                        isinstance(answer, tuple)
                        and len(answer) == 2
                        and all(isinstance(v, int) and v >= 0 for v in answer)
                    ):
                        raise winner.violation(
                            Rule.MMAP_RESULT, f"mediator_mmap returned {answer!r}, not (fd, offset)"
                        )
                    return RegionMapping(*answer)
            if index >= PCI_NUM_REGIONS:
                raise AccessError(errno.EINVAL, f"{self.name}: region {index} cannot be mapped")
            return self.backend.mmap(index, offset, length)

    # -- interrupts, reset, DMA --------------------------------------------------------

    def irq_info(self, index: int) -> IrqInfo:
        """The info of IRQ index ``index`` (``EINVAL`` for an index the device lacks)."""
        if not 0 <= index < self.backend.device_info().num_irqs:
            raise AccessError(errno.EINVAL, f"{self.name} has no IRQ index {index}")
        return self.backend.irq_info(index)

    def set_irq_triggers(self, index: int, start: int, triggers: Sequence[Trigger | None]) -> None:
        """Set (or with ``None`` unset) the triggers of vectors ``start`` onward; a vector the
        mediator observes reaches it first (see ``IrqRouting``)."""
        self._irqs.set_triggers(index, start, triggers)

    def fire_irqs(self, index: int, start: int, count: int) -> None:
        """Raise vectors ``start`` to ``start + count - 1`` of IRQ index ``index`` (the
        backend does; here because the server asks it of any served device)."""
        self.backend.fire_irqs(index, start, count)

    # -- DMA: the backend owns it (a real device maps into its IOMMU) ------------------------

    def dma_map(
        self, iova: int, size: int, fd: int, offset: int = 0, *, readable: bool = True,
        writable: bool = True,
    ) -> DmaMapping:  # fmt: skip
        """Give the device client memory (the caller keeps ``fd``); see ``DeviceBackend``."""
        return self.backend.dma_map(iova, size, fd, offset, readable=readable, writable=writable)

    def dma_map_remote(
        self, iova: int, size: int, remote: RemoteMemory, *, readable: bool = True,
        writable: bool = True,
    ) -> DmaMapping:  # fmt: skip
        """Give the device memory reached by messages (a real device refuses: ``ENOTSUP``)."""
        return self.backend.dma_map_remote(iova, size, remote, readable=readable, writable=writable)

    def dma_unmap(self, iova: int, size: int) -> None:
        """Take back a mapping (for a real device: out of the IOMMU first)."""
        self.backend.dma_unmap(iova, size)

    def reset(self) -> None:
        """Reset the device; the mediator hears of it first. Migration is RUNNING after it."""
        with self._lock:
            self._require_open()
            if self._winner is not None:
                self._winner.call("mediator_reset")
            self.backend.reset()
            self._migration.reset()

    @property
    def dma(self) -> DmaSpace | None:
        """The device's DMA address space."""
        return self.backend.dma

    # -- migration v2 (see DeviceMigration) ------------------------------------------------

    @property
    def migration_flags(self) -> int:
        """The migration v2 flags the mediator offers for this device (0: no migration)."""
        with self._lock:
            self._require_open()
            return self._migration.flags()

    @property
    def migration_state(self) -> MigrationState:
        """The current migration v2 state (RUNNING after open and after reset)."""
        return self._migration.state

    def set_migration_state(self, target: int) -> MigrationState:
        """Go to ``target`` through single arcs; returns the new state.

        An illegal transition raises ``MigrationError(EINVAL)`` with the state unchanged; a step
        the mediator fails puts the device in ERROR and raises ``MigrationError``.
        """
        with self._lock:
            self._require_open()
            return self._migration.set_state(target)

    def read_migration_data(self, size: int) -> bytes:
        """Read saved state (in PRE_COPY, PRE_COPY_P2P or STOP_COPY); ``b""`` at the end."""
        with self._lock:
            return self._migration.read_data(size)

    def write_migration_data(self, data: bytes) -> int:
        """Write state to load (in RESUMING)."""
        with self._lock:
            return self._migration.write_data(data)

    @property
    def migration_pending(self) -> int:
        """Saved bytes not yet read (``VFIO_DEVICE_FEATURE_MIG_DATA_SIZE``)."""
        return self._migration.pending

    # -- DMA dirty logging (see DmaLogging) ------------------------------------------------

    def dma_logging_start(self, page_size: int, ranges: Iterable[tuple[int, int]]) -> int:
        """Start logging DMA writes of ``ranges`` at ``page_size`` granularity (returned)."""
        with self._lock:
            self._require_open()
            return self._logging.start(page_size, ranges)

    def dma_logging_report(self, iova: int, length: int, page_size: int) -> bytes:
        """Read and clear the dirty bitmap of ``[iova, iova + length)``."""
        with self._lock:
            return self._logging.report(iova, length, page_size)

    def dma_logging_stop(self) -> None:
        """Stop logging."""
        with self._lock:
            self._logging.stop()

    @property
    def dma_logging_source(self) -> str | None:
        """Who logs dirty pages: ``"mediator"``, ``"iommu"`` or ``None`` (see ``DmaLogging``)."""
        return self._logging.source

    @property
    def dma_logging_supported(self) -> bool:
        """Whether dirty pages can be logged (by the mediator or the IOMMU)."""
        return self._logging.supported

    @property
    def dma_logging(self) -> bool:
        """Whether dirty logging runs."""
        return self._logging.log is not None
