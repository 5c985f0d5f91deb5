"""Broken on purpose (open-targets): declines with False, which claims the device."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl


class ClaimsOthers(SampleMediator):
    @hookimpl
    def mediator_open(self, device: Any) -> Any:
        return super().mediator_open(device) or False


plugin = ClaimsOthers()
