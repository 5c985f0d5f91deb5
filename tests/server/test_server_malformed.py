"""Bad input: every refusal carries the right errno, the session goes on where the protocol
allows, the connection closes where it cannot, and the server and its other devices serve on.
Nothing leaks: 10,000 requests with fds leave the fd table as it was."""

from __future__ import annotations

import errno
import logging
import os
import struct
from collections.abc import Callable, Iterator

import pytest
from server_testlib import PAGE, REG_BOOM, REG_SRC, open_fds

from vfio_mediate import MediatedDevice, anonymous_memory
from vfio_mediate.server import (
    HEADER,
    LOGGER_NAME,
    Command,
    DeviceEndpoint,
    HeaderFlag,
    Message,
    ProtocolError,
    VfioUserClient,
    pack_message,
)
from vfio_mediate.uapi import IrqIndex, IrqSetFlag

RW = struct.Struct("<QII")
CONFIG = 7


@pytest.fixture
def pair(
    make_test_device: Callable[[str], MediatedDevice],
    serve: Callable[[MediatedDevice], DeviceEndpoint],
    connect: Callable[..., VfioUserClient],
) -> tuple[DeviceEndpoint, DeviceEndpoint, VfioUserClient]:
    """The device under attack and a bystander device of the same server with its client."""
    target = serve(make_test_device("svtest-target"))
    bystander = serve(make_test_device("svtest-bystander"))
    return target, bystander, connect(bystander)


@pytest.fixture
def eventfd() -> Iterator[int]:
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    yield fd
    os.close(fd)


def exchange(
    client: VfioUserClient,
    command: int,
    payload: bytes = b"",
    fds: tuple[int, ...] = (),
    flags: int = HeaderFlag.COMMAND,
) -> Message:
    msg_id = client.next_id()
    client.send_raw(pack_message(msg_id, command, payload, flags), fds)
    reply = client.receive()
    assert reply.msg_id == msg_id and reply.command == command
    return reply


def error_of(client: VfioUserClient, command: int, payload: bytes = b"", **kw: object) -> int:
    reply = exchange(client, command, payload, **kw)  # type: ignore[arg-type]
    assert reply.flags == HeaderFlag.REPLY | HeaderFlag.ERROR, reply
    assert reply.payload == b"" and not reply.fds, "an error reply is a bare header"
    return reply.error


def still_serving(client: VfioUserClient) -> None:
    assert client.read(CONFIG, 0, 2) == b"\xf4\x1a"


def region_info_request(argsz: int, index: int) -> bytes:
    return struct.pack("<IIIIQQ", argsz, 0, index, 0, 0, 0)


CASES: list[tuple[str, int, bytes, int]] = [
    ("unknown command", 99, b"", errno.ENOSYS),
    ("region io fds", Command.DEVICE_GET_REGION_IO_FDS, bytes(16), errno.ENOTSUP),
    ("dirty pages v1", Command.DIRTY_PAGES, bytes(16), errno.ENOTSUP),
    ("dma read from client", Command.DMA_READ, bytes(16), errno.EINVAL),
    ("short read", Command.REGION_READ, bytes(8), errno.EINVAL),
    ("no such region", Command.REGION_READ, RW.pack(0, 42, 4), errno.EINVAL),
    ("read past the end", Command.REGION_READ, RW.pack(4 * PAGE - 2, 0, 4), errno.EINVAL),
    ("offset overflow", Command.REGION_READ, RW.pack(2**64 - 2, CONFIG, 4), errno.EINVAL),
    ("empty read", Command.REGION_READ, RW.pack(0, CONFIG, 0), errno.EINVAL),
    ("huge read", Command.REGION_READ, RW.pack(0, 0, 2 << 20), errno.E2BIG),
    ("write count > data", Command.REGION_WRITE, RW.pack(0, CONFIG, 8) + b"abcd", errno.EINVAL),
    ("write count < data", Command.REGION_WRITE, RW.pack(0, CONFIG, 2) + b"abcd", errno.EINVAL),
    ("write to a hole", Command.REGION_WRITE, RW.pack(0, 1, 4) + b"abcd", errno.EINVAL),
    ("info argsz < 32", Command.DEVICE_GET_REGION_INFO, region_info_request(16, 0), errno.EINVAL),
    ("short info", Command.DEVICE_GET_REGION_INFO, bytes(12), errno.EINVAL),
    ("short get info", Command.DEVICE_GET_INFO, bytes(8), errno.EINVAL),
    (
        "irq info index",
        Command.DEVICE_GET_IRQ_INFO,
        struct.pack("<IIII", 16, 0, 9, 0),
        errno.EINVAL,
    ),
    ("short set irqs", Command.DEVICE_SET_IRQS, bytes(12), errno.EINVAL),
    ("dma map size 0", Command.DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0, 0), errno.EINVAL),
    ("dma map flags", Command.DMA_MAP, struct.pack("<IIQQQ", 32, 0x10, 0, 0, 4096), errno.EINVAL),
    ("short dma map", Command.DMA_MAP, bytes(24), errno.EINVAL),
    ("unmap unknown", Command.DMA_UNMAP, struct.pack("<IIQQ", 24, 0, 0, 4096), errno.EINVAL),
    ("unmap bitmap flag", Command.DMA_UNMAP, struct.pack("<IIQQ", 24, 1, 0, 4096), errno.EINVAL),
    ("unmap all + range", Command.DMA_UNMAP, struct.pack("<IIQQ", 24, 2, 0, 4096), errno.EINVAL),
    ("multi count", Command.REGION_WRITE_MULTI, struct.pack("<Q", 3) + bytes(24), errno.EINVAL),
    (
        "multi entry > 8",
        Command.REGION_WRITE_MULTI,
        struct.pack("<QQII8s", 1, 0, CONFIG, 9, b""),
        errno.EINVAL,
    ),
    ("short feature", Command.DEVICE_FEATURE, bytes(4), errno.EINVAL),
    (
        "huge mig read",
        Command.MIG_DATA_READ,
        struct.pack("<II", 8 + (2 << 20), 2 << 20),
        errno.E2BIG,
    ),
    ("mig write size", Command.MIG_DATA_WRITE, struct.pack("<II", 8, 9) + b"x", errno.EINVAL),
    ("second version", Command.VERSION, bytes(4), errno.EINVAL),
]


def test_malformed_commands_get_the_right_errno_and_the_session_goes_on(
    pair: tuple[DeviceEndpoint, DeviceEndpoint, VfioUserClient],
    connect: Callable[..., VfioUserClient],
) -> None:
    target, _, bystander = pair
    client = connect(target)
    for name, command, payload, code in CASES:
        assert error_of(client, command, payload) == code, name
    still_serving(client)
    still_serving(bystander)
    session = target.session
    assert session is not None and session.errors == len(CASES)


def test_fds_where_none_belong_or_too_many_are_refused_and_closed(
    pair: tuple[DeviceEndpoint, DeviceEndpoint, VfioUserClient],
    connect: Callable[..., VfioUserClient],
    eventfd: int,
) -> None:
    target, _, _ = pair
    client = connect(target)
    before = open_fds()
    read = RW.pack(0, CONFIG, 4)
    assert error_of(client, Command.REGION_READ, read, fds=(eventfd,)) == errno.EINVAL
    two = (eventfd, eventfd)
    dma_map = struct.pack("<IIQQQ", 32, 3, 0, 0x1000, 4096)
    assert error_of(client, Command.DMA_MAP, dma_map, fds=two) == errno.EINVAL
    set_irqs = struct.pack("<IIIII", 20, IrqSetFlag.DATA_EVENTFD | 32, IrqIndex.MSIX, 0, 17)
    many = (eventfd,) * 17
    assert error_of(client, Command.DEVICE_SET_IRQS, set_irqs, fds=many) == errno.EINVAL
    way_too_many = (eventfd,) * 100  # beyond what the server's buffer takes: truncated
    assert error_of(client, Command.DEVICE_SET_IRQS, set_irqs, fds=way_too_many) == errno.EINVAL
    assert open_fds() == before
    still_serving(client)


def test_failures_of_posted_commands_send_nothing(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient]
) -> None:
    client = connect(test_endpoint)
    client.send_raw(pack_message(500, Command.REGION_READ, RW.pack(0, 42, 4), HeaderFlag.NO_REPLY))
    client.send_raw(pack_message(501, 77, b"", HeaderFlag.NO_REPLY))
    reply = exchange(client, Command.REGION_READ, RW.pack(0, CONFIG, 2))
    assert reply.flags == HeaderFlag.REPLY and reply.payload[16:] == b"\xf4\x1a"


def test_stray_replies_are_ignored(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient], eventfd: int
) -> None:
    client = connect(test_endpoint)
    client.send_raw(pack_message(9, Command.DMA_READ, bytes(40), HeaderFlag.REPLY))
    client.send_raw(pack_message(10, Command.DMA_WRITE, b"", HeaderFlag.REPLY), (eventfd,))
    still_serving(client)


def test_a_message_in_single_bytes_and_a_burst_of_pipelined_ones(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient]
) -> None:
    client = connect(test_endpoint)
    message = pack_message(321, Command.REGION_READ, RW.pack(0, CONFIG, 4))
    for byte in message:
        client.send_raw(bytes([byte]))
    reply = client.receive()
    assert reply.msg_id == 321 and reply.payload[16:] == b"\xf4\x1a\xfe\x10"
    burst = b"".join(
        pack_message(
            1000 + n, Command.REGION_WRITE, RW.pack(REG_SRC, 0, 4) + n.to_bytes(4, "little")
        )
        for n in range(200)
    )
    client.send_raw(burst + pack_message(2000, Command.REGION_READ, RW.pack(REG_SRC, 0, 4)))
    replies = [client.receive() for _ in range(201)]
    assert [reply.msg_id for reply in replies] == [*range(1000, 1200), 2000]
    assert replies[-1].payload[16:] == (199).to_bytes(4, "little")


def test_a_plugin_bug_is_eio_logged_with_the_plugin_name(
    test_endpoint: DeviceEndpoint,
    connect: Callable[..., VfioUserClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = connect(test_endpoint)
    with caplog.at_level(logging.ERROR, logger=LOGGER_NAME):
        code = error_of(client, Command.REGION_WRITE, RW.pack(REG_BOOM, 0, 4) + b"boom")
    assert code == errno.EIO
    assert any("svtest-mediator" in record.getMessage() for record in caplog.records)
    still_serving(client)


@pytest.mark.parametrize(
    "garbage",
    [
        HEADER.pack(1, Command.REGION_READ, 8, 0, 0),  # smaller than a header
        HEADER.pack(1, Command.REGION_WRITE, 100 << 20, 0, 0) + bytes(64),  # over the limit
        HEADER.pack(1, Command.REGION_READ, 32, 3, 0) + bytes(16),  # neither command nor reply
        HEADER.pack(1, Command.REGION_READ, 32, 0, 0) + bytes(7),  # EOF in the middle
    ],
    ids=["size-below-header", "size-over-limit", "bad-type", "eof-mid-message"],
)
def test_an_untrustworthy_stream_is_closed_and_everything_else_serves_on(
    pair: tuple[DeviceEndpoint, DeviceEndpoint, VfioUserClient],
    connect: Callable[..., VfioUserClient],
    garbage: bytes,
) -> None:
    target, _, bystander = pair
    client = VfioUserClient.connect(target.path)
    client.send_raw(garbage)
    if garbage.endswith(bytes(7)):
        client.sock.shutdown(2)
    else:
        with pytest.raises(ProtocolError):
            client.receive()
    client.close()
    assert target.wait_idle(2)
    still_serving(bystander)
    still_serving(connect(target))


def test_no_fd_leak_over_ten_thousand_requests(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient], eventfd: int
) -> None:
    memfd, memory = anonymous_memory(PAGE)
    before = open_fds()
    client = connect(test_endpoint)
    read = RW.pack(0, CONFIG, 4)
    dma_map = struct.pack("<IIQQQ", 32, 3, 0, 0x8000_0000, PAGE)
    dma_unmap = struct.pack("<IIQQ", 24, 0, 0x8000_0000, PAGE)
    set_irqs = struct.pack("<IIIII", 20, IrqSetFlag.DATA_EVENTFD | 32, IrqIndex.MSIX, 0, 1)
    requests = 0
    for _ in range(2000):
        assert error_of(client, Command.REGION_READ, read, fds=(eventfd,)) == errno.EINVAL
        assert not exchange(client, Command.DMA_MAP, dma_map, fds=(memfd,)).is_error
        assert not exchange(client, Command.DMA_UNMAP, dma_unmap).is_error
        assert not exchange(client, Command.DEVICE_SET_IRQS, set_irqs, fds=(eventfd,)).is_error
        client.region_info(0)  # brings the BAR's fd each time
        requests += 5
    assert requests == 10_000
    client.close()
    assert test_endpoint.wait_idle(2)
    assert open_fds() == before
    memory.close()
    os.close(memfd)
