"""A minimal blocking vfio-user client for measurements: prebuilt requests, one ``send`` and
as few ``recv_into`` as the reply needs, nothing else. It speaks to any vfio-user server (ours
or libvfio-user's samples) so both are measured by the same code."""

from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path

HEADER = struct.Struct("<HHIII")
REGION_RW = struct.Struct("<QII")
REGION_INFO = struct.Struct("<IIIIQQ")
VERSION, REGION_INFO_CMD, REGION_READ, REGION_WRITE = 1, 5, 9, 10
CONFIG_REGION = 7
_CONNECT_TIMEOUT = 30.0


def connect(path: Path) -> socket.socket:
    """Connect (retrying while the server starts) and negotiate version 0.0."""
    sock = connect_plain(path)
    caps = {"capabilities": {"max_msg_fds": 8, "max_data_xfer_size": 1 << 20}}
    text = json.dumps(caps).encode() + b"\0"
    sock.sendall(
        HEADER.pack(0, VERSION, 16 + 4 + len(text), 0, 0) + struct.pack("<HH", 0, 0) + text
    )
    RawClient(sock).call_bytes(b"")
    return sock


class RawClient:
    """Round trips of prebuilt requests; ``call`` returns the reply's payload size."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray(1 << 21)
        self._view = memoryview(self._buffer)

    def call_bytes(self, request: bytes) -> int:
        """Send ``request`` (if any) and read one whole reply; returns its size."""
        sock, view = self._sock, self._view
        if request:
            sock.send(request)
        got = sock.recv_into(view)
        while got < 16:
            got += sock.recv_into(view[got:])
        size = HEADER.unpack_from(view)[2]
        while got < size:
            got += sock.recv_into(view[got:])
        if self._buffer[12] & 0x20:
            raise OSError(HEADER.unpack_from(view)[4], "error reply")
        return size


def region_read(index: int, offset: int, count: int) -> bytes:
    """A REGION_READ request."""
    return HEADER.pack(1, REGION_READ, 32, 0, 0) + REGION_RW.pack(offset, index, count)


def region_write(index: int, offset: int, data: bytes) -> bytes:
    """A REGION_WRITE request."""
    head = HEADER.pack(1, REGION_WRITE, 32 + len(data), 0, 0)
    return head + REGION_RW.pack(offset, index, len(data)) + data


def region_info(index: int) -> bytes:
    """A GET_REGION_INFO request with room for no capabilities."""
    return HEADER.pack(1, REGION_INFO_CMD, 48, 0, 0) + REGION_INFO.pack(32, 0, index, 0, 0, 0)


def connect_plain(path: Path) -> socket.socket:
    """Connect to a socket that is not vfio-user (an echo floor), retrying while it starts."""
    deadline = time.monotonic() + _CONNECT_TIMEOUT
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise SystemExit(f"nothing listens on {path}") from None
            time.sleep(0.05)
