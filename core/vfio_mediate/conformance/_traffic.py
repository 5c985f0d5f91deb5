"""Dirty logging under the device's own traffic, for device models that ship a guest workload.

The suite's register accesses make a device model do no DMA unless writing a register with
the value it holds starts some; a NIC writes guest memory only when a driver gives it rings and
sends packets. A model may ship such a driver: a guest workload, the entry point of
``vfio_mediate.workloads`` named after the model (``find_workload``, ``Workload``). For a target
built from such a model, ``logged_traffic`` maps guest memory, starts logging, lets the
workload bring the device up and run in slices with a report after every few, stops logging,
runs it unlogged for a while (it posts buffers the device fills once logging runs again) and
logs a second session the same way.

The ground truth is the DMA space's record of every write the device made (``DmaSpace.watch``,
which no real device offers). A page the device wrote while logging must be in a report made
after the write in the same session: reported earlier only, a later copy of the page would be
stale. Pages reported but not written are allowed (over-reporting costs copies, not
correctness) and measured.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import final

from .._device import MediatedDevice
from .._dirty import bitmap_pages
from .._entry_points import find_workload
from .._errors import RegistryError
from .._live_migration import Workload
from ..uapi import PAGE_SIZE
from ._exercises import GUEST_IOVA, guest_memory, guest_pages
from ._targets import Target

__all__ = ["TrafficLog", "logged_traffic", "workload_for"]

TRAFFIC_MEMORY = 4 << 20
"""Guest memory a workload gets (at ``GUEST_IOVA``): room for the rings and buffers of a NIC's
queues; a memfd, so pages the guest never touches cost nothing."""
SESSIONS = 2
"""Logging sessions, with unlogged traffic between them."""
REPORTS_PER_SESSION = 4
SLICES_PER_REPORT = 3
"""Slices of guest time (``Workload.run``) between two reports; a session ends with a report."""
UNLOGGED_SLICES = 2
"""Slices between two sessions, while nothing is logged."""


@dataclass
class TrafficLog:
    """What logging saw under a workload's traffic, summed over every report."""

    sessions: int = 0
    reports: int = 0
    slices: int = 0
    """Slices of guest time while logging ran."""
    written: int = 0
    """Pages the device wrote between two reports (or a session's start and its first)."""
    reported: int = 0
    """Pages the reports gave."""
    missed: set[int] = field(default_factory=set)
    """Pages (from ``GUEST_IOVA``) written while logging and in no later report of the session."""

    @property
    def over_report(self) -> float:
        """Reported pages per written page (1.0: exact; more: over-reported)."""
        return self.reported / self.written if self.written else 0.0

    def name_missed(self, limit: int = 8) -> str:
        """The first ``limit`` missed pages: their numbers and IOVAs."""
        shown = sorted(self.missed)[:limit]
        more = ", ..." if len(self.missed) > limit else ""
        iovas = ", ".join(f"{GUEST_IOVA + page * PAGE_SIZE:#x}" for page in shown)
        return f"page(s) {', '.join(map(str, shown))}{more} (IOVA {iovas}{more})"

    def summary(self) -> str:
        """One line: the traffic, the pages written and reported, and the over-report ratio."""
        missed = len(self.missed) or "none"
        return (
            f"{self.slices} slices of guest traffic in {self.sessions} logging sessions, "
            f"{self.reports} reports: {self.written} pages written while logging, "
            f"{self.reported} reported, {missed} missed; "
            f"over-report ratio {self.over_report:.3f}"
        )


@final
class _DeviceWrites:
    """The DMA space's watcher: the pages the device wrote since the last ``take``, counted
    only while a session records (between ``start`` and ``stop``)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._pages: set[int] | None = None
        self._lock = threading.Lock()  # a device may write from its own threads

    def __call__(self, iova: int, length: int) -> None:
        with self._lock:
            if self._pages is not None:
                self._pages.update(guest_pages(iova, length, self.size))

    def start(self) -> None:
        """Record from now on."""
        with self._lock:
            self._pages = set()

    def take(self) -> set[int]:
        """The pages written since the last ``take`` or ``start``; recording goes on."""
        with self._lock:
            taken, self._pages = self._pages or set(), set()
        return taken

    def stop(self) -> None:
        """Record nothing more."""
        with self._lock:
            self._pages = None


def workload_for(target: Target) -> Callable[..., Workload] | None:
    """The guest workload factory of ``target``'s device model, or ``None`` for a plain device
    or a model without one. A workload that is registered but cannot be loaded raises
    ``PluginLoadError``."""
    if target.model is None:
        return None
    try:
        return find_workload(target.model.name)
    except RegistryError:
        return None


def logged_traffic(
    device: MediatedDevice, workload: Callable[..., Workload], seed: int
) -> TrafficLog:
    """Log dirty pages of guest memory while ``workload`` drives the open ``device`` (see the
    module docstring); what the device wrote and what the reports gave."""
    space = device.dma
    if space is None:
        raise OSError(errno.ENODEV, f"{device.name} has no DMA space")
    log = TrafficLog()
    writes = _DeviceWrites(TRAFFIC_MEMORY)
    with guest_memory(device, TRAFFIC_MEMORY) as memory:
        unwatch = space.watch(writes)
        try:
            guest = workload(device, memory, GUEST_IOVA, seed=seed)
            for session in range(SESSIONS):
                if session:
                    for _ in range(UNLOGGED_SLICES):
                        guest.run()
                device.dma_logging_start(PAGE_SIZE, [(GUEST_IOVA, TRAFFIC_MEMORY)])
                writes.start()
                try:
                    if not session:
                        guest.start()  # the driver brings the device up while logging runs
                    log.missed |= _session(device, guest, writes, log)
                finally:
                    writes.stop()
                    device.dma_logging_stop()
                log.sessions += 1
        finally:
            unwatch()
    return log


def _session(
    device: MediatedDevice, guest: Workload, writes: _DeviceWrites, log: TrafficLog
) -> set[int]:
    """Run one logging session's slices and reports; the pages no later report gave."""
    pending: set[int] = set()
    for _ in range(REPORTS_PER_SESSION):
        for _ in range(SLICES_PER_REPORT):
            guest.run()
        log.slices += SLICES_PER_REPORT
        written = writes.take()
        bitmap = device.dma_logging_report(GUEST_IOVA, TRAFFIC_MEMORY, PAGE_SIZE)
        reported = set(bitmap_pages(bitmap))
        pending = (pending | written) - reported
        log.reports += 1
        log.written += len(written)
        log.reported += len(reported)
    return pending
