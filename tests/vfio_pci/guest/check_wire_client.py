"""An independent vfio-user client (wire_client.py: ``socket`` and ``struct`` only, nothing of
the project's protocol code) against real devices on vfio-pci, INSIDE the nested guest.

``vfio-mediate serve --device 0000:01:10.0 --device 0000:00:02.0`` serves the igb VF and the
e1000e; the client checks what it is told against sysfs and against the device itself: the
identity, every region, the mapping of the device fd, a real DMA into its own memfd (and an
IOMMU fault once unmapped) and an MSI-X vector on its own eventfd. Then the dirty tracking each
served VF offers (its mediator's hooks, else type1's IOMMU tracking) as VERSION, DEVICE_FEATURE
and ``probe --json`` say it. The serve holds its devices' groups until the last check stops it,
so the checks serving a VF under a test mediator in this process use the other VF.
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pluggy
import pytest
from wire_client import (
    FEATURE_DMA_LOGGING_REPORT,
    FEATURE_DMA_LOGGING_START,
    FEATURE_DMA_LOGGING_STOP,
    FEATURE_GET,
    FEATURE_PROBE,
    FEATURE_SET,
    REGION_FLAG_MMAP,
    WireClient,
    WireError,
)

from vfio_mediate import MediatedDevice, MediatorRegistry, VfioDeviceError, create_device
from vfio_mediate.server import BackgroundServer

VF, VF2, E1000E = "0000:01:10.0", "0000:01:10.2", "0000:00:02.0"
SYSFS = Path("/sys/bus/pci/devices")
CLI = [sys.executable, "-c", "import sys; from vfio_mediate.cli import main; sys.exit(main())"]
CONFIG, BAR0, BAR3, VGA, MSIX = 7, 0, 3, 8, 2
PAGE = 4096
IOVA = 0x4000_0000
DMA_SIZE = 2 << 20
VFIO_DEVICE = "anon_inode:[vfio-device]"
# What QEMU's vfio-user-pci proposes (its "migration" asks for dirty page tracking).
PROPOSAL = {
    "max_msg_fds": 16,
    "max_data_xfer_size": 1 << 20,
    "pgsizes": PAGE,
    "max_dma_maps": 65535,
    "migration": {"pgsize": PAGE, "max_bitmap_size": 1 << 28},
}
hookimpl = pluggy.HookimplMarker("vfio_mediate")

# e1000e registers (BAR0)
CTRL, ICR, IMS, IMC, IVAR = 0x0000, 0x00C0, 0x00D0, 0x00D8, 0x00E4
TCTL, TDBAL, TDBAH, TDLEN, TDH, TDT = 0x0400, 0x3800, 0x3804, 0x3808, 0x3810, 0x3818


def sysfs_int(address: str, name: str) -> int:
    return int((SYSFS / address / name).read_text(), 16)


def sysfs_bar_sizes(address: str) -> list[int]:
    """BAR 0-5 sizes from the kernel's ``resource`` file (start end flags per line)."""
    sizes = []
    for line in (SYSFS / address / "resource").read_text().splitlines()[:6]:
        start, end, _ = (int(word, 16) for word in line.split())
        sizes.append(end - start + 1 if end else 0)
    return sizes


def enable(client: WireClient, bus_master: bool) -> None:
    command = int.from_bytes(client.read(CONFIG, 4, 2), "little")
    command |= 0x2 | (0x4 if bus_master else 0)
    client.write(CONFIG, 4, command.to_bytes(2, "little"))


def sealed_memfd(size: int) -> int:
    """Guest-RAM-like memory: a memfd sealed against resizing, as QEMU's memfd backend."""
    fd = os.memfd_create("independent-client", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


@pytest.fixture(scope="module")
def serve() -> Iterator[tuple[subprocess.Popen[str], dict[str, str]]]:
    """``vfio-mediate serve`` of the VF and the e1000e (one process, a socket each); the last
    check of this module stops it."""
    directory = tempfile.mkdtemp(dir="/run")
    paths = {VF: f"{directory}/vf.sock", E1000E: f"{directory}/e1000e.sock"}
    argv = [*CLI, "serve"]
    for address, path in paths.items():
        argv += ["--device", address, "--socket", path]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stderr is not None
        lines = []
        while not lines or lines[-1] != "Ctrl-C stops":
            line = server.stdout.readline()
            assert line, "serve exited: " + "".join(lines) + server.stderr.read()
            lines.append(line.strip())
        assert any(line.startswith(f"serving {VF} (8086:10ca)") for line in lines), lines
        yield server, paths
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


@pytest.fixture
def sockets(serve: tuple[subprocess.Popen[str], dict[str, str]]) -> dict[str, str]:
    """The served devices' sockets, by address."""
    return serve[1]


def test_independent_client_finds_the_served_vf_identity_regions_and_mappings(
    sockets: dict[str, str],
) -> None:
    with WireClient(sockets[VF]) as client:
        major, minor, caps = client.version(PROPOSAL)
        assert (major, minor) == (0, 0)
        assert caps["max_msg_fds"] >= 1 and caps["pgsizes"] == PAGE
        flags, regions, irqs = client.device_info()
        assert flags & 0x3 == 0x3, "RESET|PCI"
        assert (regions, irqs) == (9, 5)
        # identity: config space through the server, against the kernel's sysfs view
        config = client.read(CONFIG, 0, 0x30)
        vendor, device = struct.unpack_from("<HH", config)
        assert (vendor, device) == (sysfs_int(VF, "vendor"), sysfs_int(VF, "device"))
        assert (vendor, device) == (0x8086, 0x10CA)
        assert int.from_bytes(config[9:12], "little") == sysfs_int(VF, "class")
        assert struct.unpack_from("<HH", config, 0x2C) == (
            sysfs_int(VF, "subsystem_vendor"),
            sysfs_int(VF, "subsystem_device"),
        )
        # every BAR's size as the kernel has it; an absent region (VGA) is empty
        infos = [client.region_info(index) for index in range(regions)]
        assert [info.size for info in infos[:6]] == sysfs_bar_sizes(VF)
        assert infos[VGA].size == 0 and infos[VGA].flags == 0 and infos[VGA].fd is None
        assert infos[CONFIG].size == 4096 and infos[CONFIG].fd is None
        bar0, bar3 = infos[BAR0], infos[BAR3]
        assert bar0.flags & REGION_FLAG_MMAP and bar0.fd is not None
        assert bar0.sparse_areas is None  # no mediator traps: the whole BAR is mappable
        assert bar3.msix_mappable and bar3.fd is not None
        for info in (bar0, bar3):
            assert os.readlink(f"/proc/self/fd/{info.fd}") == VFIO_DEVICE
        assert bar0.offset == 0 and bar3.offset == 3 << 40  # vfio-pci's region offsets
        assert client.irq_info(MSIX)[1] == 3
        # the fd's mapping is the device: mapped reads equal the server's REGION_READ
        enable(client, bus_master=False)
        assert bar0.fd is not None
        mapped = mmap.mmap(bar0.fd, bar0.size, mmap.MAP_SHARED, offset=bar0.offset)
        try:
            for offset in (0x0, 0x8, 2 * PAGE + 0x8):
                assert mapped[offset : offset + 4] == client.read(BAR0, offset, 4)
        finally:
            mapped.close()
        for info in infos:
            if info.fd is not None:
                os.close(info.fd)


class PageTrap:
    """Claims the VF and traps BAR0 page 1; counts what it sees."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, bool]] = []

    @hookimpl
    def mediator_open(self, device: Any) -> Any:
        return self if device.device_id == 0x10CA else None

    @hookimpl
    def mediator_regions(self, handle: Any) -> Any:
        return [BAR0]

    @hookimpl
    def mediator_get_region_info(self, handle: Any, info: dict[str, Any]) -> Any:
        if info["index"] != BAR0 or not info["size"]:
            return None
        info["sparse_mmap"] = [[0, PAGE], [2 * PAGE, info["size"] - 2 * PAGE]]
        return info

    @hookimpl
    def mediator_rw(
        self, handle: Any, index: int, offset: int, count: int, data: Any, is_write: bool
    ) -> Any:
        self.seen.append((index, offset, is_write))
        return None


class DirtyLogger:
    """Claims the VF with dirty-logging hooks: it says the page at IOVA + 5 pages was written."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def mediator_open(self, device: Any) -> Any:
        return self if device.device_id == 0x10CA else None

    @hookimpl
    def mediator_dma_logging_start(self, handle: Any, log: Any) -> None:
        self.calls.append("start")

    @hookimpl
    def mediator_dma_logging_report(self, handle: Any, log: Any, iova: int, length: int) -> None:
        self.calls.append("report")
        log.mark(IOVA + 5 * PAGE, 1)

    @hookimpl
    def mediator_dma_logging_stop(self, handle: Any) -> None:
        self.calls.append("stop")


@contextmanager
def served_here(address: str, mediator: object | None) -> Iterator[tuple[str, MediatedDevice]]:
    """``address`` served in this process under ``mediator`` alone (or none)."""
    registry = MediatorRegistry()
    if mediator is not None:
        registry.register(mediator, type(mediator).__name__)
    backend = create_device(address)
    try:
        with BackgroundServer() as server:
            device = MediatedDevice(backend, registry)
            path = Path(tempfile.mkdtemp(dir="/run")) / "dev.sock"
            server.add(device, path)
            yield str(path), device
    finally:
        backend.close()


def test_independent_client_parses_the_sparse_areas_of_a_trapped_bar() -> None:
    trap = PageTrap()
    with served_here(VF2, trap) as (path, _), WireClient(path) as client:
        client.version(PROPOSAL)
        bar0 = client.region_info(BAR0)
        assert bar0.caps and bar0.sparse_areas == [(0, PAGE), (2 * PAGE, 2 * PAGE)]
        assert bar0.argsz > 32 and bar0.fd is not None  # asked again with the argsz it needs
        enable(client, bus_master=False)
        for start, size in bar0.sparse_areas:
            mapped = mmap.mmap(bar0.fd, size, mmap.MAP_SHARED, offset=bar0.offset + start)
            try:
                for offset in (0x0, 0x8, 0x100):
                    assert mapped[offset : offset + 4] == client.read(BAR0, start + offset, 4)
            finally:
                mapped.close()
        trap.seen.clear()
        client.read(BAR0, PAGE + 0x10, 4)
        client.write32(BAR0, PAGE + 0x20, 0)
        assert trap.seen == [(BAR0, PAGE + 0x10, False), (BAR0, PAGE + 0x20, True)]
        os.close(bar0.fd)


def test_independent_client_gets_an_e1000e_dma_into_its_memfd_and_msix_on_its_eventfd(
    sockets: dict[str, str],
) -> None:
    memfd = sealed_memfd(DMA_SIZE)
    ring = mmap.mmap(memfd, DMA_SIZE, mmap.MAP_SHARED)
    eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        with WireClient(sockets[E1000E]) as client:
            client.version(PROPOSAL)
            assert struct.unpack("<HH", client.read(CONFIG, 0, 4)) == (0x8086, 0x10D3)
            client.dma_map(IOVA, DMA_SIZE, memfd)
            with pytest.raises(WireError) as caught:
                client.dma_map(IOVA, DMA_SIZE, memfd)
            assert caught.value.errno == errno.EEXIST
            enable(client, bus_master=True)
            client.set_irq_eventfds(MSIX, 0, (eventfd,))
            # Causes still pending from an earlier user of the device would not be raised anew:
            # mask and clear them first, as a driver does.
            client.write32(BAR0, IMC, 0xFFFFFFFF)
            client.write32(BAR0, ICR, 0xFFFFFFFF)
            client.read32(BAR0, ICR)
            client.write32(BAR0, IVAR, 0x8 << 8)  # TX queue 0 -> MSI-X vector 0, valid
            client.write32(BAR0, IMS, 1 << 0 | 1 << 22)  # TXDW | TXQ0
            # one legacy TX descriptor at IOVA, its 64-byte frame at IOVA + 0x1000
            ring[0x1000:0x1040] = bytes(range(64))
            ring[0:16] = struct.pack("<QHBBBBH", IOVA + 0x1000, 64, 0, 0x0B, 0, 0, 0)  # EOP|IFCS|RS
            client.write32(BAR0, CTRL, client.read32(BAR0, CTRL) | 1 << 6)  # SLU
            for register, value in ((TDBAL, IOVA), (TDBAH, 0), (TDLEN, 4096), (TDH, 0), (TDT, 0)):
                client.write32(BAR0, register, value)
            client.write32(BAR0, TCTL, client.read32(BAR0, TCTL) | 1 << 1 | 1 << 3)  # EN|PSP
            client.write32(BAR0, TDT, 1)
            deadline = time.monotonic() + 2
            while not ring[12] & 1 and time.monotonic() < deadline:
                time.sleep(0.0005)
            assert ring[12] & 1, f"no DD write-back in the memfd: {ring[0:16].hex()}"
            assert select.select([eventfd], [], [], 2)[0], "TX completion did not fire MSI-X 0"
            assert os.eventfd_read(eventfd) >= 1
            # the device took the descriptor: its head moved past it (read through the mapping)
            bar0 = client.region_info(BAR0)
            assert bar0.fd is not None
            mapped = mmap.mmap(bar0.fd, PAGE * 4, mmap.MAP_SHARED, offset=bar0.offset + 0x3000)
            try:
                assert int.from_bytes(mapped[0x810:0x814], "little") == 1  # TDH
            finally:
                mapped.close()
                os.close(bar0.fd)
            client.disable_irqs(MSIX)
            client.dma_unmap(IOVA, DMA_SIZE)
            with pytest.raises(WireError) as caught:
                client.dma_unmap(IOVA, DMA_SIZE)
            assert caught.value.errno == errno.EINVAL
            # unmapped means out of the IOMMU: a second descriptor is never written back
            ring[16:32] = struct.pack("<QHBBBBH", IOVA + 0x1000, 64, 0, 0x0B, 0, 0, 0)
            client.write32(BAR0, TDT, 2)
            fault = f"[{E1000E[5:]}] fault addr {IOVA:#x}"
            assert wait_for_kernel_message(fault), "the IOMMU reported no fault of the e1000e"
            assert not ring[28] & 1, f"the device wrote unmapped memory: {ring[16:32].hex()}"
    finally:
        os.close(eventfd)
        ring.close()
        os.close(memfd)


def wait_for_kernel_message(text: str, timeout: float = 5.0) -> bool:
    """Whether the kernel log (``/dev/kmsg``) has a line containing ``text`` within
    ``timeout`` seconds (e.g. the IOMMU's DMAR fault report)."""
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:
                time.sleep(0.05)
                continue
            except BrokenPipeError:  # records were overwritten while reading: go on
                continue
            if text.encode() in record:
                return True
        return False
    finally:
        os.close(fd)


# -- which dirty tracking is in use, as the wire and probe say it ------------------------------


def dirty_offer(client: WireClient) -> tuple[bool, bool]:
    """(VERSION offers "migration", DEVICE_FEATURE probes DMA_LOGGING_START)."""
    _, _, caps = client.version(PROPOSAL)
    try:
        client.feature(FEATURE_PROBE | FEATURE_SET | FEATURE_DMA_LOGGING_START)
        probed = True
    except WireError as exc:
        assert exc.errno == errno.ENOTTY, exc
        probed = False
    if "migration" in caps:
        assert caps["migration"]["pgsize"] == PAGE
    return "migration" in caps, probed


def log_one_megabyte(client: WireClient, memfd: int) -> int:
    """DMA-map 1 MiB, log it, report: how many of its 256 pages are dirty."""
    client.dma_map(IOVA, 1 << 20, memfd)
    start = struct.pack("<QII", PAGE, 1, 0) + struct.pack("<QQ", IOVA, 1 << 20)
    client.feature(FEATURE_SET | FEATURE_DMA_LOGGING_START, start)
    report = client.feature(
        FEATURE_GET | FEATURE_DMA_LOGGING_REPORT,
        struct.pack("<QQQ", IOVA, 1 << 20, PAGE),
        room=24 + 32,
    )
    assert struct.unpack_from("<QQQ", report) == (IOVA, 1 << 20, PAGE)
    client.feature(FEATURE_SET | FEATURE_DMA_LOGGING_STOP)
    client.dma_unmap(IOVA, 1 << 20)
    return sum(bin(byte).count("1") for byte in report[24:56])


def test_the_served_vf_offers_type1_dirty_tracking_as_probe_says(
    sockets: dict[str, str],
) -> None:
    probe = json.loads(Path("/run/xchg/probe.json").read_text())  # left by check_vfio
    assert probe["device"] == VF and probe["dirty_tracking"] == "iommu"
    memfd = sealed_memfd(1 << 20)
    try:
        with WireClient(sockets[VF]) as client:
            assert dirty_offer(client) == (True, True)
            assert log_one_megabyte(client, memfd) == 256  # type1: every pinned page
    finally:
        os.close(memfd)


def test_a_dirty_logging_mediator_takes_over_from_the_iommu() -> None:
    mediator = DirtyLogger()
    memfd = sealed_memfd(1 << 20)
    try:
        with served_here(VF2, mediator) as (path, device), WireClient(path) as client:
            assert dirty_offer(client) == (True, True)
            assert device.dma_logging_source == "mediator"
            assert log_one_megabyte(client, memfd) == 1  # exactly the page it marked
            assert mediator.calls == ["start", "report", "stop"]
        with served_here(VF2, None) as (path, device), WireClient(path) as client:
            assert dirty_offer(client) == (True, True)
            assert device.dma_logging_source == "iommu"
            assert log_one_megabyte(client, memfd) == 256
    finally:
        os.close(memfd)


def test_serve_holds_the_groups_until_sigterm(
    serve: tuple[subprocess.Popen[str], dict[str, str]],
) -> None:
    server, _ = serve
    for address in (VF, E1000E):
        with pytest.raises(VfioDeviceError) as caught:
            create_device(address)
        assert caught.value.errno == errno.EBUSY and "another process" in str(caught.value)
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=30) == 0, server.stderr.read() if server.stderr else ""
    for address in (VF, E1000E):
        create_device(address).close()  # the groups are free again
