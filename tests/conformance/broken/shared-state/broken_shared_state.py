"""Broken on purpose (isolation): shadows BAR0's register page in a module global, which every
device it claims shares."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl

SHADOW = bytearray(0x1000)


class SharedShadow(SampleMediator):
    @hookimpl
    def mediator_rw(
        self, handle: Any, index: int, offset: int, count: int, data: Any, is_write: bool
    ) -> Any:
        if index == 0 and offset + count <= len(SHADOW):
            if data is None:
                return bytes(SHADOW[offset : offset + count])
            SHADOW[offset : offset + count] = data
        return super().mediator_rw(handle, index, offset, count, data, is_write)


plugin = SharedShadow()
