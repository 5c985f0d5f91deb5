"""DMA over the socket: memfd mappings the device writes into, and memory without an fd that
the device reaches through DMA_READ/DMA_WRITE messages the client serves."""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from server_testlib import CMD_COPY, CMD_FILL, PAGE, REG_DONE, REG_DOORBELL, REG_SRC

from vfio_mediate import AccessError, MediatedDevice, anonymous_memory
from vfio_mediate.server import (
    BackgroundServer,
    Command,
    DeviceEndpoint,
    DmaLayout,
    HeaderFlag,
    ServerConfig,
    VfioUserClient,
    pack_message,
)

IOVA = 0x1_0000_0000


def command(client: VfioUserClient, code: int, src: int, dst: int, length: int) -> None:
    """Program the DMA test device and ring its doorbell (a trapped register write)."""
    client.write(0, REG_SRC, struct.pack("<QQI", src, dst, length))
    client.write(0, REG_DOORBELL, struct.pack("<I", code))


def test_device_writes_into_a_memfd_the_client_mapped(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient]
) -> None:
    client = connect(test_endpoint)
    memory = client.dma_map_memfd(IOVA, 4 * PAGE)
    try:
        command(client, CMD_FILL, 0xAB, IOVA + PAGE + 10, 100)
        assert memory[PAGE + 10 : PAGE + 110] == b"\xab" * 100
        assert memory[PAGE + 9] == 0 and memory[PAGE + 110] == 0
        memory[0:5] = b"hello"
        command(client, CMD_COPY, IOVA, IOVA + 3 * PAGE, 5)
        assert memory[3 * PAGE : 3 * PAGE + 5] == b"hello"
        assert client.read(0, REG_DONE, 4) == struct.pack("<I", 2)
    finally:
        memory.close()
    assert client.dma_requests_served == 0, "fd-backed DMA needs no message"


def test_dma_outside_every_mapping_is_efault_and_read_only_is_eperm(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient]
) -> None:
    client = connect(test_endpoint)
    fd, memory = anonymous_memory(PAGE)
    try:
        client.dma_map(IOVA, PAGE, fd, readable=True, writable=False)
        with pytest.raises(AccessError) as outside:
            command(client, CMD_FILL, 1, IOVA + PAGE, 8)
        assert outside.value.errno == errno.EFAULT
        with pytest.raises(AccessError) as read_only:
            command(client, CMD_FILL, 1, IOVA, 8)
        assert read_only.value.errno == errno.EPERM
        with pytest.raises(AccessError) as overlap:
            client.dma_map(IOVA + PAGE // 2, PAGE, fd)
        assert overlap.value.errno == errno.EEXIST
        with pytest.raises(AccessError) as too_short:
            client.dma_map(IOVA + 8 * PAGE, 2 * PAGE, fd)
        assert too_short.value.errno == errno.EINVAL, "mapping past the file would SIGBUS"
    finally:
        memory.close()
        os.close(fd)


def test_unmap_exact_unmap_all_and_close_drop_the_mappings(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient]
) -> None:
    dma = test_endpoint.device.dma
    assert dma is not None
    client = connect(test_endpoint)
    first = client.dma_map_memfd(IOVA, PAGE)
    second = client.dma_map_memfd(IOVA + PAGE, PAGE)
    with pytest.raises(AccessError) as inexact:
        client.dma_unmap(IOVA, 2 * PAGE)
    assert inexact.value.errno == errno.EINVAL
    client.dma_unmap(IOVA, PAGE)
    assert [m.iova for m in dma.mappings] == [IOVA + PAGE]
    client.dma_unmap_all()
    assert dma.mappings == ()
    client.dma_map_memfd(IOVA, PAGE).close()
    client.close()
    assert test_endpoint.wait_idle(2)
    assert dma.mappings == (), "a disconnect drops the client's mappings"
    first.close()
    second.close()


@pytest.mark.parametrize("layout", [DmaLayout.SPEC, DmaLayout.QEMU_10])
def test_device_dma_by_messages_is_served_by_the_client(
    make_test_device: Callable[[str], MediatedDevice],
    socket_dir: Path,
    connect: Callable[..., VfioUserClient],
    layout: DmaLayout,
) -> None:
    with BackgroundServer(ServerConfig(dma_layout=layout)) as background:
        endpoint = background.add(make_test_device("svtest-layout"), socket_dir / "dma.sock")
        client = connect(endpoint, dma_layout=layout)
        guest = bytearray(4 * PAGE)
        client.dma_map_messages(IOVA, guest)
        command(client, CMD_FILL, 0x5A, IOVA + 100, 300)
        assert guest[100:400] == b"\x5a" * 300 and guest[99] == 0 and guest[400] == 0
        guest[PAGE : PAGE + 11] = b"from guest!"
        command(client, CMD_COPY, IOVA + PAGE, IOVA + 2 * PAGE + 1, 11)
        assert guest[2 * PAGE + 1 : 2 * PAGE + 12] == b"from guest!"
        assert client.dma_requests_served == 3  # a write, then a read and a write
        session = endpoint.session
        assert session is not None and session.dma_layout is layout
        client.close()


def test_dma_reads_are_cut_to_64_kib_for_qemu(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient]
) -> None:
    client = connect(test_endpoint)
    size = 200 << 10
    guest = bytearray(2 * size)
    client.dma_map_messages(IOVA, guest)
    guest[:size] = os.urandom(size)
    command(client, CMD_COPY, IOVA, IOVA + size, size)
    assert guest[size:] == guest[:size]
    assert client.dma_requests_served == 4 + 1  # reads of <= 64 KiB, one write of 200 KiB


def test_message_dma_is_cut_to_the_clients_transfer_size(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient]
) -> None:
    client = connect(test_endpoint, max_data_xfer_size=PAGE)
    guest = bytearray(6 * PAGE)
    client.dma_map_messages(IOVA, guest)
    length, target = 2 * PAGE + 3, 3 * PAGE - 5
    guest[:length] = os.urandom(length)
    command(client, CMD_COPY, IOVA, IOVA + target, length)
    assert guest[target : target + length] == guest[:length]
    assert client.dma_requests_served == 6  # three reads and three writes of <= 4 KiB


def test_message_dma_mixed_with_fd_memory_and_client_errors(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient]
) -> None:
    client = connect(test_endpoint)
    guest = bytearray(PAGE)
    client.dma_map_messages(IOVA, guest, writable=False)
    shared = client.dma_map_memfd(IOVA + PAGE, PAGE)
    try:
        guest[:4] = b"ping"
        command(client, CMD_COPY, IOVA, IOVA + PAGE, 4)
        assert shared[:4] == b"ping"
        with pytest.raises(AccessError) as refused:
            command(client, CMD_FILL, 7, IOVA, 4)
        assert refused.value.errno == errno.EPERM, "the server's mapping forbids writing"
    finally:
        shared.close()
    # Mapped for the server, but the client has no memory there: its EFAULT reaches the device.
    client.dma_map(IOVA + 2 * PAGE, PAGE)
    with pytest.raises(AccessError) as lost:
        command(client, CMD_COPY, IOVA + 2 * PAGE, IOVA + PAGE, 4)
    assert lost.value.errno == errno.EFAULT


def test_device_dma_from_another_thread_while_the_client_polls(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient]
) -> None:
    client = connect(test_endpoint)
    guest = bytearray(PAGE)
    client.dma_map_messages(IOVA, guest)
    dma = test_endpoint.device.dma
    assert dma is not None
    done = threading.Event()

    def device_thread() -> None:
        dma.write(IOVA + 8, b"background")
        done.set()

    worker = threading.Thread(target=device_thread)
    worker.start()
    while not done.is_set():
        client.poll(0.05)
    worker.join()
    assert guest[8:18] == b"background"


def test_unanswered_dma_times_out(
    make_test_device: Callable[[str], MediatedDevice],
    socket_dir: Path,
    connect: Callable[..., VfioUserClient],
) -> None:
    with BackgroundServer(ServerConfig(dma_timeout=0.2)) as quick:
        endpoint = quick.add(make_test_device("svtest-slow"), socket_dir / "slow.sock")
        client = connect(endpoint)
        unanswered(client, endpoint)


def unanswered(client: VfioUserClient, test_endpoint: DeviceEndpoint) -> None:
    client.dma_map_messages(IOVA, bytearray(PAGE))
    dma = test_endpoint.device.dma
    assert dma is not None
    failure: list[BaseException] = []

    def device_thread() -> None:
        try:
            dma.read(IOVA, 8)
        except AccessError as exc:
            failure.append(exc)

    worker = threading.Thread(target=device_thread)
    worker.start()
    worker.join(5)
    assert len(failure) == 1 and isinstance(failure[0], AccessError)
    assert failure[0].errno == errno.ETIMEDOUT
    client.poll(0.1)  # the stale request, answered late, is ignored by the server
    assert client.read(0, REG_DONE, 4) == bytes(4)


def test_maps_without_fd_that_the_device_never_uses_cost_no_message(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient]
) -> None:
    # QEMU maps its ROMs without an fd and guest RAM (a memfd backend) with one.
    client = connect(test_endpoint)
    client.dma_map_messages(0xF0000, bytearray(PAGE), writable=False)
    memory = client.dma_map_memfd(IOVA, PAGE)
    try:
        command(client, CMD_FILL, 0x77, IOVA, 64)
        assert memory[:64] == b"\x77" * 64
    finally:
        memory.close()
    assert client.dma_requests_served == 0


def test_commands_pipelined_behind_a_dma_wait_run_after_it_in_order(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient]
) -> None:
    client = connect(test_endpoint)
    guest = bytearray(PAGE)
    client.dma_map_messages(IOVA, guest)
    client.write(0, REG_SRC, struct.pack("<QQI", 0x3C, IOVA, 32))
    ring = pack_message(
        1,
        Command.REGION_WRITE,
        struct.pack("<QII", REG_DOORBELL, 0, 4) + struct.pack("<I", CMD_FILL),
    )
    later = pack_message(2, Command.REGION_WRITE, struct.pack("<QII", REG_SRC, 0, 1) + b"\x99")
    check = pack_message(3, Command.REGION_READ, struct.pack("<QII", REG_SRC, 0, 1))
    done = pack_message(4, Command.REGION_READ, struct.pack("<QII", REG_DONE, 0, 4))
    client.send_raw(ring + later + check + done)
    replies = [client.wait_reply(msg_id) for msg_id in (1, 2, 3, 4)]
    assert not any(reply.is_error for reply in replies)
    assert replies[2].payload[16:] == b"\x99"
    assert replies[3].payload[16:] == struct.pack("<I", 1)
    assert guest[:32] == b"\x3c" * 32 and client.dma_requests_served == 1


def test_a_command_sent_while_a_lone_command_waits_for_dma_runs_right_after_it(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient]
) -> None:
    """The doorbell arrives alone (the read loop's usual path) and waits for the DMA reply;
    a read sent meanwhile is held, and answered as soon as the doorbell is, before a read sent
    after both."""
    client = connect(test_endpoint, timeout=5.0)
    guest = bytearray(PAGE)
    client.dma_map_messages(IOVA, guest)
    client.write(0, REG_SRC, struct.pack("<QQI", 0x3C, IOVA, 32))
    doorbell = struct.pack("<QII", REG_DOORBELL, 0, 4) + struct.pack("<I", CMD_FILL)
    client.send_raw(pack_message(101, Command.REGION_WRITE, doorbell))
    time.sleep(0.2)  # the doorbell is read alone, and waits for its DMA request's reply
    client.send_raw(pack_message(102, Command.REGION_READ, struct.pack("<QII", REG_DONE, 0, 4)))
    time.sleep(0.2)  # read by the session while the doorbell still waits: held
    assert not client.wait_reply(101).is_error  # serves the DMA request on the way
    assert client.dma_requests_served == 1
    assert client.wait_reply(102).payload[16:] == struct.pack("<I", 1)
    client.send_raw(pack_message(103, Command.REGION_READ, struct.pack("<QII", REG_DONE, 0, 4)))
    assert client.receive().msg_id == 103
    assert guest[:32] == b"\x3c" * 32


def test_a_command_held_behind_a_dma_wait_that_fails_still_runs(
    make_test_device: Callable[[str], MediatedDevice],
    socket_dir: Path,
    connect: Callable[..., VfioUserClient],
) -> None:
    """The lone doorbell's DMA request goes unanswered and the doorbell is refused; the read
    held behind it is answered right after the refusal."""
    with BackgroundServer(ServerConfig(dma_timeout=0.5)) as quick:
        endpoint = quick.add(make_test_device("svtest-held"), socket_dir / "held.sock")
        client = connect(endpoint, timeout=5.0)
        client.dma_map_messages(IOVA, bytearray(PAGE))
        client.write(0, REG_SRC, struct.pack("<QQI", 0x3C, IOVA, 32))
        doorbell = struct.pack("<QII", REG_DOORBELL, 0, 4) + struct.pack("<I", CMD_FILL)
        client.send_raw(pack_message(101, Command.REGION_WRITE, doorbell))
        time.sleep(0.1)  # the doorbell is read alone and waits for its DMA request's reply
        done = struct.pack("<QII", REG_DONE, 0, 4)
        client.send_raw(pack_message(102, Command.REGION_READ, done))
        replies = []
        while len(replies) < 2:
            message = client.receive()
            if message.flags & 0xF == HeaderFlag.REPLY:
                replies.append(message)  # the DMA request itself is left unanswered
        assert [reply.msg_id for reply in replies] == [101, 102]
        assert replies[0].is_error and replies[0].error == errno.ETIMEDOUT
        assert not replies[1].is_error and replies[1].payload[16:] == bytes(4)


def test_a_client_that_ignores_dma_holds_up_no_other_device(
    make_test_device: Callable[[str], MediatedDevice],
    socket_dir: Path,
    connect: Callable[..., VfioUserClient],
) -> None:
    config = ServerConfig(dma_timeout=1.0)
    with BackgroundServer(config) as background:
        silent_end = background.add(make_test_device("svtest-silent"), socket_dir / "s.sock")
        other_end = background.add(make_test_device("svtest-other"), socket_dir / "o.sock")
        other = connect(other_end)
        silent = connect(silent_end)
        guest = bytearray(PAGE)
        silent.dma_map_messages(IOVA, guest)
        silent.write(0, REG_SRC, struct.pack("<QQI", IOVA, IOVA + 64, 8))
        ring = struct.pack("<QII", REG_DOORBELL, 0, 4) + struct.pack("<I", CMD_COPY)
        silent.send_raw(pack_message(1, Command.REGION_WRITE, ring))
        request = silent.receive()  # the device's DMA_READ, never answered
        assert request.command == Command.DMA_READ
        started = time.monotonic()
        for value in range(50):
            other.write(0, REG_SRC, value.to_bytes(4, "little"))
            assert other.read(0, REG_SRC, 4) == value.to_bytes(4, "little")
        assert time.monotonic() - started < 0.5, "the other device answers meanwhile"
        reply = silent.receive()
        assert reply.msg_id == 1 and reply.is_error and reply.error == errno.ETIMEDOUT
        # The session goes on: DMA answered in time works.
        guest[:8] = b"answered"
        command(silent, CMD_COPY, IOVA, IOVA + 8, 8)
        assert guest[8:16] == b"answered"


def test_reconnecting_clients_that_ignore_dma_never_hold_up_another_device(
    make_test_device: Callable[[str], MediatedDevice],
    socket_dir: Path,
    connect: Callable[..., VfioUserClient],
) -> None:
    # Each session of the silent device leaves a DMA request unanswered and hangs up: no wait
    # of its own may cost the bystander anything, however often it comes back.
    with BackgroundServer(ServerConfig(dma_timeout=2.0)) as background:
        silent_end = background.add(make_test_device("svtest-silent"), socket_dir / "s.sock")
        other_end = background.add(make_test_device("svtest-other"), socket_dir / "o.sock")
        other = connect(other_end)
        stalled = 0.0
        stop = threading.Event()

        def bystander() -> None:
            nonlocal stalled
            while not stop.is_set():
                started = time.monotonic()
                other.read(0, REG_SRC, 4)
                took = time.monotonic() - started
                if took > 0.1:
                    stalled += took

        reader = threading.Thread(target=bystander)
        reader.start()
        try:
            for _ in range(10):
                silent = VfioUserClient.connect(silent_end.path)
                silent.dma_map_messages(IOVA, bytearray(PAGE))
                silent.write(0, REG_SRC, struct.pack("<QQI", IOVA, IOVA + 64, 8))
                ring = struct.pack("<QII", REG_DOORBELL, 0, 4) + struct.pack("<I", CMD_COPY)
                silent.send_raw(pack_message(1, Command.REGION_WRITE, ring))
                assert silent.receive().command == Command.DMA_READ
                time.sleep(0.25)  # longer than any wait the server could allow itself inline
                silent.close()
                assert silent_end.wait_idle(2)
        finally:
            stop.set()
            reader.join()
        # A wait on a thread every device shares would show here: 0.2 s per session, 2 s in all;
        # half of that leaves room for a loaded machine's scheduling hiccups.
        assert stalled < 1.0, f"the bystander stalled {stalled:.3f} s"
