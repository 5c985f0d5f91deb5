"""Broken on purpose (quiet): prints when it claims a device."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl


class Prints(SampleMediator):
    @hookimpl
    def mediator_open(self, device: Any) -> Any:
        handle = super().mediator_open(device)
        if handle is not None:
            print(f"claimed {device.name}")
        return handle


plugin = Prints()
