"""DMA_MAP and DMA_UNMAP: the client's memory as the device's DMA space sees it, by fd or
reached by DMA_READ/DMA_WRITE messages. The mappings die with the session."""

from __future__ import annotations

import errno
import logging
import os
from typing import final

from .._dma import DmaMapping
from .._errors import AccessError
from ._codec import DMA_MAP, DMA_UNMAP, DMA_UNMAP_FLAG_ALL, Command, DmaFlag
from ._command import CommandGroup, Handler, Send
from ._config import ServerConfig
from ._dma_messages import MessageDma
from ._log import logger
from ._served import ServedDevice

__all__ = ["DmaMaps"]

_DEBUG = logging.DEBUG
_READ_WRITE = int(DmaFlag.READ | DmaFlag.WRITE)
_LIMIT = 1 << 63
"""Sizes and offsets from here on cannot be mapped (mmap takes a signed offset)."""


@final
class DmaMaps(CommandGroup):
    """Answers DMA_MAP/DMA_UNMAP; at most ``max_dma_maps`` mappings at a time (what the session
    offered at negotiation)."""

    def __init__(
        self,
        device: ServedDevice,
        config: ServerConfig,
        label: str,
        send: Send,
        message_dma: MessageDma,
        max_dma_maps: int,
    ) -> None:
        super().__init__(device, config, label, send)
        self.message_dma = message_dma
        self.max_dma_maps = max_dma_maps
        self._maps: dict[tuple[int, int], DmaMapping] = {}
        self._fdless_map_refused = False  # warned once per session (QEMU sends one per ROM)

    def handlers(self) -> dict[int, Handler]:
        return {Command.DMA_MAP: self._dma_map, Command.DMA_UNMAP: self._dma_unmap}

    def mapped_ranges(self) -> list[tuple[int, int]]:
        """The client's mappings as ``(iova, size)``, in IOVA order."""
        return sorted(self._maps)

    def teardown(self) -> None:
        for iova, size in list(self._maps):
            try:
                self.device.dma_unmap(iova, size)
            except OSError as exc:
                logger.debug("%s: unmap at close: %s", self.label, exc)
        self._maps.clear()

    def _dma_map(self, msg_id: int, flags: int, payload: memoryview, fds: list[int]) -> None:
        if len(payload) < DMA_MAP.size:
            raise AccessError(errno.EINVAL, f"DMA_MAP payload of {len(payload)} bytes")
        _, map_flags, offset, iova, size = DMA_MAP.unpack_from(payload)
        if map_flags & ~_READ_WRITE:
            raise AccessError(errno.EINVAL, f"DMA_MAP flags {map_flags:#x}")
        if len(fds) > 1:
            raise AccessError(errno.EINVAL, f"DMA_MAP carries {len(fds)} fds")
        if size >= _LIMIT or offset >= _LIMIT or iova + size > 1 << 64:
            raise AccessError(errno.EINVAL, f"DMA_MAP of {size:#x} bytes at offset {offset:#x}")
        if len(self._maps) >= self.max_dma_maps:
            raise AccessError(
                errno.ENOSPC,
                f"{len(self._maps)} DMA mappings already, the most this server offered "
                "(max_dma_maps)",
            )
        dma = self.device.dma
        if dma is None:
            raise AccessError(errno.EINVAL, f"{self.label} does no DMA")
        readable, writable = bool(map_flags & DmaFlag.READ), bool(map_flags & DmaFlag.WRITE)
        if fds:
            fd = fds.pop()
            try:
                mapping = self.device.dma_map(
                    iova, size, fd, offset, readable=readable, writable=writable
                )
            finally:
                # The backend maps the file itself; the fd is not needed any more.
                os.close(fd)
        else:
            try:
                mapping = self.device.dma_map_remote(
                    iova, size, self.message_dma.memory(iova), readable=readable, writable=writable
                )
            except AccessError as exc:
                if not self._fdless_map_refused:
                    self._fdless_map_refused = True
                    logger.warning(
                        "%s: DMA_MAP refused: %s (further such maps of this session too)",
                        self.label,
                        exc.strerror,
                    )
                raise
        self._maps[(iova, size)] = mapping
        if logger.isEnabledFor(_DEBUG):
            how = "fd" if mapping.remote is None else "messages"
            logger.debug("%s: DMA map %#x+%#x by %s", self.label, iova, size, how)
        self._respond(msg_id, Command.DMA_MAP, flags)

    def _dma_unmap(self, msg_id: int, flags: int, payload: memoryview, fds: list[int]) -> None:
        if len(payload) < DMA_UNMAP.size:
            raise AccessError(errno.EINVAL, f"DMA_UNMAP payload of {len(payload)} bytes")
        _, unmap_flags, iova, size = DMA_UNMAP.unpack_from(payload)
        dma = self.device.dma
        if unmap_flags == DMA_UNMAP_FLAG_ALL:
            if iova or size:
                raise AccessError(errno.EINVAL, "DMA_UNMAP of all with an address or size")
            targets = list(self._maps)
        elif unmap_flags:
            raise AccessError(errno.EINVAL, f"DMA_UNMAP flags {unmap_flags:#x}")
        elif (iova, size) not in self._maps:
            raise AccessError(errno.EINVAL, f"no DMA mapping is exactly {iova:#x}+{size:#x}")
        else:
            targets = [(iova, size)]
        for key in targets:
            del self._maps[key]
            if dma is not None:
                self.device.dma_unmap(*key)
        self._respond(msg_id, Command.DMA_UNMAP, flags, payload[: DMA_UNMAP.size])
