"""Broken on purpose (migration): refuses another model's state, but loads any other stream
it is given, garbage too, without checking it."""

import errno
from typing import Any

from sample_mediator import STATE_MAGIC, SampleMediator, hookimpl


class LoadsGarbage(SampleMediator):
    @hookimpl
    def mediator_load_state(self, handle: Any, data: bytes) -> None:
        if data.startswith(STATE_MAGIC) and not data.startswith(handle.state_header):
            raise OSError(errno.EINVAL, "another device model's state")
        size = len(handle.scratch)
        handle.scratch[:] = data[-size:].rjust(size, b"\0")


plugin = LoadsGarbage()
