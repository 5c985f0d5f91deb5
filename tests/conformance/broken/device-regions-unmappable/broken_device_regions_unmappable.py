"""Broken on purpose (device-regions-valid): says its scratch region can be mapped, but has
no mediator_mmap to map it."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl

MMAP = 4


class Unmappable(SampleMediator):
    @hookimpl
    def mediator_device_regions(self, handle: Any) -> list[dict[str, Any]]:
        regions = super().mediator_device_regions(handle)
        for region in regions:
            region["flags"] |= MMAP
        return regions


plugin = Unmappable()
