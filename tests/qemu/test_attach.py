"""QEMU's own vfio-user client attaches to devices this project serves."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from vfio_mediate import MediatorRegistry
from vfio_mediate.uapi import RegionIndex

from .conftest import RunningVm, ServedDevice, device_option
from .qmp import find_pci_device

I40E_VF = (0x8086, 0x154C)
COMMAND = shutil.which("vfio-mediate") or str(Path(sys.executable).parent / "vfio-mediate")


def wait_for_bars(vm: RunningVm, timeout: float = 30.0) -> dict[str, Any]:
    """The device's ``query-pci`` entry once the firmware has assigned its BARs."""
    deadline = time.monotonic() + timeout
    while True:
        entry = find_pci_device(vm.qmp, *I40E_VF)
        assert entry is not None, vm.log_text()
        bars = {bar["bar"]: bar for bar in entry["regions"]}
        if all(bar["address"] not in (0, -1) for bar in bars.values()):
            return entry
        if time.monotonic() > deadline:
            raise AssertionError(f"BARs never assigned: {entry}\n{vm.log_text()}")
        time.sleep(0.2)


def test_device_realizes_with_its_bars(
    serve: Callable[..., ServedDevice], start_vm: Callable[..., RunningVm]
) -> None:
    served = serve()
    vm = start_vm("-device", device_option(served.socket_in_root))
    entry = wait_for_bars(vm)
    bars = {bar["bar"]: bar for bar in entry["regions"]}
    assert bars[0]["size"] == 64 * 1024 and bars[0]["mem_type_64"]
    assert bars[3]["size"] == 16 * 1024
    assert entry["class_info"]["class"] == 0x0200
    # ERR and REQ vectors are offered, so QEMU registers its notifiers without complaint
    assert "Could not enable error recovery" not in vm.log_text()
    # SeaBIOS's BAR assignment reached the device's own config space through the server
    config = served.device.read(RegionIndex.CONFIG, 0x10, 8)
    assert int.from_bytes(config, "little") & ~0xF == bars[0]["address"]


def test_firmware_config_writes_go_through_the_mediator(
    serve: Callable[..., ServedDevice],
    start_vm: Callable[..., RunningVm],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the null mediator (which mediates every region) and the device model, nothing else
    monkeypatch.setenv("VFIO_MEDIATE_ONLY", "null,i40e-vf")
    served = serve(registry=MediatorRegistry.from_entry_points())
    vm = start_vm("-device", device_option(served.socket_in_root))
    wait_for_bars(vm)
    assert served.device.mediator is not None and served.device.mediator.name == "null"
    counts = served.device.handle
    assert counts.writes[RegionIndex.CONFIG] > 0, counts
    assert counts.reads[RegionIndex.CONFIG] > 0, counts
    assert counts.region_infos >= 9


def test_the_served_command_line_attaches(
    qemu_root: Any, provisioner: ModuleType, start_vm: Callable[..., RunningVm]
) -> None:
    """The user's path: ``vfio-mediate serve`` in one process, QEMU in another."""
    socket_path = provisioner.shared_dir(qemu_root) / f"cli-{os.getpid()}.sock"
    server = subprocess.Popen(
        [COMMAND, "serve", "--device", "i40e-vf", "--socket", str(socket_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    printed = b""
    try:
        assert server.stdout is not None
        fd = server.stdout.fileno()
        deadline = time.monotonic() + 30
        while b"Ctrl-C stops" not in printed:  # printed once every socket listens
            left = deadline - time.monotonic()
            assert left > 0 and select.select([fd], [], [], left)[0], f"no server: {printed!r}"
            chunk = os.read(fd, 4096)
            assert chunk, f"the server exited: {printed!r}"
            printed += chunk
        vm = start_vm("-device", device_option(f"/run/vfio-mediate/{socket_path.name}"))
        entry = wait_for_bars(vm)
        assert {bar["bar"] for bar in entry["regions"]} == {0, 3}
    finally:
        server.send_signal(signal.SIGINT)
        try:
            out, err = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.communicate()
            raise
    assert server.returncode == 0, err
    assert not socket_path.exists()
    assert b"vfio-user-pci" in printed + out
