"""Broken on purpose (release-once): its reset already releases the handle, so the release
at the last close fails."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl


class ReleaseRaises(SampleMediator):
    @hookimpl
    def mediator_reset(self, handle: Any) -> None:
        super().mediator_reset(handle)
        self.mediator_release(handle)

    @hookimpl
    def mediator_release(self, handle: Any) -> None:
        if getattr(handle, "released", False):
            raise RuntimeError("handle released twice")
        handle.released = True


plugin = ReleaseRaises()
