"""The socket side of a session: fds in ancillary data, framing, and thread-safe sends."""

from __future__ import annotations

import array
import os
import select
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import final

from ._codec import HEADER, HEADER_SIZE, ProtocolError
from ._log import logger

__all__ = [
    "FD_SIZE",
    "EventfdTrigger",
    "Frame",
    "Framer",
    "Sender",
    "close_fds",
    "is_eventfd",
    "received_fds",
]

FD_SIZE = array.array("i").itemsize
_SCM = socket.SCM_RIGHTS
_SOL = socket.SOL_SOCKET
_TIMEVAL = struct.Struct("@ll")
_write = os.write
_EVENTFD_LINK = "anon_inode:[eventfd]"


def close_fds(fds: Sequence[int]) -> None:
    """Close received fds (negative entries stand for fds the kernel already dropped)."""
    for fd in fds:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                logger.debug("closing received fd %d failed", fd)


def received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds of ``recvmsg``'s ancillary data."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == _SOL and kind == _SCM:
            fds.extend(array.array("i", data[: len(data) - len(data) % FD_SIZE]))
    return fds


Frame = tuple[int, int, int, int, memoryview, list[int]]
"""A received message: msg id, command, flags, error, payload and its fds."""


@final
class Framer:
    """Cuts the received byte stream into messages and gives each the fds that came with it.

    The kernel ends a read right after the data that carried fds, so the fds of one read belong
    to the message holding its last byte. All state lives here, so that a nested read (a DMA
    reply awaited in the middle of a command) goes on exactly where the outer one stopped.
    A message's payload is a view of immutable bytes: it may be kept.
    """

    def __init__(self, max_message: int, max_fds: int) -> None:
        self._max_message = max_message
        self._max_pending_fds = 4 * (max_fds + 1)
        self._data = b""
        self._position = 0
        self._parts: list[bytes] = []
        self._have = 0
        self._need = HEADER_SIZE
        self._received = 0
        self._consumed = 0
        self._fds: deque[tuple[int, list[int]]] = deque()
        self._pending_fds = 0
        self.idle = True
        """Whether nothing is held (no part of a message, no fds), as of the last ``next``
        that found no message: a read holding exactly one whole message may skip the framer."""

    def feed(self, data: bytes, fds: list[int]) -> None:
        """Add one read's bytes and fds; ``ProtocolError`` when fds pile up unclaimed."""
        self.idle = False
        if fds:
            self._fds.append((self._received + len(data) - 1, fds))
            self._pending_fds += len(fds)
            if self._pending_fds > self._max_pending_fds:
                raise ProtocolError(f"{self._pending_fds} fds for no complete message")
        self._received += len(data)
        if self._parts:
            self._parts.append(data)
            self._have += len(data)
        elif self._position < len(self._data):
            # A message is incomplete: collect the pieces and join them once, when it is whole.
            left = self._data[self._position :]
            self._parts, self._have = [left, data], len(left) + len(data)
            self._data, self._position = b"", 0
        else:
            self._data, self._position = data, 0
            return
        if self._have >= self._need:
            self._data, self._position = b"".join(self._parts), 0
            self._parts, self._have = [], 0

    def next(self) -> Frame | None:
        """The next whole message, or ``None``; ``ProtocolError`` for a size that cannot be
        (the stream cannot be trusted after it)."""
        if self._parts:
            return None
        available = len(self._data) - self._position
        if available < HEADER_SIZE:
            self._need = HEADER_SIZE
            self.idle = not available and not self._fds
            return None
        start = self._position
        msg_id, command, size, flags, error = HEADER.unpack_from(self._data, start)
        if size < HEADER_SIZE or size > self._max_message:
            raise ProtocolError(f"message size {size} is outside [16, {self._max_message}]")
        if available < size:
            self._need = size
            return None
        self._position += size
        self._consumed += size
        fds: list[int] = []
        while self._fds and self._fds[0][0] < self._consumed:
            fds.extend(self._fds.popleft()[1])
        if fds:
            self._pending_fds -= len(fds)
        payload = memoryview(self._data)[start + HEADER_SIZE : start + size]
        return msg_id, command, flags, error, payload, fds

    def close(self) -> None:
        """Close the fds no message claimed."""
        for _, fds in self._fds:
            close_fds(fds)
        self._fds.clear()


@final
class Sender:
    """Thread-safe blocking sends of whole messages; fds ride on a message's first byte.

    Nothing is queued in the process: a client that does not read its replies makes the
    session's sends wait (its own socket buffer bounds what it holds, fds included), and one
    that reads nothing for ``timeout`` seconds (the socket's send timeout) is cut off:
    ``on_error`` is called once with the reason and later sends do nothing.
    """

    def __init__(
        self, sock: socket.socket, timeout: float, on_error: Callable[[str], None]
    ) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._sendall = sock.sendall
        self._timeout = timeout
        self._on_error = on_error
        self._lock = threading.Lock()
        # Bound once: a ``with`` block costs twice these two calls on every reply.
        self._acquire, self._release = self._lock.acquire, self._lock.release
        self.broken = False
        """Whether a send failed or ``close`` was called: nothing more is sent."""
        seconds = int(timeout)
        sock.setsockopt(
            _SOL,
            socket.SO_SNDTIMEO,
            _TIMEVAL.pack(seconds, int((timeout - seconds) * 1_000_000)),
        )

    @property
    def lock(self) -> threading.Lock:
        """The lock every send holds. A caller that writes a message itself (the session's
        own reply path, without the call of ``send``) writes nothing once ``broken``, else
        holds it, writes with ``os.write`` on ``fd``, and calls ``finish`` after a partial
        write and ``failed`` on an error."""
        return self._lock

    @property
    def fd(self) -> int:
        """The socket's fd."""
        return self._fd

    def send(self, data: bytes | bytearray, fds: Sequence[int] = ()) -> None:
        """Send one message with ``fds``; waits while the client's socket is full."""
        self._acquire()
        try:
            if self.broken:
                return
            if fds:
                ancillary = [(_SOL, _SCM, array.array("i", fds))]
                sent = self._sock.sendmsg([data], ancillary)
            else:
                # os.write: the thinnest call there is (the socket blocks, with a timeout).
                sent = _write(self._fd, data)
            if sent < len(data):
                self._sendall(memoryview(data)[sent:])
        except OSError as exc:
            self.failed(exc)
        finally:
            self._release()

    def finish(self, data: bytes | bytearray, sent: int) -> None:
        """Send what a write of ``data`` left after its first ``sent`` bytes (lock held)."""
        self._sendall(memoryview(data)[sent:])

    def failed(self, exc: OSError) -> None:
        """A send failed with ``exc`` (lock held): send nothing more, and report it once."""
        if self.broken:
            return
        self.broken = True
        if isinstance(exc, BlockingIOError):
            self._on_error(f"the client read no reply for {self._timeout} s")
        else:
            self._on_error(f"send failed: {exc}")

    def close(self) -> None:
        """Send nothing more."""
        with self._lock:
            self.broken = True


def is_eventfd(fd: int) -> bool:
    """Whether ``fd`` is an eventfd (what else a client passes may block a write: a full pipe)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == _EVENTFD_LINK
    except OSError:
        return False


def _writable(events: list[tuple[int, int]]) -> bool:
    return bool(events) and bool(events[0][1] & select.POLLOUT)


@final
class EventfdTrigger:
    """An interrupt trigger that adds 1 to a client's eventfd; closing it makes later calls
    no-ops, so a device thread holding the trigger never writes to a reused fd number.

    A saturated eventfd does not make it wait: the client's eventfd may be in blocking mode
    (its file status flags are the client's, shared with this fd, so they are left alone) with
    its counter at the maximum, where a write waits for a read. So the write is made only when
    ``poll`` says it goes through; otherwise the counter, far from zero, already signals an
    interrupt and nothing is lost, as with the kernel's own eventfd signalling. Only a client
    that keeps its eventfd blocking and races its counter up between the poll and the write
    could still make one write wait.
    """

    __slots__ = ("_fd", "_lock", "_poller")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._poller = select.poll()
        self._poller.register(fd, select.POLLOUT)

    def __call__(self) -> None:
        with self._lock:
            if self._fd >= 0 and _writable(self._poller.poll(0)):
                try:
                    os.eventfd_write(self._fd, 1)
                except OSError as exc:
                    logger.debug("irq eventfd %d write failed: %s", self._fd, exc)

    def fileno(self) -> int:
        """The eventfd (for a backend that hands it to the kernel; it stays owned here)."""
        return self._fd

    def close(self) -> None:
        """Close the eventfd; later calls do nothing (a device may still hold the trigger)."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
