"""The sample mediator answering reads of BAR0's register page from a shadow in its handle,
taken from the device at open and written through; the device may change under it (the suite
writes the device directly), and only what goes through the mediator shows."""

from typing import Any

from sample_mediator import SampleHandle, SampleMediator, hookimpl
from sample_mediator.model import PAGE


class HandleShadow(SampleMediator):
    @hookimpl
    def mediator_open(self, device: Any) -> SampleHandle | None:
        handle = super().mediator_open(device)
        if handle is not None:
            handle.shadow = bytearray(device.read(0, 0, PAGE))
        return handle

    @hookimpl
    def mediator_rw(
        self, handle: Any, index: int, offset: int, count: int, data: Any, is_write: bool
    ) -> Any:
        if index == 0 and offset + count <= PAGE:
            if data is None:
                return bytes(handle.shadow[offset : offset + count])
            handle.shadow[offset : offset + count] = data
        return super().mediator_rw(handle, index, offset, count, data, is_write)

    @hookimpl
    def mediator_reset(self, handle: Any) -> None:
        super().mediator_reset(handle)
        handle.shadow[:] = bytes(PAGE)


plugin = HandleShadow()
