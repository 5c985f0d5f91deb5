"""Broken on purpose (no-core-import): imports vfio_mediate in a hook, at run time."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl


class ImportsCoreLate(SampleMediator):
    @hookimpl
    def mediator_regions(self, handle: Any) -> list[int]:
        from vfio_mediate.uapi import RegionIndex

        return [RegionIndex.BAR0]


plugin = ImportsCoreLate()
