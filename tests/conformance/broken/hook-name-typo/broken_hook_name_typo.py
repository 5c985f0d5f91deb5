"""Broken on purpose (hook-signature): misspells the name of its access hook."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl


class Misspelt(SampleMediator):
    @hookimpl
    def mediator_rww(
        self, handle: Any, index: int, offset: int, count: int, data: Any, is_write: bool
    ) -> Any:
        return None


plugin = Misspelt()
