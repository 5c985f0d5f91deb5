"""Broken on purpose (dirty-logging): forgets the log it is given, so it marks nothing."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl


class ForgetsLog(SampleMediator):
    @hookimpl
    def mediator_dma_logging_start(self, handle: Any, log: Any) -> None:
        handle.log = None


plugin = ForgetsLog()
