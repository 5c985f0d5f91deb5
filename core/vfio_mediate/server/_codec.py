"""The vfio-user wire format: every message layout, command number and header flag, once.

The protocol is QEMU's ``docs/interop/vfio-user.rst``; all integers are little-endian and the
structures are packed. Payload offsets are counted from the end of the 16-byte header. Server and
client both import their layouts from here.
"""

from __future__ import annotations

import errno
import json
import struct
from collections.abc import Iterable
from enum import Enum, IntEnum, IntFlag
from typing import Any, NamedTuple

from .._errors import ProtocolError
from ..uapi import PAGE_SIZE, CapId, RegionFlag, RegionInfo, RegionType, SparseMmapArea

__all__ = [
    "CAP_HEADER",
    "DEFAULT_MAX_DATA_XFER_SIZE",
    "DEFAULT_MAX_DMA_MAPS",
    "DEVICE_INFO",
    "DMA_LOGGING_CONTROL",
    "DMA_LOGGING_RANGE",
    "DMA_LOGGING_REPORT",
    "DMA_MAP",
    "DMA_RW_QEMU_10",
    "DMA_RW_SPEC",
    "DMA_UNMAP",
    "DMA_UNMAP_FLAG_ALL",
    "FEATURE",
    "FEATURE_MIGRATION",
    "FEATURE_MIG_DATA_SIZE",
    "FEATURE_MIG_STATE",
    "HEADER",
    "HEADER_SIZE",
    "IRQ_INFO",
    "IRQ_SET",
    "MAX_MSG_FDS",
    "MIG_DATA",
    "REGION_INFO",
    "REGION_RW",
    "REPLY_RW",
    "SPARSE_MMAP",
    "SPARSE_MMAP_AREA",
    "TYPE_CAP",
    "TYPE_MASK",
    "VERSION",
    "WRITE_MULTI_COUNT",
    "WRITE_MULTI_ENTRY",
    "WRITE_MULTI_MAX_DATA",
    "Command",
    "DmaFlag",
    "DmaLayout",
    "HeaderFlag",
    "ProtocolError",
    "VfioUserCapabilities",
    "decode_capabilities",
    "decode_dma_read_reply",
    "decode_dma_request",
    "decode_region_info",
    "encode_capabilities",
    "encode_dma_read_reply",
    "encode_dma_request",
    "encode_dma_write_reply",
    "encode_region_info",
    "pack_error",
    "pack_message",
]


class Command(IntEnum):
    """vfio-user command numbers."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14
    """Migration v1 dirty-page command, removed from the protocol; refused."""
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18

    @classmethod
    def name_of(cls, number: int) -> str:
        """The command's name, or its number when it has none."""
        try:
            return cls(number).name
        except ValueError:
            return str(number)


class HeaderFlag(IntFlag):
    """The header's flags word: the type in bits 0-3, then NO_REPLY and ERROR."""

    COMMAND = 0
    REPLY = 1
    NO_REPLY = 1 << 4
    ERROR = 1 << 5


TYPE_MASK = 0xF
"""The type bits of the header's flags (0 command, 1 reply; anything else is fatal)."""

HEADER = struct.Struct("<HHIII")
"""msg id, command, message size (header included), flags, error (positive errno)."""
HEADER_SIZE = HEADER.size

VERSION = struct.Struct("<HH")
"""major, minor; then NUL-terminated JSON."""

DMA_MAP = struct.Struct("<IIQQQ")
"""argsz, flags (DmaFlag), offset into the passed fd, IOVA, size."""
DMA_UNMAP = struct.Struct("<IIQQ")
"""argsz, flags, IOVA, size; the reply echoes it."""
DMA_UNMAP_FLAG_ALL = 1 << 1
"""VFIO_DMA_UNMAP_FLAG_ALL: unmap everything (address and size 0); no other flag is valid."""

DEVICE_INFO = struct.Struct("<IIII")
"""argsz, flags (DeviceFlag), num_regions, num_irqs."""

REGION_INFO = struct.Struct("<IIIIQQ")
"""argsz, flags (RegionFlag), index, cap_offset, size, offset (the mmap offset of the fd)."""
CAP_HEADER = struct.Struct("<HHI")
"""Capability header: id, version, next (offset from the start of the region info; 0 ends)."""
SPARSE_MMAP = struct.Struct("<II")
"""After a SPARSE_MMAP cap header: nr_areas, reserved; then the areas."""
SPARSE_MMAP_AREA = struct.Struct("<QQ")
"""One mmap-able area: offset in the region, size."""
TYPE_CAP = struct.Struct("<II")
"""After a TYPE cap header: type, subtype."""
CAP_VERSION = 1

IRQ_INFO = struct.Struct("<IIII")
"""argsz, flags (IrqInfoFlag), index, count."""
IRQ_SET = struct.Struct("<IIIII")
"""argsz, flags (IrqSetFlag), index, start, count; DATA_BOOL bytes follow, eventfds ride as
SCM_RIGHTS."""

REGION_RW = struct.Struct("<QII")
"""offset, region index, count; a write's data (or a read reply's) follows."""
REPLY_RW = struct.Struct("<HHIIIQII")
"""Header and REGION_RW in one: how a region read or write reply starts."""

WRITE_MULTI_COUNT = struct.Struct("<Q")
"""wr_cnt; the entries follow (request), or the number of writes done (reply)."""
WRITE_MULTI_ENTRY = struct.Struct("<QII8s")
"""offset, region index, count (<= 8), 8 data bytes of which count are used."""
WRITE_MULTI_MAX_DATA = 8

FEATURE = struct.Struct("<II")
"""argsz (largest reply payload the client takes), flags (feature | GET/SET/PROBE); data
follows."""
FEATURE_MIGRATION = struct.Struct("<Q")
"""VFIO_DEVICE_FEATURE_MIGRATION data: migration flags."""
FEATURE_MIG_STATE = struct.Struct("<II")
"""VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE data: device_state, data_fd (unused in vfio-user)."""
FEATURE_MIG_DATA_SIZE = struct.Struct("<Q")
"""VFIO_DEVICE_FEATURE_MIG_DATA_SIZE data: bytes left to read in the saving state."""
DMA_LOGGING_CONTROL = struct.Struct("<QII")
"""DMA_LOGGING_START data: page_size, num_ranges, reserved; the ranges follow."""
DMA_LOGGING_RANGE = struct.Struct("<QQ")
"""One logged range: IOVA, length."""
DMA_LOGGING_REPORT = struct.Struct("<QQQ")
"""DMA_LOGGING_REPORT data: IOVA, length, page_size; the reply appends the bitmap (u64s)."""

MIG_DATA = struct.Struct("<II")
"""MIG_DATA_READ/WRITE: argsz, size; data follows (write request, read reply)."""

DMA_RW_SPEC = struct.Struct("<QQ")
"""DMA_READ/DMA_WRITE as the spec lays them out: address, count (u64); data from @16."""
DMA_RW_QEMU_10 = struct.Struct("<QI")
"""The same messages as QEMU 10.1-10.2's client source has them: address, count (u32); data
from @12, and a message is padded to 16 + count bytes of payload."""
DMA_RW_QEMU_10_PADDING = 4

DEFAULT_MAX_DATA_XFER_SIZE = 1 << 20
DEFAULT_MAX_DMA_MAPS = 65535
MAX_MSG_FDS = 16
"""The most fds this implementation takes in one message (QEMU refuses more than 16)."""


class DmaFlag(IntFlag):
    """DMA_MAP flags."""

    READ = 1 << 0
    WRITE = 1 << 1


class DmaLayout(Enum):
    """Which layout DMA_READ/DMA_WRITE messages use with a client.

    ``SPEC`` is the protocol's: libvfio-user, SPDK, and QEMU 11.1 (checked against its
    binary: it accepts the spec's DMA_WRITE and refuses the other with E2BIG). ``QEMU_10`` is
    what the client source of QEMU 10.1 and 10.2 reads and writes: a 32-bit count and the data
    four bytes earlier; it is never chosen by itself.
    """

    SPEC = "spec"
    QEMU_10 = "qemu-10"


def pack_message(
    msg_id: int,
    command: int,
    payload: bytes | bytearray | memoryview = b"",
    flags: int = HeaderFlag.COMMAND,
    error: int = 0,
) -> bytes:
    """One whole message: header and payload."""
    return HEADER.pack(msg_id, command, HEADER_SIZE + len(payload), flags, error) + payload


def pack_error(msg_id: int, command: int, code: int) -> bytes:
    """An error reply: the header alone, with the positive errno."""
    return HEADER.pack(
        msg_id, command, HEADER_SIZE, HeaderFlag.REPLY | HeaderFlag.ERROR, code or errno.EIO
    )


# -- VERSION capabilities -------------------------------------------------------------------


class VfioUserCapabilities(NamedTuple):
    """The capabilities one side of a connection announced (defaults where it said nothing)."""

    max_msg_fds: int = 1
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    max_dma_maps: int = DEFAULT_MAX_DMA_MAPS
    pgsizes: int = PAGE_SIZE
    write_multiple: bool = False
    migration_pgsize: int | None = None
    migration_max_bitmap_size: int | None = None
    keys: frozenset[str] = frozenset()
    """The capability names present (the rest are defaults)."""


def _number(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProtocolError(f"capability {name} must be an integer in [{low}, {high}]")
    return value


def decode_capabilities(text: bytes | memoryview) -> VfioUserCapabilities:
    """Parse the NUL-terminated JSON of a VERSION message; ``ProtocolError`` when malformed."""
    raw = bytes(text)
    if not raw:
        return VfioUserCapabilities()
    if raw[-1] != 0:
        raise ProtocolError("version JSON is not NUL-terminated")
    try:
        document = json.loads(raw[:-1].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"version JSON does not parse: {exc}") from None
    if not isinstance(document, dict):
        raise ProtocolError("version JSON is not an object")
    caps = document.get("capabilities", {})
    if not isinstance(caps, dict):
        raise ProtocolError("version capabilities is not an object")
    fields: dict[str, Any] = {"keys": frozenset(caps)}
    limit = (1 << 64) - 1
    if "max_msg_fds" in caps:
        fields["max_msg_fds"] = _number(caps["max_msg_fds"], "max_msg_fds", 0, 1 << 16)
    if "max_data_xfer_size" in caps:
        fields["max_data_xfer_size"] = _number(
            caps["max_data_xfer_size"], "max_data_xfer_size", 1, limit
        )
    if "max_dma_maps" in caps:
        fields["max_dma_maps"] = _number(caps["max_dma_maps"], "max_dma_maps", 0, limit)
    if "pgsizes" in caps:
        fields["pgsizes"] = _number(caps["pgsizes"], "pgsizes", 1, limit)
    if "write_multiple" in caps:
        if not isinstance(caps["write_multiple"], bool):
            raise ProtocolError("capability write_multiple must be a boolean")
        fields["write_multiple"] = caps["write_multiple"]
    migration = caps.get("migration")
    if migration is not None:
        if not isinstance(migration, dict):
            raise ProtocolError("capability migration must be an object")
        if "pgsize" in migration:
            fields["migration_pgsize"] = _number(migration["pgsize"], "migration.pgsize", 1, limit)
        if "max_bitmap_size" in migration:
            fields["migration_max_bitmap_size"] = _number(
                migration["max_bitmap_size"], "migration.max_bitmap_size", 0, limit
            )
    return VfioUserCapabilities(**fields)


def encode_capabilities(entries: Iterable[tuple[str, Any]], limit: int | None = None) -> bytes:
    """NUL-terminated compact JSON ``{"capabilities": {...}}`` of ``entries`` in order.

    With ``limit``, entries are dropped from the end until the text fits in ``limit`` bytes;
    ``b""`` when not even an empty object fits (the JSON is optional in the protocol).
    """
    kept = list(entries)
    while True:
        text = json.dumps({"capabilities": dict(kept)}, separators=(",", ":")).encode() + b"\0"
        if limit is None or len(text) <= limit:
            return text
        if not kept:
            return b""
        kept.pop()


# -- region info -----------------------------------------------------------------------------


def encode_region_info(
    info: RegionInfo,
    areas: tuple[SparseMmapArea, ...],
    file_offset: int,
    argsz: int,
) -> tuple[bytes, bool]:
    """The GET_REGION_INFO reply payload for ``info`` whose mmap-able ``areas`` a client maps
    at ``file_offset`` + area offset; returns the payload and whether it is complete.

    ``flags`` keep MMAP only when ``areas`` is not empty. When the whole reply (struct plus
    capability chain) exceeds ``argsz``, only the 32-byte struct is sent, without CAPS, and its
    ``argsz`` field says how much the client must offer (the client asks again).
    """
    flags = info.flags & (RegionFlag.READ | RegionFlag.WRITE)
    caps: list[tuple[int, bytes]] = []
    if areas:
        flags |= RegionFlag.MMAP
        if len(areas) != 1 or areas[0].offset != 0 or areas[0].size != info.size:
            body = SPARSE_MMAP.pack(len(areas), 0) + b"".join(
                SPARSE_MMAP_AREA.pack(area.offset, area.size) for area in areas
            )
            caps.append((CapId.SPARSE_MMAP, body))
    if info.type is not None:
        caps.append((CapId.TYPE, TYPE_CAP.pack(info.type.type, info.type.subtype)))
    if info.msix_mappable:
        caps.append((CapId.MSIX_MAPPABLE, b""))
    chain = bytearray()
    position = REGION_INFO.size
    for number, (cap_id, body) in enumerate(caps):
        end = position + CAP_HEADER.size + len(body)
        following = end if number + 1 < len(caps) else 0
        chain += CAP_HEADER.pack(cap_id, CAP_VERSION, following) + body
        position = end
    full = REGION_INFO.size + len(chain)
    offset = file_offset if areas else 0
    if full > argsz or not caps:
        payload = REGION_INFO.pack(full, flags, info.index, 0, info.size, offset)
        return payload, full <= argsz
    payload = REGION_INFO.pack(
        full, flags | RegionFlag.CAPS, info.index, REGION_INFO.size, info.size, offset
    )
    return payload + bytes(chain), True


def decode_region_info(payload: bytes | memoryview) -> tuple[RegionInfo, int]:
    """A GET_REGION_INFO reply as ``RegionInfo`` (``offset`` is the wire's mmap offset) and the
    ``argsz`` the server asked for. Raises ``ProtocolError`` for a malformed chain."""
    if len(payload) < REGION_INFO.size:
        raise ProtocolError(f"region info reply of {len(payload)} bytes is too short")
    argsz, flags, index, cap_offset, size, offset = REGION_INFO.unpack_from(payload)
    fields: dict[str, Any] = {
        "index": index,
        "flags": flags & ~int(RegionFlag.CAPS),
        "size": size,
        "offset": offset,
    }
    if flags & RegionFlag.CAPS:
        seen: set[int] = set()
        position = cap_offset
        while position:
            if position in seen or position < REGION_INFO.size:
                raise ProtocolError(f"region {index}: capability chain loops or points back")
            seen.add(position)
            if position + CAP_HEADER.size > len(payload):
                raise ProtocolError(f"region {index}: capability at {position} is cut off")
            cap_id, _, following = CAP_HEADER.unpack_from(payload, position)
            body = position + CAP_HEADER.size
            if cap_id == CapId.SPARSE_MMAP:
                first = body + SPARSE_MMAP.size
                if first > len(payload):
                    raise ProtocolError(f"region {index}: sparse mmap capability is cut off")
                count, _ = SPARSE_MMAP.unpack_from(payload, body)
                if first + count * SPARSE_MMAP_AREA.size > len(payload):
                    raise ProtocolError(f"region {index}: sparse mmap areas are cut off")
                fields["sparse_mmap"] = tuple(
                    SparseMmapArea(offset=o, size=s)
                    for o, s in SPARSE_MMAP_AREA.iter_unpack(
                        payload[first : first + count * SPARSE_MMAP_AREA.size]
                    )
                )
            elif cap_id == CapId.TYPE:
                if body + TYPE_CAP.size > len(payload):
                    raise ProtocolError(f"region {index}: type capability is cut off")
                kind, subtype = TYPE_CAP.unpack_from(payload, body)
                fields["type"] = RegionType(type=kind, subtype=subtype)
            elif cap_id == CapId.MSIX_MAPPABLE:
                fields["msix_mappable"] = True
            position = following
    try:
        return RegionInfo.model_validate(fields), argsz
    except ValueError as exc:
        raise ProtocolError(f"region {index}: invalid region info: {exc}") from None


# -- DMA_READ / DMA_WRITE --------------------------------------------------------------------


def encode_dma_request(
    layout: DmaLayout, msg_id: int, command: int, address: int, count: int, data: bytes = b""
) -> bytes:
    """A server's DMA_READ (``data`` empty) or DMA_WRITE command in ``layout``."""
    if command == Command.DMA_READ or layout is DmaLayout.SPEC:
        # A 32-bit count is the low half of the spec's u64: a read request suits both layouts.
        body = DMA_RW_SPEC.pack(address, count) + data
    else:
        # QEMU 10 counts the data after its padded struct: 16 payload bytes, not 12.
        body = DMA_RW_QEMU_10.pack(address, count) + data + bytes(DMA_RW_QEMU_10_PADDING)
    return pack_message(msg_id, command, body)


def decode_dma_request(
    layout: DmaLayout, command: int, payload: bytes | memoryview
) -> tuple[int, int, bytes | memoryview]:
    """A DMA_READ/DMA_WRITE command (client side): address, count and, for a write, the data.

    Raises ``ProtocolError`` when the payload is short for its count.
    """
    if len(payload) < DMA_RW_SPEC.size:
        raise ProtocolError(f"DMA request payload of {len(payload)} bytes is too short")
    if layout is DmaLayout.QEMU_10:
        address, count = DMA_RW_QEMU_10.unpack_from(payload)
        start = DMA_RW_QEMU_10.size
    else:
        address, count = DMA_RW_SPEC.unpack_from(payload)
        start = DMA_RW_SPEC.size
    if command == Command.DMA_READ:
        return address, count, b""
    if start + count > len(payload):
        raise ProtocolError(f"DMA write of {count} bytes carries {len(payload) - start}")
    return address, count, payload[start : start + count]


def encode_dma_read_reply(
    layout: DmaLayout, msg_id: int, address: int, data: bytes | memoryview
) -> bytes:
    """The client's reply to a DMA_READ with the ``data`` read."""
    if layout is DmaLayout.QEMU_10:
        padding = bytes(DMA_RW_QEMU_10_PADDING)
        body = DMA_RW_QEMU_10.pack(address, len(data)) + bytes(data) + padding
    else:
        body = DMA_RW_SPEC.pack(address, len(data)) + bytes(data)
    return pack_message(msg_id, Command.DMA_READ, body, HeaderFlag.REPLY)


def encode_dma_write_reply(layout: DmaLayout, msg_id: int, address: int, count: int) -> bytes:
    """The client's reply to a DMA_WRITE: address and count, or (QEMU 10) the header alone."""
    body = b"" if layout is DmaLayout.QEMU_10 else DMA_RW_SPEC.pack(address, count)
    return pack_message(msg_id, Command.DMA_WRITE, body, HeaderFlag.REPLY)


def decode_dma_read_reply(layout: DmaLayout, payload: bytes | memoryview, count: int) -> bytes:
    """The ``count`` bytes a DMA_READ reply carries; ``ProtocolError`` when it carries fewer."""
    start = DMA_RW_QEMU_10.size if layout is DmaLayout.QEMU_10 else DMA_RW_SPEC.size
    if len(payload) < start + count:
        raise ProtocolError(f"DMA read reply carries {len(payload) - start} of {count} bytes")
    return bytes(payload[start : start + count])
