"""Broken on purpose (hook-signature): its release names an argument the hook does not have."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl


class BadSignature(SampleMediator):
    @hookimpl
    def mediator_release(self, handle: Any, device: Any) -> None:
        super().mediator_release(handle)


plugin = BadSignature()
