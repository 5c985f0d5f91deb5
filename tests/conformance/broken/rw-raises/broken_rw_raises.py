"""Broken on purpose (access-errors): raises KeyError for BAR0 registers it does not know."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl

KNOWN = range(0, 0x14)


class RaisesKeyError(SampleMediator):
    @hookimpl
    def mediator_rw(
        self, handle: Any, index: int, offset: int, count: int, data: Any, is_write: bool
    ) -> Any:
        if index == 0 and offset < 0x1000 and offset not in KNOWN:
            raise KeyError(offset)
        return super().mediator_rw(handle, index, offset, count, data, is_write)


plugin = RaisesKeyError()
