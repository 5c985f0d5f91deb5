"""``VfioUserClient``: a blocking vfio-user client, for tests and for scripting a served device."""

from __future__ import annotations

import array
import bisect
import errno
import json
import mmap
import os
import socket
import struct
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, final

from .._dma import anonymous_memory
from .._errors import AccessError
from ..uapi import (
    PAGE_SIZE,
    DeviceFeature,
    DeviceInfo,
    FeatureFlag,
    IrqInfo,
    IrqSetFlag,
    MigrationState,
    RegionInfo,
)
from ._codec import (
    DEFAULT_MAX_DATA_XFER_SIZE,
    DEFAULT_MAX_DMA_MAPS,
    DEVICE_INFO,
    DMA_LOGGING_CONTROL,
    DMA_LOGGING_RANGE,
    DMA_LOGGING_REPORT,
    DMA_MAP,
    DMA_UNMAP,
    DMA_UNMAP_FLAG_ALL,
    FEATURE,
    FEATURE_MIG_DATA_SIZE,
    FEATURE_MIG_STATE,
    FEATURE_MIGRATION,
    HEADER,
    HEADER_SIZE,
    IRQ_INFO,
    IRQ_SET,
    MAX_MSG_FDS,
    MIG_DATA,
    REGION_INFO,
    REGION_RW,
    TYPE_MASK,
    VERSION,
    WRITE_MULTI_COUNT,
    WRITE_MULTI_ENTRY,
    WRITE_MULTI_MAX_DATA,
    Command,
    DmaFlag,
    DmaLayout,
    HeaderFlag,
    ProtocolError,
    VfioUserCapabilities,
    decode_capabilities,
    decode_dma_request,
    decode_region_info,
    encode_dma_read_reply,
    encode_dma_write_reply,
    pack_error,
    pack_message,
)
from ._transport import FD_SIZE, Framer, close_fds, received_fds

__all__ = ["Message", "VfioUserClient"]

_QEMU_MAX_BITMAP_SIZE = 256 << 20
_RECV_SIZE = 1 << 16
_TIMEVAL = struct.Struct("@ll")
_COMMAND, _REPLY, _ERROR = int(HeaderFlag.COMMAND), int(HeaderFlag.REPLY), int(HeaderFlag.ERROR)
_READ, _WRITE = int(Command.REGION_READ), int(Command.REGION_WRITE)
_RW_REQUEST = struct.Struct("<HHIIIQII")
"""A region read or write request's header and REGION_RW in one."""
_RW_REQUEST_SIZE = _RW_REQUEST.size
_INFO = int(Command.DEVICE_GET_REGION_INFO)
_INFO_REQUEST = struct.Struct("<HHIIIIII20x")
"""A region info request: its header and its payload's argsz, flags and index (the rest 0)."""
_KIND_AND_ERROR = TYPE_MASK | int(HeaderFlag.ERROR)
_unpack_header = HEADER.unpack_from
_unpack_rw, _RW_SIZE = REGION_RW.unpack_from, REGION_RW.size


def _send_failure(exc: OSError) -> Exception:
    """What a failed send tells the caller."""
    if isinstance(exc, BlockingIOError):
        return TimeoutError("the server takes nothing more in time")
    if isinstance(exc, BrokenPipeError | ConnectionResetError):
        return ProtocolError(f"the server closed the connection ({exc.strerror})")
    return exc


def _receive_failure(exc: OSError) -> Exception:
    """What a failed receive tells the caller."""
    if isinstance(exc, BlockingIOError):
        return TimeoutError("no message from the server in time")
    if isinstance(exc, ConnectionResetError):
        return ProtocolError(f"the server closed the connection ({exc.strerror})")
    return exc


def _refused(command: int, code: int) -> AccessError:
    code = code or errno.EIO
    return AccessError(code, f"{Command.name_of(command)} refused: {os.strerror(code)}")


class Message(NamedTuple):
    """A received message: header fields, payload and the fds that came with it."""

    msg_id: int
    command: int
    flags: int
    error: int
    payload: bytes
    fds: list[int]

    @property
    def is_error(self) -> bool:
        """Whether this is an error reply."""
        return bool(self.flags & HeaderFlag.ERROR)


class _LocalMemory(NamedTuple):
    iova: int
    view: memoryview
    readable: bool
    writable: bool


@final
class VfioUserClient:
    """A vfio-user client over a blocking UNIX socket.

    Every method sends one command and waits for its reply; an error reply raises
    ``AccessError`` with the server's errno. While it waits, the client serves the server's
    DMA_READ/DMA_WRITE requests for memory mapped with ``dma_map_messages`` (``poll`` serves them
    when idle), in ``dma_layout`` (the server must be configured with the same). It announces
    the capabilities QEMU's client does. Replies to region reads and writes are read with a
    plain ``recv`` (cheaper than ``recvmsg``): an fd a server sends along with one (none is
    due) is closed by the kernel rather than reported.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        timeout: float | None = 5.0,
        dma_layout: DmaLayout = DmaLayout.SPEC,
        max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE,
    ) -> None:
        self.sock = sock
        self.dma_layout = dma_layout
        self.max_data_xfer_size = max_data_xfer_size
        self.server_capabilities = VfioUserCapabilities()
        self.dma_requests_served = 0
        self._timeout = timeout
        self._next_id = 0
        self._anc_space = socket.CMSG_SPACE(MAX_MSG_FDS * FD_SIZE)
        limit = HEADER_SIZE + 64 + max(max_data_xfer_size, DEFAULT_MAX_DATA_XFER_SIZE)
        self._framer = Framer(limit, MAX_MSG_FDS)
        self._buffer = bytearray(_RECV_SIZE)
        self._buffers, self._view = [self._buffer], memoryview(self._buffer)
        self._decoded: dict[int, tuple[bytes, RegionInfo, int]] = {}
        self._region_fds: dict[int, int] = {}
        self._local: list[_LocalMemory] = []
        self._local_starts: list[int] = []
        self._dma_logging = False
        self.name = "vfio-user device"  # connect() names it after the socket path
        # A blocking socket with kernel timeouts: one recvmsg per reply, no poll before it.
        sock.settimeout(None)
        self._set_timeouts(timeout)

    @classmethod
    def connect(
        cls,
        path: str | os.PathLike[str],
        *,
        negotiate: bool = True,
        timeout: float | None = 5.0,
        dma_layout: DmaLayout = DmaLayout.SPEC,
        max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE,
    ) -> VfioUserClient:
        """Connect to the server socket at ``path`` and (by default) negotiate."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(os.fspath(path))
        except BaseException:
            sock.close()
            raise
        client = cls(
            sock, timeout=timeout, dma_layout=dma_layout, max_data_xfer_size=max_data_xfer_size
        )
        client.name = os.fspath(path)
        if negotiate:
            try:
                client.negotiate()
            except BaseException:
                client.close()
                raise
        return client

    def close(self) -> None:
        """Close the connection and every fd the server gave."""
        close_fds(list(self._region_fds.values()))
        self._region_fds.clear()
        self._framer.close()
        self.sock.close()

    def __enter__(self) -> VfioUserClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- messages ----------------------------------------------------------------------

    def next_id(self) -> int:
        """A fresh message id (16 bits, wrapping)."""
        self._next_id = (self._next_id + 1) & 0xFFFF
        return self._next_id

    def send_raw(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Send bytes as they are, with ``fds`` on their first byte (for malformed input);
        ``ProtocolError`` once the server has closed the connection."""
        try:
            if fds:
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                sent = self.sock.sendmsg([data], ancillary)
                if sent < len(data):
                    self.sock.sendall(memoryview(data)[sent:])
            else:
                self.sock.sendall(data)
        except OSError as exc:
            raise _send_failure(exc) from None

    def _set_timeouts(self, timeout: float | None) -> None:
        seconds = 0.0 if timeout is None else max(timeout, 1e-6)
        whole = int(seconds)
        value = _TIMEVAL.pack(whole, int((seconds - whole) * 1_000_000))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)

    def _fill(self) -> None:
        """One read into the framer (blocking up to the timeout: ``TimeoutError``)."""
        size, ancdata = self._read()
        self._framer.feed(self._view[:size].tobytes(), received_fds(ancdata) if ancdata else [])

    def _read(self) -> tuple[int, list[tuple[int, int, bytes]]]:
        """One read into the receive buffer: its size and ancillary data."""
        try:
            size, ancdata, _, _ = self.sock.recvmsg_into(self._buffers, self._anc_space)
        except OSError as exc:
            raise _receive_failure(exc) from None
        if not size:
            raise ProtocolError("the server closed the connection")
        return size, ancdata

    def receive(self) -> Message:
        """The next message, whatever it is (raises ``ProtocolError`` at EOF)."""
        framer = self._framer
        frame = framer.next()
        while frame is None:
            self._fill()
            frame = framer.next()
        msg_id, command, flags, error, payload, fds = frame
        return Message(msg_id, command, flags, error, payload.tobytes(), fds)

    def request(
        self,
        command: int,
        payload: bytes | bytearray | memoryview = b"",
        fds: Sequence[int] = (),
        *,
        no_reply: bool = False,
    ) -> Message | None:
        """Send a command and return its reply (``None`` with ``no_reply``); an error reply
        raises ``AccessError``. The caller owns the fds of the reply."""
        msg_id = self.next_id()
        flags = HeaderFlag.COMMAND | (HeaderFlag.NO_REPLY if no_reply else 0)
        self.send_raw(pack_message(msg_id, command, payload, flags), fds)
        if no_reply:
            return None
        reply = self.wait_reply(msg_id)
        if reply.command != command:
            close_fds(reply.fds)
            raise ProtocolError(f"reply to command {command} names command {reply.command}")
        if reply.is_error:
            close_fds(reply.fds)
            raise _refused(command, reply.error)
        return reply

    def _exchange(self, request: bytes, msg_id: int, command: int) -> tuple[memoryview, list[int]]:
        """Send a whole command without fds and return its reply's payload and fds (now the
        caller's), serving the server's commands meanwhile: nothing on the way beyond the
        codec. The payload may be a view of the receive buffer, valid up to the next call."""
        self.send_raw(request)
        if self._framer.idle:
            size, ancdata = self._read()
            if not ancdata and self._is_reply(size, msg_id, command):
                return self._view[HEADER_SIZE:size], []
            self._framer.feed(self._view[:size].tobytes(), received_fds(ancdata) if ancdata else [])
        return self._await_reply(msg_id, command)

    def _transact(self, request: bytes, msg_id: int, command: int) -> memoryview:
        """``_exchange`` of a command whose reply brings no fds; the payload may be a view of
        the receive buffer, valid up to the next call."""
        sock = self.sock
        try:
            sent = sock.send(request)
        except OSError as exc:
            raise _send_failure(exc) from None
        if sent < len(request):
            self.send_raw(memoryview(request)[sent:])
        if self._framer.idle:
            # A plain recv (cheaper than recvmsg): an fd a server sent anyway is closed by
            # the kernel.
            try:
                size = sock.recv_into(self._buffer)
            except OSError as exc:
                raise _receive_failure(exc) from None
            if not size:
                raise ProtocolError("the server closed the connection")
            if self._is_reply(size, msg_id, command):
                return self._view[HEADER_SIZE:size]
            self._framer.feed(self._view[:size].tobytes(), [])
        payload, fds = self._await_reply(msg_id, command)
        if fds:
            close_fds(fds)
            raise ProtocolError(f"reply to command {command} brought fds")
        return payload

    def _is_reply(self, size: int, msg_id: int, command: int) -> bool:
        """Whether the ``size`` bytes in the receive buffer are exactly the successful reply
        to ``msg_id`` (the usual read); otherwise they are the framer's."""
        if size < HEADER_SIZE:
            return False
        reply_id, reply_command, length, flags, _ = _unpack_header(self._buffer)
        if length != size or reply_id != msg_id or reply_command != command:
            return False
        return flags & _KIND_AND_ERROR == _REPLY  # type: ignore[no-any-return]

    def _await_reply(self, msg_id: int, command: int) -> tuple[memoryview, list[int]]:
        """The reply to ``msg_id`` through the framer, serving the server's commands
        meanwhile."""
        framer = self._framer
        while True:
            frame = framer.next()
            if frame is None:
                self._fill()
                continue
            reply_id, reply_command, flags, error, payload, fds = frame
            if flags & TYPE_MASK == _COMMAND:
                self._serve(Message(reply_id, reply_command, flags, error, payload.tobytes(), fds))
                continue
            if flags & TYPE_MASK != _REPLY or reply_id != msg_id or reply_command != command:
                close_fds(fds)
                raise ProtocolError(
                    f"unexpected message {reply_id, reply_command, flags} while waiting for "
                    f"the reply to {msg_id}"
                )
            if flags & _ERROR:
                close_fds(fds)
                raise _refused(command, error)
            return payload, fds

    def wait_reply(self, msg_id: int) -> Message:
        """Read until the reply to ``msg_id``, serving server commands on the way."""
        while True:
            message = self.receive()
            kind = message.flags & TYPE_MASK
            if kind == HeaderFlag.COMMAND:
                self._serve(message)
                continue
            if kind != HeaderFlag.REPLY or message.msg_id != msg_id:
                close_fds(message.fds)
                raise ProtocolError(f"unexpected message {message[:4]} while waiting for {msg_id}")
            return message

    def poll(self, timeout: float) -> int:
        """Serve the server's requests that arrive within ``timeout`` seconds; returns how many
        were served."""
        served = 0
        self._set_timeouts(timeout)
        try:
            while True:
                try:
                    message = self.receive()
                except TimeoutError:
                    return served
                if message.flags & TYPE_MASK != HeaderFlag.COMMAND:
                    close_fds(message.fds)
                    raise ProtocolError(f"unexpected reply {message[:4]}")
                self._serve(message)
                served += 1
        finally:
            self._set_timeouts(self._timeout)

    def _serve(self, message: Message) -> None:
        """Answer a server command: DMA_READ/DMA_WRITE from local memory, anything else ENOSYS
        (as QEMU does)."""
        msg_id, command = message.msg_id, message.command
        reply_wanted = not message.flags & HeaderFlag.NO_REPLY
        if message.fds:
            close_fds(message.fds)
            self.send_raw(pack_error(msg_id, command, errno.EINVAL))
            return
        if command not in (Command.DMA_READ, Command.DMA_WRITE):
            self.send_raw(pack_error(msg_id, command, errno.ENOSYS))
            return
        try:
            address, count, data = decode_dma_request(self.dma_layout, command, message.payload)
            if command == Command.DMA_READ:
                answer = encode_dma_read_reply(
                    self.dma_layout, msg_id, address, self._local_access(address, count, None)
                )
            else:
                self._local_access(address, count, bytes(data))
                answer = encode_dma_write_reply(self.dma_layout, msg_id, address, count)
        except (AccessError, ProtocolError) as exc:
            code = exc.errno if isinstance(exc, AccessError) and exc.errno else errno.EINVAL
            self.send_raw(pack_error(msg_id, command, code))
            return
        self.dma_requests_served += 1
        if reply_wanted:
            self.send_raw(answer)

    def _local_access(self, address: int, count: int, data: bytes | None) -> bytes:
        at = bisect.bisect_right(self._local_starts, address) - 1
        if at < 0:
            raise AccessError(errno.EFAULT, f"{address:#x} is not mapped")
        memory = self._local[at]
        offset = address - memory.iova
        if offset + count > len(memory.view):
            raise AccessError(errno.EFAULT, f"{address:#x}+{count:#x} is not mapped")
        if data is None:
            if not memory.readable:
                raise AccessError(errno.EPERM, f"{address:#x} is not readable")
            return bytes(memory.view[offset : offset + count])
        if not memory.writable:
            raise AccessError(errno.EPERM, f"{address:#x} is not writable")
        memory.view[offset : offset + count] = data
        return b""

    # -- negotiation and device information --------------------------------------------

    def default_capabilities(self) -> dict[str, Any]:
        """What this client announces: what QEMU's vfio-user-pci does."""
        migration = {"pgsize": PAGE_SIZE, "max_bitmap_size": _QEMU_MAX_BITMAP_SIZE}
        return {
            "max_msg_fds": MAX_MSG_FDS,
            "max_data_xfer_size": self.max_data_xfer_size,
            "pgsizes": PAGE_SIZE,
            "max_dma_maps": DEFAULT_MAX_DMA_MAPS,
            "write_multiple": True,
            "migration": migration,
        }

    def negotiate(
        self, capabilities: Mapping[str, Any] | None = None, *, major: int = 0, minor: int = 0
    ) -> VfioUserCapabilities:
        """VERSION: announce ``capabilities`` (default: ``default_capabilities()``) and keep
        the server's answer in ``server_capabilities``."""
        caps = self.default_capabilities() if capabilities is None else dict(capabilities)
        text = json.dumps({"capabilities": caps}).encode() + b"\0"
        reply = self.request(Command.VERSION, VERSION.pack(major, minor) + text)
        assert reply is not None
        if len(reply.payload) < VERSION.size:
            raise ProtocolError("short VERSION reply")
        self.server_capabilities = decode_capabilities(reply.payload[VERSION.size :])
        return self.server_capabilities

    def device_info(self) -> DeviceInfo:
        """DEVICE_GET_INFO."""
        reply = self._call(Command.DEVICE_GET_INFO, DEVICE_INFO.pack(DEVICE_INFO.size, 0, 0, 0))
        if len(reply) != DEVICE_INFO.size:
            raise ProtocolError(f"GET_INFO reply of {len(reply)} bytes")
        _, flags, regions, irqs = DEVICE_INFO.unpack(reply)
        return DeviceInfo(flags=flags, num_regions=regions, num_irqs=irqs)

    def region_info_raw(self, index: int, argsz: int) -> tuple[bytes, int | None]:
        """One GET_REGION_INFO with ``argsz``: the reply payload and the fd it brought (now the
        caller's)."""
        msg_id = self._next_id = (self._next_id + 1) & 0xFFFF
        request = _INFO_REQUEST.pack(msg_id, _INFO, _INFO_REQUEST.size, 0, 0, argsz, 0, index)
        payload, fds = self._exchange(request, msg_id, _INFO)
        if len(fds) > 1:
            close_fds(fds)
            raise ProtocolError(f"region info brought {len(fds)} fds")
        return payload.tobytes(), fds[0] if fds else None

    def region_info(self, index: int) -> RegionInfo:
        """GET_REGION_INFO (asking again with a bigger argsz when the caps do not fit, as QEMU
        does). ``offset`` is where the region's fd maps; the fd is kept for ``map_area``."""
        argsz = REGION_INFO.size
        while True:
            payload, fd = self.region_info_raw(index, argsz)
            # The same reply decodes to the same (immutable) info: decode each reply once.
            known = self._decoded.get(index)
            if known is not None and known[0] == payload:
                info, wanted = known[1], known[2]
            else:
                info, wanted = decode_region_info(payload)
                self._decoded[index] = (payload, info, wanted)
            if wanted <= argsz:
                break
            if fd is not None:
                os.close(fd)
            argsz = wanted
        old = self._region_fds.pop(index, None)
        if old is not None:
            os.close(old)
        if fd is not None:
            self._region_fds[index] = fd
        return info

    def region_fd(self, index: int) -> int | None:
        """The fd the server gave with region ``index``'s info (owned by the client)."""
        return self._region_fds.get(index)

    def map_area(self, index: int, area_offset: int, size: int) -> mmap.mmap:
        """Map ``size`` bytes of region ``index`` at ``area_offset`` (inside an mmap-able area)
        through the fd the region info brought."""
        info = self.region_info(index)
        fd = self._region_fds.get(index)
        if fd is None:
            raise AccessError(errno.EINVAL, f"region {index} came without an fd")
        if not any(
            a.offset <= area_offset and area_offset + size <= a.end for a in info.mmap_areas()
        ):
            raise AccessError(errno.EINVAL, f"region {index} {area_offset:#x}+{size:#x} is trapped")
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, offset=info.file_offset + area_offset)

    def irq_info(self, index: int) -> IrqInfo:
        """DEVICE_GET_IRQ_INFO."""
        reply = self._call(Command.DEVICE_GET_IRQ_INFO, IRQ_INFO.pack(IRQ_INFO.size, 0, index, 0))
        if len(reply) != IRQ_INFO.size:
            raise ProtocolError(f"GET_IRQ_INFO reply of {len(reply)} bytes")
        _, flags, number, count = IRQ_INFO.unpack(reply)
        return IrqInfo(index=number, flags=flags, count=count)

    def _call(
        self, command: int, payload: bytes | bytearray | memoryview = b"", fds: Sequence[int] = ()
    ) -> bytes:
        reply = self.request(command, payload, fds)
        assert reply is not None
        if reply.fds:
            close_fds(reply.fds)
            raise ProtocolError(f"reply to command {command} brought fds")
        return reply.payload

    # -- region access -----------------------------------------------------------------

    def read(self, index: int, offset: int, count: int) -> bytes:
        """REGION_READ: ``count`` bytes of region ``index`` at ``offset``."""
        msg_id = self._next_id = (self._next_id + 1) & 0xFFFF
        request = _RW_REQUEST.pack(msg_id, _READ, _RW_REQUEST_SIZE, 0, 0, offset, index, count)
        reply = self._transact(request, msg_id, _READ)
        if len(reply) < _RW_SIZE:
            raise ProtocolError(f"REGION_READ reply of {len(reply)} bytes")
        _, _, got = _unpack_rw(reply)
        if got > count or len(reply) != _RW_SIZE + got:
            raise ProtocolError(f"REGION_READ of {count} bytes answered with {got}")
        return reply[_RW_SIZE:].tobytes()

    def write(self, index: int, offset: int, data: bytes, *, posted: bool = False) -> int:
        """REGION_WRITE; ``posted`` sends it without waiting (no reply, errors unseen)."""
        if posted:
            payload = REGION_RW.pack(offset, index, len(data)) + data
            self.request(Command.REGION_WRITE, payload, no_reply=True)
            return len(data)
        msg_id = self._next_id = (self._next_id + 1) & 0xFFFF
        size = _RW_REQUEST_SIZE + len(data)
        request = _RW_REQUEST.pack(msg_id, _WRITE, size, 0, 0, offset, index, len(data)) + data
        reply = self._transact(request, msg_id, _WRITE)
        if len(reply) < _RW_SIZE:
            raise ProtocolError(f"REGION_WRITE reply of {len(reply)} bytes")
        return int(_unpack_rw(reply)[2])

    def write_multiple(
        self, writes: Sequence[tuple[int, int, bytes]], *, posted: bool = True
    ) -> int:
        """REGION_WRITE_MULTI of ``(index, offset, data <= 8 bytes)`` writes."""
        entries = b"".join(
            WRITE_MULTI_ENTRY.pack(
                offset, index, len(data), data.ljust(WRITE_MULTI_MAX_DATA, b"\0")
            )
            for index, offset, data in writes
        )
        payload = WRITE_MULTI_COUNT.pack(len(writes)) + entries
        if posted:
            self.request(Command.REGION_WRITE_MULTI, payload, no_reply=True)
            return len(writes)
        return int(
            WRITE_MULTI_COUNT.unpack_from(self._call(Command.REGION_WRITE_MULTI, payload))[0]
        )

    # -- DMA -------------------------------------------------------------------------------

    def dma_map(
        self,
        iova: int,
        size: int,
        fd: int | None = None,
        offset: int = 0,
        *,
        readable: bool = True,
        writable: bool = True,
    ) -> None:
        """DMA_MAP of ``size`` bytes of ``fd`` from ``offset`` (the fd stays the caller's), or
        without an fd (then only ``dma_map_messages`` memory answers the server)."""
        flags = (DmaFlag.READ if readable else 0) | (DmaFlag.WRITE if writable else 0)
        payload = DMA_MAP.pack(DMA_MAP.size, flags, offset, iova, size)
        self._call(Command.DMA_MAP, payload, () if fd is None else (fd,))

    def dma_map_memfd(self, iova: int, size: int) -> mmap.mmap:
        """Map a new shared memfd of ``size`` bytes at ``iova``; returns the client's mapping."""
        fd, mapped = anonymous_memory(size, "vfio-user-client-dma")
        try:
            self.dma_map(iova, size, fd)
        except BaseException:
            mapped.close()
            raise
        finally:
            os.close(fd)
        return mapped

    def dma_map_messages(
        self,
        iova: int,
        memory: bytearray | memoryview | mmap.mmap,
        *,
        readable: bool = True,
        writable: bool = True,
    ) -> None:
        """Map ``memory`` at ``iova`` without an fd: the server reaches it by DMA_READ and
        DMA_WRITE messages, which this client answers from ``memory``."""
        view = memoryview(memory).cast("B")
        self.dma_map(iova, len(view), readable=readable, writable=writable)
        at = bisect.bisect_left(self._local_starts, iova)
        self._local_starts.insert(at, iova)
        self._local.insert(at, _LocalMemory(iova, view, readable, writable))

    def dma_unmap(self, iova: int, size: int) -> None:
        """DMA_UNMAP of a mapping, exactly."""
        self._call(Command.DMA_UNMAP, DMA_UNMAP.pack(DMA_UNMAP.size, 0, iova, size))
        at = bisect.bisect_left(self._local_starts, iova)
        if at < len(self._local) and self._local_starts[at] == iova:
            del self._local_starts[at]
            self._local.pop(at).view.release()

    def dma_unmap_all(self) -> None:
        """DMA_UNMAP with VFIO_DMA_UNMAP_FLAG_ALL."""
        self._call(Command.DMA_UNMAP, DMA_UNMAP.pack(DMA_UNMAP.size, DMA_UNMAP_FLAG_ALL, 0, 0))
        for memory in self._local:
            memory.view.release()
        self._local.clear()
        self._local_starts.clear()

    # -- interrupts and reset --------------------------------------------------------------

    def set_irqs(
        self,
        flags: int,
        index: int,
        start: int,
        count: int,
        data: bytes = b"",
        fds: Sequence[int] = (),
    ) -> None:
        """DEVICE_SET_IRQS as it is (flags are ``IrqSetFlag`` bits)."""
        payload = IRQ_SET.pack(IRQ_SET.size + len(data), flags, index, start, count) + data
        self._call(Command.DEVICE_SET_IRQS, payload, fds)

    def set_irq_eventfds(self, index: int, start: int, eventfds: Sequence[int]) -> None:
        """Trigger vectors ``start`` onward by writing to ``eventfds`` (they stay the caller's)."""
        flags = IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER
        self.set_irqs(flags, index, start, len(eventfds), fds=eventfds)

    def clear_irq_eventfds(self, index: int, start: int, count: int) -> None:
        """De-assign the eventfds of ``count`` vectors (DATA_EVENTFD without fds)."""
        self.set_irqs(IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER, index, start, count)

    def disable_irqs(self, index: int) -> None:
        """Disable every vector of ``index`` (DATA_NONE|TRIGGER, count 0)."""
        self.set_irqs(IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER, index, 0, 0)

    def trigger_irqs(self, index: int, start: int, count: int) -> None:
        """Have the device raise ``count`` vectors (DATA_NONE|TRIGGER)."""
        self.set_irqs(IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER, index, start, count)

    def reset(self) -> None:
        """DEVICE_RESET."""
        self._call(Command.DEVICE_RESET)

    # -- device features ---------------------------------------------------------------

    def feature(self, flags: int, data: bytes = b"", argsz: int | None = None) -> bytes:
        """DEVICE_FEATURE with ``flags`` (feature | GET/SET/PROBE); returns the reply's data
        (after argsz and flags). ``argsz`` defaults to the request's size plus 1 MiB for GET."""
        if argsz is None:
            argsz = FEATURE.size + len(data)
            if flags & FeatureFlag.GET:
                argsz += DEFAULT_MAX_DATA_XFER_SIZE
        reply = self._call(Command.DEVICE_FEATURE, FEATURE.pack(argsz, flags) + data)
        if len(reply) < FEATURE.size:
            raise ProtocolError(f"DEVICE_FEATURE reply of {len(reply)} bytes")
        return reply[FEATURE.size :]

    def probe_feature(self, feature: int, operations: int = 0) -> bool:
        """Whether the device supports ``feature`` (with GET/SET ``operations``)."""
        try:
            self.feature(feature | FeatureFlag.PROBE | operations)
        except AccessError as exc:
            if exc.errno in (errno.ENOTTY, errno.EINVAL):
                return False
            raise
        return True

    # Migration and dirty logging have the shape of ``MediatedDevice``'s (the
    # ``vfio_mediate.MigratableDevice`` protocol), so one driver moves either kind of device.

    @property
    def migration_flags(self) -> int:
        """VFIO_DEVICE_FEATURE_MIGRATION: the device's migration flags, 0 for a device without
        the feature (``ENOTTY``, as QEMU reads it); asked each time."""
        try:
            data = self.feature(DeviceFeature.MIGRATION | FeatureFlag.GET)
        except AccessError as exc:
            if exc.errno == errno.ENOTTY:
                return 0
            raise
        return int(FEATURE_MIGRATION.unpack_from(data)[0])

    @property
    def migration_state(self) -> MigrationState:
        """The device's migration state (asked each time)."""
        data = self.feature(DeviceFeature.MIG_DEVICE_STATE | FeatureFlag.GET)
        return MigrationState(FEATURE_MIG_STATE.unpack_from(data)[0])

    def set_migration_state(self, target: int) -> MigrationState:
        """Move the device to ``target`` (through the arcs the server chooses); returns it."""
        self.feature(
            DeviceFeature.MIG_DEVICE_STATE | FeatureFlag.SET,
            FEATURE_MIG_STATE.pack(target, 0xFFFF_FFFF),
        )
        return MigrationState(target)

    @property
    def migration_pending(self) -> int:
        """VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: saved bytes still to read (asked each time)."""
        data = self.feature(DeviceFeature.MIG_DATA_SIZE | FeatureFlag.GET)
        return int(FEATURE_MIG_DATA_SIZE.unpack_from(data)[0])

    def read_migration_data(self, size: int) -> bytes:
        """MIG_DATA_READ of up to ``size`` bytes (fewer: the end of the saved data)."""
        reply = self._call(Command.MIG_DATA_READ, MIG_DATA.pack(MIG_DATA.size + size, size))
        if len(reply) < MIG_DATA.size:
            raise ProtocolError(f"MIG_DATA_READ reply of {len(reply)} bytes")
        _, got = MIG_DATA.unpack_from(reply)
        if got > size or len(reply) != MIG_DATA.size + got:
            raise ProtocolError(f"MIG_DATA_READ of {size} bytes answered with {got}")
        return reply[MIG_DATA.size :]

    def read_all_migration_data(self, chunk: int = 64 << 10) -> bytes:
        """Every saved byte, read in ``chunk``s until a short read."""
        parts = []
        while True:
            part = self.read_migration_data(chunk)
            parts.append(part)
            if len(part) < chunk:
                return b"".join(parts)

    def write_migration_data(self, data: bytes, chunk: int = 64 << 10) -> int:
        """MIG_DATA_WRITE of ``data`` in ``chunk``s; returns the bytes written (all)."""
        for start in range(0, len(data), chunk):
            piece = data[start : start + chunk]
            self._call(Command.MIG_DATA_WRITE, MIG_DATA.pack(MIG_DATA.size, len(piece)) + piece)
        return len(data)

    def dma_logging_start(self, page_size: int, ranges: Sequence[tuple[int, int]]) -> int:
        """Start dirty logging of ``ranges`` (all mapped memory when empty); returns the page
        size the device chose."""
        data = DMA_LOGGING_CONTROL.pack(page_size, len(ranges), 0) + b"".join(
            DMA_LOGGING_RANGE.pack(iova, length) for iova, length in ranges
        )
        reply = self.feature(DeviceFeature.DMA_LOGGING_START | FeatureFlag.SET, data)
        self._dma_logging = True
        return int(DMA_LOGGING_CONTROL.unpack_from(reply)[0])

    def dma_logging_report(self, iova: int, length: int, page_size: int) -> bytes:
        """Read and clear the dirty bitmap of ``[iova, iova + length)``."""
        reply = self.feature(
            DeviceFeature.DMA_LOGGING_REPORT | FeatureFlag.GET,
            DMA_LOGGING_REPORT.pack(iova, length, page_size),
        )
        return reply[DMA_LOGGING_REPORT.size :]

    def dma_logging_stop(self) -> None:
        """Stop dirty logging."""
        self.feature(DeviceFeature.DMA_LOGGING_STOP | FeatureFlag.SET)
        self._dma_logging = False

    @property
    def dma_logging(self) -> bool:
        """Whether dirty logging runs, as this client started and stopped it."""
        return self._dma_logging
