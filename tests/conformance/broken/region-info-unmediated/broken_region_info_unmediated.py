"""Broken on purpose (region-info-valid): traps a page of BAR4, which it does not mediate."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl


class ChangesUnmediated(SampleMediator):
    @hookimpl
    def mediator_get_region_info(self, handle: Any, info: dict[str, Any]) -> Any:
        if info["index"] == 4:
            info["sparse_mmap"] = [[0, 0x1000]]
            return info
        return super().mediator_get_region_info(handle, info)


plugin = ChangesUnmediated()
