"""Live migration of a device and its guest memory, driven by dirty page logging.

``LiveMigration`` does what a VMM does with the VFIO migration v2 and DMA logging uAPI:

1. the destination device goes to RESUMING; the source starts DMA logging over guest memory
   and, when it offers PRE_COPY, enters it (its initial state goes to the destination);
2. round 0 copies all of guest memory; each later round copies the pages dirtied since the
   round before: the source device's dirty bitmap (what the device wrote by DMA) together with
   the pages the guest CPU wrote (the workload's ``take_cpu_dirty``, what KVM's dirty log gives
   a real VMM). Rounds stop when few pages remain or after ``max_rounds``;
3. stop and copy: the guest and the source stop (STOP_COPY), the last dirty pages and the
   device state go over, the destination loads it (STOP) and its config space is written as the
   source's (the VMM's own part of the device state);
4. verification (not counted as downtime): memory byte for byte, and the destination's state,
   saved again, against the source's;
5. the destination runs (RUNNING); downtime is from the stop to here.

The guest runs while memory is copied: one slice of guest time (``GuestWorkload.run``) for every
``pages_per_slice`` pages copied, so the less there is to copy, the less the guest dirties, as
with vCPUs running beside the copy.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, final

from ._device_migration import MigrationStream
from ._dirty import bitmap_pages
from ._errors import MigrationError
from ._pages import pages_of, runs
from .uapi import PAGE_SIZE, MigrationFlag, MigrationState, RegionIndex, RegionInfo

__all__ = [
    "CopyRound",
    "GuestWorkload",
    "LiveMigration",
    "MigratableDevice",
    "MigrationProgress",
    "MigrationReport",
    "Workload",
]

_CHUNK = 64 << 10
"""Migration data is moved in pieces this big (well under a vfio-user message's limit)."""


class MigratableDevice(Protocol):
    """What ``LiveMigration`` drives, in-process or over a socket: the region access, migration
    v2 and DMA dirty logging of ``MediatedDevice``, which ``server.VfioUserClient`` speaks too.

    Errors are ``AccessError`` (``MigrationError`` for state changes) carrying the errno.
    """

    name: str

    def read(self, index: int, offset: int, count: int) -> bytes:
        """Read ``count`` bytes of region ``index`` at ``offset``."""

    def write(self, index: int, offset: int, data: bytes) -> int:
        """Write ``data`` to region ``index`` at ``offset``; returns the bytes written."""

    def region_info(self, index: int) -> RegionInfo:
        """Region ``index``'s info."""

    @property
    def migration_flags(self) -> int:
        """The migration v2 flags (``MigrationFlag`` bits; 0: no migration)."""

    @property
    def migration_state(self) -> MigrationState:
        """The current migration v2 state."""

    def set_migration_state(self, target: int) -> MigrationState:
        """Go to ``target`` through Linux's arcs; returns the state reached (``target``)."""

    def read_migration_data(self, size: int) -> bytes:
        """Up to ``size`` saved bytes; ``b""`` at the end of what is saved so far."""

    def write_migration_data(self, data: bytes) -> int:
        """Add ``data`` to the state to load (in RESUMING); returns the bytes taken."""

    @property
    def migration_pending(self) -> int:
        """Saved bytes not yet read."""

    def dma_logging_start(self, page_size: int, ranges: list[tuple[int, int]]) -> int:
        """Start logging the device's DMA writes of ``ranges`` ``(iova, length)``; returns
        the page size the device logs at."""

    def dma_logging_report(self, iova: int, length: int, page_size: int) -> bytes:
        """Read and clear the dirty bitmap of ``[iova, iova + length)`` (a bit per page)."""

    def dma_logging_stop(self) -> None:
        """Stop logging."""

    @property
    def dma_logging(self) -> bool:
        """Whether dirty logging runs."""


class GuestWorkload(Protocol):
    """A guest that keeps using the device and its memory while it is migrated."""

    def run(self) -> object:
        """Run one slice of guest time."""

    def take_cpu_dirty(self) -> Iterable[tuple[int, int]]:
        """The ``(iova, length)`` ranges the guest CPU wrote since the last call."""


class Workload(GuestWorkload, Protocol):
    """What a ``vfio_mediate.workloads`` entry point's factory returns.

    The factory is called as ``factory(device, memory, iova, *, seed=0)``: ``device`` offers
    ``read``/``write``/``set_irq_triggers`` (a ``MediatedDevice``), ``memory`` is the guest memory
    (at least 4 MiB) mapped at ``iova`` in the device's DMA space, or a ``VfioUserClient``
    of a device served by another process (no ``set_irq_triggers`` then).

    The factory may carry ``far_end``: a callable that ``migrate-demo --transport vfio-user``
    calls in each serve process before the device is built, and whose result it keeps there,
    for what the guest's traffic reaches beyond the device (a NIC's link partner on the
    process's switch).
    """

    def start(self) -> None:
        """Bring the device up as the guest's driver does."""

    def move_to(self, device: Any, memory: memoryview) -> Workload:
        """The same guest continuing on another device and memory (after a migration)."""

    def stats(self) -> dict[str, int]:
        """Counters, at least ``received`` (packets checked good) and ``corrupt``."""


@dataclass(frozen=True)
class CopyRound:
    """One pass over guest memory."""

    number: int
    phase: str  # "full", "pre-copy" or "stop-copy"
    device_pages: int  # dirty pages the device's bitmap reported
    cpu_pages: int  # pages the guest CPU wrote
    pages: int  # pages copied (the union)
    seconds: float


@dataclass(frozen=True)
class MigrationProgress:
    """Where a migration is, for a progress display."""

    phase: str
    round: int
    copied: int
    total: int


@dataclass
class MigrationReport:
    """What a migration did and whether it worked."""

    memory_pages: int
    rounds: list[CopyRound] = field(default_factory=list)
    converged: bool = False
    precopy_state_bytes: int = 0
    state_bytes: int = 0
    downtime: float = 0.0
    memory_equal: bool = False
    state_equal: bool = False

    @property
    def ok(self) -> bool:
        """Memory and device state arrived intact."""
        return self.memory_equal and self.state_equal

    def as_dict(self) -> dict[str, Any]:
        """The report as plain data."""
        return {**asdict(self), "ok": self.ok}


@final
class LiveMigration:
    """Migrate ``source`` and its guest memory to ``destination`` under a running guest.

    Each device is a ``MediatedDevice`` in this process or a ``VfioUserClient`` of a device
    served by another (then each memory is a mapping of the memfd the client DMA-mapped).

    ``source_memory`` and ``destination_memory`` are the guest memory of each side, mapped at
    ``iova`` in the respective device's DMA space (the caller maps them). Both devices are open
    and RUNNING; afterwards the destination runs and the source is stopped.
    """

    def __init__(
        self,
        source: MigratableDevice,
        destination: MigratableDevice,
        source_memory: memoryview,
        destination_memory: memoryview,
        iova: int,
        guest: GuestWorkload | None = None,
        *,
        page_size: int = PAGE_SIZE,
        max_rounds: int = 8,
        stop_pages: int = 64,
        pages_per_slice: int = 64,
    ) -> None:
        if len(source_memory) != len(destination_memory) or len(source_memory) % page_size:
            raise ValueError("both memories must have the same size, a multiple of the page size")
        self.source = source
        self.destination = destination
        self.source_memory = source_memory.cast("B")
        self.destination_memory = destination_memory.cast("B")
        self.iova = iova
        self.guest = guest
        self.page_size = page_size
        self.pages = len(source_memory) // page_size
        self.max_rounds = max_rounds
        self.stop_pages = stop_pages
        self.pages_per_slice = pages_per_slice
        self._progress: Callable[[MigrationProgress], None] | None = None
        self._sent = MigrationStream()

    def run(self, progress: Callable[[MigrationProgress], None] | None = None) -> MigrationReport:
        """Migrate; ``progress`` hears of every copied chunk and phase change."""
        self._progress = progress
        self._sent = MigrationStream()
        report = MigrationReport(memory_pages=self.pages)
        flags = self.source.migration_flags
        if not flags & MigrationFlag.STOP_COPY or not self.destination.migration_flags:
            raise MigrationError(
                errno.ENOTTY,
                f"{self.source.name} and {self.destination.name} must both support migration",
            )
        self.destination.set_migration_state(MigrationState.RESUMING)
        self.source.dma_logging_start(self.page_size, [(self.iova, len(self.source_memory))])
        try:
            if flags & MigrationFlag.PRE_COPY:
                self.source.set_migration_state(MigrationState.PRE_COPY)
                report.precopy_state_bytes = self._forward_state()
            self._take_cpu_dirty()
            report.rounds.append(self._copy(0, "full", list(range(self.pages)), 0, 0))
            for number in range(1, self.max_rounds + 1):
                device, cpu = self._device_dirty(), self._take_cpu_dirty()
                done = self._copy(number, "pre-copy", sorted(device | cpu), len(device), len(cpu))
                report.rounds.append(done)
                if done.pages <= self.stop_pages:
                    report.converged = True
                    break
            stopped = time.perf_counter()
            self.source.set_migration_state(MigrationState.STOP_COPY)
            report.state_bytes = self._forward_state()
            device, cpu = self._device_dirty(), self._take_cpu_dirty()
            number = len(report.rounds)
            pages = sorted(device | cpu)
            report.rounds.append(
                self._copy(number, "stop-copy", pages, len(device), len(cpu), guest=False)
            )
        finally:
            if self.source.dma_logging:
                self.source.dma_logging_stop()
        config = self.source.region_info(RegionIndex.CONFIG).size
        self.destination.write(
            RegionIndex.CONFIG, 0, self.source.read(RegionIndex.CONFIG, 0, config)
        )
        self.destination.set_migration_state(MigrationState.STOP)
        loaded = time.perf_counter()
        self._notify("verify", number, 0, 1)
        report.memory_equal = self._memory_equal()
        report.state_equal = self._state_equal()
        resumed = time.perf_counter()
        self.destination.set_migration_state(MigrationState.RUNNING)
        self.source.set_migration_state(MigrationState.STOP)
        report.downtime = (loaded - stopped) + (time.perf_counter() - resumed)
        self._notify("done", number, 1, 1)
        return report

    # -- pieces ----------------------------------------------------------------------------

    def _notify(self, phase: str, number: int, copied: int, total: int) -> None:
        if self._progress is not None:
            self._progress(MigrationProgress(phase, number, copied, total))

    def _forward_state(self) -> int:
        """Move what the source saved so far to the destination; returns the bytes moved."""
        moved = 0
        while chunk := self.source.read_migration_data(_CHUNK):
            self.destination.write_migration_data(chunk)
            self._sent.data += chunk
            moved += len(chunk)
        return moved

    def _device_dirty(self) -> set[int]:
        bitmap = self.source.dma_logging_report(self.iova, len(self.source_memory), self.page_size)
        return {page for page in bitmap_pages(bitmap) if page < self.pages}

    def _take_cpu_dirty(self) -> set[int]:
        pages: set[int] = set()
        if self.guest is None:
            return pages
        for iova, length in self.guest.take_cpu_dirty():
            touched = pages_of(iova - self.iova, length, self.page_size)
            pages.update(range(max(0, touched.start), min(self.pages, touched.stop)))
        return pages

    def _copy(
        self,
        number: int,
        phase: str,
        pages: list[int],
        device_pages: int,
        cpu_pages: int,
        *,
        guest: bool = True,
    ) -> CopyRound:
        """Copy ``pages`` (sorted), giving the guest a slice every ``pages_per_slice``."""
        started = time.perf_counter()
        source, target, size = self.source_memory, self.destination_memory, self.page_size
        step = self.pages_per_slice
        for at in range(0, len(pages), step):
            for first, last in runs(pages[at : at + step]):
                target[first * size : (last + 1) * size] = source[first * size : (last + 1) * size]
            self._notify(phase, number, min(at + step, len(pages)), len(pages))
            if guest and self.guest is not None:
                self.guest.run()
        if not pages:
            self._notify(phase, number, 0, 0)
        return CopyRound(
            number, phase, device_pages, cpu_pages, len(pages), time.perf_counter() - started
        )

    def _memory_equal(self) -> bool:
        source, target = self.source_memory, self.destination_memory
        return all(
            source[at : at + _CHUNK] == target[at : at + _CHUNK]
            for at in range(0, len(source), _CHUNK)
        )

    def _state_equal(self) -> bool:
        """Save the destination's state again (STOP -> STOP_COPY -> STOP) and compare it with
        the last state the source saved."""
        self.destination.set_migration_state(MigrationState.STOP_COPY)
        saved = MigrationStream()
        while chunk := self.destination.read_migration_data(_CHUNK):
            saved.data += chunk
        self.destination.set_migration_state(MigrationState.STOP)
        return saved.last_chunk() == self._sent.last_chunk()
