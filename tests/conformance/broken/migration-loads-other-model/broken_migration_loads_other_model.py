"""Broken on purpose (migration): loads any stream of its format, whichever device model saved
it."""

from typing import Any

from sample_mediator import STATE_MAGIC, SampleMediator, hookimpl

IDENTITY = 4  # bytes of vendor and device id after the magic


class LoadsOtherModels(SampleMediator):
    @hookimpl
    def mediator_load_state(self, handle: Any, data: bytes) -> None:
        if not data.startswith(STATE_MAGIC):
            raise OSError(22, "not a sample mediator state")
        handle.scratch[:] = data[len(STATE_MAGIC) + IDENTITY :]


plugin = LoadsOtherModels()
