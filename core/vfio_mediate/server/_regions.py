"""Device info, region info and region access: DEVICE_GET_INFO, DEVICE_GET_REGION_INFO,
REGION_READ, REGION_WRITE, REGION_WRITE_MULTI and DEVICE_RESET.

Region access is the hot path: bounds checks and one device call, no formatting. A region's
info reply (with the fd of its mmap-able areas) is built once and kept until ``invalidate``,
which the engine calls after every command that can change what the mediator answers.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from typing import final

from .._errors import AccessError, ContractViolation
from ..uapi import RegionInfo, SparseMmapArea
from ._codec import (
    DEVICE_INFO,
    HEADER,
    HEADER_SIZE,
    REGION_INFO,
    REGION_RW,
    REPLY_RW,
    WRITE_MULTI_COUNT,
    WRITE_MULTI_ENTRY,
    WRITE_MULTI_MAX_DATA,
    Command,
    encode_region_info,
)
from ._command import NO_REPLY, REPLY, CommandGroup, Handler, Send
from ._config import ServerConfig
from ._log import logger
from ._served import ServedDevice

__all__ = ["MessageHandler", "Regions"]

_READ, _WRITE = int(Command.REGION_READ), int(Command.REGION_WRITE)
_RW_REPLY_SIZE = HEADER_SIZE + REGION_RW.size
_MSG_ID = struct.Struct("<H")
_RW_SIZE = REGION_RW.size
_unpack_rw, _pack_reply = REGION_RW.unpack_from, REPLY_RW.pack
MessageHandler = Callable[[int, int, memoryview, int, int], bytes | bytearray | None]
"""``handler(msg_id, flags, message, start, end)``: one command whose payload is ``message``
from ``start`` to ``end``; returns the reply for the caller to send (``None``: nothing to
send). ``message`` may be a view of the engine's receive buffer: it is not kept."""


@final
class _Reply:
    """One region's encoded info: the whole reply and its fd, and the struct alone (for a
    client whose argsz is too small for the capabilities; it brings no fd)."""

    __slots__ = ("areas", "fd", "full", "short")

    def __init__(
        self, full: bytearray, short: bytearray, fd: int, areas: set[tuple[int, int]]
    ) -> None:
        self.full, self.short, self.fd, self.areas = full, short, fd, areas


@final
class Regions(CommandGroup):
    """Answers a session's device info, region info and region access commands.

    ``mapped_areas`` records, per region index, every ``(offset, size)`` area whose fd was
    handed to the client (the endpoint's dict, shared by its sessions).
    """

    def __init__(
        self,
        device: ServedDevice,
        config: ServerConfig,
        label: str,
        send: Send,
        mapped_areas: dict[int, set[tuple[int, int]]],
    ) -> None:
        super().__init__(device, config, label, send)
        self.mapped_areas = mapped_areas
        self._replies: dict[int, _Reply] = {}
        self._max_count = config.max_data_xfer_size
        self._read, self._write = device.read, device.write

    def handlers(self) -> dict[int, Handler]:
        return {
            Command.DEVICE_GET_INFO: self._device_info,
            Command.DEVICE_GET_REGION_INFO: self._replying(self.region_info_at),
            Command.REGION_READ: self._replying(self.read_at),
            Command.REGION_WRITE: self._replying(self.write_at),
            Command.REGION_WRITE_MULTI: self._write_multi,
            Command.DEVICE_RESET: self._reset,
        }

    def message_handlers(self) -> dict[int, MessageHandler]:
        """The commands the engine hands over as read, as ``(msg_id, flags, message, start,
        end)`` with the payload at ``start:end`` of ``message``, and whose replies it sends
        itself: region access and region info."""
        return {
            Command.REGION_READ: self.read_at,
            Command.REGION_WRITE: self.write_at,
            Command.DEVICE_GET_REGION_INFO: self.region_info_at,
        }

    def _replying(self, handler: MessageHandler) -> Handler:
        """``handler`` as a command handler of a framed payload, which sends its reply."""
        send = self._send

        def run(msg_id: int, flags: int, payload: memoryview, fds: list[int]) -> None:
            reply = handler(msg_id, flags, payload, 0, len(payload))
            if reply is not None:
                send(reply)

        return run

    def invalidate(self) -> None:
        """Forget the region info replies: the next ones are asked of the device again."""
        if self._replies:
            self._replies.clear()

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

    def region_info_at(
        self, msg_id: int, flags: int, message: memoryview, start: int, end: int
    ) -> bytearray | None:
        """DEVICE_GET_REGION_INFO whose payload is ``message[start:end]`` (see ``read_at``);
        a reply with an fd is sent here."""
        if end - start < REGION_INFO.size:
            raise AccessError(errno.EINVAL, f"GET_REGION_INFO payload of {end - start} bytes")
        argsz, _, index, _, _, _ = REGION_INFO.unpack_from(message, start)
        if argsz < REGION_INFO.size:
            raise AccessError(errno.EINVAL, f"GET_REGION_INFO argsz {argsz} < 32")
        reply = self._replies.get(index)
        if reply is None:
            reply = self._replies[index] = self._build_reply(index)
        if flags & NO_REPLY:
            return None
        full = reply.full
        if len(full) - HEADER_SIZE > argsz:
            _MSG_ID.pack_into(reply.short, 0, msg_id)
            return reply.short
        _MSG_ID.pack_into(full, 0, msg_id)
        if reply.fd < 0:
            return full
        self._send(full, (reply.fd,))
        if reply.areas:
            self.mapped_areas.setdefault(index, set()).update(reply.areas)
            reply.areas = set()  # recorded once: the endpoint's record only grows
        return None

    def _build_reply(self, index: int) -> _Reply:
        info = self.device.region_info(index)
        areas, file_offset, fd = self._map_areas(info)
        full, _ = encode_region_info(info, areas, file_offset, 1 << 32)
        short, _ = encode_region_info(info, areas, file_offset, REGION_INFO.size)
        command = Command.DEVICE_GET_REGION_INFO
        head = HEADER.pack
        return _Reply(
            bytearray(head(0, command, HEADER_SIZE + len(full), REPLY, 0) + full),
            bytearray(head(0, command, HEADER_SIZE + len(short), REPLY, 0) + short),
            fd if areas else -1,
            {(area.offset, area.size) for area in areas},
        )

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

    # -- region access (the hot path: no validation beyond bounds, no formatting) -------

    def read_at(
        self, msg_id: int, flags: int, message: memoryview, start: int, end: int
    ) -> bytes | None:
        """REGION_READ whose payload is ``message[start:end]`` (for a whole message read
        alone, the engine's receive buffer with the header in front; for a framed one, its
        payload): the reply, or ``None`` for a command that wants none."""
        if end - start < _RW_SIZE:
            raise AccessError(errno.EINVAL, f"REGION_READ payload of {end - start} bytes")
        offset, index, count = _unpack_rw(message, start)
        if count > self._max_count:
            raise AccessError(errno.E2BIG, f"read of {count} bytes")
        entry = self.device.region_handlers.get(index)
        data = self._read(index, offset, count) if entry is None else entry[1](offset, count)
        if flags & NO_REPLY:
            return None
        size = len(data)
        return (
            _pack_reply(msg_id, _READ, _RW_REPLY_SIZE + size, REPLY, 0, offset, index, size) + data
        )

    def write_at(
        self, msg_id: int, flags: int, message: memoryview, start: int, end: int
    ) -> bytes | None:
        """REGION_WRITE whose payload is ``message[start:end]`` (see ``read_at``)."""
        if end - start < _RW_SIZE:
            raise AccessError(errno.EINVAL, f"REGION_WRITE payload of {end - start} bytes")
        offset, index, count = _unpack_rw(message, start)
        if count > self._max_count:
            raise AccessError(errno.E2BIG, f"write of {count} bytes")
        if count != end - start - _RW_SIZE:
            raise AccessError(
                errno.EINVAL, f"write of {count} bytes carries {end - start - _RW_SIZE}"
            )
        data = message[start + _RW_SIZE : end].tobytes()
        entry = self.device.region_handlers.get(index)
        written = self._write(index, offset, data) if entry is None else entry[2](offset, data)
        if self._replies:
            self._replies.clear()  # what the mediator answers may change with any write
        if flags & NO_REPLY:
            return None
        return _pack_reply(msg_id, _WRITE, _RW_REPLY_SIZE, REPLY, 0, offset, index, written)

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

    def _reset(self, msg_id: int, flags: int, payload: memoryview, fds: list[int]) -> None:
        self.device.reset()
        self._respond(msg_id, Command.DEVICE_RESET, flags)
