"""Broken on purpose (open-result): declines devices by raising instead of returning None."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl


class OpenRaises(SampleMediator):
    @hookimpl
    def mediator_open(self, device: Any) -> Any:
        handle = super().mediator_open(device)
        if handle is None:
            raise ValueError(f"{device.name} is not a sample device")
        return handle


plugin = OpenRaises()
