"""Broken on purpose (migration): its arc out of STOP_COPY fails with a RuntimeError, not an
OSError."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl

STOP_COPY = 3


class ArcRaises(SampleMediator):
    @hookimpl
    def mediator_set_state(self, handle: Any, current: int, new: int) -> Any:
        if current == STOP_COPY:
            raise RuntimeError("lost the device state")
        return super().mediator_set_state(handle, current, new)


plugin = ArcRaises()
