"""Broken on purpose (open-result): declines the devices it does not target with False, which
claims them."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl


class DeclinesWithFalse(SampleMediator):
    @hookimpl
    def mediator_open(self, device: Any) -> Any:
        return super().mediator_open(device) or False


plugin = DeclinesWithFalse()
