"""The socket's safety (mode, directory, stale files), who may connect, one client at a time,
and sessions that come and go while the device keeps its state."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from server_testlib import REG_SRC, TrapMediator

from vfio_mediate import MediatedDevice
from vfio_mediate.server import (
    BackgroundServer,
    DeviceEndpoint,
    ProtocolError,
    VfioUserClient,
)


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
        caplog.at_level(logging.WARNING, logger="vfio_mediate.server"),
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
            caplog.at_level(logging.WARNING, logger="vfio_mediate.server"),
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
