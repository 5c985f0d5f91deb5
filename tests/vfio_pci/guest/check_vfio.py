"""Checks that run INSIDE the nested guest (see ../nested.py), against real devices on vfio-pci.

Devices (set up by run.sh): igb VFs 0000:01:10.0 and 0000:01:10.2 (8086:10ca) and the e1000e
0000:00:02.0 (8086:10d3) on vfio-pci; the igb PF 0000:01:00.0 stays on igb; of the two e1000
behind the PCIe-to-PCI bridge (one IOMMU group) the first is on vfio-pci, the second on e1000.
Each check is one pytest test; the host reports each separately (../test_vfio_pci.py).
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import runpy
import select
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pluggy
import pytest

from vfio_mediate import (
    MediatedDevice,
    MediatorRegistry,
    VfioContainer,
    VfioDeviceError,
    VfioPciDevice,
    anonymous_memory,
    create_device,
)
from vfio_mediate.cli import main
from vfio_mediate.server import BackgroundServer, VfioUserClient
from vfio_mediate.uapi import IrqIndex, RegionFlag

VF, VF2, E1000E, PF = "0000:01:10.0", "0000:01:10.2", "0000:00:02.0", "0000:01:00.0"
_BRIDGED = Path("/run/xchg/bridged.txt")
BRIDGED = _BRIDGED.read_text().split() if _BRIDGED.exists() else []
CONFIG = 7
Completed = subprocess.CompletedProcess[str]
hookimpl = pluggy.HookimplMarker("vfio_mediate")
PAGE = 4096
IOVA = 0x4000_0000

# e1000e registers (BAR0)
CTRL, STATUS, IMS, IMC, IVAR = 0x0000, 0x0008, 0x00D0, 0x00D8, 0x00E4
TCTL, TDBAL, TDBAH, TDLEN, TDH, TDT = 0x0400, 0x3800, 0x3804, 0x3808, 0x3810, 0x3818
ICR_TXDW, ICR_TXQ0 = 1 << 0, 1 << 22


def u32(data: bytes) -> int:
    return int.from_bytes(data[:4], "little")


def p32(value: int) -> bytes:
    return value.to_bytes(4, "little")


class Served:
    """A device served in this process to the project's own client."""

    def __init__(self, address: str, registry: MediatorRegistry | None = None) -> None:
        self.backend = create_device(address)
        self.server = BackgroundServer()
        self.client: Any = None
        try:
            self.device = MediatedDevice(
                self.backend, registry or MediatorRegistry.from_entry_points()
            )
            self.path = Path(tempfile.mkdtemp(dir="/run")) / "dev.sock"
            self.endpoint = self.server.add(self.device, self.path)
            self.client = VfioUserClient.connect(self.path)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.server.close()
        self.backend.close()

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def enable_memory(client: VfioUserClient, bus_master: bool = False) -> None:
    command = int.from_bytes(client.read(CONFIG, 4, 2), "little")
    command |= 0x2 | (0x4 if bus_master else 0)
    client.write(CONFIG, 4, command.to_bytes(2, "little"))


# -- 1. probe -----------------------------------------------------------------------------------


def run_forked(target: Callable[[], int | None], uid: int | None = None) -> Completed:
    """``target()`` in a forked child of this (already importing) process, as user ``uid`` if
    given: its exit status (what it returns or exits with), stdout and stderr. A new
    interpreter costs seconds of imports under TCG; the serve checks (check_wire_client.py)
    start a real ``python -c`` process."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a command line of its own, nothing of pytest's capture
        status = 99
        try:
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            logging.root.handlers.clear()  # the CLI configures its own
            if uid is not None:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            result = target()
            status = 0 if result is None else result
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    os.close(out_w)
    os.close(err_w)
    with open(out_r) as out_file, open(err_r) as err_file:
        out, err = out_file.read(), err_file.read()
    _, wait_status = os.waitpid(pid, 0)
    return Completed([], os.waitstatus_to_exitcode(wait_status), out, err)


def run_cli(*argv: str, uid: int | None = None) -> Completed:
    """``vfio-mediate ARGV`` (its ``main``) in a forked child."""
    return run_forked(lambda: main(list(argv)), uid)


def test_probe_json_of_a_vf() -> None:
    out = run_cli("probe", "--device", VF, "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    Path("/run/xchg/probe.json").write_text(out.stdout)
    assert (report["vendor_id"], report["device_id"]) == (0x8086, 0x10CA)
    assert report["device"] == VF
    assert report["mediator"] == "null"
    regions = {row["name"]: row for row in report["regions"]}
    assert regions["BAR0"]["size"] == 16 << 10 and "mmap" in regions["BAR0"]["flags"]
    assert regions["BAR3"]["size"] == 16 << 10
    assert regions["CONFIG"]["size"] == 4096
    assert regions["VGA"]["size"] == 0 and regions["BAR1"]["size"] == 0
    # no mediator hooks, no variant driver (VFIO_DEVICE_FEATURE answers ENOTTY): type1's
    assert report["dirty_tracking"] == "iommu" and report["kernel_migration"] is False


# -- 2. the served VF -----------------------------------------------------------------------


def test_served_vf_identity_regions_and_bar_sizing() -> None:
    with Served(VF) as served:
        client = served.client
        info = client.device_info()
        assert info.num_regions == 9 and info.num_irqs == 5 and info.flags & 0x3 == 0x3
        ids = client.read(CONFIG, 0, 4)
        assert struct.unpack("<HH", ids) == (0x8086, 0x10CA)
        bar0 = client.region_info(0)
        assert bar0.size == 16 << 10 and bar0.flags & RegionFlag.MMAP
        fd = client.region_fd(0)
        assert fd is not None and os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[vfio-device]"
        assert bar0.file_offset == 0  # region 0 of the VFIO device fd
        bar3 = client.region_info(3)
        assert bar3.msix_mappable and client.region_fd(3) is not None
        assert bar3.file_offset == 3 << 40
        config = client.region_info(CONFIG)
        assert config.size == 4096 and client.region_fd(CONFIG) is None
        assert client.region_info(8).size == 0  # VGA: EINVAL from vfio, an empty region here
        # BAR sizing through config writes (vfio-pci virtualizes the BARs)
        original = client.read(CONFIG, 0x10, 4)
        client.write(CONFIG, 0x10, p32(0xFFFFFFFF))
        mask = u32(client.read(CONFIG, 0x10, 4))
        client.write(CONFIG, 0x10, original)
        assert (~(mask & ~0xF) & 0xFFFFFFFF) + 1 == 16 << 10
        assert client.read(CONFIG, 0x10, 4) == original
        # the mapping is the real BAR: a mapped read equals a pread of the device fd
        enable_memory(client)
        mapped = client.map_area(0, 0, PAGE)
        try:
            assert mapped[8:12] == os.pread(served.backend.fd, 4, 8)
        finally:
            mapped.close()


# -- 3. a mediator that traps one BAR0 page -------------------------------------------------


class PageTrap:
    """Claims the igb VF, traps BAR0 page 1, records every access it sees."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int, bool]] = []
        self.resets = 0
        self.irqs: list[tuple[int, int]] = []
        self.observe: dict[int, list[int]] = {}

    @hookimpl
    def mediator_open(self, device: Any) -> Any:
        if (device.vendor_id, device.device_id) in ((0x8086, 0x10CA), (0x8086, 0x10D3)):
            return self
        return None

    @hookimpl
    def mediator_regions(self, handle: Any) -> Any:
        return [0]

    @hookimpl
    def mediator_get_region_info(self, handle: Any, info: dict[str, Any]) -> Any:
        if info["index"] != 0 or not info["size"]:
            return None
        size = info["size"]
        info["sparse_mmap"] = [[0, PAGE], [2 * PAGE, size - 2 * PAGE]]
        return info

    @hookimpl
    def mediator_rw(
        self, handle: Any, index: int, offset: int, count: int, data: Any, is_write: bool
    ) -> Any:
        self.seen.append((index, offset, count, is_write))
        return None

    @hookimpl
    def mediator_reset(self, handle: Any) -> None:
        self.resets += 1

    @hookimpl
    def mediator_irq_observe(self, handle: Any, index: int) -> Any:
        return self.observe.get(index)

    @hookimpl
    def mediator_irq(self, handle: Any, index: int, vector: int) -> Any:
        self.irqs.append((index, vector))
        return True


def trap_registry() -> tuple[MediatorRegistry, PageTrap]:
    registry = MediatorRegistry()
    trap = PageTrap()
    registry.register(trap, "page-trap")
    return registry, trap


def test_mediator_sees_exactly_the_trapped_page_and_mapped_reads_equal_pread() -> None:
    registry, trap = trap_registry()
    with Served(VF, registry) as served:
        client = served.client
        info = client.region_info(0)
        assert [(a.offset, a.size) for a in info.mmap_areas()] == [(0, PAGE), (2 * PAGE, 2 * PAGE)]
        enable_memory(client)
        trap.seen.clear()
        client.read(0, PAGE + 0x10, 4)
        client.write(0, PAGE + 0x20, p32(0))
        client.read(0, PAGE + 0x24, 4)
        mapped = client.map_area(0, 2 * PAGE, 2 * PAGE)
        try:
            for offset in (0x0, 0x8, 0x100):
                pread = os.pread(served.backend.fd, 4, 2 * PAGE + offset)
                assert mapped[offset : offset + 4] == pread
        finally:
            mapped.close()
        low = client.map_area(0, 0, PAGE)
        try:
            assert low[8:12] == os.pread(served.backend.fd, 4, 8)  # VTSTATUS
        finally:
            low.close()
        assert trap.seen == [(0, PAGE + 0x10, 4, False), (0, PAGE + 0x20, 4, True),
                             (0, PAGE + 0x24, 4, False)]  # fmt: skip
        with pytest.raises(OSError):
            client.map_area(0, PAGE, PAGE)  # the trapped page is not mappable


# -- 4. real DMA into the client's memfd, MSI-X to its eventfd, reset --------------------------


def program_tx(client: VfioUserClient, ring: mmap.mmap) -> None:
    """One legacy TX descriptor at IOVA, its 64-byte buffer at IOVA + 0x1000; TDT = 1."""
    ring[0x1000:0x1040] = bytes(range(64))
    ring[0:16] = struct.pack("<QHBBBBH", IOVA + 0x1000, 64, 0, 0x0B, 0, 0, 0)  # EOP|IFCS|RS
    client.write(0, CTRL, p32(u32(client.read(0, CTRL, 4)) | 1 << 6))  # SLU
    client.write(0, TDBAL, p32(IOVA & 0xFFFFFFFF))
    client.write(0, TDBAH, p32(IOVA >> 32))
    client.write(0, TDLEN, p32(4096))
    client.write(0, TDH, p32(0))
    client.write(0, TDT, p32(0))
    client.write(0, TCTL, p32(u32(client.read(0, TCTL, 4)) | 1 << 1 | 1 << 3))  # EN|PSP
    client.write(0, TDT, p32(1))


def wait_for(predicate: Any, timeout: float = 2.0) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            return -1.0
        time.sleep(0.0005)
    return time.monotonic() - start


def test_e1000e_dma_write_back_lands_in_the_client_memfd_and_msix_fires_its_eventfd() -> None:
    with Served(E1000E) as served:
        client = served.client
        ring = client.dma_map_memfd(IOVA, 2 << 20)
        assert served.backend.container.mappings == ((IOVA, 2 << 20),)
        enable_memory(client, bus_master=True)
        eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            client.set_irq_eventfds(IrqIndex.MSIX, 0, [eventfd])
            # a userspace trigger reaches the eventfd through the kernel
            client.trigger_irqs(IrqIndex.MSIX, 0, 1)
            assert select.select([eventfd], [], [], 2)[0], "the triggered vector did not fire"
            os.eventfd_read(eventfd)
            client.write(0, IVAR, p32(0x8 << 8))  # TX queue 0 -> vector 0, valid
            client.write(0, IMS, p32(ICR_TXDW | ICR_TXQ0))
            program_tx(client, ring)
            took = wait_for(lambda: ring[12] & 1)
            assert took >= 0, f"no DD write-back: descriptor {ring[0:16].hex()}"
            assert select.select([eventfd], [], [], 2)[0], "TX completion did not fire MSI-X 0"
            assert os.eventfd_read(eventfd) >= 1
            # the server's own view (what a mediator reads descriptors through) is the same memory
            assert served.backend.dma.read(IOVA + 12, 1)[0] & 1
            client.dma_unmap(IOVA, 2 << 20)
            assert served.backend.container.mappings == ()
        finally:
            os.close(eventfd)
            ring.close()


def test_an_observed_vector_is_relayed_through_the_mediator() -> None:
    registry, trap = trap_registry()
    trap.observe = {IrqIndex.MSIX: [0]}
    with Served(E1000E, registry) as served:
        client = served.client
        enable_memory(client, bus_master=True)
        eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            client.set_irq_eventfds(IrqIndex.MSIX, 0, [eventfd])
            client.trigger_irqs(IrqIndex.MSIX, 0, 1)
            assert select.select([eventfd], [], [], 2)[0]
            assert trap.irqs == [(IrqIndex.MSIX, 0)]
        finally:
            os.close(eventfd)


def test_reset_reaches_the_device_and_the_mediator() -> None:
    registry, trap = trap_registry()
    with Served(VF, registry) as served:
        client = served.client
        enable_memory(client)
        mapped = client.map_area(0, 0, PAGE)
        try:
            before = mapped[8:12]
            # VFIO_DEVICE_RESET (an FLR for the VF, reset_method "flr"): the kernel zaps the
            # client's BAR mappings for the reset and they fault back in afterwards. (QEMU's
            # igb VF model keeps its BAR registers across FLR, so they cannot show it.)
            client.reset()
            assert trap.resets == 1
            enable_memory(client)
            assert mapped[8:12] == before == os.pread(served.backend.fd, 4, 8)
        finally:
            mapped.close()
    with Served(E1000E, registry) as served:  # reset_method "pm"
        served.client.reset()
        assert trap.resets == 2


def test_session_end_takes_the_client_memory_out_of_the_iommu() -> None:
    with Served(VF) as served:
        memory = served.client.dma_map_memfd(IOVA, 1 << 20)
        assert served.backend.container.mappings == ((IOVA, 1 << 20),)
        served.client.close()  # no DMA_UNMAP: the session just ends
        served.client = None
        deadline = time.monotonic() + 5
        while served.backend.container.mappings and time.monotonic() < deadline:
            time.sleep(0.01)
        assert served.backend.container.mappings == ()
        with pytest.raises(OSError):  # and out of the server's own view after it
            served.backend.dma.read(IOVA, 1)
        memory.close()


def test_dma_map_without_fd_is_refused() -> None:
    with Served(VF) as served:
        with pytest.raises(OSError) as caught:
            served.client.dma_map(IOVA, 1 << 20)
        assert caught.value.errno == errno.ENOTSUP
        assert served.backend.container.mappings == ()


def test_dirty_logging_falls_back_to_type1_and_over_reports() -> None:
    with Served(VF) as served:
        client = served.client
        memory = client.dma_map_memfd(IOVA, 1 << 20)
        try:
            client.dma_logging_start(PAGE, [(IOVA, 1 << 20)])
            bitmap = client.dma_logging_report(IOVA, 1 << 20, PAGE)
            assert sum(bin(b).count("1") for b in bitmap) == 256  # every pinned page
            client.dma_logging_stop()
        finally:
            memory.close()


# -- 5. containers, groups, serve's lifetime ----------------------------------------------------


def test_two_vfs_share_one_container() -> None:
    container = VfioContainer()
    opened: list[VfioPciDevice] = []
    try:
        first = VfioPciDevice(VF, container=container)
        opened.append(first)
        second = VfioPciDevice(VF2, container=container)
        opened.append(second)
        assert sorted(container.groups) == [8, 9]
        memory, view = anonymous_memory(1 << 20)
        container.map_dma(IOVA, 1 << 20, memory, 0, readable=True, writable=True)
        os.close(memory)
        view.close()
        container.dirty_start()
        bitmap = container.dirty_bitmap(IOVA, 1 << 20)
        container.dirty_stop()
        assert sum(bin(b).count("1") for b in bitmap) == 256  # type1 reports every pinned page
        first.close()
        second.close()
        assert container.groups == () and container.mappings == ()
    finally:
        for device in opened:
            device.close()
        container.close()


# -- 6. each failure is one line that says what to do --------------------------------------------


MISSING = "0000:05:00.0"
NOBODY = 65534


def probe_error(address: str, uid: int | None = None) -> str:
    out = run_cli("probe", "--device", address, uid=uid)
    assert out.returncode == 1, (out.stdout, out.stderr)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_error_no_such_device() -> None:
    line = probe_error(MISSING)
    assert f"no PCI device {MISSING}" in line


def test_error_bound_to_another_driver() -> None:
    line = probe_error(PF)
    assert "is bound to igb, not vfio-pci" in line
    assert f"echo vfio-pci > /sys/bus/pci/devices/{PF}/driver_override" in line
    assert f"echo {PF} > /sys/bus/pci/devices/{PF}/driver/unbind" in line


def test_error_group_not_viable() -> None:
    assert len(BRIDGED) == 2, BRIDGED
    line = probe_error(BRIDGED[0])
    assert "is not viable" in line and f"{BRIDGED[1]} (bound to e1000)" in line


def test_error_no_permission() -> None:
    line = probe_error(VF, uid=NOBODY)
    assert "no permission on /dev/vfio/8" in line


def test_error_no_iommu(tmp_path: Path) -> None:
    device = tmp_path / "bus" / "pci" / "devices" / "0000:07:00.0"
    device.mkdir(parents=True)
    with pytest.raises(VfioDeviceError) as caught:
        VfioPciDevice("0000:07:00.0", sysfs=tmp_path)
    assert "no IOMMU" in str(caught.value) and "intel_iommu=on" in str(caught.value)


# -- 7. the benchmark (benchmarks/bench_vfio.py) runs here ----------------------------------------


def test_benchmark_runs_against_a_vf() -> None:
    bench = "/mnt/checkout/benchmarks/bench_vfio.py"

    def run_script() -> None:
        sys.argv = [bench, VF, "-n", "2000", "--json"]
        runpy.run_path(bench, run_name="__main__")

    out = run_forked(run_script)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    Path("/run/xchg/bench.json").write_text(out.stdout)
    assert (
        results["BAR0 read mapped in the vfio-user client"] < results["BAR0 pread of the device fd"]
    )
