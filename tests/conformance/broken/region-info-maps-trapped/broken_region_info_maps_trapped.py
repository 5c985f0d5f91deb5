"""Broken on purpose (region-info-valid): offers the MSI-X pages, which the device traps, for
mapping."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl

MMAP = 4


class MapsTrapped(SampleMediator):
    @hookimpl
    def mediator_get_region_info(self, handle: Any, info: dict[str, Any]) -> Any:
        if info["index"] == 2:
            info["flags"] |= MMAP
            info["sparse_mmap"] = None
            return info
        return super().mediator_get_region_info(handle, info)


plugin = MapsTrapped()
