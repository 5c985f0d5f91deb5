"""One vfio-user connection: framing messages, the command handlers, the replies.

Concurrency. Every access a session makes goes through its ``MediatedDevice``, and commands run
in arrival order. They run inline on the event loop thread: no thread hop, so a trapped access
costs one socket round trip and one device call. Only DMA by messages can make a command wait on
the client (a device model's DMA inside a region write, to memory mapped without an fd, needs a
DMA_READ/DMA_WRITE round trip). The first time that happens inline, the loop thread reads the
socket itself until the reply comes (commands arriving meanwhile are queued), and the session
then hands its commands, for good, to a worker thread of its own: from there on its DMA waits
block that worker while the loop goes on reading replies and serving other devices. While the
loop thread waits, no other device is served, and the command cannot move to another thread in
the middle of the device's call: so that first wait is cut short
(``ServerConfig.inline_dma_timeout``). A client that does not answer at once gets that one
request failed with ETIMEDOUT (the device sees a DMA error, as for any timeout); no client holds
up the other devices longer than that, once per session. A session whose client maps memory
without an fd that the device never touches (QEMU's ROMs) stays inline.
Sends are serialised by a lock; what the socket does not take at once is flushed by the loop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import queue
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, final

from .._device import MediatedDevice
from .._dma import DmaMapping
from .._errors import AccessError, ContractViolation
from ..uapi import PAGE_SIZE, IrqInfoFlag, IrqSetFlag, RegionInfo, SparseMmapArea
from ._codec import (
    DEVICE_INFO,
    DMA_MAP,
    DMA_UNMAP,
    DMA_UNMAP_FLAG_ALL,
    HEADER,
    HEADER_SIZE,
    IRQ_INFO,
    IRQ_SET,
    REGION_INFO,
    REGION_RW,
    REPLY_RW,
    TYPE_MASK,
    VERSION,
    WRITE_MULTI_COUNT,
    WRITE_MULTI_ENTRY,
    WRITE_MULTI_MAX_DATA,
    Capabilities,
    Command,
    DmaFlag,
    DmaLayout,
    HeaderFlag,
    ProtocolError,
    decode_capabilities,
    encode_capabilities,
    encode_region_info,
    pack_error,
)
from ._config import PeerCredentials, ServerConfig
from ._dma_messages import MessageDma
from ._features import DeviceFeatures
from ._log import logger, sessions_logger
from ._transport import (
    FD_SIZE,
    EventfdTrigger,
    Framer,
    Sender,
    close_fds,
    is_eventfd,
    received_fds,
)

__all__ = ["Session"]

_DEBUG, _INFO = logging.DEBUG, logging.INFO
_RECV_SIZE = 1 << 16
_REPLY = HeaderFlag.REPLY
_NO_REPLY = HeaderFlag.NO_REPLY
_COMMAND = HeaderFlag.COMMAND
# Worker-mode flow control: stop reading above HIGH queued commands (or bytes), resume below
# LOW; a client that pushes past HARD while the worker waits on it is cut off.
_QUEUE_HIGH, _QUEUE_LOW, _QUEUE_HARD = 256, 64, 4096
_QUEUE_HIGH_BYTES, _QUEUE_HARD_BYTES = 8 << 20, 64 << 20
_FD_COMMANDS = frozenset({Command.DMA_MAP, Command.DEVICE_SET_IRQS})
"""The commands that may carry fds."""


class _Fatal(Exception):
    """A protocol violation after which the stream cannot be trusted: reply (when ``code``),
    then close."""

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(message)
        self.code = code


_Handler = Callable[[int, int, memoryview, list[int]], None]
_Item = tuple[int, int, int, memoryview, list[int]]


@final
class Session:
    """One client connection to one device: from VERSION to disconnect.

    Created and started by the server on the loop thread. The device is opened at ``start``
    and closed when the session ends; the client's DMA mappings and interrupt eventfds die with
    the session, the device's state does not. ``mapped_areas`` records, per region index, every
    ``(offset, size)`` area whose fd was handed to the client (pass the dict of the endpoint to
    record every session's in one place).
    """

    def __init__(
        self,
        device: MediatedDevice,
        sock: socket.socket,
        config: ServerConfig,
        *,
        peer: PeerCredentials,
        label: str,
        mapped_areas: dict[int, set[tuple[int, int]]] | None = None,
        on_closed: Callable[[Session], None] | None = None,
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
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._sender = Sender(sock, self._loop, self.close)
        self.message_dma = MessageDma(
            self._sender,
            label,
            config.dma_timeout,
            config.inline_dma_timeout,
            self._reply_wanted,
            self._wait_inline,
        )
        self._on_closed = on_closed
        self._started = time.monotonic()
        self._max_message = config.max_message
        self._max_fds = config.max_msg_fds
        self._anc_space = socket.CMSG_SPACE((config.max_msg_fds + 1) * FD_SIZE)
        self._framer = Framer(config.max_message, config.max_msg_fds)
        self._negotiated = False
        self._reading = False
        self._paused = False
        self._closing = False
        self._reason = ""
        self._maps: dict[tuple[int, int], DmaMapping] = {}
        self._triggers: dict[tuple[int, int], EventfdTrigger] = {}
        self._worker: threading.Thread | None = None
        self._gate = threading.Event()
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._queue_lock = threading.Lock()
        self._queued_bytes = 0
        self._discard = False
        self._features = DeviceFeatures(device, config, label, lambda: sorted(self._maps))
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._handlers: dict[int, _Handler] = {
            Command.VERSION: self._version,
            Command.DMA_MAP: self._dma_map,
            Command.DMA_UNMAP: self._dma_unmap,
            Command.DEVICE_GET_INFO: self._device_info,
            Command.DEVICE_GET_REGION_INFO: self._region_info,
            Command.DEVICE_GET_REGION_IO_FDS: self._unsupported,
            Command.DEVICE_GET_IRQ_INFO: self._irq_info,
            Command.DEVICE_SET_IRQS: self._set_irqs,
            Command.REGION_READ: self._region_read,
            Command.REGION_WRITE: self._region_write,
            Command.DMA_READ: self._wrong_direction,
            Command.DMA_WRITE: self._wrong_direction,
            Command.DEVICE_RESET: self._reset,
            Command.DIRTY_PAGES: self._unsupported,
            Command.REGION_WRITE_MULTI: self._write_multi,
            Command.DEVICE_FEATURE: self._feature,
            Command.MIG_DATA_READ: self._mig_data_read,
            Command.MIG_DATA_WRITE: self._mig_data_write,
        }

    def __repr__(self) -> str:
        return f"<Session {self.label} pid={self.peer.pid} requests={self.requests}>"

    @property
    def dma_layout(self) -> DmaLayout:
        """The layout of the DMA_READ/DMA_WRITE messages this client gets."""
        return self.message_dma.layout

    @property
    def threaded(self) -> bool:
        """Whether commands run on the session's worker thread (once the device did DMA by
        messages)."""
        return self._worker is not None

    # -- lifetime ----------------------------------------------------------------------

    def start(self) -> None:
        """Open the device and start reading (loop thread); raises if the device won't open."""
        self.device.open()
        self._sock.setblocking(False)
        self._loop.add_reader(self._fd, self._on_readable)
        self._reading = True
        if sessions_logger.isEnabledFor(_DEBUG):
            sessions_logger.debug("%s: session from pid %d (uid %d) started", *self._who())

    def _who(self) -> tuple[str, int, int]:
        return self.label, self.peer.pid, self.peer.uid

    def close(self, reason: str = "closed by the server", *, drain: bool = False) -> None:
        """End the session (loop thread). With ``drain``, commands already received still run
        (the client closed after posting them); otherwise they are dropped."""
        if self._closing:
            return
        self._closing = True
        self._reason = reason
        self._stop_reading()
        self.message_dma.close()
        if self._worker is not None:
            self._discard = not drain
            self._queue.put(None)
        else:
            self._teardown()

    def peer_hung_up(self) -> bool:
        """Whether the client has shut its end of the connection (its EOF may be unread)."""
        if self._closing:
            return True
        poller = select.poll()
        poller.register(self._fd, select.POLLRDHUP | select.POLLHUP)
        return bool(poller.poll(0))

    async def finish(self, timeout: float) -> None:
        """Let the session read and run what its client sent before hanging up, up to its EOF;
        after ``timeout`` seconds close it anyway."""
        self._resume_reading()
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        except TimeoutError:
            self.close("the client hung up and its last commands took too long")
            await asyncio.shield(self.closed)

    def _stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _worker_finished(self) -> None:
        self._worker = None
        self._teardown()

    def _teardown(self) -> None:
        self._sender.close()
        self._sock.close()
        self._framer.close()
        for iova, size in list(self._maps):
            try:
                self.device.dma_unmap(iova, size)
            except OSError as exc:
                logger.debug("%s: unmap at close: %s", self.label, exc)
        self._maps.clear()
        for (index, vector), trigger in self._triggers.items():
            try:
                self.device.set_irq_triggers(index, vector, [None])
            except (OSError, ContractViolation) as exc:
                logger.debug("%s: clearing irq %d/%d: %s", self.label, index, vector, exc)
            trigger.close()
        self._triggers.clear()
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
        if self._on_closed is not None:
            self._on_closed(self)
        if not self.closed.done():
            self.closed.set_result(None)

    # -- reading and framing -----------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data, ancdata, msg_flags, _ = self._sock.recvmsg(_RECV_SIZE, self._anc_space)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(f"receive failed: {exc}")
            return
        fds = received_fds(ancdata) if ancdata else []
        if msg_flags & socket.MSG_CTRUNC:
            # The kernel closed the fds that did not fit: the message has too many.
            fds.extend([-1] * (self._max_fds + 1 - len(fds)))
        if not data:
            close_fds(fds)
            self.close("the client closed the connection", drain=True)
            return
        try:
            self._framer.feed(data, fds)
        except ProtocolError as exc:
            self._protocol_violation(str(exc))
            return
        self._pump()
        if self._worker is not None and not self._closing:
            self._apply_backpressure()

    def _pump(self) -> None:
        """Dispatch every whole message received; re-entered by a nested read."""
        while not self._closing:
            try:
                frame = self._framer.next()
            except ProtocolError as exc:
                self._protocol_violation(str(exc))
                return
            if frame is None:
                return
            self._dispatch(*frame)

    def _protocol_violation(self, reason: str) -> None:
        logger.warning(
            "%s: closing the connection of pid %d: %s", self.label, self.peer.pid, reason
        )
        self.close(f"protocol violation: {reason}")

    def _dispatch(
        self,
        msg_id: int,
        command: int,
        flags: int,
        error: int,
        payload: memoryview,
        fds: list[int],
    ) -> None:
        kind = flags & TYPE_MASK
        if kind == _REPLY:
            self.message_dma.on_reply(msg_id, command, flags, error, payload, fds)
            return
        if kind != _COMMAND:
            close_fds(fds)
            self._protocol_violation(f"message type {kind} is neither command nor reply")
            return
        self.requests += 1
        if self._worker is None:
            self._execute(msg_id, command, flags, payload, fds)
            return
        with self._queue_lock:
            self._queued_bytes += len(payload)
        self._queue.put((msg_id, command, flags, payload, fds))

    # -- worker mode -------------------------------------------------------------------

    def _wait_inline(self, done: threading.Event, timeout: float) -> None:
        """Wait on the loop thread for the reply to a DMA request a command made: the loop
        cannot read while the command runs, so read the socket here (other commands that come
        meanwhile are queued), for at most ``timeout`` (the short ``inline_dma_timeout``), and
        hand the session's later commands to a worker thread, so that its DMA by messages never
        holds up the loop again."""
        self._start_worker()
        deadline = time.monotonic() + timeout
        poller = select.poll()
        while not done.is_set() and not self._closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            poller.register(
                self._fd, select.POLLIN | (select.POLLOUT if self._sender.queued else 0)
            )
            for _, events in poller.poll(remaining * 1000):
                if events & select.POLLOUT:
                    self._sender.flush()
                if events & ~select.POLLOUT:
                    self._on_readable()

    def _start_worker(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(
                target=self._work, name=f"vfio-user {self.label}", daemon=True
            )
            self._worker.start()
            # The worker waits until the command running now (inline) has finished.
            self._loop.call_soon(self._gate.set)
            logger.debug("%s: commands now run on a worker thread (DMA by messages)", self.label)

    def _work(self) -> None:
        self._gate.wait()
        while True:
            item = self._queue.get()
            if item is None:
                break
            msg_id, command, flags, payload, fds = item
            with self._queue_lock:
                self._queued_bytes -= len(payload)
            if self._discard:
                close_fds(fds)
                continue
            self._execute(msg_id, command, flags, payload, fds)
            if self._paused and self._queue.qsize() < _QUEUE_LOW:
                self._loop.call_soon_threadsafe(self._resume_reading)
        self._loop.call_soon_threadsafe(self._worker_finished)

    def _apply_backpressure(self) -> None:
        waiting = self.message_dma.waiting
        depth, size = self._queue.qsize(), self._queued_bytes
        if depth > _QUEUE_HARD or size > _QUEUE_HARD_BYTES:
            self._protocol_violation(f"{depth} commands ({size} bytes) queued unanswered")
        elif not waiting and (depth > _QUEUE_HIGH or size > _QUEUE_HIGH_BYTES):
            self._stop_reading()
            self._paused = True

    def _reply_wanted(self) -> None:
        # A device thread is about to wait for a DMA reply: the loop must be reading.
        if self._paused:
            self._loop.call_soon_threadsafe(self._resume_reading)

    def _resume_reading(self) -> None:
        if self._paused and not self._closing:
            self._paused = False
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    # -- executing commands ------------------------------------------------------------

    def _execute(
        self, msg_id: int, command: int, flags: int, payload: memoryview, fds: list[int]
    ) -> None:
        try:
            if not self._negotiated and command != Command.VERSION:
                raise _Fatal(errno.EINVAL, f"command {command} before VERSION")
            handler = self._handlers.get(command)
            if handler is None:
                raise AccessError(errno.ENOSYS, f"unknown command {command}")
            if fds and (len(fds) > self._max_fds or command not in _FD_COMMANDS):
                raise AccessError(errno.EINVAL, f"{len(fds)} fds with command {command}")
            handler(msg_id, flags, payload, fds)
            return
        except OSError as exc:
            code = exc.errno or errno.EIO
            if logger.isEnabledFor(_INFO):
                logger.info(
                    "%s: %s refused with %s: %s",
                    self.label,
                    Command.name_of(command),
                    errno.errorcode.get(code, code),
                    exc,
                )
        except ContractViolation as exc:
            code = errno.EIO
            logger.error("%s: command %d: %s", self.label, command, exc)
        except _Fatal as exc:
            if exc.code is not None and not flags & _NO_REPLY:
                self._sender.send((pack_error(msg_id, command, exc.code),))
            if threading.get_ident() == self._loop_thread:
                self._protocol_violation(str(exc))
            else:
                self._loop.call_soon_threadsafe(self._protocol_violation, str(exc))
            return
        except Exception:
            code = errno.EIO
            logger.exception(
                "%s: command %s raised in the device or its mediator %s",
                self.label,
                Command.name_of(command),
                self._mediator_name(),
            )
        finally:
            close_fds(fds)
        self.errors += 1
        if not flags & _NO_REPLY:
            self._sender.send((pack_error(msg_id, command, code),))

    def _mediator_name(self) -> str:
        record = self.device.mediator
        return record.describe() if record is not None else "(none: passthrough)"

    def _respond(
        self,
        msg_id: int,
        command: int,
        flags: int,
        payload: bytes | bytearray | memoryview = b"",
        fds: Sequence[int] = (),
    ) -> None:
        if not flags & _NO_REPLY:
            self._sender.send(
                (HEADER.pack(msg_id, command, HEADER_SIZE + len(payload), _REPLY, 0), payload), fds
            )

    # -- negotiation and information ---------------------------------------------------

    def _version(self, msg_id: int, flags: int, payload: memoryview, fds: list[int]) -> None:
        if self._negotiated:
            raise AccessError(errno.EINVAL, "VERSION after negotiation")
        if len(payload) < VERSION.size:
            raise _Fatal(errno.EINVAL, f"VERSION payload of {len(payload)} bytes")
        major, _ = VERSION.unpack_from(payload)
        if major != 0:
            raise _Fatal(errno.ENOTSUP, f"protocol version {major}.x is not supported")
        try:
            caps = decode_capabilities(payload[VERSION.size :])
        except ProtocolError as exc:
            raise _Fatal(errno.EINVAL, str(exc)) from None
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
        ours += [("pgsizes", PAGE_SIZE), ("max_dma_maps", config.max_dma_maps)]
        entries = [(name, value) for name, value in ours if name in caps.keys]
        text = encode_capabilities(entries, len(payload) - VERSION.size)
        self._negotiated = True
        self._respond(msg_id, Command.VERSION, flags, VERSION.pack(0, 0) + text)
        if logger.isEnabledFor(_DEBUG):
            logger.debug("%s: negotiated %s, DMA messages in %s layout", self.label, caps, layout)

    def _migration_capability(self, caps: Capabilities) -> dict[str, int] | None:
        """The old "migration" capability: the dirty page size and the largest report bitmap,
        offered back only for a device that migrates."""
        try:
            migrates = bool(self.device.migration_flags)
        except (OSError, ContractViolation) as exc:
            logger.warning("%s: migration flags: %s", self.label, exc)
            migrates = False
        if not migrates:
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

    def _device_info(self, msg_id: int, flags: int, payload: memoryview, fds: list[int]) -> None:
        if (
            len(payload) < DEVICE_INFO.size
            or DEVICE_INFO.unpack_from(payload)[0] < DEVICE_INFO.size
        ):
            raise AccessError(errno.EINVAL, "GET_INFO needs argsz >= 16")
        info = self.device.device_info()
        self._respond(
            msg_id,
            Command.DEVICE_GET_INFO,
            flags,
            DEVICE_INFO.pack(DEVICE_INFO.size, info.flags, info.num_regions, info.num_irqs),
        )

    def _region_info(self, msg_id: int, flags: int, payload: memoryview, fds: list[int]) -> None:
        if len(payload) < REGION_INFO.size:
            raise AccessError(errno.EINVAL, f"GET_REGION_INFO payload of {len(payload)} bytes")
        argsz, _, index, _, _, _ = REGION_INFO.unpack_from(payload)
        if argsz < REGION_INFO.size:
            raise AccessError(errno.EINVAL, f"GET_REGION_INFO argsz {argsz} < 32")
        info = self.device.region_info(index)
        areas, file_offset, fd = self._map_areas(info)
        reply, complete = encode_region_info(info, areas, file_offset, argsz)
        send_fds = (fd,) if complete and areas else ()
        self._respond(msg_id, Command.DEVICE_GET_REGION_INFO, flags, reply, send_fds)
        if send_fds and not flags & _NO_REPLY:
            handed = {(area.offset, area.size) for area in areas}
            self.mapped_areas.setdefault(index, set()).update(handed)

    def _map_areas(self, info: RegionInfo) -> tuple[tuple[SparseMmapArea, ...], int, int]:
        """The areas of ``info`` a client may map, each from ``device.mmap``; all must come
        from one fd at one base offset (the region info has one offset). An area the device
        refuses or that does not fit is left out, i.e. stays trapped."""
        chosen: list[SparseMmapArea] = []
        fd, base = -1, 0
        for area in info.mmap_areas():
            try:
                mapping = self.device.mmap(info.index, area.offset, area.size)
            except (OSError, ContractViolation) as exc:
                logger.warning(
                    "%s: region %d area %#x+%#x stays trapped: %s",
                    self.label,
                    info.index,
                    area.offset,
                    area.size,
                    exc,
                )
                continue
            area_base = mapping.file_offset - area.offset
            if fd < 0 and area_base >= 0:
                fd, base = mapping.fd, area_base
            elif mapping.fd != fd or area_base != base:
                logger.warning(
                    "%s: region %d area %#x+%#x stays trapped: its mapping (fd %d at %#x) is "
                    "not in the region's one file at one offset",
                    self.label,
                    info.index,
                    area.offset,
                    area.size,
                    mapping.fd,
                    mapping.file_offset,
                )
                continue
            chosen.append(area)
        return tuple(chosen), base, fd

    def _irq_info(self, msg_id: int, flags: int, payload: memoryview, fds: list[int]) -> None:
        if len(payload) < IRQ_INFO.size:
            raise AccessError(errno.EINVAL, f"GET_IRQ_INFO payload of {len(payload)} bytes")
        argsz, _, index, _ = IRQ_INFO.unpack_from(payload)
        if argsz < IRQ_INFO.size:
            raise AccessError(errno.EINVAL, f"GET_IRQ_INFO argsz {argsz} < 16")
        info = self.device.irq_info(index)
        self._respond(
            msg_id,
            Command.DEVICE_GET_IRQ_INFO,
            flags,
            IRQ_INFO.pack(IRQ_INFO.size, info.flags, index, info.count),
        )

    def _unsupported(self, msg_id: int, flags: int, payload: memoryview, fds: list[int]) -> None:
        raise AccessError(errno.ENOTSUP, "command not supported by this server")

    def _wrong_direction(
        self, msg_id: int, flags: int, payload: memoryview, fds: list[int]
    ) -> None:
        raise AccessError(errno.EINVAL, "DMA_READ/DMA_WRITE go from server to client")

    # -- DMA mappings ------------------------------------------------------------------

    def _dma_map(self, msg_id: int, flags: int, payload: memoryview, fds: list[int]) -> None:
        if len(payload) < DMA_MAP.size:
            raise AccessError(errno.EINVAL, f"DMA_MAP payload of {len(payload)} bytes")
        _, map_flags, offset, iova, size = DMA_MAP.unpack_from(payload)
        if map_flags & ~int(DmaFlag.READ | DmaFlag.WRITE):
            raise AccessError(errno.EINVAL, f"DMA_MAP flags {map_flags:#x}")
        if len(fds) > 1:
            raise AccessError(errno.EINVAL, f"DMA_MAP carries {len(fds)} fds")
        if len(self._maps) >= self.config.max_dma_maps:
            raise AccessError(errno.ENOSPC, f"{len(self._maps)} DMA mappings already")
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
                logger.warning("%s: DMA_MAP refused: %s", self.label, exc.strerror)
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

    # -- region access (the hot path: no validation beyond bounds, no formatting) -------

    def _region_read(self, msg_id: int, flags: int, payload: memoryview, fds: list[int]) -> None:
        if len(payload) < REGION_RW.size:
            raise AccessError(errno.EINVAL, f"REGION_READ payload of {len(payload)} bytes")
        offset, index, count = REGION_RW.unpack_from(payload)
        if count > self.config.max_data_xfer_size:
            raise AccessError(errno.E2BIG, f"read of {count} bytes")
        data = self.device.read(index, offset, count)
        if not flags & _NO_REPLY:
            head = REPLY_RW.pack(
                msg_id,
                Command.REGION_READ,
                HEADER_SIZE + REGION_RW.size + len(data),
                _REPLY,
                0,
                offset,
                index,
                len(data),
            )
            self._sender.send((head, data))

    def _region_write(self, msg_id: int, flags: int, payload: memoryview, fds: list[int]) -> None:
        if len(payload) < REGION_RW.size:
            raise AccessError(errno.EINVAL, f"REGION_WRITE payload of {len(payload)} bytes")
        offset, index, count = REGION_RW.unpack_from(payload)
        if count > self.config.max_data_xfer_size:
            raise AccessError(errno.E2BIG, f"write of {count} bytes")
        if count != len(payload) - REGION_RW.size:
            raise AccessError(
                errno.EINVAL, f"write of {count} bytes carries {len(payload) - REGION_RW.size}"
            )
        written = self.device.write(index, offset, payload[REGION_RW.size :].tobytes())
        if not flags & _NO_REPLY:
            head = REPLY_RW.pack(
                msg_id,
                Command.REGION_WRITE,
                HEADER_SIZE + REGION_RW.size,
                _REPLY,
                0,
                offset,
                index,
                written,
            )
            self._sender.send((head,))

    def _write_multi(self, msg_id: int, flags: int, payload: memoryview, fds: list[int]) -> None:
        if len(payload) < WRITE_MULTI_COUNT.size:
            raise AccessError(errno.EINVAL, f"REGION_WRITE_MULTI payload of {len(payload)} bytes")
        (count,) = WRITE_MULTI_COUNT.unpack_from(payload)
        end = WRITE_MULTI_COUNT.size + count * WRITE_MULTI_ENTRY.size
        if end > len(payload):
            raise AccessError(errno.EINVAL, f"{count} writes do not fit {len(payload)} bytes")
        entries = list(WRITE_MULTI_ENTRY.iter_unpack(payload[WRITE_MULTI_COUNT.size : end]))
        for _, _, size, _ in entries:
            if not 0 < size <= WRITE_MULTI_MAX_DATA:
                raise AccessError(errno.EINVAL, f"multi-write entry of {size} bytes")
        for offset, index, size, data in entries:
            self.device.write(index, offset, data[:size])
        self._respond(msg_id, Command.REGION_WRITE_MULTI, flags, WRITE_MULTI_COUNT.pack(count))

    # -- interrupts and reset ----------------------------------------------------------

    def _set_irqs(self, msg_id: int, flags: int, payload: memoryview, fds: list[int]) -> None:
        if len(payload) < IRQ_SET.size:
            raise AccessError(errno.EINVAL, f"SET_IRQS payload of {len(payload)} bytes")
        argsz, set_flags, index, start, count = IRQ_SET.unpack_from(payload)
        if argsz < IRQ_SET.size:
            raise AccessError(errno.EINVAL, f"SET_IRQS argsz {argsz} < 20")
        data_kind = set_flags & (
            IrqSetFlag.DATA_NONE | IrqSetFlag.DATA_BOOL | IrqSetFlag.DATA_EVENTFD
        )
        action = set_flags & (
            IrqSetFlag.ACTION_MASK | IrqSetFlag.ACTION_UNMASK | IrqSetFlag.ACTION_TRIGGER
        )
        if (
            set_flags & ~int(data_kind | action)
            or data_kind.bit_count() != 1
            or action.bit_count() != 1
        ):
            raise AccessError(errno.EINVAL, f"SET_IRQS flags {set_flags:#x}")
        if fds and data_kind != IrqSetFlag.DATA_EVENTFD:
            raise AccessError(errno.EINVAL, "SET_IRQS carries fds without DATA_EVENTFD")
        info = self.device.irq_info(index)
        if count == 0 and start == 0 and data_kind == IrqSetFlag.DATA_NONE:
            if action == IrqSetFlag.ACTION_TRIGGER:
                self._drop_triggers(index, 0, info.count)
        elif count == 0 or start + count > info.count:
            raise AccessError(
                errno.EINVAL, f"IRQ index {index} has {info.count} vectors, not {start}+{count}"
            )
        elif action != IrqSetFlag.ACTION_TRIGGER:
            # The device has no interrupt masking: mask/unmask of a maskable index is accepted
            # and changes nothing; eventfd notifications of masking cannot be given.
            if not info.flags & IrqInfoFlag.MASKABLE or data_kind == IrqSetFlag.DATA_EVENTFD:
                raise AccessError(errno.EINVAL, f"IRQ index {index} cannot do {action!r}")
        elif data_kind == IrqSetFlag.DATA_EVENTFD:
            if fds:
                if len(fds) != count:
                    raise AccessError(errno.EINVAL, f"{len(fds)} eventfds for {count} vectors")
                self._assign_triggers(index, start, fds)
            else:
                self._drop_triggers(index, start, count)
        elif data_kind == IrqSetFlag.DATA_BOOL:
            if len(payload) < IRQ_SET.size + count:
                raise AccessError(errno.EINVAL, f"SET_IRQS lacks {count} booleans")
            chosen = payload[IRQ_SET.size : IRQ_SET.size + count]
            for vector, value in enumerate(chosen, start):
                if value:
                    self.device.backend.fire_irqs(index, vector, 1)
        else:
            self.device.backend.fire_irqs(index, start, count)
        self._respond(msg_id, Command.DEVICE_SET_IRQS, flags)

    def _assign_triggers(self, index: int, start: int, fds: list[int]) -> None:
        # Anything but an eventfd could block the trigger's write (and the loop thread with it).
        for position, fd in enumerate(fds):
            if not is_eventfd(fd):
                raise AccessError(errno.EINVAL, f"SET_IRQS fd #{position} is not an eventfd")
        triggers = [EventfdTrigger(fd) for fd in fds]
        fds.clear()
        try:
            self.device.set_irq_triggers(index, start, triggers)
        except BaseException:
            for trigger in triggers:
                trigger.close()
            raise
        for vector, trigger in enumerate(triggers, start):
            old = self._triggers.pop((index, vector), None)
            if old is not None:
                old.close()
            self._triggers[(index, vector)] = trigger
        if logger.isEnabledFor(_DEBUG):
            logger.debug(
                "%s: irq %d vectors %d+%d on eventfds", self.label, index, start, len(triggers)
            )

    def _drop_triggers(self, index: int, start: int, count: int) -> None:
        if count:
            self.device.set_irq_triggers(index, start, [None] * count)
        for vector in range(start, start + count):
            old = self._triggers.pop((index, vector), None)
            if old is not None:
                old.close()

    def _reset(self, msg_id: int, flags: int, payload: memoryview, fds: list[int]) -> None:
        self.device.reset()
        self._respond(msg_id, Command.DEVICE_RESET, flags)

    # -- device features and migration data ---------------------------------------------

    def _feature(self, msg_id: int, flags: int, payload: memoryview, fds: list[int]) -> None:
        answer = self._features.device_feature(payload)
        self._respond(msg_id, Command.DEVICE_FEATURE, flags, answer)

    def _mig_data_read(self, msg_id: int, flags: int, payload: memoryview, fds: list[int]) -> None:
        answer = self._features.read_migration_data(payload)
        self._respond(msg_id, Command.MIG_DATA_READ, flags, answer)

    def _mig_data_write(self, msg_id: int, flags: int, payload: memoryview, fds: list[int]) -> None:
        self._features.write_migration_data(payload)
        self._respond(msg_id, Command.MIG_DATA_WRITE, flags)
