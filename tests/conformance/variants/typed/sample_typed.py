"""The sample mediator with its hooks typed by the contract's protocols, imported for the type
checker only: at run time it imports nothing of vfio-mediate, as before."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sample_mediator import SampleHandle, SampleMediator, hookimpl

if TYPE_CHECKING:
    from vfio_mediate.hookspecs import Device, DirtyPageLog


class Typed(SampleMediator):
    @hookimpl
    def mediator_open(self, device: Device) -> SampleHandle | None:
        if device.dma is None:
            return None
        return super().mediator_open(device)

    @hookimpl
    def mediator_dma_logging_start(self, handle: SampleHandle, log: DirtyPageLog) -> None:
        if log.page_size % 4096:
            raise OSError(22, f"cannot log {log.page_size}-byte pages")
        handle.log = log


plugin = Typed()
