"""Broken on purpose (rw-result): a write of BAR0 smaller than 8 bytes is widened to its whole
64-bit word, zeros around the data, which clobbers the neighbouring bytes."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl


class WritesOutside(SampleMediator):
    @hookimpl
    def mediator_rw(
        self, handle: Any, index: int, offset: int, count: int, data: Any, is_write: bool
    ) -> Any:
        base = offset & ~7
        if index == 0 and is_write and count < 8 and offset - base + count <= 8:
            word = bytearray(8)
            word[offset - base : offset - base + count] = data
            handle.device.write(index, base, bytes(word))
            return count
        return super().mediator_rw(handle, index, offset, count, data, is_write)


plugin = WritesOutside()
