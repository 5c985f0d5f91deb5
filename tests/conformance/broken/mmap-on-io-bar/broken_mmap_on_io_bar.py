"""Broken on purpose (region-info-valid): targets a device with an I/O BAR too, and offers
that BAR for mmap."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl
from sample_mediator.model import VENDOR_ID, spec

IO_DEVICE_ID = 0x5A03
MMAP = 4


class MapsIoBar(SampleMediator):
    targets = (*SampleMediator.targets, (VENDOR_ID, IO_DEVICE_ID))

    @hookimpl
    def mediator_targets(self) -> list[Any]:
        io = spec(IO_DEVICE_ID)
        io["bars"] = [*io["bars"], {"index": 1, "size": 0x20, "kind": "io"}]
        return [*super().mediator_targets(), {**io, "name": "sample-io"}]

    @hookimpl
    def mediator_get_region_info(self, handle: Any, info: dict[str, Any]) -> Any:
        if info["index"] == 1 and info["size"]:
            info["flags"] |= MMAP
            return info
        return super().mediator_get_region_info(handle, info)


plugin = MapsIoBar()
