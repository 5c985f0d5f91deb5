"""The engine of one vfio-user connection: reading, framing, dispatching, lifetime.

Threads. Each session runs on a thread of its own: a blocking ``recvmsg_into`` into one
buffer, then the commands it brought, in arrival order, each through a handler table built once
(indexed by command number; the table before VERSION answers only VERSION). A read that is one
whole region access or region info command (the usual read) goes to its handler as it lies in
the buffer, and the read loop writes the reply itself, under the sender's lock: no payload
copy (a write's data is copied once), no framer, no call of ``Sender.send`` on the path
every access takes.

Nothing a session waits for holds up another device: its reads, its replies to a client that
does not read, and its device's DMA by messages block only its own thread. Devices share the
interpreter: a session gives it up while it waits on its socket, and one that runs pipelined
commands (many in one read) pauses every ``_TURN`` seconds, so one device's client holds the
others up for a few milliseconds at most.

DMA by messages inside a command (a device model's DMA, in a region write, to memory mapped
without an fd) waits for the client's reply on the session's thread, which reads the socket
meanwhile: replies go to their requests, commands are held and run, in order, once the command
that waits has finished (at most ``_HELD_LIMIT`` of them; a client that pushes more is cut off).
DMA from other threads (a device's own) waits on an event the session's reads set.

The bounds on what one client makes the server hold are in the README ("Per-client bounds").
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import final

from .._errors import AccessError, ContractViolation
from ._codec import (
    HEADER,
    HEADER_SIZE,
    Command,
    DmaLayout,
    ProtocolError,
    pack_error,
)
from ._command import NO_REPLY, REPLY, FatalError, Handler
from ._config import PeerCredentials, ServerConfig
from ._dma_maps import DmaMaps
from ._dma_messages import MessageDma
from ._features import DeviceFeatures
from ._irqs import Irqs
from ._log import logger, sessions_logger
from ._negotiation import Negotiation
from ._regions import MessageHandler, Regions
from ._served import ServedDevice
from ._transport import FD_SIZE, Framer, Sender, close_fds, received_fds

__all__ = ["Session", "fd_budget"]

_DEBUG, _INFO = logging.DEBUG, logging.INFO
_RECV_SIZE = 1 << 16
_TYPE_MASK = 0xF
_COMMAND = 0
_TABLE_SIZE = max(Command) + 1
_FD_LOST = -2
"""Stands for an fd the kernel could not give: the process is at its fd limit."""
_HELD_LIMIT, _HELD_BYTES_LIMIT = 4096, 64 << 20
_TURN, _PAUSE = 0.002, 0.0001
"""Seconds of pipelined commands a session runs before it pauses, and for how long."""
_FD_RESERVE = 64
"""Fds kept for the process itself (sockets, logs, the device's files) out of the budget."""
_FD_COMMANDS = frozenset({Command.DMA_MAP, Command.DEVICE_SET_IRQS})
"""The commands that may carry fds."""
_KEEPS_REGION_INFO = frozenset(
    {
        Command.VERSION,
        Command.DEVICE_GET_INFO,
        Command.DEVICE_GET_REGION_INFO,
        Command.DEVICE_GET_IRQ_INFO,
        Command.REGION_READ,
        Command.DMA_READ,
        Command.DMA_WRITE,
    }
)
"""Commands after which a mediator's region info answer stays what it was."""
_Item = tuple[int, int, int, memoryview, list[int]]


def fd_budget(devices: int) -> int:
    """The DMA mappings each of ``devices`` sessions can hold with the fd limit of this
    process (``RLIMIT_NOFILE``, soft): what is left of it once the fds open now and a reserve
    are taken, shared equally (a mapping by fd may hold one fd)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = _FD_RESERVE
    return max(1, (soft - in_use - _FD_RESERVE) // max(1, devices))


@final
class Session:
    """One client connection to one device: from VERSION to disconnect, on a thread of its own.

    Created and started by the server on its event loop. The device is opened at ``start`` and
    closed when the session ends; the client's DMA mappings and interrupt eventfds die with the
    session, the device's state does not (a device left out of RUNNING is resumed).
    ``mapped_areas`` records, per region index, every ``(offset, size)`` area whose fd was
    handed to the client (pass the dict of the endpoint to record every session's in one
    place); ``max_dma_maps`` is the most DMA mappings the session offers (default: the
    configuration's). ``closed`` is done once the session has ended and released everything.
    """

    def __init__(
        self,
        device: ServedDevice,
        sock: socket.socket,
        config: ServerConfig,
        *,
        peer: PeerCredentials,
        label: str,
        mapped_areas: dict[int, set[tuple[int, int]]] | None = None,
        on_closed: Callable[[Session], None] | None = None,
        max_dma_maps: int | None = None,
    ) -> None:
        self.device = device
        self.peer = peer
        self.label = label
        self.config = config
        self.mapped_areas: dict[int, set[tuple[int, int]]] = (
            mapped_areas if mapped_areas is not None else {}
        )
        self.requests = 0
        self.errors = 0
        self._sock = sock
        self._fd = sock.fileno()
        sock.setblocking(True)
        self._loop = asyncio.get_running_loop()
        self._sender = Sender(sock, config.reply_timeout, self._send_failed)
        send = self._sender.send
        self.message_dma = MessageDma(send, label, config.dma_timeout, self._wait_here)
        self._on_closed = on_closed
        self._started = time.monotonic()
        self._max_fds = config.max_msg_fds
        self._anc_space = socket.CMSG_SPACE((config.max_msg_fds + 1) * FD_SIZE)
        self._framer = Framer(config.max_message, config.max_msg_fds)
        self._closing = False
        self._discard = False
        self._reason = ""
        self._nesting = 0
        self._held: deque[_Item] = deque()
        self._held_bytes = 0
        self._poller = select.poll()
        self._poller.register(self._fd, select.POLLIN)
        self._thread: threading.Thread | None = None
        maps = (
            config.max_dma_maps if max_dma_maps is None else min(max_dma_maps, config.max_dma_maps)
        )
        self._regions = Regions(device, config, label, send, self.mapped_areas)
        self._dma_maps = DmaMaps(device, config, label, send, self.message_dma, maps)
        self._groups = (
            Negotiation(device, config, label, send, self.message_dma, maps, self._negotiated),
            self._regions,
            self._dma_maps,
            Irqs(device, config, label, send),
            DeviceFeatures(device, config, label, send, self._dma_maps.mapped_ranges),
        )
        handlers: dict[int, Handler] = {
            Command.DEVICE_GET_REGION_IO_FDS: self._unsupported,
            Command.DMA_READ: self._wrong_direction,
            Command.DMA_WRITE: self._wrong_direction,
            Command.DIRTY_PAGES: self._unsupported,
        }
        for group in self._groups:
            handlers.update(group.handlers())
        self._negotiated_table: list[Handler] = [
            handlers.get(number, self._unknown) for number in range(_TABLE_SIZE)
        ]
        self._table: list[Handler] = [self._before_version] * _TABLE_SIZE
        self._table[Command.VERSION] = handlers[Command.VERSION]
        self._fallback: Handler = self._before_version
        self._fast: dict[int, MessageHandler] = {}
        """Commands taken from the message as read (none before VERSION)."""
        self.closed: asyncio.Future[None] = self._loop.create_future()

    def __repr__(self) -> str:
        return f"<Session {self.label} pid={self.peer.pid} requests={self.requests}>"

    @property
    def dma_layout(self) -> DmaLayout:
        """The layout of the DMA_READ/DMA_WRITE messages this client gets."""
        return self.message_dma.layout

    # -- lifetime ----------------------------------------------------------------------

    def start(self) -> None:
        """Open the device and start the session's thread; raises if the device won't open."""
        self.device.open()
        self._thread = threading.Thread(target=self._run, name=f"vfio-user {self.label}")
        self._thread.daemon = True
        self._thread.start()
        if sessions_logger.isEnabledFor(_DEBUG):
            sessions_logger.debug("%s: session from pid %d (uid %d) started", *self._who())

    def _who(self) -> tuple[str, int, int]:
        return self.label, self.peer.pid, self.peer.uid

    def close(self, reason: str = "closed by the server") -> None:
        """End the session (from any thread): commands not yet run are dropped, a command
        running finishes, then everything the client held is released."""
        if self._closing and self._discard:
            return
        if not self._closing:
            self._reason = reason
        self._closing = self._discard = True
        self.message_dma.close()
        with contextlib.suppress(OSError):
            # Wakes the session's thread from a read or a send that waits on the client.
            self._sock.shutdown(socket.SHUT_RDWR)

    def _end(self, reason: str) -> None:
        """Stop reading (on the session's thread); what was read still runs."""
        if not self._closing:
            self._closing = True
            self._reason = reason
            self.message_dma.close()

    def _send_failed(self, reason: str) -> None:
        self.close(reason)

    def peer_hung_up(self) -> bool:
        """Whether the client has shut its end of the connection (its EOF may be unread)."""
        if self._closing:
            return True
        poller = select.poll()
        poller.register(self._fd, select.POLLRDHUP | select.POLLHUP)
        return bool(poller.poll(0))

    async def finish(self, timeout: float) -> None:
        """Let the session run what its client sent before hanging up, up to its EOF; after
        ``timeout`` seconds close it anyway."""
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        except TimeoutError:
            self.close("the client hung up and its last commands took too long")
            await asyncio.shield(self.closed)

    def _run(self) -> None:
        self.message_dma.reader_thread = threading.get_ident()
        try:
            self._read_loop()
        except Exception:
            logger.exception("%s: the session failed", self.label)
        finally:
            self._teardown()

    def _teardown(self) -> None:
        self._closing = True
        self.message_dma.close()
        self._sender.close()
        self._sock.close()
        self._framer.close()
        for item in self._held:
            close_fds(item[4])
        self._held.clear()
        for group in reversed(self._groups):
            try:
                group.teardown()
            except Exception:
                logger.exception("%s: releasing the client's %s failed", self.label, group)
        try:
            self.device.close()
        except Exception:
            logger.exception("%s: closing the device failed", self.label)
        sessions_logger.info(
            "%s: session of pid %d (uid %d) ended after %.1f s, %d requests, %d errors: %s",
            *self._who(),
            time.monotonic() - self._started,
            self.requests,
            self.errors,
            self._reason,
        )
        # Without a loop (it is closed), nobody waits for this session any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._finished)

    def _finished(self) -> None:
        if self._on_closed is not None:
            self._on_closed(self)
        if not self.closed.done():
            self.closed.set_result(None)

    # -- reading and framing -----------------------------------------------------------

    def _read_loop(self) -> None:
        recvmsg_into, anc_space, framer = self._sock.recvmsg_into, self._anc_space, self._framer
        # One buffer for every read: the usual read is one whole command, taken from it as it
        # is (nothing keeps it); anything else is copied out for the framer.
        buffer = bytearray(_RECV_SIZE)
        buffers, view = [buffer], memoryview(buffer)
        # At this level nothing is nested: a command runs at once (what comes while it waits
        # for a DMA reply is held, and runs right after it).
        unpack, keeps, invalidate = HEADER.unpack_from, _KEEPS_REGION_INFO, self._regions.invalidate
        table, fast, held = self._table, self._fast, self._held
        # The reply path of ``Sender.send``, written out here: it is every command's.
        write, fd, sender = os.write, self._fd, self._sender
        acquire, release, finish, failed = (
            sender.lock.acquire,
            sender.lock.release,
            sender.finish,
            sender.failed,
        )
        while not self._closing:
            try:
                size, ancdata, msg_flags, _ = recvmsg_into(buffers, anc_space)
            except InterruptedError:
                continue
            except OSError as exc:
                self._end(f"receive failed: {exc}")
                return
            if not ancdata and not msg_flags and size >= HEADER_SIZE and framer.idle:
                # The usual read: exactly one whole command, no fds (none dropped either).
                msg_id, command, length, flags, _ = unpack(buffer)
                if length == size and not flags & _TYPE_MASK:
                    self.requests += 1
                    hot = fast.get(command)  # the hottest commands, without a payload view
                    if hot is not None:
                        try:
                            reply = hot(msg_id, flags, view, HEADER_SIZE, size)
                        except Exception as exc:
                            self._refuse(exc, msg_id, command, flags)
                            reply = None
                        if reply is not None and not sender.broken:
                            acquire()
                            try:
                                sent = write(fd, reply)
                                if sent < len(reply):
                                    finish(reply, sent)
                            except OSError as exc:
                                failed(exc)
                            finally:
                                release()
                        if held:  # commands that came while it waited for a DMA reply
                            self._run_held()
                        continue
                    handler = table[command] if command < _TABLE_SIZE else self._fallback
                    try:
                        handler(msg_id, flags, memoryview(view[HEADER_SIZE:size].tobytes()), [])
                    except Exception as exc:
                        self._refuse(exc, msg_id, command, flags)
                    else:
                        if command not in keeps:
                            invalidate()
                    if held:
                        self._run_held()
                    table = self._table  # VERSION negotiated: the whole table from now on
                    continue
            if self._take(view[:size].tobytes(), ancdata, msg_flags):
                self._pump()
                table = self._table
        self._pump()  # what the client sent before its EOF still runs

    def _take(self, data: bytes, ancdata: list[tuple[int, int, bytes]], msg_flags: int) -> bool:
        """Give one read to the framer; ``False`` at EOF or a framing violation."""
        fds = received_fds(ancdata) if ancdata else []
        if msg_flags & socket.MSG_CTRUNC:
            # The kernel dropped the fds that did not fit: too many for one message, or (with
            # room for more than the most a message may carry) none left in this process.
            lost = _FD_LOST if len(fds) <= self._max_fds else -1
            fds.extend([lost] * (self._max_fds + 1 - len(fds)))
        if not data:
            close_fds(fds)
            self._end("the client closed the connection")
            return False
        try:
            self._framer.feed(data, fds)
        except ProtocolError as exc:
            self._protocol_violation(str(exc))
            return False
        return True

    def _pump(self) -> None:
        """Dispatch every whole message received; re-entered by a nested read. After each
        ``_TURN`` seconds of commands, other threads get the interpreter for a moment."""
        turn_ends = time.monotonic() + _TURN
        while not self._discard:
            try:
                frame = self._framer.next()
            except ProtocolError as exc:
                self._protocol_violation(str(exc))
                return
            if frame is None:
                return
            msg_id, command, flags, error, payload, fds = frame
            kind = flags & _TYPE_MASK
            if kind == REPLY:
                self.message_dma.on_reply(msg_id, command, flags, error, payload, fds)
            elif kind != _COMMAND:
                close_fds(fds)
                self._protocol_violation(f"message type {kind} is neither command nor reply")
            else:
                self.requests += 1
                self._execute(msg_id, command, flags, payload, fds)
                if time.monotonic() > turn_ends:
                    # The GIL, released and taken back at every reply, seldom reaches a
                    # thread waiting on another CPU (it wakes too late): a sleep hands it over.
                    time.sleep(_PAUSE)
                    turn_ends = time.monotonic() + _TURN

    def _protocol_violation(self, reason: str) -> None:
        logger.warning(
            "%s: closing the connection of pid %d: %s", self.label, self.peer.pid, reason
        )
        self._end(f"protocol violation: {reason}")
        self._discard = True

    def _wait_here(self, done: threading.Event, timeout: float) -> None:
        """Wait on the session's thread for the reply to a DMA request its command made:
        read the socket until the reply comes (commands that come meanwhile are held), for at
        most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        self._nesting += 1
        try:
            while not done.is_set() and not self._closing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                if not self._poller.poll(remaining * 1000):
                    continue
                try:
                    data, ancdata, msg_flags, _ = self._sock.recvmsg(_RECV_SIZE, self._anc_space)
                except InterruptedError:
                    continue
                except OSError as exc:
                    self._end(f"receive failed: {exc}")
                    return
                if self._take(data, ancdata, msg_flags):
                    self._pump()
        finally:
            self._nesting -= 1

    # -- executing commands ------------------------------------------------------------

    def _execute(
        self, msg_id: int, command: int, flags: int, payload: memoryview, fds: list[int]
    ) -> None:
        if self._nesting:
            self._hold(msg_id, command, flags, payload, fds)
            return
        self._run_command(msg_id, command, flags, payload, fds)
        self._run_held()

    def _run_held(self) -> None:
        """Run, in order, the commands held while a command waited for a DMA reply."""
        held = self._held
        while held and not self._discard:
            item = held.popleft()
            self._held_bytes -= len(item[3])
            self._run_command(*item)

    def _hold(
        self, msg_id: int, command: int, flags: int, payload: memoryview, fds: list[int]
    ) -> None:
        self._held.append((msg_id, command, flags, payload, fds))
        self._held_bytes += len(payload)
        if len(self._held) > _HELD_LIMIT or self._held_bytes > _HELD_BYTES_LIMIT:
            self._protocol_violation(
                f"{len(self._held)} commands ({self._held_bytes} bytes) sent while a DMA "
                "request waits for its reply"
            )

    def _run_command(
        self, msg_id: int, command: int, flags: int, payload: memoryview, fds: list[int]
    ) -> None:
        try:
            if fds:
                self._check_fds(command, fds)
            handler = self._table[command] if command < _TABLE_SIZE else self._fallback
            handler(msg_id, flags, payload, fds)
        except Exception as exc:
            close_fds(fds)  # before the client hears of the refusal
            self._refuse(exc, msg_id, command, flags)
            return
        if command not in _KEEPS_REGION_INFO:
            self._regions.invalidate()
        if fds:
            close_fds(fds)

    def _refuse(self, exc: Exception, msg_id: int, command: int, flags: int) -> None:
        """Answer a command that raised ``exc``: its errno (EIO for a bug, which is logged with
        the mediator's name), or for a ``FatalError`` an error and the end of the session."""
        self._regions.invalidate()
        if isinstance(exc, FatalError):
            if exc.code is not None and not flags & NO_REPLY:
                self._sender.send(pack_error(msg_id, command, exc.code))
            self._protocol_violation(str(exc))
            return
        if isinstance(exc, OSError):
            code = exc.errno or errno.EIO
            if logger.isEnabledFor(_INFO):
                logger.info(
                    "%s: %s refused with %s: %s",
                    self.label,
                    Command.name_of(command),
                    errno.errorcode.get(code, code),
                    exc,
                )
        elif isinstance(exc, ContractViolation):
            code = errno.EIO
            logger.error("%s: command %d: %s", self.label, command, exc)
        else:
            code = errno.EIO
            logger.error(
                "%s: command %s raised in the device or its mediator %s",
                self.label,
                Command.name_of(command),
                self._mediator_name(),
                exc_info=exc,
            )
        self.errors += 1
        if not flags & NO_REPLY:
            self._sender.send(pack_error(msg_id, command, code))

    def _check_fds(self, command: int, fds: list[int]) -> None:
        if _FD_LOST in fds:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            raise AccessError(
                errno.EMFILE,
                f"the server has no fd left for this message's fds (RLIMIT_NOFILE {soft})",
            )
        if len(fds) > self._max_fds or command not in _FD_COMMANDS:
            raise AccessError(errno.EINVAL, f"{len(fds)} fds with command {command}")

    def _mediator_name(self) -> str:
        record = self.device.mediator
        return record.describe() if record is not None else "(none: passthrough)"

    def _negotiated(self) -> None:
        self._table, self._fallback = self._negotiated_table, self._unknown
        self._fast.update(self._regions.message_handlers())

    def _before_version(self, msg_id: int, flags: int, payload: memoryview, fds: list[int]) -> None:
        raise FatalError(errno.EINVAL, "command before VERSION")

    def _unknown(self, msg_id: int, flags: int, payload: memoryview, fds: list[int]) -> None:
        raise AccessError(errno.ENOSYS, "unknown command")

    def _unsupported(self, msg_id: int, flags: int, payload: memoryview, fds: list[int]) -> None:
        raise AccessError(errno.ENOTSUP, "command not supported by this server")

    def _wrong_direction(
        self, msg_id: int, flags: int, payload: memoryview, fds: list[int]
    ) -> None:
        raise AccessError(errno.EINVAL, "DMA_READ/DMA_WRITE go from server to client")
