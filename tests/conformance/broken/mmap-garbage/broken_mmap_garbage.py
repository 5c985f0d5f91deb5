"""Broken on purpose (mmap-result): maps BAR0 from a file of its own, not the device's memory."""

import os
from typing import Any

from sample_mediator import SampleMediator, hookimpl


class MapsGarbage(SampleMediator):
    @hookimpl
    def mediator_mmap(self, handle: Any, index: int, offset: int, length: int) -> Any:
        if not hasattr(handle, "shadow_fd"):
            handle.shadow_fd = os.memfd_create("mmap-garbage")
            os.ftruncate(handle.shadow_fd, 1 << 20)
        return handle.shadow_fd, offset

    @hookimpl
    def mediator_release(self, handle: Any) -> None:
        super().mediator_release(handle)
        if hasattr(handle, "shadow_fd"):
            os.close(handle.shadow_fd)


plugin = MapsGarbage()
