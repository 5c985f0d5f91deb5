"""Broken on purpose (rw-result): a read of BAR0 returns one byte less than asked."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl


class ShortRead(SampleMediator):
    @hookimpl
    def mediator_rw(
        self, handle: Any, index: int, offset: int, count: int, data: Any, is_write: bool
    ) -> Any:
        if index == 0 and not is_write and count > 1:
            return handle.device.read(index, offset, count)[:-1]
        return super().mediator_rw(handle, index, offset, count, data, is_write)


plugin = ShortRead()
