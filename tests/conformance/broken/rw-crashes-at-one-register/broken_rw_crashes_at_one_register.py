"""Broken on purpose (access-errors): its handler of one BAR0 register (0x5c0) divides by a
value the register holds, and crashes when that is 0."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl

REGISTER = 0x5C0


class CrashesAtOneRegister(SampleMediator):
    @hookimpl
    def mediator_rw(
        self, handle: Any, index: int, offset: int, count: int, data: Any, is_write: bool
    ) -> Any:
        if index == 0 and offset == REGISTER and data is not None:
            _ = 0x1000 // int.from_bytes(data, "little").bit_count()
        return super().mediator_rw(handle, index, offset, count, data, is_write)


plugin = CrashesAtOneRegister()
