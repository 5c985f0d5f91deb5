"""Broken on purpose (rw-result): a read at one BAR0 register (0x7a4), and only there, returns
one byte less than asked."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl

REGISTER = 0x7A4


class ShortAtOneRegister(SampleMediator):
    @hookimpl
    def mediator_rw(
        self, handle: Any, index: int, offset: int, count: int, data: Any, is_write: bool
    ) -> Any:
        if index == 0 and offset == REGISTER and data is None:
            return handle.device.read(index, offset, count)[:-1]
        return super().mediator_rw(handle, index, offset, count, data, is_write)


plugin = ShortAtOneRegister()
