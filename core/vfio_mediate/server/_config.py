"""What a server applies to every session, and who a session's peer is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, final

from ..uapi import PAGE_SIZE
from ._codec import (
    DEFAULT_MAX_DATA_XFER_SIZE,
    DEFAULT_MAX_DMA_MAPS,
    HEADER_SIZE,
    MAX_MSG_FDS,
    DmaLayout,
)

__all__ = ["PeerCredentials", "ServerConfig"]


@final
@dataclass(frozen=True)
class ServerConfig:
    """Limits and choices a server applies to every session.

    ``max_data_xfer_size`` is the largest data count of one region or migration data transfer
    (and of a DMA message the server sends, with the client's own limit); ``max_msg_fds`` the
    most fds one message may carry; ``max_dma_maps`` the most DMA mappings a client may hold;
    ``dma_timeout`` how long a device waits for the client's reply to a DMA_READ/DMA_WRITE;
    ``inline_dma_timeout`` how long it waits instead when the request is made on the event loop
    thread (the first DMA by messages of a session, made by a command running inline): the loop
    serves every device, so that wait stays short, and the request then fails with ETIMEDOUT
    while the session's later commands run on its worker thread, where DMA waits up to
    ``dma_timeout`` (whichever timeout is shorter applies); ``dma_layout`` the layout of those
    messages (see ``DmaLayout``).
    """

    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    max_msg_fds: int = MAX_MSG_FDS
    max_dma_maps: int = DEFAULT_MAX_DMA_MAPS
    dma_timeout: float = 5.0
    inline_dma_timeout: float = 0.2
    dma_layout: DmaLayout = DmaLayout.SPEC

    def __post_init__(self) -> None:
        # QEMU refuses a server's max_data_xfer_size above 64 MiB and max_msg_fds above 16.
        if not PAGE_SIZE <= self.max_data_xfer_size <= 64 << 20:
            raise ValueError("max_data_xfer_size must lie in [4 KiB, 64 MiB]")
        if not 1 <= self.max_msg_fds <= MAX_MSG_FDS:
            raise ValueError(f"max_msg_fds must lie in [1, {MAX_MSG_FDS}]")
        if not 1 <= self.max_dma_maps <= DEFAULT_MAX_DMA_MAPS:
            raise ValueError(f"max_dma_maps must lie in [1, {DEFAULT_MAX_DMA_MAPS}]")
        if self.dma_timeout <= 0 or self.inline_dma_timeout <= 0:
            raise ValueError("dma_timeout and inline_dma_timeout must be positive")

    @property
    def max_message(self) -> int:
        """The largest message accepted: a header, a fixed part and the data."""
        return HEADER_SIZE + 32 + self.max_data_xfer_size


class PeerCredentials(NamedTuple):
    """The connected process (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int
