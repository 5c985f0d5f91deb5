"""TX offloads the VF performs for iavf: checksum insertion and TCP segmentation (TSO).

iavf turns both on whatever capabilities the PF grants, so a TCP or UDP frame arrives with the
L4 checksum left for the device (the field holds only a pseudo-header sum) and a large TCP send
arrives as one frame of up to 64 KiB plus a context descriptor asking for TSO. ``tx_offload``
turns such a frame into what goes on the wire, as the X710 does:

- checksums: the IPv4 header checksum when the descriptor says IIPT "IPv4 with checksum", the
  TCP or UDP checksum when it says L4T TCP or UDP (IPv4 or IPv6), always computed afresh over
  the pseudo-header, the L4 header and the payload (whatever seed the field held); the SCTP
  CRC32c (stored little-endian, as Linux does) when it says L4T SCTP. The L4 data ends where
  the IP header's length field says (frame padding is not summed).
- TSO (TCP only): the payload after the headers is cut into ``mss``-byte segments, each with a
  copy of the headers whose IPv4 total length / IPv6 payload length, IPv4 identification (the
  first segment keeps the guest's, then +1 each), TCP sequence number and checksums are set;
  FIN and PSH only on the last segment and CWR only on the first (the X710's default TCP flag
  masks). The IP length fields the guest wrote (Linux zeroes them for TSO) are not used.

Lengths are in **bytes** (the descriptor's MACLEN counts 2-byte words and IPLEN/L4LEN 4-byte
words: the caller converts). Whatever the guest wrote is checked first: an inconsistent request
raises ``OffloadError`` (a ``ValueError``) naming what is wrong, so the caller can count and log
a malformed packet.
"""

from __future__ import annotations

__all__ = [
    "IIPT_IPV4",
    "IIPT_IPV4_CSUM",
    "IIPT_IPV6",
    "IIPT_NONE",
    "L4T_NONE",
    "L4T_SCTP",
    "L4T_TCP",
    "L4T_UDP",
    "MAX_MSS",
    "MIN_MSS",
    "OffloadError",
    "crc32c",
    "internet_checksum",
    "tx_offload",
]

# The TX data descriptor's IIPT field (CMD bits 5-6) and L4T field (CMD bits 8-9).
IIPT_NONE = 0
IIPT_IPV6 = 1
IIPT_IPV4 = 2
IIPT_IPV4_CSUM = 3
L4T_NONE = 0
L4T_TCP = 1
L4T_SCTP = 2
L4T_UDP = 3

# The MSS range the X710 segments with (smaller or larger values are a malformed context).
MIN_MSS = 64
MAX_MSS = 9668

_PROTOCOL = {L4T_TCP: 6, L4T_UDP: 17}
_L4_CHECKSUM_OFFSET = {L4T_TCP: 16, L4T_UDP: 6}
_IPV4_MIN, _IPV6_HEADER, _TCP_MIN, _UDP_HEADER, _SCTP_HEADER = 20, 40, 20, 8, 12
_SCTP_CHECKSUM_OFFSET = 8
_TCP_FIN, _TCP_PSH, _TCP_CWR = 0x01, 0x08, 0x80
_NOT_FIRST = _TCP_CWR  # flags cleared in every segment but the first
_NOT_LAST = _TCP_FIN | _TCP_PSH  # flags cleared in every segment but the last


class OffloadError(ValueError):
    """A TX offload request that does not fit the frame it came with."""


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        value = byte
        for _ in range(8):
            value = (value >> 1) ^ (0x82F63B78 if value & 1 else 0)
        table.append(value)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes | bytearray) -> int:
    """The CRC-32C (Castagnoli) of ``data``, as SCTP uses it (RFC 9260 appendix A)."""
    table = _CRC32C_TABLE
    crc = 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def internet_checksum(data: bytes | bytearray) -> int:
    """The RFC 1071 checksum of ``data``: the ones' complement of the ones' complement sum of
    its big-endian 16-bit words (an odd last byte padded with zero)."""
    if len(data) & 1:
        data = bytes(data) + b"\0"
    # 2**16 = 1 (mod 0xFFFF), so the whole number mod 0xFFFF is the folded word sum, except
    # that a nonzero sum divisible by 0xFFFF is 0xFFFF in ones' complement arithmetic.
    number = int.from_bytes(data, "big")
    folded = number % 0xFFFF
    if not folded and number:
        folded = 0xFFFF
    return folded ^ 0xFFFF


def tx_offload(
    frame: bytes,
    *,
    maclen: int,
    iplen: int,
    l4len: int,
    l3_type: int,
    l4_type: int,
    tso: bool,
    mss: int,
    checksum: bool,
) -> list[bytes]:
    """The frames to put on the wire for ``frame`` (see the module docstring).

    ``l3_type``/``l4_type`` are the descriptor's IIPT and L4T values; ``checksum`` asks for the
    checksums they name; ``tso`` asks for segmentation into ``mss``-byte TCP payloads (its
    segments always get both checksums). Without either, the frame is returned unchanged.
    Raises ``OffloadError`` when the request does not fit the frame.
    """
    if not tso and (not checksum or (l3_type != IIPT_IPV4_CSUM and l4_type == L4T_NONE)):
        return [frame]
    _check_layout(frame, maclen, iplen, l4len, l3_type, l4_type)
    if tso:
        return _segment(frame, maclen, iplen, l4len, l3_type, l4_type, mss)
    packet = bytearray(frame)
    if l3_type == IIPT_IPV4_CSUM:
        _set_ipv4_checksum(packet, maclen, iplen)
    if l4_type in _PROTOCOL:
        end = _ip_end(packet, maclen, iplen, l3_type)
        _set_l4_checksum(packet, maclen, iplen, end, l3_type, l4_type)
    elif l4_type == L4T_SCTP:
        start, end = maclen + iplen, _ip_end(packet, maclen, iplen, l3_type)
        if start + _SCTP_HEADER > end:
            raise OffloadError(f"the {end - start}-byte SCTP packet is shorter than its header")
        field = start + _SCTP_CHECKSUM_OFFSET
        packet[field : field + 4] = bytes(4)
        packet[field : field + 4] = crc32c(packet[start:end]).to_bytes(4, "little")
    return [bytes(packet)]


def _check_layout(
    frame: bytes, maclen: int, iplen: int, l4len: int, l3_type: int, l4_type: int
) -> None:
    if l3_type not in (IIPT_IPV6, IIPT_IPV4, IIPT_IPV4_CSUM):
        raise OffloadError(f"checksum or TSO offload asked for a frame of IIPT {l3_type}")
    ipv6 = l3_type == IIPT_IPV6
    if maclen < 14 or maclen & 1:
        raise OffloadError(f"MAC header length {maclen} is not an even number of bytes >= 14")
    minimum = _IPV6_HEADER if ipv6 else _IPV4_MIN
    if iplen < minimum or iplen & 3:
        raise OffloadError(f"IP header length {iplen} is not a multiple of 4 bytes >= {minimum}")
    if maclen + iplen > len(frame):
        raise OffloadError(
            f"the headers ({maclen} + {iplen} bytes) overrun a {len(frame)}-byte frame"
        )
    version = frame[maclen] >> 4
    if version != (6 if ipv6 else 4):
        raise OffloadError(f"IIPT {l3_type} but the IP header says version {version}")
    if not ipv6 and (frame[maclen] & 0xF) * 4 != iplen:
        raise OffloadError(
            f"IP header length {iplen} but the IPv4 header says {(frame[maclen] & 0xF) * 4}"
        )
    if l4_type not in (L4T_NONE, L4T_TCP, L4T_SCTP, L4T_UDP):
        raise OffloadError(f"L4T {l4_type} is not a layer 4 type")
    if l4_type in _PROTOCOL:
        needed = _UDP_HEADER if l4_type == L4T_UDP else _TCP_MIN
        if maclen + iplen + needed > len(frame):
            raise OffloadError(f"the {len(frame)}-byte frame ends inside its L4 header")
    if l4_type == L4T_TCP and l4len:
        offset = (frame[maclen + iplen + 12] >> 4) * 4
        if l4len != offset:
            raise OffloadError(f"TCP header length {l4len} but the TCP header says {offset}")


def _ip_end(packet: bytearray, maclen: int, iplen: int, l3_type: int) -> int:
    """Where the IP packet ends, by its header's length field."""
    if l3_type == IIPT_IPV6:
        end = maclen + _IPV6_HEADER + int.from_bytes(packet[maclen + 4 : maclen + 6], "big")
    else:
        end = maclen + int.from_bytes(packet[maclen + 2 : maclen + 4], "big")
    if not maclen + iplen <= end <= len(packet):
        raise OffloadError(
            f"the IP length field puts the packet's end at byte {end} of a {len(packet)}-byte frame"
        )
    return end


def _set_ipv4_checksum(packet: bytearray, maclen: int, iplen: int) -> None:
    packet[maclen + 10 : maclen + 12] = b"\0\0"
    packet[maclen + 10 : maclen + 12] = internet_checksum(packet[maclen : maclen + iplen]).to_bytes(
        2, "big"
    )


def _set_l4_checksum(
    packet: bytearray, maclen: int, iplen: int, end: int, l3_type: int, l4_type: int
) -> None:
    start = maclen + iplen
    length = end - start
    if l3_type == IIPT_IPV6:
        pseudo = (
            packet[maclen + 8 : maclen + 40]
            + length.to_bytes(4, "big")
            + bytes((0, 0, 0, _PROTOCOL[l4_type]))
        )
    else:
        pseudo = (
            packet[maclen + 12 : maclen + 20]
            + bytes((0, _PROTOCOL[l4_type]))
            + length.to_bytes(2, "big")
        )
    field = start + _L4_CHECKSUM_OFFSET[l4_type]
    if field + 2 > end:
        raise OffloadError(f"the {length}-byte L4 packet has no room for its checksum")
    packet[field : field + 2] = b"\0\0"
    value = internet_checksum(pseudo + packet[start:end])
    if l4_type == L4T_UDP and not value:
        value = 0xFFFF  # a zero UDP checksum means "none"
    packet[field : field + 2] = value.to_bytes(2, "big")


def _segment(
    frame: bytes, maclen: int, iplen: int, l4len: int, l3_type: int, l4_type: int, mss: int
) -> list[bytes]:
    if l4_type != L4T_TCP:
        raise OffloadError(f"TSO asked for L4T {l4_type}: the VF segments TCP only")
    if not MIN_MSS <= mss <= MAX_MSS:
        raise OffloadError(f"TSO MSS {mss} is outside {MIN_MSS}..{MAX_MSS}")
    header_size = maclen + iplen + l4len
    if not l4len or header_size > len(frame):
        raise OffloadError(f"TSO with a TCP header of {l4len} bytes in a {len(frame)}-byte frame")
    header = frame[:header_size]
    payload = memoryview(frame)[header_size:]
    if not payload:
        raise OffloadError("TSO of a frame without payload")
    ipv6 = l3_type == IIPT_IPV6
    tcp = maclen + iplen
    identification = int.from_bytes(header[maclen + 4 : maclen + 6], "big")
    sequence = int.from_bytes(header[tcp + 4 : tcp + 8], "big")
    flags = header[tcp + 13]
    count = -(-len(payload) // mss)
    segments: list[bytes] = []
    for index in range(count):
        chunk = payload[index * mss : (index + 1) * mss]
        packet = bytearray(header)
        packet += chunk
        ip_length = iplen + l4len + len(chunk)
        if ipv6:
            packet[maclen + 4 : maclen + 6] = (ip_length - _IPV6_HEADER).to_bytes(2, "big")
        else:
            packet[maclen + 2 : maclen + 4] = ip_length.to_bytes(2, "big")
            packet[maclen + 4 : maclen + 6] = ((identification + index) & 0xFFFF).to_bytes(2, "big")
            _set_ipv4_checksum(packet, maclen, iplen)
        packet[tcp + 4 : tcp + 8] = ((sequence + index * mss) & 0xFFFFFFFF).to_bytes(4, "big")
        segment_flags = flags
        if index:
            segment_flags &= ~_NOT_FIRST
        if index != count - 1:
            segment_flags &= ~_NOT_LAST
        packet[tcp + 13] = segment_flags
        _set_l4_checksum(packet, maclen, iplen, len(packet), l3_type, l4_type)
        segments.append(bytes(packet))
    return segments
