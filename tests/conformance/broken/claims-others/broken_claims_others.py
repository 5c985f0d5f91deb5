"""Broken on purpose (open-targets): claims every device it is offered, its targets or not."""

from typing import Any

from sample_mediator import SampleHandle, SampleMediator, hookimpl


class ClaimsOthers(SampleMediator):
    @hookimpl
    def mediator_open(self, device: Any) -> Any:
        return SampleHandle(device)


plugin = ClaimsOthers()
