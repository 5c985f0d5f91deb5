"""``vfio-mediate serve`` as a user runs it: a subprocess, a real client, Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
import struct
import subprocess
from pathlib import Path

import pytest
from server_testlib import start

from vfio_mediate import AccessError, ProtocolError
from vfio_mediate.server import VfioUserClient

NO_SUCH_REGION = 42


def stop(process: subprocess.Popen[str], signum: int) -> tuple[int, str]:
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=15)
    return process.returncode, stderr


def test_serve_a_device_until_ctrl_c(socket_dir: Path) -> None:
    path = socket_dir / "vf.sock"
    process, output = start(["serve", "--device", "i40e-vf", "--socket", str(path)])
    try:
        assert f'"path":"{path}"' in output and "vfio-user-pci" in output
        assert "share=on" in output
        with VfioUserClient.connect(path) as client:
            assert struct.unpack("<HH", client.read(7, 0, 4)) == (0x8086, 0x154C)
            with pytest.raises(AccessError):
                client.read(NO_SUCH_REGION, 0, 4)
    finally:
        status, stderr = stop(process, signal.SIGINT)
    assert status == 0, stderr
    assert not path.exists()
    sessions = [line for line in stderr.splitlines() if "session of pid" in line]
    assert len(sessions) == 1, stderr
    assert "refused" not in stderr, "without -v a refused request is not logged"


def test_ctrl_c_with_clients_connected_ends_their_sessions_and_exits(socket_dir: Path) -> None:
    first, second = socket_dir / "a.sock", socket_dir / "b.sock"
    devices = ["--device", "i40e-vf", "--device", "i40e-vf"]
    process, _ = start(["serve", *devices, "--socket", str(first), "--socket", str(second)])
    clients = [VfioUserClient.connect(first), VfioUserClient.connect(second)]
    try:
        for client in clients:
            client.read(7, 0, 4)  # both sessions are up and idle in their reads
        status, stderr = stop(process, signal.SIGINT)
        assert status == 0, stderr
        ended = [line for line in stderr.splitlines() if "the server stops serving" in line]
        assert len(ended) == 2, stderr
        for client in clients:
            with pytest.raises(ProtocolError, match="the server closed the connection"):
                client.read(7, 0, 4)
    finally:
        for client in clients:
            client.close()


def test_verbose_serve_logs_each_refused_request(socket_dir: Path) -> None:
    path = socket_dir / "vf.sock"
    process, _ = start(["-v", "serve", "--socket", str(path)])
    try:
        with VfioUserClient.connect(path) as client, pytest.raises(AccessError):
            client.read(NO_SUCH_REGION, 0, 4)
    finally:
        status, stderr = stop(process, signal.SIGTERM)
    assert status == 0, stderr
    refusals = [line for line in stderr.splitlines() if "refused" in line]
    assert len(refusals) == 1 and "i40e-vf#1: REGION_READ refused with EINVAL" in refusals[0]


def test_a_device_given_twice_is_numbered_alike_in_name_and_socket(socket_dir: Path) -> None:
    arguments = ["serve", "--device", "i40e-vf", "--device", "i40e-vf", "--device", "i40e-vf"]
    process, output = start(arguments, env={"XDG_RUNTIME_DIR": str(socket_dir)})
    directory = socket_dir / "vfio-mediate"
    try:
        for name in ("i40e-vf", "i40e-vf-1", "i40e-vf-2"):
            assert f"serving {name} (8086:154c) on {directory / name}.sock\n" in output
            with VfioUserClient.connect(directory / f"{name}.sock") as client:
                assert client.device_info().num_regions >= 9
    finally:
        status, stderr = stop(process, signal.SIGTERM)
    assert status == 0, stderr


def test_serve_with_no_arguments_uses_the_runtime_directory(socket_dir: Path) -> None:
    process, output = start(["serve"], env={"XDG_RUNTIME_DIR": str(socket_dir)})
    path = socket_dir / "vfio-mediate" / "i40e-vf.sock"
    try:
        assert str(path) in output
        assert (path.parent.stat().st_mode & 0o777) == 0o700
        with VfioUserClient.connect(path) as client:
            assert client.device_info().num_regions >= 9  # a mediator may add regions
    finally:
        status, stderr = stop(process, signal.SIGTERM)
    assert status == 0, stderr
    assert not path.exists()
