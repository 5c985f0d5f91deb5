"""The sample mediator: keeps every rule of the hook contract and offers every capability.

It targets the ``sample-dma`` device model and a plain device of the same shape. It mediates
BAR0 (trapping its register page), adds a scratch region (index 9), migrates the scratch
region's contents, and logs the record the device writes when its doorbell is rung. The broken
mediators of the conformance tests are this class with one hook changed.
"""

from __future__ import annotations

import errno
from typing import Any

import pluggy

from .model import (
    DMA_ADDRESS,
    DMA_DEVICE_ID,
    DOORBELL,
    PAGE,
    PLAIN_DEVICE_ID,
    RECORD_SIZE,
    VENDOR_ID,
    spec,
)

__all__ = ["SampleHandle", "SampleMediator", "hookimpl", "plugin"]

hookimpl = pluggy.HookimplMarker("vfio_mediate")

SCRATCH = 9
SCRATCH_SIZE = PAGE
STATE_MAGIC = b"SMPL\x01"
READ, WRITE, MMAP = 1, 2, 4
STOP_COPY, P2P, PRE_COPY = 1, 2, 4
SAVING = {3, 6, 7}  # STOP_COPY, PRE_COPY, PRE_COPY_P2P: arcs into them save the state


class SampleHandle:
    """Per-device state."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.scratch = bytearray(SCRATCH_SIZE)
        self.log: Any = None
        # A saved state names the device it came from: another model's does not load.
        identity = device.vendor_id.to_bytes(2, "little") + device.device_id.to_bytes(2, "little")
        self.state_header: bytes = STATE_MAGIC + identity


class SampleMediator:
    """The hooks, as methods (an entry point may name an object)."""

    targets = ((VENDOR_ID, DMA_DEVICE_ID), (VENDOR_ID, PLAIN_DEVICE_ID))

    @hookimpl
    def mediator_targets(self) -> list[Any]:
        """The DMA device model and a plain device of the same shape."""
        return ["sample-dma", {**spec(PLAIN_DEVICE_ID), "name": "sample-plain"}]

    @hookimpl
    def mediator_open(self, device: Any) -> SampleHandle | None:
        """Claim the two sample devices."""
        if (device.vendor_id, device.device_id) in self.targets:
            return SampleHandle(device)
        return None

    @hookimpl
    def mediator_release(self, handle: SampleHandle) -> None:
        """Drop the log."""
        handle.log = None

    @hookimpl
    def mediator_regions(self, handle: SampleHandle) -> list[int]:
        """BAR0 (and the scratch region, always)."""
        return [0]

    @hookimpl
    def mediator_get_region_info(self, handle: SampleHandle, info: dict[str, Any]) -> Any:
        """Trap BAR0's register page."""
        if info["index"] != 0 or not info["flags"] & MMAP:
            return None
        areas = info["sparse_mmap"] or [[0, info["size"]]]
        kept = []
        for offset, size in areas:
            if offset < PAGE:
                size -= PAGE - offset
                offset = PAGE
            if size > 0:
                kept.append([offset, size])
        if kept == areas:
            return None
        info["sparse_mmap"] = kept
        if not kept:
            info["flags"] &= ~MMAP
            info["sparse_mmap"] = None
        return info

    @hookimpl
    def mediator_device_regions(self, handle: SampleHandle) -> list[dict[str, Any]]:
        """The scratch region."""
        kind = [0x8000_0000 | VENDOR_ID, 1]
        return [{"index": SCRATCH, "flags": READ | WRITE, "size": SCRATCH_SIZE, "type": kind}]

    @hookimpl
    def mediator_rw(
        self,
        handle: SampleHandle,
        index: int,
        offset: int,
        count: int,
        data: bytes | None,
        is_write: bool,
    ) -> Any:
        """The scratch region is the handle's; BAR0 passes through, logging the doorbell."""
        if index == SCRATCH:
            if data is None:
                return bytes(handle.scratch[offset : offset + count])
            handle.scratch[offset : offset + count] = data
            return count
        if data is not None and handle.log is not None and offset <= DOORBELL < offset + count:
            registers = bytearray(handle.device.read(0, DMA_ADDRESS, 8))
            for at in range(max(offset, DMA_ADDRESS), min(offset + count, DMA_ADDRESS + 8)):
                registers[at - DMA_ADDRESS] = data[at - offset]
            handle.log.mark(int.from_bytes(registers, "little"), RECORD_SIZE)
        return None

    @hookimpl
    def mediator_reset(self, handle: SampleHandle) -> None:
        """The scratch region resets too."""
        handle.scratch[:] = bytes(SCRATCH_SIZE)

    @hookimpl
    def mediator_migration_flags(self, handle: SampleHandle) -> int:
        """Stop-copy, P2P and pre-copy."""
        return STOP_COPY | P2P | PRE_COPY

    @hookimpl
    def mediator_set_state(self, handle: SampleHandle, current: int, new: int) -> bytes | None:
        """Arcs into a saving state save the scratch region."""
        if new in SAVING:
            return handle.state_header + bytes(handle.scratch)
        return None

    @hookimpl
    def mediator_load_state(self, handle: SampleHandle, data: bytes) -> None:
        """Load a state this mediator saved for a device like this one; refuse anything else."""
        header = handle.state_header
        if len(data) != len(header) + SCRATCH_SIZE or not data.startswith(header):
            raise OSError(errno.EINVAL, "not a sample mediator state of this device model")
        handle.scratch[:] = data[len(header) :]

    @hookimpl
    def mediator_dma_logging_start(self, handle: SampleHandle, log: Any) -> None:
        """Mark the records the device writes from now on."""
        handle.log = log

    @hookimpl
    def mediator_dma_logging_stop(self, handle: SampleHandle) -> None:
        """Stop marking."""
        handle.log = None


plugin = SampleMediator()
