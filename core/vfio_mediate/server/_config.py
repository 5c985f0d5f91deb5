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
    ``dma_timeout`` how long a device waits for the client's reply to a DMA_READ/DMA_WRITE
    (a session's wait never holds up another device: each session has its own thread);
    ``reply_timeout`` how long a reply may wait for a client that does not read (its socket
    full) before the session is closed; ``max_migration_data`` the most device state bytes a
    client may write while the device is RESUMING; ``dma_layout`` the layout of DMA messages
    (see ``DmaLayout``). ``max_dma_maps`` is lowered per session to what the process's fd limit
    can hold (see ``fd_budget``).
    """

    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    max_msg_fds: int = MAX_MSG_FDS
    max_dma_maps: int = DEFAULT_MAX_DMA_MAPS
    dma_timeout: float = 5.0
    reply_timeout: float = 10.0
    max_migration_data: int = 64 << 20
    dma_layout: DmaLayout = DmaLayout.SPEC

    def __post_init__(self) -> None:
        # QEMU refuses a server's max_data_xfer_size above 64 MiB and max_msg_fds above 16.
        if not PAGE_SIZE <= self.max_data_xfer_size <= 64 << 20:
            raise ValueError("max_data_xfer_size must lie in [4 KiB, 64 MiB]")
        if not 1 <= self.max_msg_fds <= MAX_MSG_FDS:
            raise ValueError(f"max_msg_fds must lie in [1, {MAX_MSG_FDS}]")
        if not 1 <= self.max_dma_maps <= DEFAULT_MAX_DMA_MAPS:
            raise ValueError(f"max_dma_maps must lie in [1, {DEFAULT_MAX_DMA_MAPS}]")
        if self.dma_timeout <= 0 or self.reply_timeout <= 0:
            raise ValueError("dma_timeout and reply_timeout must be positive")
        if self.max_migration_data < 0:
            raise ValueError("max_migration_data must not be negative")

    @property
    def max_message(self) -> int:
        """The largest message accepted: a header, a fixed part and the data."""
        return HEADER_SIZE + 32 + self.max_data_xfer_size


class PeerCredentials(NamedTuple):
    """The connected process (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int
