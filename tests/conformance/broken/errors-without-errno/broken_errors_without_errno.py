"""Broken on purpose (access-errors): refuses byte writes of BAR0 with an OSError that has no
errno, so a client cannot be told why."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl


class NoErrno(SampleMediator):
    @hookimpl
    def mediator_rw(
        self, handle: Any, index: int, offset: int, count: int, data: Any, is_write: bool
    ) -> Any:
        if index == 0 and is_write and count == 1:
            raise OSError("byte writes are not supported")
        return super().mediator_rw(handle, index, offset, count, data, is_write)


plugin = NoErrno()
