"""``DmaLogging``: one device's DMA dirty logging, marked by its mediator."""

from __future__ import annotations

import errno
from collections.abc import Iterable
from typing import final

from ._dirty import DirtyLog
from ._errors import AccessError
from ._winner import WinningMediator

__all__ = ["DmaLogging"]


@final
class DmaLogging:
    """Dirty logging of one open device (``VFIO_DEVICE_FEATURE_DMA_LOGGING_*``).

    The core owns the ``DirtyLog``; the winner's ``mediator_dma_logging_start`` receives it and
    marks the pages the device writes, ``..._report`` runs before each report and ``..._stop``
    at the end. Without a winner that implements the start hook a device cannot log. The caller
    serializes the calls.
    """

    def __init__(self, name: str, winner: WinningMediator | None) -> None:
        self.name = name
        self.winner = winner
        self.log: DirtyLog | None = None

    @property
    def supported(self) -> bool:
        """Whether the winner can log dirty pages."""
        return self.winner is not None and self.winner.implements("mediator_dma_logging_start")

    def start(self, page_size: int, ranges: Iterable[tuple[int, int]]) -> int:
        """Start logging ``ranges`` at ``page_size`` granularity; returns the page size."""
        if self.winner is None or not self.supported:
            raise AccessError(errno.ENOTTY, f"{self.name} cannot log dirty pages")
        if self.log is not None:
            raise AccessError(errno.EBUSY, f"{self.name} is already logging dirty pages")
        log = DirtyLog(page_size, ranges)
        self.winner.call("mediator_dma_logging_start", log)
        self.log = log
        return log.page_size

    def report(self, iova: int, length: int, page_size: int) -> bytes:
        """Read and clear the dirty bitmap of ``[iova, iova + length)``."""
        log = self.log
        if log is None or self.winner is None:
            raise AccessError(errno.EINVAL, f"{self.name} is not logging dirty pages")
        self.winner.call("mediator_dma_logging_report", log, iova, length)
        return log.report(iova, length, page_size)

    def stop(self) -> None:
        """Stop logging."""
        if self.log is None or self.winner is None:
            raise AccessError(errno.EINVAL, f"{self.name} is not logging dirty pages")
        self.log = None
        self.winner.call("mediator_dma_logging_stop")

    def stop_quietly(self) -> None:
        """Stop logging, if it runs, where nobody could take an error (the last close)."""
        if self.log is not None and self.winner is not None:
            self.log = None
            self.winner.call_quietly("mediator_dma_logging_stop")
