"""The sample mediator observing MSI-X vector 0: it counts that vector's interrupts in its
handle and lets only every other one reach the client, which the contract allows."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl

MSIX = 2


class SwallowsEveryOther(SampleMediator):
    @hookimpl
    def mediator_irq_observe(self, handle: Any, index: int) -> Any:
        return [0] if index == MSIX else None

    @hookimpl
    def mediator_irq(self, handle: Any, index: int, vector: int) -> Any:
        handle.interrupts = getattr(handle, "interrupts", 0) + 1
        return handle.interrupts % 2 == 0


plugin = SwallowsEveryOther()
