"""The socket's safety (mode, directory, stale files), who may connect, one client at a time,
and sessions that come and go while the device keeps its state."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import socket
import stat
import struct
import subprocess
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from server_testlib import (
    CMD_FILL,
    PAGE,
    REG_DOORBELL,
    REG_SRC,
    REG_STALL,
    TrapMediator,
)

from vfio_mediate import MediatedDevice
from vfio_mediate.server import (
    LOGGER_NAME,
    BackgroundServer,
    Command,
    DeviceEndpoint,
    ProtocolError,
    VfioUserClient,
    pack_message,
)

IOVA = 0x1_0000_0000


def test_socket_is_private_and_removed_when_serving_stops(
    server: BackgroundServer, test_endpoint: DeviceEndpoint
) -> None:
    mode = test_endpoint.path.lstat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    server.remove(test_endpoint)
    assert not test_endpoint.path.exists()


def test_unsafe_directories_are_refused(
    server: BackgroundServer,
    make_test_device: Callable[[str], MediatedDevice],
    socket_dir: Path,
) -> None:
    device = make_test_device("svtest-dir")
    shared = socket_dir / "shared"
    shared.mkdir(mode=0o700)
    shared.chmod(0o777)
    with pytest.raises(PermissionError, match="writable by others"):
        server.add(device, shared / "dev.sock")
    if os.geteuid() == 0:
        foreign = socket_dir / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 65534, 65534)
    else:
        foreign = Path("/")
    with pytest.raises(PermissionError, match="owned by uid"):
        server.add(device, foreign / "dev.sock")


def test_existing_files_stale_sockets_and_live_sockets(
    server: BackgroundServer,
    make_test_device: Callable[[str], MediatedDevice],
    socket_dir: Path,
) -> None:
    device = make_test_device("svtest-files")
    regular = socket_dir / "regular.sock"
    regular.write_text("not a socket")
    with pytest.raises(FileExistsError):
        server.add(device, regular)
    stale = socket_dir / "stale.sock"
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(str(stale))
    leftover.close()
    endpoint = server.add(device, stale)
    with VfioUserClient.connect(stale) as client:
        assert client.device_info().num_regions == 9
    with pytest.raises(OSError) as busy:
        server.add(make_test_device("svtest-other"), stale)
    assert busy.value.errno == errno.EADDRINUSE
    live = socket_dir / "live.sock"
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(live))
    other.listen()
    try:
        with pytest.raises(OSError) as taken:
            server.add(make_test_device("svtest-live"), live)
        assert taken.value.errno == errno.EADDRINUSE
    finally:
        other.close()
    server.remove(endpoint)


def test_a_second_client_is_refused_while_the_first_is_connected(
    test_endpoint: DeviceEndpoint,
    connect: Callable[..., VfioUserClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = connect(test_endpoint)
    with (
        caplog.at_level(logging.WARNING, logger=LOGGER_NAME),
        pytest.raises((ProtocolError, ConnectionError)),
    ):
        VfioUserClient.connect(test_endpoint.path)
    assert test_endpoint.refused == 1
    assert any("already has a client" in record.getMessage() for record in caplog.records)
    assert first.device_info().num_regions == 9


def test_a_peer_of_another_uid_is_refused(
    make_test_device: Callable[[str], MediatedDevice],
    socket_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with BackgroundServer(allow_uids=[os.geteuid() + 1]) as strict:
        endpoint = strict.add(make_test_device("svtest-uid"), socket_dir / "uid.sock")
        with (
            caplog.at_level(logging.WARNING, logger=LOGGER_NAME),
            pytest.raises((ProtocolError, ConnectionError)),
        ):
            VfioUserClient.connect(endpoint.path)
        assert endpoint.refused == 1 and endpoint.sessions_served == 0
    assert any("is not allowed" in record.getMessage() for record in caplog.records)


def test_reconnects_keep_the_device_state_and_reopen_the_mediator(
    test_endpoint: DeviceEndpoint, mediator: TrapMediator
) -> None:
    for number in range(20):
        # No waiting between sessions: a client that hung up gives way to the next one.
        with VfioUserClient.connect(test_endpoint.path) as client:
            if number:
                assert client.read(0, REG_SRC, 4) == (number - 1).to_bytes(4, "little")
            client.write(0, REG_SRC, number.to_bytes(4, "little"))
    assert test_endpoint.wait_idle(2)
    assert test_endpoint.sessions_served == 20 and test_endpoint.refused == 0
    assert len(mediator.handles) == 20, "each session opens the device anew"
    assert not test_endpoint.device.is_open


def test_many_devices_in_one_server(
    make_test_device: Callable[[str], MediatedDevice],
    serve: Callable[[MediatedDevice], DeviceEndpoint],
    connect: Callable[..., VfioUserClient],
) -> None:
    endpoints = [serve(make_test_device(f"svtest-many{n}")) for n in range(8)]
    clients = [connect(endpoint) for endpoint in endpoints]
    for number, client in enumerate(clients):
        client.write(0, REG_SRC, number.to_bytes(4, "little"))
    for number, client in enumerate(clients):
        assert client.read(0, REG_SRC, 4) == number.to_bytes(4, "little")


def test_removing_a_device_closes_a_client_waiting_for_the_last_one_to_finish(
    server: BackgroundServer, test_endpoint: DeviceEndpoint, mediator: TrapMediator
) -> None:
    first = VfioUserClient.connect(test_endpoint.path)
    first.dma_map_messages(IOVA, bytearray(PAGE))
    first.write(0, REG_SRC, struct.pack("<QQI", 0x11, IOVA, 8))
    first.write(0, REG_DOORBELL, struct.pack("<I", CMD_FILL))  # DMA by messages: a worker now
    first.send_raw(
        pack_message(1, Command.REGION_WRITE, struct.pack("<QII", REG_STALL, 0, 4) + bytes(4))
    )
    assert mediator.stalled.wait(5)
    first.sock.shutdown(socket.SHUT_WR)  # hung up, its last command still running
    second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    second.settimeout(2)
    remover = threading.Thread(target=server.remove, args=(test_endpoint,))
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        try:
            second.connect(str(test_endpoint.path))
            server.call(welcome_waits_for_the_last_session(test_endpoint))
            remover.start()  # cancels the welcome of the second client
            assert second.recv(1) == b"", "the second client is let go at once"
        finally:
            mediator.release.set()
            if remover.is_alive():
                remover.join(15)
            first.close()
            second.close()
        gc.collect()
    # Left to the garbage collector, the server's end of the connection would warn.
    unclosed = [str(w.message) for w in caught if str(test_endpoint.path) in str(w.message)]
    assert not unclosed
    assert test_endpoint.sessions_served == 1 and test_endpoint.session is None


async def welcome_waits_for_the_last_session(endpoint: DeviceEndpoint) -> None:
    """Return once the endpoint's accept task waits in ``Session.finish`` (of the last client)."""
    accepting = next(
        task
        for task in asyncio.all_tasks()
        if task.get_name() == f"vfio-user accept {endpoint.name}"
    )
    for _ in range(500):
        awaiting: Any = accepting.get_coro()
        while awaiting is not None:
            if getattr(awaiting, "__name__", "") == "finish":
                return
            awaiting = getattr(awaiting, "cr_await", None)
        await asyncio.sleep(0.01)
    raise AssertionError("the server never waited for the last session")


VERSION_PROBE = """
import socket, struct, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    sock.connect(sys.argv[1])
except PermissionError:
    sys.exit(13)
sock.sendall(struct.pack("<HHIIIHH", 1, 1, 20, 0, 0, 0, 0))
reply = sock.recv(16)
sys.exit(0 if len(reply) == 16 and struct.unpack("<HHIII", reply)[3] == 1 else 1)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run clients as other users")
def test_allow_uid_opens_the_socket_to_that_user_only(
    make_test_device: Callable[[str], MediatedDevice], socket_dir: Path
) -> None:
    allowed, stranger = 64_123, 64_124
    with BackgroundServer(allow_uids=[os.geteuid(), allowed]) as shared:
        endpoint = shared.add(make_test_device("svtest-shared"), socket_dir / "shared.sock")
        mode = endpoint.path.stat().st_mode
        assert not mode & (stat.S_IRWXO), "nothing for others"
        assert not socket_dir.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)

        def probe(uid: int) -> int:
            # /usr/bin/python3: the test's own interpreter may live where uid cannot read.
            command = ["/usr/bin/python3", "-c", VERSION_PROBE, str(endpoint.path)]
            return subprocess.run(command, user=uid, group=uid, timeout=30).returncode

        assert probe(allowed) == 0, "the allowed user negotiates"
        assert endpoint.wait_idle(2) and endpoint.sessions_served == 1
        assert probe(stranger) == 13, "anyone else cannot even connect"
        assert endpoint.refused == 0
