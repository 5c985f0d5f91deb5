"""``vfio-mediate serve`` as a user runs it: a subprocess, a real client, Ctrl-C or SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

from vfio_mediate.server import VfioUserClient

STARTUP_TIMEOUT = 30.0


def serve_command(*arguments: str) -> list[str]:
    script = shutil.which("vfio-mediate", path=str(Path(sys.executable).parent))
    if script is not None:
        return [script, *arguments]
    return [
        sys.executable,
        "-c",
        "import sys; from vfio_mediate.cli import main; sys.exit(main())",
        *arguments,
    ]


def start(
    arguments: list[str], env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], str]:
    """Start the server and return it with its output up to "Ctrl-C stops"."""
    process = subprocess.Popen(
        serve_command(*arguments),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert process.stdout is not None
    watchdog = threading.Timer(STARTUP_TIMEOUT, process.kill)
    watchdog.start()
    lines: list[str] = []
    try:
        while not lines or not lines[-1].startswith("Ctrl-C stops"):
            line = process.stdout.readline()
            if not line:
                raise AssertionError(f"the server did not start: {process.communicate()}")
            lines.append(line)
    finally:
        watchdog.cancel()
    return process, "".join(lines)


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
    finally:
        status, stderr = stop(process, signal.SIGINT)
    assert status == 0, stderr
    assert not path.exists()
    sessions = [line for line in stderr.splitlines() if "session of pid" in line]
    assert len(sessions) == 1, stderr


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
