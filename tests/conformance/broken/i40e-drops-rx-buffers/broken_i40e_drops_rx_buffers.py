"""Broken on purpose (dirty-logging): the real i40e mediator, except that the log it marks
drops every mark of one RX buffer. Descriptors and rings are still marked, so only traffic
that fills RX buffers (the i40e-vf workload's) shows the pages it misses."""

from typing import Any

from i40e_mediator import mediator as i40e
from i40e_mediator.mediator import (
    hookimpl,
    mediator_device_regions,
    mediator_dma_logging_report,
    mediator_dma_logging_stop,
    mediator_get_region_info,
    mediator_load_state,
    mediator_migration_flags,
    mediator_open,
    mediator_regions,
    mediator_release,
    mediator_reset,
    mediator_rw,
    mediator_set_state,
    mediator_targets,
)

__all__ = [
    "mediator_device_regions",
    "mediator_dma_logging_report",
    "mediator_dma_logging_start",
    "mediator_dma_logging_stop",
    "mediator_get_region_info",
    "mediator_load_state",
    "mediator_migration_flags",
    "mediator_open",
    "mediator_regions",
    "mediator_release",
    "mediator_reset",
    "mediator_rw",
    "mediator_set_state",
    "mediator_targets",
]

RX_BUFFER_SIZE = 2048  # what the i40e-vf workload's guest posts (i40e_mediator.guest)


class WithoutRxBuffers:
    """The log the core gave, deaf to marks of exactly one RX buffer."""

    def __init__(self, log: Any) -> None:
        self.log = log

    def mark(self, iova: int, length: int) -> None:
        if length != RX_BUFFER_SIZE:
            self.log.mark(iova, length)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.log, name)


@hookimpl
def mediator_dma_logging_start(handle: Any, log: Any) -> None:
    i40e.mediator_dma_logging_start(handle, WithoutRxBuffers(log))
