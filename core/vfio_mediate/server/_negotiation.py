"""VERSION: the capabilities both sides announce, answered once per session."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import Any, final

from .._errors import AccessError
from ..uapi import PAGE_SIZE
from ._codec import (
    VERSION,
    Command,
    ProtocolError,
    VfioUserCapabilities,
    decode_capabilities,
    encode_capabilities,
)
from ._command import CommandGroup, FatalError, Handler, Send
from ._config import ServerConfig
from ._dma_messages import MessageDma
from ._log import logger
from ._served import ServedDevice

__all__ = ["Negotiation"]

_DEBUG = logging.DEBUG


@final
class Negotiation(CommandGroup):
    """Answers VERSION; ``on_negotiated`` runs after the reply is sent (the engine then takes
    every other command). ``max_dma_maps`` is what the session offers and enforces."""

    def __init__(
        self,
        device: ServedDevice,
        config: ServerConfig,
        label: str,
        send: Send,
        message_dma: MessageDma,
        max_dma_maps: int,
        on_negotiated: Callable[[], None],
    ) -> None:
        super().__init__(device, config, label, send)
        self.message_dma = message_dma
        self.max_dma_maps = max_dma_maps
        self._on_negotiated = on_negotiated
        self._negotiated = False

    def handlers(self) -> dict[int, Handler]:
        return {Command.VERSION: self._version}

    def _version(self, msg_id: int, flags: int, payload: memoryview, fds: list[int]) -> None:
        if self._negotiated:
            raise AccessError(errno.EINVAL, "VERSION after negotiation")
        if len(payload) < VERSION.size:
            raise FatalError(errno.EINVAL, f"VERSION payload of {len(payload)} bytes")
        major, _ = VERSION.unpack_from(payload)
        if major != 0:
            raise FatalError(errno.ENOTSUP, f"protocol version {major}.x is not supported")
        try:
            caps = decode_capabilities(payload[VERSION.size :])
        except ProtocolError as exc:
            raise FatalError(errno.EINVAL, str(exc)) from None
        layout = self.config.dma_layout
        self.message_dma.layout = layout
        self.message_dma.chunk = min(caps.max_data_xfer_size, self.config.max_data_xfer_size)
        # The reply may name only what the client proposed, and QEMU takes no reply longer
        # than its request: entries go in order of importance and the tail is dropped to fit.
        config = self.config
        ours: list[tuple[str, Any]] = [
            ("max_msg_fds", config.max_msg_fds),
            ("max_data_xfer_size", config.max_data_xfer_size),
            ("write_multiple", True),
        ]
        migration = self._migration_capability(caps)
        if migration is not None:
            ours.append(("migration", migration))
        ours += [("pgsizes", PAGE_SIZE), ("max_dma_maps", self.max_dma_maps)]
        entries = [(name, value) for name, value in ours if name in caps.keys]
        text = encode_capabilities(entries, len(payload) - VERSION.size)
        self._negotiated = True
        self._respond(msg_id, Command.VERSION, flags, VERSION.pack(0, 0) + text)
        self._on_negotiated()
        if logger.isEnabledFor(_DEBUG):
            logger.debug("%s: negotiated %s, DMA messages in %s layout", self.label, caps, layout)

    def _migration_capability(self, caps: VfioUserCapabilities) -> dict[str, int] | None:
        """The old "migration" capability: the dirty page size and the largest report bitmap,
        offered back only for a device that can log dirty pages (``dma_logging_source``: its
        mediator or its IOMMU), as its DMA_LOGGING features are."""
        if not self.device.dma_logging_supported:
            return None
        page = caps.migration_pgsize
        if page is None or page < PAGE_SIZE or page & (page - 1):
            page = PAGE_SIZE
        answer = {"pgsize": page}
        if caps.migration_max_bitmap_size is not None:
            answer["max_bitmap_size"] = min(
                caps.migration_max_bitmap_size, self.config.max_data_xfer_size
            )
        return answer
