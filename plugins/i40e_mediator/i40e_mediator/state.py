"""The VF's saved state and its versioned byte stream.

Stream format, version 2 (little endian)::

    offset  size  field
    0       8     magic b"I40EVFST"
    8       2     format version (2)
    10      1     n = length of the model id
    11      n     model id, ASCII ("i40e-vf")
    11+n    4     body length L
    15+n    4     CRC-32 of the body
    19+n    L     body: sections, each [u16 id][u16 zero][u32 length][length bytes]

Sections of version 2, each exactly once and in this order:

1. DEVICE: u16 queue pairs, u16 vectors, u8 VFGEN_RSTAT state shown next.
2. REGISTERS: u32 count, then count x (u32 BAR0 offset, u32 value): every non-zero dword of
   the register file except the queue tails (they are positions, in QUEUES). The admin
   queue's registers (bases, lengths, heads, tails) are among them.
3. QUEUES: one ``QUEUE`` record per queue pair (configuration, head/tail positions, vectors,
   enable and error bits, counters).
4. VECTORS: one byte per MSI-X vector: bit 0 armed (INTENA), bit 1 cause pending.
5. MSIX: u32 n, the MSI-X table (n bytes, masks included); u32 m, the PBA (m bytes).
6. ADMIN: u32 count, then count x (u32 virtchnl opcode, i32 status, u32 length, payload): the
   PF-to-VF messages waiting for ARQ buffers.
7. VIRTCHNL: u8 version negotiated, u32 the VF's minor version, u32 granted capabilities.
8. PORT: the switch-port state: 6-byte default MAC, u8 flags (bit 0 promiscuous, bit 1 all
   multicast), u16 unicast count, u16 multicast count, then the 6-byte addresses.
9. STATS: 12 u64, the VF's ``virtchnl_eth_stats``.

Version 1 (the model before it spoke virtchnl) and any other version are refused:
``decode`` refuses anything but version 2 of this model with ``OSError(EINVAL)`` naming what
is wrong: another magic, another model, another version, a bad checksum, a truncated or
malformed body.
"""

from __future__ import annotations

import errno
import struct
import zlib
from dataclasses import dataclass

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "MODEL_ID",
    "QueueState",
    "VfState",
    "decode",
    "encode",
]

MAGIC = b"I40EVFST"
FORMAT_VERSION = 2
MODEL_ID = "i40e-vf"

_HEADER = struct.Struct("<8sHB")
_BODY_HEADER = struct.Struct("<II")
_SECTION = struct.Struct("<HHI")
_DEVICE = struct.Struct("<HHB")
_REGISTER = struct.Struct("<II")
_COUNT = struct.Struct("<I")
_QUEUE = struct.Struct("<QIIIQIIIIIHHBxQQQQQ")

SECTION_DEVICE = 1
SECTION_REGISTERS = 2
SECTION_QUEUES = 3
SECTION_VECTORS = 4
SECTION_MSIX = 5
SECTION_ADMIN = 6
SECTION_VIRTCHNL = 7
SECTION_PORT = 8
SECTION_STATS = 9
_SECTIONS = tuple(range(SECTION_DEVICE, SECTION_STATS + 1))
_MESSAGE = struct.Struct("<IiI")
_VIRTCHNL = struct.Struct("<BII")
_PORT = struct.Struct("<6sBHH")
_STATS = struct.Struct("<12Q")
_MAC = 6

_QUEUE_RX_ENABLED = 1 << 0
_QUEUE_ERROR = 1 << 1
_QUEUE_TX_ENABLED = 1 << 2
_PORT_PROMISCUOUS = 1 << 0
_PORT_ALL_MULTICAST = 1 << 1
_VECTOR_ARMED = 1 << 0
_VECTOR_PENDING = 1 << 1


@dataclass(frozen=True)
class QueueState:
    """One queue pair: its context, the device's positions in both rings, and counters.

    ``tx_head``/``rx_head`` are the device's next descriptors; ``tx_tail``/``rx_tail`` the
    tail registers software wrote (the next-to-clean indexes are the driver's, in guest memory).
    """

    tx_base: int = 0
    tx_len: int = 0
    tx_head: int = 0
    tx_tail: int = 0
    rx_base: int = 0
    rx_len: int = 0
    rx_buf_size: int = 0
    max_pkt_size: int = 0
    rx_head: int = 0
    rx_tail: int = 0
    rx_vector: int = 0
    tx_vector: int = 0
    rx_enabled: bool = False
    tx_enabled: bool = False
    error: bool = False
    tx_packets: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_discards: int = 0

    @property
    def configured(self) -> bool:
        """Whether a context (both rings) has been latched."""
        return self.tx_len > 0 and self.rx_len > 0


@dataclass(frozen=True)
class VfState:
    """Everything that makes one VF's state: what migration saves and restores."""

    queue_pairs: int
    vectors: int
    rstat: int
    registers: tuple[tuple[int, int], ...]
    queues: tuple[QueueState, ...]
    armed: tuple[bool, ...]
    pending: tuple[bool, ...]
    msix_table: bytes
    msix_pba: bytes
    admin_messages: tuple[tuple[int, int, bytes], ...]
    api_minor: int | None
    caps: int
    mac: bytes
    unicast: tuple[bytes, ...]
    multicast: tuple[bytes, ...]
    promiscuous: bool
    all_multicast: bool
    stats: tuple[int, ...]


def encode(state: VfState) -> bytes:
    """The version-2 stream of ``state``."""
    sections = {
        SECTION_DEVICE: _DEVICE.pack(state.queue_pairs, state.vectors, state.rstat),
        SECTION_REGISTERS: _COUNT.pack(len(state.registers))
        + b"".join(_REGISTER.pack(offset, value) for offset, value in state.registers),
        SECTION_QUEUES: b"".join(_pack_queue(queue) for queue in state.queues),
        SECTION_VECTORS: bytes(
            (_VECTOR_ARMED if armed else 0) | (_VECTOR_PENDING if pending else 0)
            for armed, pending in zip(state.armed, state.pending, strict=True)
        ),
        SECTION_MSIX: _COUNT.pack(len(state.msix_table))
        + state.msix_table
        + _COUNT.pack(len(state.msix_pba))
        + state.msix_pba,
        SECTION_ADMIN: _COUNT.pack(len(state.admin_messages))
        + b"".join(
            _MESSAGE.pack(opcode, status, len(payload)) + payload
            for opcode, status, payload in state.admin_messages
        ),
        SECTION_VIRTCHNL: _VIRTCHNL.pack(
            state.api_minor is not None, state.api_minor or 0, state.caps
        ),
        SECTION_PORT: _PORT.pack(
            state.mac,
            (_PORT_PROMISCUOUS if state.promiscuous else 0)
            | (_PORT_ALL_MULTICAST if state.all_multicast else 0),
            len(state.unicast),
            len(state.multicast),
        )
        + b"".join(state.unicast)
        + b"".join(state.multicast),
        SECTION_STATS: _STATS.pack(*state.stats),
    }
    body = b"".join(
        _SECTION.pack(number, 0, len(sections[number])) + sections[number] for number in _SECTIONS
    )
    model = MODEL_ID.encode("ascii")
    return (
        _HEADER.pack(MAGIC, FORMAT_VERSION, len(model))
        + model
        + _BODY_HEADER.pack(len(body), zlib.crc32(body))
        + body
    )


def decode(data: bytes) -> VfState:
    """The state in ``data``; ``OSError(EINVAL)`` for a stream this version cannot take."""
    view = memoryview(data)
    if len(view) < _HEADER.size or bytes(view[:8]) != MAGIC:
        raise _invalid("not an i40e VF state stream (bad magic)")
    _, version, model_length = _HEADER.unpack_from(view)
    at = _HEADER.size
    if len(view) < at + model_length + _BODY_HEADER.size:
        raise _invalid("the state stream is truncated")
    model = bytes(view[at : at + model_length]).decode("ascii", "replace")
    if model != MODEL_ID:
        raise _invalid(f"the stream is from device model {model!r}, this device is {MODEL_ID!r}")
    if version != FORMAT_VERSION:
        raise _invalid(
            f"state stream format version {version} is not supported "
            f"(this mediator reads version {FORMAT_VERSION})"
        )
    at += model_length
    length, crc = _BODY_HEADER.unpack_from(view, at)
    body = view[at + _BODY_HEADER.size :]
    if len(body) != length:
        raise _invalid(f"the state body has {len(body)} bytes, its header says {length}")
    if zlib.crc32(body) != crc:
        raise _invalid("the state stream is corrupted (CRC mismatch)")
    try:
        return _decode_body(body)
    except (struct.error, ValueError) as exc:
        raise _invalid(f"malformed state body: {exc}") from exc


def _decode_body(body: memoryview) -> VfState:
    sections: dict[int, memoryview] = {}
    at = 0
    while at < len(body):
        number, _, length = _SECTION.unpack_from(body, at)
        at += _SECTION.size
        if number not in _SECTIONS or number in sections or at + length > len(body):
            raise ValueError(f"unexpected or truncated section {number}")
        sections[number] = body[at : at + length]
        at += length
    missing = [number for number in _SECTIONS if number not in sections]
    if missing:
        raise ValueError(f"sections {missing} are missing")
    queue_pairs, vectors, rstat = _DEVICE.unpack(sections[SECTION_DEVICE])
    registers_data = sections[SECTION_REGISTERS]
    (count,) = _COUNT.unpack_from(registers_data)
    registers = tuple(
        _REGISTER.unpack_from(registers_data, _COUNT.size + i * _REGISTER.size)
        for i in range(count)
    )
    if _COUNT.size + count * _REGISTER.size != len(registers_data):
        raise ValueError("register section length does not match its count")
    queues_data = sections[SECTION_QUEUES]
    if len(queues_data) != queue_pairs * _QUEUE.size:
        raise ValueError(f"queue section does not hold {queue_pairs} queue pairs")
    queues = tuple(_unpack_queue(queues_data, i * _QUEUE.size) for i in range(queue_pairs))
    flags = bytes(sections[SECTION_VECTORS])
    if len(flags) != vectors:
        raise ValueError(f"vector section does not hold {vectors} vectors")
    msix = sections[SECTION_MSIX]
    (table_length,) = _COUNT.unpack_from(msix)
    table = bytes(msix[_COUNT.size : _COUNT.size + table_length])
    (pba_length,) = _COUNT.unpack_from(msix, _COUNT.size + table_length)
    pba_at = 2 * _COUNT.size + table_length
    pba = bytes(msix[pba_at : pba_at + pba_length])
    if pba_at + pba_length != len(msix) or len(table) != table_length:
        raise ValueError("MSI-X section lengths do not match")
    admin = sections[SECTION_ADMIN]
    (count,) = _COUNT.unpack_from(admin)
    messages = []
    at = _COUNT.size
    for _ in range(count):
        opcode, status, length = _MESSAGE.unpack_from(admin, at)
        at += _MESSAGE.size
        messages.append((opcode, status, bytes(admin[at : at + length])))
        at += length
    if at != len(admin):
        raise ValueError("admin section length does not match its messages")
    negotiated, minor, caps = _VIRTCHNL.unpack(sections[SECTION_VIRTCHNL])
    port = sections[SECTION_PORT]
    mac, port_flags, unicast_count, multicast_count = _PORT.unpack_from(port)
    addresses = [
        bytes(port[_PORT.size + i * _MAC : _PORT.size + (i + 1) * _MAC])
        for i in range(unicast_count + multicast_count)
    ]
    if _PORT.size + len(addresses) * _MAC != len(port):
        raise ValueError("port section length does not match its addresses")
    return VfState(
        queue_pairs=queue_pairs,
        vectors=vectors,
        rstat=rstat,
        registers=registers,
        queues=queues,
        armed=tuple(bool(flag & _VECTOR_ARMED) for flag in flags),
        pending=tuple(bool(flag & _VECTOR_PENDING) for flag in flags),
        msix_table=table,
        msix_pba=pba,
        admin_messages=tuple(messages),
        api_minor=minor if negotiated else None,
        caps=caps,
        mac=mac,
        unicast=tuple(addresses[:unicast_count]),
        multicast=tuple(addresses[unicast_count:]),
        promiscuous=bool(port_flags & _PORT_PROMISCUOUS),
        all_multicast=bool(port_flags & _PORT_ALL_MULTICAST),
        stats=_STATS.unpack(sections[SECTION_STATS]),
    )


def _pack_queue(queue: QueueState) -> bytes:
    flags = (
        (_QUEUE_RX_ENABLED if queue.rx_enabled else 0)
        | (_QUEUE_TX_ENABLED if queue.tx_enabled else 0)
        | (_QUEUE_ERROR if queue.error else 0)
    )
    return _QUEUE.pack(
        queue.tx_base,
        queue.tx_len,
        queue.tx_head,
        queue.tx_tail,
        queue.rx_base,
        queue.rx_len,
        queue.rx_buf_size,
        queue.max_pkt_size,
        queue.rx_head,
        queue.rx_tail,
        queue.rx_vector,
        queue.tx_vector,
        flags,
        queue.tx_packets,
        queue.tx_bytes,
        queue.rx_packets,
        queue.rx_bytes,
        queue.rx_discards,
    )


def _unpack_queue(data: memoryview, at: int) -> QueueState:
    (
        tx_base,
        tx_len,
        tx_head,
        tx_tail,
        rx_base,
        rx_len,
        rx_buf_size,
        max_pkt_size,
        rx_head,
        rx_tail,
        rx_vector,
        tx_vector,
        flags,
        tx_packets,
        tx_bytes,
        rx_packets,
        rx_bytes,
        rx_discards,
    ) = _QUEUE.unpack_from(data, at)
    return QueueState(
        tx_base=tx_base,
        tx_len=tx_len,
        tx_head=tx_head,
        tx_tail=tx_tail,
        rx_base=rx_base,
        rx_len=rx_len,
        rx_buf_size=rx_buf_size,
        max_pkt_size=max_pkt_size,
        rx_head=rx_head,
        rx_tail=rx_tail,
        rx_vector=rx_vector,
        tx_vector=tx_vector,
        rx_enabled=bool(flags & _QUEUE_RX_ENABLED),
        tx_enabled=bool(flags & _QUEUE_TX_ENABLED),
        error=bool(flags & _QUEUE_ERROR),
        tx_packets=tx_packets,
        tx_bytes=tx_bytes,
        rx_packets=rx_packets,
        rx_bytes=rx_bytes,
        rx_discards=rx_discards,
    )


def _invalid(message: str) -> OSError:
    return OSError(errno.EINVAL, message)
