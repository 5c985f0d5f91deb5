"""Broken on purpose (migration): returns no state bytes on the arcs that save the state."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl


class NoState(SampleMediator):
    @hookimpl
    def mediator_set_state(self, handle: Any, current: int, new: int) -> Any:
        return None


plugin = NoState()
