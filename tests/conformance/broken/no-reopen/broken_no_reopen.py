"""Broken on purpose (reopen): claims each device name once and declines it ever after."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl


class ClaimsOnce(SampleMediator):
    def __init__(self) -> None:
        self.claimed: set[str] = set()

    @hookimpl
    def mediator_open(self, device: Any) -> Any:
        if device.name in self.claimed:
            return None
        handle = super().mediator_open(device)
        if handle is not None:
            self.claimed.add(device.name)
        return handle


plugin = ClaimsOnce()
