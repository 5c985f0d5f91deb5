"""The kinds of guest memory a VMM hands the server for DMA, tried as a hostile client would
and as QEMU 11.1 does: files that can shrink (memory-backend-file on disk or tmpfs,
memory-backend-memfd,seal=off) are served without risking the SIGBUS that would kill every
device of the process, and mapped memory holds no server fd per mapping.

Each scenario runs a server in a child process: on failure the child dies (status -7, SIGBUS),
not the test session."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from distributions import PROVISION_SCRIPT, load_provisioner

TESTS = Path(__file__).parents[1]


SCENARIO = """
import errno, json, os, struct, sys
sys.path.insert(0, sys.argv[1])
from server_testlib import (
    CMD_FILL, PAGE, REG_DOORBELL, REG_SRC, DmaModel, TrapMediator, device_spec,
)
from vfio_mediate import AccessError, EmulatedPciDevice, MediatedDevice, MediatorRegistry
from vfio_mediate.server import BackgroundServer, ServerConfig, VfioUserClient

IOVA = 0x1_0000_0000
directory, kind = sys.argv[2], sys.argv[3]


def fill(client, byte, iova, length):
    client.write(0, REG_SRC, struct.pack("<QQI", byte, iova, length))
    client.write(0, REG_DOORBELL, struct.pack("<I", CMD_FILL))


def outcome(client, byte, iova, length):
    try:
        fill(client, byte, iova, length)
        return "done"
    except AccessError as exc:
        return errno.errorcode[exc.errno]


def open_fds():
    return len(os.listdir("/proc/self/fd"))


registry = MediatorRegistry()
registry.register(TrapMediator(), "svtest-mediator")
backends = [EmulatedPciDevice(device_spec(f"svtest{n}"), DmaModel()) for n in range(2)]
seen = {}
with BackgroundServer(ServerConfig(dma_timeout=2.0)) as server:
    paths = [
        server.add(MediatedDevice(backend, registry), f"{directory}/{backend.name}.sock").path
        for backend in backends
    ]
    victim, bystander = (VfioUserClient.connect(path) for path in paths)
    if kind == "memfd":
        fd = os.memfd_create("guest-ram")  # memory-backend-memfd,seal=off
    else:
        fd = os.open(os.path.join(directory, "guest-ram"), os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 4 * PAGE)
    victim.dma_map(IOVA, 4 * PAGE, fd)
    seen["before"] = outcome(victim, 0xAB, IOVA + 3 * PAGE, 16)
    seen["written"] = os.pread(fd, 16, 3 * PAGE).hex()
    os.ftruncate(fd, PAGE)  # the VMM (or an attacker) takes the memory back
    seen["after_truncate"] = outcome(victim, 0xCD, IOVA + 3 * PAGE, 16)
    seen["size_after"] = os.fstat(fd).st_size
    seen["below_the_end"] = outcome(victim, 0xEF, IOVA + 8, 8)
    memory = bystander.dma_map_memfd(IOVA, PAGE)
    seen["bystander"] = outcome(bystander, 0x11, IOVA, 4)
    seen["bystander_memory"] = bytes(memory[:4]).hex()
    memory.close()
    os.ftruncate(fd, 4 * PAGE)
    seen["regrown"] = outcome(victim, 0x22, IOVA + 3 * PAGE, 4)
    os.close(fd)

    sealed = os.memfd_create("sealed", os.MFD_ALLOW_SEALING)
    os.ftruncate(sealed, 300 * PAGE)
    before = open_fds()
    for page in range(300):
        victim.dma_map(2 * IOVA + page * PAGE, PAGE, sealed, page * PAGE)
    seen["server_fds_for_300_maps"] = open_fds() - before
    seen["sealed_dma"] = outcome(victim, 0x33, 2 * IOVA + 299 * PAGE, 4)
    seen["sealed_memory"] = os.pread(sealed, 4, 299 * PAGE).hex()
    os.close(sealed)
    victim.close()
    bystander.close()
print(json.dumps(seen))
"""


@pytest.mark.parametrize("kind", ["disk", "tmpfs", "memfd"])
def test_memory_that_can_shrink_never_kills_the_server(kind: str) -> None:
    if kind == "tmpfs":
        mounts = Path("/proc/mounts").read_text().splitlines()
        if not any(line.split()[1:3] == ["/dev/shm", "tmpfs"] for line in mounts):
            pytest.skip("no tmpfs at /dev/shm")
        directory = tempfile.mkdtemp(prefix="vmm-", dir="/dev/shm")
    else:
        directory = tempfile.mkdtemp(prefix="vmm-")
    try:
        child = subprocess.run(
            [sys.executable, "-c", SCENARIO, str(Path(__file__).parent), directory, kind],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    assert child.returncode == 0, f"the server's process died ({child.returncode}): {child.stderr}"
    assert json.loads(child.stdout) == {
        "before": "done",
        "written": "ab" * 16,
        "after_truncate": "EFAULT",
        "size_after": 4096,
        "below_the_end": "done",
        "bystander": "done",
        "bystander_memory": "11" * 4,
        "regrown": "done",
        "server_fds_for_300_maps": 0,
        "sealed_dma": "done",
        "sealed_memory": "33" * 4,
    }


QEMU_SCENARIO = """
import importlib.util, json, os, subprocess, sys, time, uuid
tests, script, kind = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path[:0] = [os.path.join(tests, "server"), tests]
spec = importlib.util.spec_from_file_location("provision_qemu", script)
provisioner = importlib.util.module_from_spec(spec)
spec.loader.exec_module(provisioner)
from qemu.qmp import Qmp
from server_testlib import DmaModel, TrapMediator, device_spec
from vfio_mediate import AccessError, EmulatedPciDevice, MediatedDevice, MediatorRegistry
from vfio_mediate.server import BackgroundServer, VfioUserClient

root = provisioner.provision()
shared = provisioner.shared_dir(root)
tag = uuid.uuid4().hex[:8]
ram = shared / f"ram-{tag}"
memory = {
    "file": f"memory-backend-file,id=mem,size=128M,share=on,mem-path=/run/vfio-mediate/{ram.name}",
    "memfd": "memory-backend-memfd,id=mem,size=128M,share=on,seal=off",
}[kind]
registry = MediatorRegistry()
registry.register(TrapMediator(), "svtest-mediator")
backends = [EmulatedPciDevice(device_spec(f"svtest{n}"), DmaModel()) for n in range(2)]
seen = {}
with BackgroundServer() as server:
    sockets = [shared / f"mem-{tag}-{n}.sock" for n in range(2)]
    for backend, path in zip(backends, sockets):
        server.add(MediatedDevice(backend, registry), path)
    qmp_path = shared / f"qmp-{tag}.sock"
    device = {"driver": "vfio-user-pci", "socket": {"type": "unix",
              "path": f"/run/vfio-mediate/{sockets[0].name}"}}
    argv = [root.qemu, "-machine", "q35,accel=tcg,memory-backend=mem", "-m", "128M",
            "-object", memory, "-display", "none", "-nodefaults", "-S",
            "-qmp", f"unix:/run/vfio-mediate/{qmp_path.name},server=on,wait=off",
            "-device", json.dumps(device)]
    qemu = provisioner.run_in_root(root, argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        qmp = Qmp(qmp_path, timeout=30)
        dma = backends[0].dma
        deadline = time.monotonic() + 30
        while not any(m.iova == 0x100000 for m in dma.mappings) and time.monotonic() < deadline:
            time.sleep(0.05)
        ram_map = next((m for m in dma.mappings if m.iova == 0x100000), None)
        seen["guest_ram_by_fd"] = ram_map is not None and ram_map.file is not None
        if ram_map is None:  # refused
            print(json.dumps(seen))
            sys.exit(0)
        dma.write(0x200000, b"DMA from the device")
        shown = qmp.command("human-monitor-command", **{"command-line": "xp /3xb 0x200000"})
        seen["guest_sees"] = shown.split(":", 1)[1].split()
        if kind == "file":
            os.truncate(ram, 0x100000)  # the guest RAM file loses all but its first MiB
            try:
                dma.write(0x200000, b"after")
                seen["after_truncate"] = "no error"
            except AccessError as exc:
                seen["after_truncate"] = exc.strerror.split(":")[0]
        bystander = VfioUserClient.connect(sockets[1])
        seen["bystander_reads_config"] = bystander.read(7, 0, 4).hex()
        bystander.close()
    finally:
        qemu.kill()
        qemu.wait()
        ram.unlink(missing_ok=True)
print(json.dumps(seen))
"""


@pytest.fixture(scope="module")
def qemu_provisioned() -> None:
    """QEMU provisioned (cached), as the QEMU tests need it; skipped or failed as they are."""
    provisioner = load_provisioner()
    try:
        provisioner.provision()
    except provisioner.ProvisionError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the QEMU tests, but QEMU could not be provisioned: {exc}")
        pytest.skip(f"QEMU with vfio-user-pci cannot be provisioned here: {exc}")


@pytest.mark.parametrize("kind", ["file", "memfd"])
def test_qemu_guest_ram_that_can_shrink_is_served(kind: str, qemu_provisioned: None) -> None:
    """QEMU's memory-backend-file and memory-backend-memfd,seal=off: the DMA_MAPs of guest RAM
    are accepted and reached through the fd, the device's DMA shows in the guest's memory, and
    a truncated RAM file makes the DMA fail while the server and its other device live on."""
    child = subprocess.run(
        [sys.executable, "-c", QEMU_SCENARIO, str(TESTS), str(PROVISION_SCRIPT), kind],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert child.returncode == 0, f"the server's process died ({child.returncode}): {child.stderr}"
    expected = {
        "guest_ram_by_fd": True,
        "guest_sees": ["0x44", "0x4d", "0x41"],  # "DMA"
        "bystander_reads_config": "f41afe10",  # 1af4:10fe
    }
    if kind == "file":
        expected["after_truncate"] = "DMA write at file offset 0x200000+0x5"
    assert json.loads(child.stdout) == expected
