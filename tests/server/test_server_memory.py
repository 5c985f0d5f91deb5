"""The kinds of guest memory a VMM hands the server for DMA, tried as a hostile client would:
files that can shrink (memory-backend-file on disk or tmpfs, memory-backend-memfd,seal=off) are
served without risking the SIGBUS that would kill every device of the process, and mapped
memory holds no server fd per mapping.

Each scenario runs a server in a child process: on failure the child dies (status -7, SIGBUS),
not the test session."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

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
