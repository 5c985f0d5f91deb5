"""Fixtures that run the real QEMU (11.1, ``vfio-user-pci``) against served devices.

QEMU comes from ``scripts/provision_qemu.py`` (a Debian trixie root, cached). In CI
(``CI=true``) a failure to provision fails the tests; elsewhere they skip, saying why.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from distributions import load_provisioner

from vfio_mediate import MediatedDevice, MediatorRegistry, create_device
from vfio_mediate.server import BackgroundServer, DeviceEndpoint

from .qmp import Qmp

GUEST_RAM = "128M"


@pytest.fixture(scope="session")
def provisioner() -> ModuleType:
    """The provisioning script's module."""
    return load_provisioner()


@pytest.fixture(scope="session")
def qemu_root(provisioner: ModuleType) -> Any:
    """A provisioned QEMU (``Provision``): made once, then taken from the cache."""
    try:
        return provisioner.provision()
    except provisioner.ProvisionError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the QEMU tests, but QEMU could not be provisioned: {exc}")
        pytest.skip(f"QEMU with vfio-user-pci cannot be provisioned here: {exc}")


@dataclass
class RunningVm:
    """A QEMU process, its QMP connection and its log file."""

    process: subprocess.Popen[bytes]
    qmp: Qmp
    log: Path
    serial: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def log_text(self) -> str:
        """What QEMU printed so far."""
        return self.log.read_text(errors="replace")


def device_option(socket_in_root: str) -> str:
    """The ``-device`` option that attaches a vfio-user device (JSON form)."""
    return json.dumps(
        {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": socket_in_root}}
    )


@pytest.fixture
def start_vm(
    qemu_root: Any, provisioner: ModuleType, tmp_path: Path
) -> Iterator[Callable[..., RunningVm]]:
    """Start QEMU (q35, TCG, no display, guest RAM in a shared memfd) with extra arguments;
    every QEMU started is stopped after the test."""
    shared = provisioner.shared_dir(qemu_root)
    started: list[RunningVm] = []

    def start(*arguments: str, serial: bool = False) -> RunningVm:
        name = uuid.uuid4().hex[:8]
        qmp_path = shared / f"qmp-{name}.sock"
        log = tmp_path / f"qemu-{name}.log"
        serial_path = shared / f"serial-{name}.txt" if serial else None
        argv = [
            qemu_root.qemu, "-machine", "q35,accel=tcg,memory-backend=mem", "-m", GUEST_RAM,
            "-object", f"memory-backend-memfd,id=mem,size={GUEST_RAM},share=on",
            "-display", "none", "-nodefaults", "-no-reboot",
            "-qmp", f"unix:/run/vfio-mediate/{qmp_path.name},server=on,wait=off",
            *(["-serial", f"file:/run/vfio-mediate/{serial_path.name}"] if serial_path else []),
            *arguments,
        ]  # fmt: skip
        with log.open("wb") as sink:
            process = provisioner.run_in_root(
                qemu_root, argv, stdout=sink, stderr=subprocess.STDOUT
            )
        try:
            qmp = Qmp(qmp_path, timeout=30)
        except OSError:
            process.kill()
            process.wait()
            pytest.fail(f"QEMU did not start: {log.read_text(errors='replace')}")
        vm = RunningVm(process, qmp, log, serial_path)
        started.append(vm)
        return vm

    yield start
    for vm in started:
        with contextlib.suppress(Exception):
            vm.qmp.command("quit")
        with contextlib.suppress(Exception):
            vm.qmp.close()
        try:
            vm.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            vm.process.kill()
            vm.process.wait()
        if vm.serial is not None:
            vm.serial.unlink(missing_ok=True)


@dataclass
class ServedDevice:
    """A device served in this process, where the test can look inside."""

    device: MediatedDevice
    endpoint: DeviceEndpoint
    socket_in_root: str


@pytest.fixture
def serve(qemu_root: Any, provisioner: ModuleType) -> Iterator[Callable[..., ServedDevice]]:
    """Serve a device (model name or spec) from an in-process server on a socket QEMU sees."""
    shared = provisioner.shared_dir(qemu_root)
    server = BackgroundServer()
    backends = []

    def serve_device(
        spec: str = "i40e-vf", registry: MediatorRegistry | None = None
    ) -> ServedDevice:
        backend = create_device(spec)
        backends.append(backend)
        device = MediatedDevice(backend, registry or MediatorRegistry.from_entry_points())
        path = shared / f"vf-{uuid.uuid4().hex[:8]}.sock"
        endpoint = server.add(device, path)
        return ServedDevice(device, endpoint, f"/run/vfio-mediate/{path.name}")

    yield serve_device
    server.close()
    for backend in backends:
        backend.close()
