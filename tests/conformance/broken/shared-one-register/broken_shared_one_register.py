"""Broken on purpose (isolation): shadows one BAR0 register (0x6a0) in a module global, which
every device it claims shares."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl

REGISTER, WIDTH = 0x6A0, 4
SHADOW = bytearray(WIDTH)


class SharedRegister(SampleMediator):
    @hookimpl
    def mediator_rw(
        self, handle: Any, index: int, offset: int, count: int, data: Any, is_write: bool
    ) -> Any:
        if index == 0 and offset >= REGISTER and offset + count <= REGISTER + WIDTH:
            at = offset - REGISTER
            if data is None:
                return bytes(SHADOW[at : at + count])
            SHADOW[at : at + count] = data
            return count
        return super().mediator_rw(handle, index, offset, count, data, is_write)


plugin = SharedRegister()
