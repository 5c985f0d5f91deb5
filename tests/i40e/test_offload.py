"""TX offloads: checksums checked the way a receiver checks them (an RFC 1071 word-by-word sum
written here, independent of the module's), and TSO segments reassembled to the input stream."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from i40e_mediator.offload import (
    IIPT_IPV4,
    IIPT_IPV4_CSUM,
    IIPT_IPV6,
    IIPT_NONE,
    L4T_NONE,
    L4T_SCTP,
    L4T_TCP,
    L4T_UDP,
    OffloadError,
    crc32c,
    internet_checksum,
    tx_offload,
)

ETHERNET = bytes.fromhex("027666000001027666000000") + b"\x08\x00"
ETHERNET6 = ETHERNET[:12] + b"\x86\xdd"
SOURCE4, DESTINATION4 = bytes((10, 0, 0, 1)), bytes((10, 0, 0, 2))
SOURCE6 = bytes.fromhex("fe800000000000000076 66ff fe00 0000".replace(" ", ""))
DESTINATION6 = bytes.fromhex("fe800000000000000076 66ff fe00 0001".replace(" ", ""))
TCP_FIN, TCP_PSH, TCP_ACK, TCP_CWR = 0x01, 0x08, 0x10, 0x80


def ones_sum(data: bytes) -> int:
    """RFC 1071: add big-endian 16-bit words with end-around carry, one at a time."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return total


def tcp_header(seq: int, flags: int, options: bytes = b"", seed: int = 0xBEEF) -> bytes:
    offset = (20 + len(options)) // 4
    return struct.pack("!HHIIBBHHH", 40000, 5201, seq, 77, offset << 4, flags, 64240, seed, 0) + (
        options
    )


def udp_header(length: int, seed: int = 0xBEEF) -> bytes:
    return struct.pack("!HHHH", 40000, 5201, length, seed)


def ipv4(l4: bytes, protocol: int, *, total: int | None = None, ident: int = 0x1234) -> bytes:
    length = 20 + len(l4) if total is None else total
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, length, ident, 0x4000, 64, protocol, 0xDEAD, SOURCE4, DESTINATION4
    )
    return ETHERNET + header + l4


def ipv6(l4: bytes, protocol: int, *, payload_length: int | None = None) -> bytes:
    length = len(l4) if payload_length is None else payload_length
    header = struct.pack("!IHBB16s16s", 0x60000000, length, protocol, 64, SOURCE6, DESTINATION6)
    return ETHERNET6 + header + l4


def l4_verifies(frame: bytes, protocol: int) -> bool:
    """A receiver's check: the sum over the pseudo-header and the L4 packet, checksum
    included, is all ones."""
    if frame[12:14] == b"\x86\xdd":
        length = int.from_bytes(frame[18:20], "big")
        l4 = frame[54 : 54 + length]
        pseudo = frame[22:54] + struct.pack("!IxxxB", length, protocol)
    else:
        ihl = (frame[14] & 0xF) * 4
        end = 14 + int.from_bytes(frame[16:18], "big")
        l4 = frame[14 + ihl : end]
        pseudo = frame[26:34] + struct.pack("!xBH", protocol, len(l4))
    return ones_sum(pseudo + l4) == 0xFFFF


def ipv4_header_verifies(frame: bytes) -> bool:
    return ones_sum(frame[14 : 14 + (frame[14] & 0xF) * 4]) == 0xFFFF


def offload(frame: bytes, **changes: object) -> list[bytes]:
    arguments: dict[str, object] = {
        "maclen": 14,
        "iplen": 20,
        "l4len": 20,
        "l3_type": IIPT_IPV4_CSUM,
        "l4_type": L4T_TCP,
        "tso": False,
        "mss": 0,
        "checksum": True,
    }
    arguments.update(changes)
    return tx_offload(frame, **arguments)  # type: ignore[arg-type]


@given(st.binary(max_size=3000))
def test_internet_checksum_matches_rfc1071(data: bytes) -> None:
    assert internet_checksum(data) == ones_sum(data) ^ 0xFFFF


def test_internet_checksum_edges() -> None:
    assert internet_checksum(b"") == 0xFFFF
    assert internet_checksum(b"\0\0\0") == 0xFFFF
    assert internet_checksum(b"\xff\xff") == 0  # the sum is 0xFFFF ("negative zero")
    assert internet_checksum(b"\x80\x00\x80\x00") == 0xFFFE  # end-around carry
    assert internet_checksum(b"\x01") == 0xFEFF  # odd byte padded on the right


@given(payload=st.binary(max_size=1460), ipv4_checksum=st.booleans(), seed=st.integers(0, 0xFFFF))
def test_tcp_over_ipv4_checksums(payload: bytes, ipv4_checksum: bool, seed: int) -> None:
    frame = ipv4(tcp_header(1, TCP_ACK | TCP_PSH, seed=seed) + payload, 6)
    l3_type = IIPT_IPV4_CSUM if ipv4_checksum else IIPT_IPV4
    (out,) = offload(frame, l3_type=l3_type)
    assert l4_verifies(out, 6)
    assert ipv4_header_verifies(out) == ipv4_checksum  # 0xDEAD stays unless asked for
    assert out[:24] + out[26:50] + out[52:] == frame[:24] + frame[26:50] + frame[52:]


@given(payload=st.binary(max_size=1452), seed=st.integers(0, 0xFFFF))
def test_udp_over_ipv4_and_ipv6_checksums(payload: bytes, seed: int) -> None:
    datagram = udp_header(8 + len(payload), seed) + payload
    (out4,) = offload(ipv4(datagram, 17), l4_type=L4T_UDP, l4len=8)
    (out6,) = offload(ipv6(datagram, 17), l4_type=L4T_UDP, l4len=8, l3_type=IIPT_IPV6, iplen=40)
    assert l4_verifies(out4, 17) and ipv4_header_verifies(out4)
    assert l4_verifies(out6, 17)
    assert out4[34 + 8 :] == payload and out6[54 + 8 :] == payload


@given(
    payload=st.binary(max_size=1440), options=st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(8)])
)
def test_tcp_over_ipv6_checksum(payload: bytes, options: bytes) -> None:
    header = tcp_header(5, TCP_ACK, options)
    (out,) = offload(ipv6(header + payload, 6), l3_type=IIPT_IPV6, iplen=40, l4len=len(header))
    assert l4_verifies(out, 6)


def test_udp_checksum_that_sums_to_zero_is_sent_as_all_ones() -> None:
    datagram = bytearray(udp_header(10, 0) + b"\0\0")
    frame = ipv4(bytes(datagram), 17)
    pseudo = SOURCE4 + DESTINATION4 + struct.pack("!xBH", 17, len(datagram))
    # choose the last payload word so that the whole sum is 0xFFFF: the checksum would be 0
    word = 0xFFFF - ones_sum(pseudo + bytes(datagram))
    frame = frame[:-2] + word.to_bytes(2, "big")
    (out,) = offload(frame, l4_type=L4T_UDP, l4len=8)
    assert out[40:42] == b"\xff\xff"
    assert l4_verifies(out, 17)


def test_padding_after_the_ip_packet_is_kept_and_not_summed() -> None:
    packet = ipv4(tcp_header(9, TCP_ACK) + b"ab", 6)
    padded = packet + b"\x55" * (60 - len(packet))
    (out,) = offload(padded)
    assert len(out) == 60 and out[len(packet) :] == b"\x55" * (60 - len(packet))
    assert l4_verifies(out, 6) and ipv4_header_verifies(out)


def test_frames_without_offload_pass_unchanged() -> None:
    arp = ETHERNET[:12] + b"\x08\x06" + bytes(28)
    assert offload(arp, l3_type=IIPT_NONE, l4_type=L4T_NONE) == [arp]
    frame = ipv4(tcp_header(1, TCP_ACK) + b"data", 6)
    assert offload(frame, checksum=False) == [frame]


def bitwise_crc32c(data: bytes) -> int:
    """CRC-32C one bit at a time (reflected polynomial 0x82F63B78)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
    return crc ^ 0xFFFFFFFF


def test_crc32c_matches_the_rfc_3720_vectors() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C


def sctp_verifies(frame: bytes, start: int, end: int) -> bool:
    """A receiver's check: the CRC-32C of the SCTP packet with its checksum field zeroed equals
    that field (little-endian, as Linux stores it)."""
    packet = frame[start:end]
    zeroed = packet[:8] + bytes(4) + packet[12:]
    return bitwise_crc32c(zeroed) == int.from_bytes(packet[8:12], "little")


@settings(max_examples=25)
@given(chunks=st.binary(min_size=4, max_size=1400), padding=st.binary(max_size=20))
def test_sctp_crc32c_over_ipv4_and_ipv6(chunks: bytes, padding: bytes) -> None:
    sctp = struct.pack("!HHII", 5000, 5001, 0x01020304, 0xDEADBEEF) + chunks
    (out4,) = offload(ipv4(sctp, 132) + padding, l4_type=L4T_SCTP, l4len=12)
    (out6,) = offload(
        ipv6(sctp, 132) + padding, l3_type=IIPT_IPV6, iplen=40, l4_type=L4T_SCTP, l4len=12
    )
    assert sctp_verifies(out4, 34, 34 + len(sctp)) and ipv4_header_verifies(out4)
    assert sctp_verifies(out6, 54, 54 + len(sctp))
    assert out4[34 + 12 :] == chunks + padding and out6[54 + 12 :] == chunks + padding


def reassemble(segments: list[bytes], tcp: int, header_size: int) -> tuple[int, bytes]:
    """The first sequence number and the byte stream the segments carry, in order."""
    stream = b""
    first = int.from_bytes(segments[0][tcp + 4 : tcp + 8], "big")
    for segment in segments:
        sequence = int.from_bytes(segment[tcp + 4 : tcp + 8], "big")
        assert sequence == (first + len(stream)) & 0xFFFFFFFF
        stream += segment[header_size:]
    return first, stream


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(1, 65000),
    mss=st.integers(64, 9000),
    ipv6_frame=st.booleans(),
    sequence=st.integers(0, 0xFFFFFFFF),
    ident=st.integers(0, 0xFFFF),
)
def test_tso_segments_reassemble_to_the_stream(
    size: int, mss: int, ipv6_frame: bool, sequence: int, ident: int
) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    options = b"\x01\x01\x08\x0a" + bytes(8)
    tcp = tcp_header(sequence, TCP_ACK | TCP_PSH | TCP_FIN | TCP_CWR, options, seed=0x1111)
    if ipv6_frame:
        # Linux zeroes the IP length fields of a TSO frame
        frame = ipv6(tcp + payload, 6, payload_length=0)
        l3_type, iplen = IIPT_IPV6, 40
    else:
        frame = ipv4(tcp + payload, 6, total=0, ident=ident)
        l3_type, iplen = IIPT_IPV4_CSUM, 20
    header_size = 14 + iplen + len(tcp)
    segments = offload(
        frame, tso=True, mss=mss, l3_type=l3_type, iplen=iplen, l4len=len(tcp), checksum=False
    )
    assert len(segments) == -(-size // mss)
    first, stream = reassemble(segments, 14 + iplen, header_size)
    assert first == sequence and stream == payload
    for index, segment in enumerate(segments):
        assert len(segment) - header_size == (
            mss if index < len(segments) - 1 else size - index * mss
        )
        assert segment[:12] == frame[:12]
        assert l4_verifies(segment, 6)
        flags = segment[header_size - len(tcp) + 13]
        assert flags & TCP_ACK
        assert bool(flags & TCP_CWR) == (index == 0)
        assert bool(flags & (TCP_FIN | TCP_PSH)) == (index == len(segments) - 1)
        assert flags & (TCP_FIN | TCP_PSH) in (0, TCP_FIN | TCP_PSH)
        if ipv6_frame:
            assert int.from_bytes(segment[18:20], "big") == len(segment) - 54
        else:
            assert int.from_bytes(segment[16:18], "big") == len(segment) - 14
            assert int.from_bytes(segment[18:20], "big") == (ident + index) & 0xFFFF
            assert ipv4_header_verifies(segment)


@pytest.mark.parametrize(
    ("frame", "changes", "message"),
    [
        (ipv4(tcp_header(1, 0), 6), {"maclen": 7}, "MAC header length 7"),
        (ipv4(tcp_header(1, 0), 6), {"iplen": 5}, "IP header length 5"),
        (ipv4(tcp_header(1, 0), 6), {"iplen": 24}, "the IPv4 header says 20"),
        (ipv4(tcp_header(1, 0), 6), {"l3_type": IIPT_IPV6, "iplen": 40}, "says version 4"),
        (ipv4(tcp_header(1, 0), 6), {"l3_type": IIPT_NONE}, "IIPT 0"),
        (ipv4(tcp_header(1, 0), 6), {"l4len": 24}, "the TCP header says 20"),
        (ipv4(tcp_header(1, 0), 6), {"l4_type": 4}, "L4T 4"),
        (ETHERNET + bytes(10), {}, "overrun a 24-byte frame"),
        (ipv4(b"short", 6), {}, "ends inside its L4 header"),
        (ipv4(bytes(8), 132), {"l4_type": L4T_SCTP}, "8-byte SCTP packet is shorter"),
        (ipv4(tcp_header(1, 0), 6, total=200), {}, "byte 214 of a 54-byte frame"),
        (ipv4(tcp_header(1, 0) + bytes(100), 6), {"tso": True, "mss": 63}, "MSS 63"),
        (ipv4(tcp_header(1, 0), 6), {"tso": True, "mss": 1448}, "without payload"),
        (
            ipv4(udp_header(108) + bytes(100), 17),
            {"tso": True, "mss": 64, "l4_type": L4T_UDP, "l4len": 8},
            "TCP only",
        ),
        (
            ipv4(tcp_header(1, 0) + bytes(100), 6),
            {"tso": True, "mss": 64, "l4len": 0},
            "TCP header of 0",
        ),
    ],
)
def test_requests_that_do_not_fit_the_frame_are_refused(
    frame: bytes, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(OffloadError, match=message):
        offload(frame, **changes)
