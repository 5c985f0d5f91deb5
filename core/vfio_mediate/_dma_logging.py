"""``DmaLogging``: one device's DMA dirty logging, by its mediator or by the IOMMU."""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable
from typing import Any, final

from ._dirty import DirtyLog, bitmap_pages
from ._errors import AccessError
from ._hook_types import DirtyPageLog
from ._pages import runs
from ._winner import WinningMediator
from .uapi import PAGE_SIZE

__all__ = ["DmaLogging"]

logger = logging.getLogger(__name__)


@final
class DmaLogging:
    """Dirty logging of one open device (``VFIO_DEVICE_FEATURE_DMA_LOGGING_*``).

    The core owns the ``DirtyLog``. Who marks it is ``source``: ``"mediator"`` when the winner
    implements ``mediator_dma_logging_start`` (it receives the log and marks the pages the
    device writes; ``..._report`` runs before each report, ``..._stop`` at the end), else
    ``"iommu"`` for a backend with ``iommu_dirty_tracking`` (a device bound to vfio-pci: type1's
    container dirty tracking, which reports every pinned page), else nobody (``None``). A closed
    device has neither winner nor backend here. The caller serializes the calls.
    """

    def __init__(self, name: str, winner: WinningMediator | None, backend: Any = None) -> None:
        self.name = name
        self.winner = winner
        self.backend = backend
        self.log: DirtyLog | None = None
        if winner is not None and winner.implements("mediator_dma_logging_start"):
            self.source: str | None = "mediator"
        elif backend is not None and backend.iommu_dirty_tracking:
            self.source = "iommu"
        else:
            self.source = None

    @property
    def supported(self) -> bool:
        """Whether anyone can log this device's dirty pages."""
        return self.source is not None

    def start(self, page_size: int, ranges: Iterable[tuple[int, int]]) -> int:
        """Start logging ``ranges`` at ``page_size`` granularity; returns the page size."""
        if self.source is None:
            raise AccessError(errno.ENOTTY, f"{self.name} cannot log dirty pages")
        if self.log is not None:
            raise AccessError(errno.EBUSY, f"{self.name} is already logging dirty pages")
        log = DirtyLog(page_size, ranges)
        if self.winner is not None and self.source == "mediator":
            handed: DirtyPageLog = log  # what the contract promises, checked here
            self.winner.call("mediator_dma_logging_start", handed)
        else:
            self.backend.dirty_start()
        self.log = log
        return log.page_size

    def report(self, iova: int, length: int, page_size: int) -> bytes:
        """Read and clear the dirty bitmap of ``[iova, iova + length)``."""
        log = self.log
        if log is None:
            raise AccessError(errno.EINVAL, f"{self.name} is not logging dirty pages")
        if self.winner is not None and self.source == "mediator":
            self.winner.call("mediator_dma_logging_report", log, iova, length)
        else:
            # type1 reports per mapping: every pinned page, an honest over-report.
            for start, dirty in self.backend.dirty_report(iova, length):
                for first, last in runs(bitmap_pages(dirty)):
                    log.mark(start + first * PAGE_SIZE, (last - first + 1) * PAGE_SIZE)
        return log.report(iova, length, page_size)

    def stop(self) -> None:
        """Stop logging."""
        if self.log is None:
            raise AccessError(errno.EINVAL, f"{self.name} is not logging dirty pages")
        self.log = None
        if self.winner is not None and self.source == "mediator":
            self.winner.call("mediator_dma_logging_stop")
        else:
            self.backend.dirty_stop()

    def stop_quietly(self) -> None:
        """Stop logging, if it runs, where nobody could take an error (the last close)."""
        if self.log is None:
            return
        self.log = None
        if self.winner is not None and self.source == "mediator":
            self.winner.call_quietly("mediator_dma_logging_stop")
            return
        try:
            self.backend.dirty_stop()
        except OSError:
            logger.exception("%s: stopping the IOMMU's dirty tracking failed", self.name)
