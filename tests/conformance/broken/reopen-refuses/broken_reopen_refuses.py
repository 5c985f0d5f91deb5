"""Broken on purpose (reopen): claims a device opened again, but its handle then refuses every
access of BAR0."""

import errno
from typing import Any

from sample_mediator import SampleMediator, hookimpl


class RefusesWhenReopened(SampleMediator):
    def __init__(self) -> None:
        self.opened: set[str] = set()

    @hookimpl
    def mediator_open(self, device: Any) -> Any:
        handle = super().mediator_open(device)
        if handle is not None:
            handle.reopened = device.name in self.opened
            self.opened.add(device.name)
        return handle

    @hookimpl
    def mediator_rw(
        self, handle: Any, index: int, offset: int, count: int, data: Any, is_write: bool
    ) -> Any:
        if index == 0 and handle.reopened:
            raise OSError(errno.EIO, "the device is gone")
        return super().mediator_rw(handle, index, offset, count, data, is_write)


plugin = RefusesWhenReopened()
