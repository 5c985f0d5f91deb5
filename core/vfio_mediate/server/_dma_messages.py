"""DMA by messages: client memory mapped without an fd, reached by the DMA_READ and DMA_WRITE
commands the server sends and the client answers.

A device's DMA is synchronous, so the thread that does it waits here for the client's reply,
which the session's thread reads and hands over. When the waiting thread is the session's own
(a command made the device do DMA), it reads the socket itself until the reply comes
(``wait_here``); commands arriving meanwhile wait until the command that waits has finished.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from typing import final

from .._dma import RemoteMemory
from .._errors import AccessError
from ._codec import (
    DEFAULT_MAX_DATA_XFER_SIZE,
    Command,
    DmaLayout,
    HeaderFlag,
    ProtocolError,
    decode_dma_read_reply,
    encode_dma_request,
)
from ._command import Send
from ._log import logger
from ._transport import close_fds

__all__ = ["DMA_READ_MAX", "MessageDma"]

DMA_READ_MAX = 64 << 10
"""The most bytes one DMA_READ asks for. QEMU 11.1.3 breaks (an assertion, after a garbled
stream) when it has to send a reply larger than its socket's buffer (seen at 256 KiB, not at
128 KiB); writes of up to max_data_xfer_size reach it fine."""


@final
class _Waiter:
    """A DMA_READ/DMA_WRITE sent and not yet answered."""

    __slots__ = ("command", "count", "data", "error", "event")

    def __init__(self, command: Command, count: int) -> None:
        self.command = command
        self.count = count
        self.data = b""
        self.error = 0
        self.event = threading.Event()

    def finish(self, data: bytes = b"", error: int = 0) -> None:
        self.data, self.error = data, error
        self.event.set()


@final
class _MessageMemory(RemoteMemory):
    """One mapping of client memory without an fd, as a ``DmaSpace`` sees it."""

    def __init__(self, channel: MessageDma, iova: int) -> None:
        self._channel = channel
        self._iova = iova

    def read(self, offset: int, length: int) -> bytes:
        channel, address = self._channel, self._iova + offset
        chunk = min(channel.chunk, DMA_READ_MAX)
        if length <= chunk:
            return channel.request(Command.DMA_READ, address, length)
        return b"".join(
            channel.request(Command.DMA_READ, address + done, min(chunk, length - done))
            for done in range(0, length, chunk)
        )

    def write(self, offset: int, data: bytes) -> None:
        channel, chunk, address = self._channel, self._channel.chunk, self._iova + offset
        for done in range(0, len(data), chunk):
            channel.request(Command.DMA_WRITE, address + done, 0, data[done : done + chunk])


@final
class MessageDma:
    """The DMA_READ/DMA_WRITE requests of one session and their replies.

    ``layout`` and ``chunk`` (the largest transfer of one message) are set at negotiation;
    ``reader_thread`` is the ident of the session's thread, which reads the replies: a request
    made there waits with ``wait_here(event, timeout)``, which reads the socket. A request
    waits ``timeout`` seconds for its reply.
    """

    def __init__(
        self,
        send: Send,
        label: str,
        timeout: float,
        wait_here: Callable[[threading.Event, float], None],
    ) -> None:
        self.layout = DmaLayout.SPEC
        self.chunk = DEFAULT_MAX_DATA_XFER_SIZE
        self.reader_thread = 0
        self._send = send
        self._label = label
        self._timeout = timeout
        self._wait_here = wait_here
        self._lock = threading.Lock()
        self._waiters: dict[int, _Waiter] = {}
        self._next_id = 0
        self._closed = False

    def memory(self, iova: int) -> RemoteMemory:
        """The memory of a mapping at ``iova``, for ``DmaSpace.map_remote``."""
        return _MessageMemory(self, iova)

    @property
    def waiting(self) -> bool:
        """Whether a request waits for its reply."""
        return bool(self._waiters)

    def request(self, command: Command, address: int, count: int, data: bytes = b"") -> bytes:
        """Send a DMA_READ of ``count`` bytes, or a DMA_WRITE of ``data``, and wait for the
        reply; raises ``AccessError`` with the client's errno, ETIMEDOUT (a late reply is then
        dropped), or EFAULT when the client is gone."""
        if command == Command.DMA_WRITE:
            count = len(data)
        waiter = _Waiter(command, count)
        with self._lock:
            if self._closed:
                raise AccessError(errno.EFAULT, f"{self._label}: the client is gone")
            msg_id = self._next_id
            while msg_id in self._waiters:
                msg_id = (msg_id + 1) & 0xFFFF
            self._next_id = (msg_id + 1) & 0xFFFF
            self._waiters[msg_id] = waiter
        self._send(encode_dma_request(self.layout, msg_id, command, address, count, data))
        timeout = self._timeout
        if threading.get_ident() == self.reader_thread:
            self._wait_here(waiter.event, timeout)
        else:
            waiter.event.wait(timeout)
        if not waiter.event.is_set():
            with self._lock:
                self._waiters.pop(msg_id, None)
            raise AccessError(
                errno.ETIMEDOUT,
                f"{self._label}: no reply to {command.name} at {address:#x} within {timeout} s",
            )
        if waiter.error:
            raise AccessError(
                waiter.error, f"{self._label}: the client refused {command.name} at {address:#x}"
            )
        return waiter.data

    def on_reply(
        self,
        msg_id: int,
        command: int,
        flags: int,
        error: int,
        payload: memoryview,
        fds: list[int],
    ) -> None:
        """Hand a reply to the request it answers (a stray reply is logged and dropped)."""
        with self._lock:
            waiter = self._waiters.pop(msg_id, None)
        if fds:
            close_fds(fds)
            if waiter is not None:
                waiter.finish(error=errno.EINVAL)
            return
        if waiter is None or command != waiter.command:
            logger.debug("%s: unexpected reply %d to command %d", self._label, msg_id, command)
            if waiter is not None:
                waiter.finish(error=errno.EINVAL)
            return
        if flags & HeaderFlag.ERROR:
            waiter.finish(error=error or errno.EIO)
        elif command == Command.DMA_READ:
            try:
                waiter.finish(decode_dma_read_reply(self.layout, payload, waiter.count))
            except ProtocolError as exc:
                logger.debug("%s: %s", self._label, exc)
                waiter.finish(error=errno.EIO)
        else:
            waiter.finish()

    def close(self) -> None:
        """Fail every waiting request with EFAULT and refuse new ones."""
        with self._lock:
            self._closed = True
            waiters, self._waiters = list(self._waiters.values()), {}
        for waiter in waiters:
            waiter.finish(error=errno.EFAULT)
