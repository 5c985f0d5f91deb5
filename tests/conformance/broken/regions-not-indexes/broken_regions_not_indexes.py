"""Broken on purpose (regions-result): names the regions it mediates by name, not by index."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl


class RegionsByName(SampleMediator):
    @hookimpl
    def mediator_regions(self, handle: Any) -> Any:
        return ["BAR0"]


plugin = RegionsByName()
