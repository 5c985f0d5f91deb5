"""A minimal vfio-user client written from the protocol specification with ``socket`` and
``struct`` only: it shares no code with the project's server, codec or client, so what it finds
is what any other vfio-user client would find.

Wire format (host byte order, packed): a 16-byte header (msg id u16, command u16, message size
u32 including the header, flags u32 with the type in bits 0-3 (0 command, 1 reply), no-reply
0x10 and error 0x20, errno u32), then the command's payload; file descriptors travel as
SCM_RIGHTS with the message's first byte.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
from dataclasses import dataclass, field

VERSION, DMA_MAP, DMA_UNMAP, DEVICE_GET_INFO, DEVICE_GET_REGION_INFO = 1, 2, 3, 4, 5
DEVICE_GET_IRQ_INFO, DEVICE_SET_IRQS, REGION_READ, REGION_WRITE = 7, 8, 9, 10
DEVICE_FEATURE = 16

HEADER = struct.Struct("<HHIII")
TYPE_REPLY, FLAG_ERROR = 0x1, 0x20
REGION_INFO = struct.Struct("<IIIIQQ")  # argsz flags index cap_offset size offset
CAP_HEADER = struct.Struct("<HHI")  # id version next
CAP_SPARSE_MMAP, CAP_TYPE, CAP_MSIX_MAPPABLE = 1, 2, 3
REGION_FLAG_READ, REGION_FLAG_WRITE, REGION_FLAG_MMAP, REGION_FLAG_CAPS = 0x1, 0x2, 0x4, 0x8
IRQ_DATA_NONE, IRQ_DATA_EVENTFD, IRQ_ACTION_TRIGGER = 0x1, 0x4, 0x20
FEATURE_PROBE, FEATURE_GET, FEATURE_SET = 1 << 18, 1 << 16, 1 << 17
FEATURE_DMA_LOGGING_START, FEATURE_DMA_LOGGING_STOP, FEATURE_DMA_LOGGING_REPORT = 6, 7, 8
_MAX_FDS = 8


class WireError(OSError):
    """An error reply: ``errno`` is the server's."""


@dataclass
class Region:
    """A GET_REGION_INFO reply as the wire gives it, with its capability chain decoded here."""

    index: int
    flags: int
    size: int
    offset: int
    argsz: int
    fd: int | None
    sparse_areas: list[tuple[int, int]] | None = None
    msix_mappable: bool = False
    caps: list[int] = field(default_factory=list)


class WireClient:
    """One connection to one served device."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.settimeout(30)
        self._next_id = 0x100

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> WireClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- framing -------------------------------------------------------------------------

    def request(
        self, command: int, payload: bytes = b"", fds: tuple[int, ...] = ()
    ) -> tuple[bytes, list[int]]:
        """Send a command and wait for its reply: ``(payload, fds)``; an error reply raises."""
        msg_id = self._next_id = (self._next_id + 1) & 0xFFFF
        message = HEADER.pack(msg_id, command, HEADER.size + len(payload), 0, 0) + payload
        ancillary = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        self.sock.sendmsg([message], ancillary)
        data, ancdata, _, _ = self.sock.recvmsg(HEADER.size, socket.CMSG_SPACE(4 * _MAX_FDS))
        received: list[int] = []
        for level, kind, blob in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received += array.array("i", blob[: len(blob) - len(blob) % 4]).tolist()
        while len(data) < HEADER.size:
            more = self.sock.recv(HEADER.size - len(data))
            if not more:
                raise ConnectionError("the server closed the connection")
            data += more
        reply_id, reply_command, size, flags, error = HEADER.unpack(data)
        body = b""
        while len(body) < size - HEADER.size:
            more = self.sock.recv(size - HEADER.size - len(body))
            if not more:
                raise ConnectionError("the server closed the connection mid-reply")
            body += more
        if (reply_id, reply_command, flags & 0xF) != (msg_id, command, TYPE_REPLY):
            raise AssertionError(f"reply {reply_id}/{reply_command}/{flags:#x} to {msg_id}")
        if flags & FLAG_ERROR:
            for fd in received:
                os.close(fd)
            raise WireError(error, f"command {command}: {os.strerror(error)}")
        return body, received

    # -- commands ------------------------------------------------------------------------

    def version(self, capabilities: dict[str, object]) -> tuple[int, int, dict[str, object]]:
        """VERSION 0.0 with ``capabilities``: the server's major, minor and capabilities."""
        text = json.dumps({"capabilities": capabilities}).encode() + b"\0"
        body, _ = self.request(VERSION, struct.pack("<HH", 0, 0) + text)
        major, minor = struct.unpack_from("<HH", body)
        if body[-1:] != b"\0":
            raise AssertionError("the VERSION reply's JSON is not NUL-terminated")
        document = json.loads(body[4:-1].decode())
        return major, minor, document.get("capabilities", {})

    def device_info(self) -> tuple[int, int, int]:
        """DEVICE_GET_INFO: flags, number of regions, number of IRQ indexes."""
        body, _ = self.request(DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0))
        argsz, flags, regions, irqs = struct.unpack("<IIII", body)
        assert argsz == 16, argsz
        return flags, regions, irqs

    def region_info(self, index: int, argsz: int = REGION_INFO.size) -> Region:
        """GET_REGION_INFO, asked again with the argsz the server says it needs."""
        body, fds = self.request(DEVICE_GET_REGION_INFO, REGION_INFO.pack(argsz, 0, index, 0, 0, 0))
        need, flags, got_index, cap_offset, size, offset = REGION_INFO.unpack_from(body)
        assert got_index == index and len(body) <= argsz
        if need > argsz:
            for fd in fds:
                os.close(fd)
            return self.region_info(index, need)
        assert len(fds) <= 1, f"{len(fds)} fds for one region"
        region = Region(index, flags, size, offset, need, fds[0] if fds else None)
        at = cap_offset if flags & REGION_FLAG_CAPS else 0
        while at:
            cap_id, _, following = CAP_HEADER.unpack_from(body, at)
            region.caps.append(cap_id)
            if cap_id == CAP_SPARSE_MMAP:
                (count,) = struct.unpack_from("<I", body, at + 8)
                region.sparse_areas = [
                    struct.unpack_from("<QQ", body, at + 16 + 16 * n) for n in range(count)
                ]
            elif cap_id == CAP_MSIX_MAPPABLE:
                region.msix_mappable = True
            assert following == 0 or following > at, "the capability chain loops"
            at = following
        return region

    def irq_info(self, index: int) -> tuple[int, int]:
        """DEVICE_GET_IRQ_INFO: flags and count."""
        body, _ = self.request(DEVICE_GET_IRQ_INFO, struct.pack("<IIII", 16, 0, index, 0))
        _, flags, _, count = struct.unpack("<IIII", body)
        return flags, count

    def read(self, region: int, offset: int, count: int) -> bytes:
        """REGION_READ."""
        body, _ = self.request(REGION_READ, struct.pack("<QII", offset, region, count))
        got_offset, got_region, got = struct.unpack_from("<QII", body)
        assert (got_offset, got_region, got) == (offset, region, count)
        return body[16 : 16 + got]

    def write(self, region: int, offset: int, data: bytes) -> None:
        """REGION_WRITE."""
        self.request(REGION_WRITE, struct.pack("<QII", offset, region, len(data)) + data)

    def read32(self, region: int, offset: int) -> int:
        return int.from_bytes(self.read(region, offset, 4), "little")

    def write32(self, region: int, offset: int, value: int) -> None:
        self.write(region, offset, value.to_bytes(4, "little"))

    def dma_map(self, iova: int, size: int, fd: int, offset: int = 0) -> None:
        """DMA_MAP of ``fd`` (read and write) at ``iova``."""
        self.request(DMA_MAP, struct.pack("<IIQQQ", 32, 0x3, offset, iova, size), (fd,))

    def dma_unmap(self, iova: int, size: int) -> None:
        """DMA_UNMAP of exactly one earlier map."""
        self.request(DMA_UNMAP, struct.pack("<IIQQ", 24, 0, iova, size))

    def set_irq_eventfds(self, index: int, start: int, fds: tuple[int, ...]) -> None:
        """DEVICE_SET_IRQS DATA_EVENTFD|ACTION_TRIGGER: the eventfds ride as SCM_RIGHTS."""
        flags = IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER
        self.request(DEVICE_SET_IRQS, struct.pack("<IIIII", 20, flags, index, start, len(fds)), fds)

    def disable_irqs(self, index: int) -> None:
        """DEVICE_SET_IRQS DATA_NONE|ACTION_TRIGGER with count 0: every vector off."""
        flags = IRQ_DATA_NONE | IRQ_ACTION_TRIGGER
        self.request(DEVICE_SET_IRQS, struct.pack("<IIIII", 20, flags, index, 0, 0))

    def feature(self, flags: int, data: bytes = b"", room: int = 0) -> bytes:
        """DEVICE_FEATURE: the reply's data (after argsz and flags)."""
        argsz = 8 + max(len(data), room)
        body, _ = self.request(DEVICE_FEATURE, struct.pack("<II", argsz, flags) + data)
        return body[8:]
