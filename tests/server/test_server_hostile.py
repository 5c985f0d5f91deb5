"""Hostile clients: what one client makes the server hold is bounded (fds, memory, time), and
no client takes another device's service away."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from server_testlib import PAGE, REG_SPIN, REG_SRC, SPIN, TrapMediator, start

from vfio_mediate import AccessError, MediatedDevice, ProtocolError, anonymous_memory
from vfio_mediate.server import (
    LOGGER_NAME,
    BackgroundServer,
    Command,
    DeviceEndpoint,
    ServerConfig,
    VfioUserClient,
    pack_message,
)
from vfio_mediate.uapi import MigrationState, RegionIndex

IOVA = 0x1_0000_0000
MAX_FDS = 256
"""The RLIMIT_NOFILE a subprocess server gets here."""


def open_fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def two_devices(
    socket_dir: Path, max_fds: int, *options: str
) -> tuple[subprocess.Popen[str], Path, Path]:
    """``vfio-mediate [options] serve`` of two VFs under an fd limit of ``max_fds``."""
    first, second = socket_dir / "a.sock", socket_dir / "b.sock"
    arguments = [*options, "serve", "--device", "i40e-vf", "--device", "i40e-vf"]
    process, _ = start(
        [*arguments, "--socket", str(first), "--socket", str(second)], max_fds=max_fds
    )
    return process, first, second


def test_unread_replies_never_exhaust_the_servers_fds(socket_dir: Path) -> None:
    # Every region info reply of BAR0 brings the BAR's fd; a client that never reads them
    # once made the server keep a dup of it per reply, up to RLIMIT_NOFILE.
    process, attacked, other = two_devices(socket_dir, MAX_FDS)
    try:
        attacker = VfioUserClient.connect(attacked)
        # Large replies first fill the socket; then each reply waits with its fd.
        whole_bar = struct.pack("<QII", 0, RegionIndex.BAR0, 64 << 10)
        request = struct.pack("<IIIIQQ", 4096, 0, RegionIndex.BAR0, 0, 0, 0)  # room for caps
        burst = b"".join(
            pack_message(number, Command.REGION_READ, whole_bar) for number in range(64)
        ) + b"".join(
            pack_message(number & 0xFFFF, Command.DEVICE_GET_REGION_INFO, request)
            for number in range(20_000)
        )
        attacker.sock.settimeout(2)
        with contextlib.suppress(TimeoutError):  # the server reads only while it can reply
            attacker.sock.sendall(burst)
        time.sleep(0.5)
        assert open_fd_count(process.pid) < MAX_FDS // 2
        with VfioUserClient.connect(other) as bystander:
            info = bystander.region_info(RegionIndex.BAR0)
            assert info.mmap_areas() and bystander.region_fd(RegionIndex.BAR0) is not None
        attacker.close()
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=15)


def test_max_dma_maps_is_what_the_fd_limit_holds_and_the_limit_is_told(socket_dir: Path) -> None:
    process, first_path, second_path = two_devices(socket_dir, MAX_FDS)
    memfd, memory = anonymous_memory(PAGE)
    try:
        first = VfioUserClient.connect(first_path)
        offered = first.server_capabilities.max_dma_maps
        assert 0 < offered < MAX_FDS // 2, "two devices share one fd limit"
        for number in range(offered):
            first.dma_map(IOVA + number * PAGE, PAGE, memfd)
        with pytest.raises(AccessError) as refused:
            first.dma_map(IOVA + offered * PAGE, PAGE, memfd)
        assert refused.value.errno == errno.ENOSPC
        # The other device still maps as much as it was offered.
        with VfioUserClient.connect(second_path) as second:
            for number in range(second.server_capabilities.max_dma_maps):
                second.dma_map(IOVA + number * PAGE, PAGE, memfd)
        first.close()
    finally:
        memory.close()
        os.close(memfd)
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=15)


def test_fds_the_server_cannot_receive_are_emfile_naming_the_limit(socket_dir: Path) -> None:
    process, first_path, _ = two_devices(socket_dir, MAX_FDS, "-v")
    memfd, memory = anonymous_memory(PAGE)
    try:
        with VfioUserClient.connect(first_path) as client:
            in_use = {int(name) for name in os.listdir(f"/proc/{process.pid}/fd")}
            lowest_free = min(set(range(len(in_use) + 1)) - in_use)
            # The next fd the server gets would be at or above its limit.
            resource.prlimit(process.pid, resource.RLIMIT_NOFILE, (lowest_free, MAX_FDS))
            with pytest.raises(AccessError) as refused:
                client.dma_map(IOVA, PAGE, memfd)
            assert refused.value.errno == errno.EMFILE
            resource.prlimit(process.pid, resource.RLIMIT_NOFILE, (MAX_FDS, MAX_FDS))
            client.dma_map(IOVA, PAGE, memfd)  # the session goes on
    finally:
        memory.close()
        os.close(memfd)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=15)
    assert "no fd left for this message's fds (RLIMIT_NOFILE" in stderr


def test_dma_map_beyond_what_mmap_takes_is_einval_not_a_mediator_bug(
    test_endpoint: DeviceEndpoint,
    connect: Callable[..., VfioUserClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = connect(test_endpoint)
    zero = os.open("/dev/zero", os.O_RDWR)
    try:
        with caplog.at_level(logging.ERROR, logger=LOGGER_NAME):
            for size, offset in ((1 << 63, 0), (PAGE, 1 << 63), (1 << 64 - 1, PAGE)):
                with pytest.raises(AccessError) as refused:
                    client.dma_map(IOVA, size, zero, offset)
                assert refused.value.errno == errno.EINVAL
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        client.dma_map(IOVA, PAGE, zero)  # the session goes on
    finally:
        os.close(zero)


def test_migration_data_written_is_bounded_and_the_other_device_serves_on(
    make_test_device: Callable[[str], MediatedDevice],
    socket_dir: Path,
    connect: Callable[..., VfioUserClient],
) -> None:
    limit = 1 << 20
    with BackgroundServer(ServerConfig(max_migration_data=limit)) as background:
        target = background.add(make_test_device("svtest-load"), socket_dir / "l.sock")
        other = connect(background.add(make_test_device("svtest-other"), socket_dir / "o.sock"))
        client = connect(target)
        client.set_migration_state(MigrationState.RESUMING)
        client.write_migration_data(bytes(limit))
        with pytest.raises(AccessError) as refused:
            client.write_migration_data(b"one byte too many")
        assert refused.value.errno == errno.EFBIG
        assert other.read(0, REG_SRC, 4) == bytes(4)
        # A new RESUMING starts counting anew.
        with pytest.raises(AccessError):  # zeros are no device state: loading them fails
            client.set_migration_state(MigrationState.STOP)
        assert client.migration_state is MigrationState.ERROR
        client.reset()
        client.set_migration_state(MigrationState.RESUMING)
        client.write_migration_data(bytes(PAGE))


@pytest.mark.parametrize("left_in", [MigrationState.STOP, MigrationState.STOP_COPY])
def test_a_device_left_stopped_is_resumed_and_the_next_session_told_the_truth(
    test_endpoint: DeviceEndpoint,
    mediator: TrapMediator,
    caplog: pytest.LogCaptureFixture,
    left_in: MigrationState,
) -> None:
    name = test_endpoint.name
    with VfioUserClient.connect(test_endpoint.path) as client:
        client.set_migration_state(left_in)
        assert mediator.states[name] == left_in
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        assert test_endpoint.wait_idle(2)
    assert f"left the device in {left_in.name}: resumed" in caplog.text
    with VfioUserClient.connect(test_endpoint.path) as client:
        told = client.migration_state
        assert told is MigrationState.RUNNING and mediator.states[name] == told


def test_a_device_left_resuming_garbage_is_reset(
    test_endpoint: DeviceEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    with VfioUserClient.connect(test_endpoint.path) as client:
        client.set_migration_state(MigrationState.RESUMING)
        client.write_migration_data(b"not a device state")
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        assert test_endpoint.wait_idle(2)
    assert "left the device in RESUMING and it cannot resume" in caplog.text
    with VfioUserClient.connect(test_endpoint.path) as client:
        assert client.migration_state is MigrationState.RUNNING


FLOODER = """
import socket, struct, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
text = b'{"capabilities":{}}\\0'
sock.sendall(struct.pack("<HHIIIHH", 0, 1, 20 + len(text), 0, 0, 0, 0) + text)
sock.recv(4096)
read = struct.pack("<QII", int(sys.argv[2]), 0, 4)
sock.sendall(b"".join(
    struct.pack("<HHIII", n, 9, 32, 0, 0) + read for n in range(1, 2049)
))  # 64 KiB: what one read of the server takes at once
print("sent", flush=True)
got = 0
while got < 2048 * 36:
    got += len(sock.recv(1 << 16))
"""


def test_pipelined_slow_requests_of_one_client_do_not_hold_up_another_device(
    make_test_device: Callable[[str], MediatedDevice],
    serve: Callable[[MediatedDevice], DeviceEndpoint],
    connect: Callable[..., VfioUserClient],
) -> None:
    flooded = serve(make_test_device("svtest-flooded"))
    bystander = connect(serve(make_test_device("svtest-bystander")))
    # 2048 requests of about 1 ms each, from a process of its own (as a VMM would be).
    flooder = subprocess.Popen(
        [sys.executable, "-c", FLOODER, str(flooded.path), str(REG_SPIN)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert flooder.stdout is not None and flooder.stdout.readline() == "sent\n"
    worst = 0.0
    for _ in range(20):
        started = time.monotonic()
        bystander.read(0, REG_SRC, 4)
        worst = max(worst, time.monotonic() - started)
    assert flooder.wait(30) == 0
    # The whole pipeline takes 2048 * SPIN; a fifth of that leaves room for a loaded machine.
    assert worst < 400 * SPIN, f"a bystander read waited {worst:.3f} s"


def test_the_client_says_the_server_has_gone(
    test_endpoint: DeviceEndpoint, server: BackgroundServer
) -> None:
    client = VfioUserClient.connect(test_endpoint.path)
    server.remove(test_endpoint)
    with pytest.raises(ProtocolError, match="the server closed the connection"):
        for _ in range(3):  # the first write may still reach the socket buffer
            client.write(0, REG_SRC, b"gone")
    client.close()


def test_a_client_that_reads_no_reply_is_cut_off_after_the_reply_timeout(
    make_test_device: Callable[[str], MediatedDevice],
    socket_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with BackgroundServer(ServerConfig(reply_timeout=0.5)) as background:
        endpoint = background.add(make_test_device("svtest-deaf"), socket_dir / "d.sock")
        deaf = VfioUserClient.connect(endpoint.path)
        read = pack_message(1, Command.REGION_READ, struct.pack("<QII", 0, 0, 4096))
        deaf.sock.settimeout(5)
        with caplog.at_level(logging.INFO):
            with pytest.raises((TimeoutError, OSError)):
                for _ in range(100_000):
                    deaf.sock.sendall(read)
            assert endpoint.wait_idle(5)
        assert "read no reply for 0.5 s" in caplog.text
        deaf.sock.shutdown(socket.SHUT_RDWR)
        deaf.close()
