"""Broken on purpose (migration): loads whatever stream it is given, without checking it."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl


class LoadsGarbage(SampleMediator):
    @hookimpl
    def mediator_load_state(self, handle: Any, data: bytes) -> None:
        size = len(handle.scratch)
        handle.scratch[:] = data[-size:].rjust(size, b"\0")


plugin = LoadsGarbage()
