"""Broken on purpose (migration): checks the stream it is given, refuses garbage, and restores
nothing of it."""

import errno
from typing import Any

from sample_mediator import SampleMediator, hookimpl


class RestoresNothing(SampleMediator):
    @hookimpl
    def mediator_load_state(self, handle: Any, data: bytes) -> None:
        if not data.startswith(handle.state_header):
            raise OSError(errno.EINVAL, "not a sample mediator state of this device model")


plugin = RestoresNothing()
