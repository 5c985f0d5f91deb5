"""The DMA test device, its spec and the test mediator used by the server tests."""

from __future__ import annotations

import os
import resource
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pluggy

from vfio_mediate import DeviceSpec

hookimpl = pluggy.HookimplMarker("vfio_mediate")

PAGE = 4096
TEST_DEVICE_PREFIX = "svtest"
# Registers of the DMA test device, all in BAR0 page 0 (trapped by the device itself).
REG_SRC, REG_DST, REG_LEN, REG_DOORBELL, REG_DONE = 0x00, 0x08, 0x10, 0x18, 0x1C
REG_BOOM = 0x20
"""A write here makes the test mediator raise (a plugin bug)."""
REG_STALL = 0x28
"""A write here makes the test mediator wait until its ``release`` is set (a slow device)."""
REG_SPIN = 0x30
"""A read here keeps the test mediator busy (holding the interpreter) for ``SPIN`` seconds."""
SPIN = 0.001
CMD_COPY, CMD_FILL = 1, 2
TRAPPED_BY_MEDIATOR = 1
"""BAR0 page that the device lets clients map but the test mediator traps."""
MSIX_VECTORS = 4
STATE_MAGIC = b"SVT1"


def device_spec(name: str) -> DeviceSpec:
    """A 16 KiB BAR0 (page 0 registers), an 8 KiB BAR2 with the MSI-X table and PBA."""
    return DeviceSpec.from_plain(
        {
            "name": name,
            "vendor_id": 0x1AF4,
            "device_id": 0x10FE,
            "class_code": 0xFF0000,
            "bars": [
                {"index": 0, "size": 4 * PAGE, "kind": "mem64"},
                {"index": 2, "size": 2 * PAGE, "kind": "mem32"},
            ],
            "msix": {
                "vectors": MSIX_VECTORS,
                "table_bar": 2,
                "table_offset": 0,
                "pba_bar": 2,
                "pba_offset": PAGE,
            },
        },
        source="tests/server",
    )


class DmaModel:
    """The DMA test device: a doorbell write copies LEN bytes from SRC to DST (COPY) or fills
    LEN bytes at DST with the low byte of SRC (FILL), counts it in DONE and raises vector 0."""

    def __init__(self) -> None:
        self.bus: Any = None

    def attach(self, bus: Any) -> None:
        self.bus = bus

    def mmap_areas(self, bar: int) -> list[tuple[int, int]] | None:
        return [(PAGE, 3 * PAGE)] if bar == 0 else None

    def bar_write(self, bar: int, offset: int, data: bytes) -> bool:
        if bar != 0 or offset != REG_DOORBELL:
            return False
        registers = self.bus.bar(0)
        src, dst = struct.unpack_from("<QQ", registers, REG_SRC)
        (length,) = struct.unpack_from("<I", registers, REG_LEN)
        command = int.from_bytes(data, "little")
        if command == CMD_COPY:
            self.bus.dma.write(dst, self.bus.dma.read(src, length))
        elif command == CMD_FILL:
            self.bus.dma.write(dst, bytes([src & 0xFF]) * length)
        (done,) = struct.unpack_from("<I", registers, REG_DONE)
        struct.pack_into("<I", registers, REG_DONE, done + 1)
        self.bus.raise_msix(0)
        return True


class TrapHandle:
    """Per-device state of the test mediator."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.writes: list[tuple[int, bytes]] = []
        self.reads: list[tuple[int, int]] = []
        self.counter = 0
        self.log: Any = None
        self.loaded: bytes | None = None


class TrapMediator:
    """Claims the test devices; traps BAR0 page 1 (which the device would let clients map),
    sees every BAR0 access, saves/restores the registers and counter, logs DMA writes."""

    def __init__(self) -> None:
        self.handles: list[TrapHandle] = []
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.states: dict[str, int] = {}
        """The migration state each device was last moved to, whichever handle moved it."""

    @hookimpl
    def mediator_open(self, device: Any) -> TrapHandle | None:
        if not device.name.startswith(TEST_DEVICE_PREFIX):
            return None
        handle = TrapHandle(device)
        self.handles.append(handle)
        return handle

    @hookimpl
    def mediator_regions(self, handle: TrapHandle) -> list[int]:
        return [0]

    @hookimpl
    def mediator_get_region_info(self, handle: TrapHandle, info: dict[str, Any]) -> Any:
        if info["index"] != 0 or not info["sparse_mmap"]:
            return None
        trapped = (TRAPPED_BY_MEDIATOR * PAGE, (TRAPPED_BY_MEDIATOR + 1) * PAGE)
        areas = []
        for offset, size in info["sparse_mmap"]:
            for page in range(offset, offset + size, PAGE):
                if not trapped[0] <= page < trapped[1]:
                    areas.append([page, PAGE])
        info["sparse_mmap"] = areas
        return info

    @hookimpl
    def mediator_rw(
        self,
        handle: TrapHandle,
        index: int,
        offset: int,
        count: int,
        data: bytes | None,
        is_write: bool,
    ) -> Any:
        if is_write:
            assert data is not None
            if offset == REG_BOOM:
                raise RuntimeError("the test mediator has a bug")
            if offset == REG_STALL:
                self.stalled.set()
                self.release.wait(10)
            if offset == REG_DOORBELL and handle.log is not None:
                # The doorbell makes the device write LEN bytes at DST: mark them.
                (dst,) = struct.unpack("<Q", handle.device.read(0, REG_DST, 8))
                (length,) = struct.unpack("<I", handle.device.read(0, REG_LEN, 4))
                handle.log.mark(dst, length)
            handle.writes.append((offset, data))
            handle.counter += 1
        else:
            handle.reads.append((offset, count))
            if offset == REG_SPIN:
                end = time.perf_counter() + SPIN
                while time.perf_counter() < end:
                    pass
        return None

    @hookimpl
    def mediator_migration_flags(self, handle: TrapHandle) -> int:
        return 1 | 4  # STOP_COPY | PRE_COPY

    @hookimpl
    def mediator_set_state(self, handle: TrapHandle, current: int, new: int) -> Any:
        self.states[handle.device.name] = new
        if new in (3, 6):  # STOP_COPY, PRE_COPY: the saving arcs
            registers = handle.device.read(0, 0, REG_BOOM)
            trapped_page = handle.device.read(0, TRAPPED_BY_MEDIATOR * PAGE, 64)
            return STATE_MAGIC + struct.pack("<Q", handle.counter) + registers + trapped_page
        return None

    @hookimpl
    def mediator_load_state(self, handle: TrapHandle, data: bytes) -> None:
        if not data.startswith(STATE_MAGIC) or len(data) != 4 + 8 + REG_BOOM + 64:
            raise OSError(22, "not a test device state")
        handle.loaded = data
        (handle.counter,) = struct.unpack_from("<Q", data, 4)
        registers = data[12 : 12 + REG_BOOM]
        handle.device.write(0, 0, registers[:REG_DOORBELL])
        handle.device.write(0, REG_DONE, registers[REG_DONE:REG_BOOM])
        handle.device.write(0, TRAPPED_BY_MEDIATOR * PAGE, data[12 + REG_BOOM :])

    @hookimpl
    def mediator_dma_logging_start(self, handle: TrapHandle, log: Any) -> None:
        handle.log = log

    @hookimpl
    def mediator_dma_logging_stop(self, handle: TrapHandle) -> None:
        handle.log = None


def open_fds() -> set[int]:
    """This process's open fds."""
    return {int(name) for name in os.listdir("/proc/self/fd")}


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
    arguments: list[str], env: dict[str, str] | None = None, *, max_fds: int | None = None
) -> tuple[subprocess.Popen[str], str]:
    """Start ``vfio-mediate`` with ``arguments`` (with ``max_fds``, under that RLIMIT_NOFILE)
    and return it with its output up to "Ctrl-C stops"."""

    def limit() -> None:
        if max_fds is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_fds, max_fds))

    process = subprocess.Popen(
        serve_command(*arguments),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        preexec_fn=limit,
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
