"""Broken on purpose (open-targets): compares ids as text with ints, so it never claims."""

from typing import Any

from sample_mediator import SampleHandle, SampleMediator, hookimpl


class NeverClaims(SampleMediator):
    @hookimpl
    def mediator_open(self, device: Any) -> Any:
        identity = (f"{device.vendor_id:04x}", f"{device.device_id:04x}")
        return SampleHandle(device) if identity in self.targets else None


plugin = NeverClaims()
