"""Broken on purpose (access-errors): observes MSI-X vectors by a fixed list written for a
bigger device, so it names vectors the device does not have."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl

MSIX = 2


class AbsentVectors(SampleMediator):
    @hookimpl
    def mediator_irq_observe(self, handle: Any, index: int) -> Any:
        return [0, 63] if index == MSIX else None

    @hookimpl
    def mediator_irq(self, handle: Any, index: int, vector: int) -> Any:
        return True


plugin = AbsentVectors()
