"""Broken on purpose (dirty-logging): marks the pages the DMA space saw written, a record no
real device offers, instead of the writes it makes the device do."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl


class ReadsTheOracle(SampleMediator):
    @hookimpl
    def mediator_dma_logging_start(self, handle: Any, log: Any) -> None:
        handle.unwatch = handle.device.dma.watch(log.mark)

    @hookimpl
    def mediator_dma_logging_stop(self, handle: Any) -> None:
        handle.unwatch()


plugin = ReadsTheOracle()
