"""Broken on purpose (no-core-import): imports vfio_mediate for its region flag numbers."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl

from vfio_mediate.uapi import RegionFlag


class ImportsCore(SampleMediator):
    @hookimpl
    def mediator_regions(self, handle: Any) -> list[int]:
        assert RegionFlag.MMAP == 4
        return super().mediator_regions(handle)


plugin = ImportsCore()
