"""QEMU 11.1 (from the root the nested guest runs on) attaches to the served VF with
``-device vfio-user-pci``, INSIDE the nested guest: SeaBIOS only, no kernel, TCG in TCG.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from vfio_mediate import MediatedDevice, MediatorRegistry, create_device
from vfio_mediate.server import BackgroundServer

VF = "0000:01:10.2"
CONFIG = 7


def _load_qmp() -> Any:
    # The host tests' QMP client (standard library only), from the checkout the guest mounts.
    path = Path(__file__).parents[2] / "qemu" / "qmp.py"
    spec = importlib.util.spec_from_file_location("qmp", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Qmp


Qmp = _load_qmp()


def test_qemu_attaches_to_the_served_vf_and_seabios_programs_its_bars(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """QEMU maps its ROMs (pc.bios, the 0xc0000-0xfffff option ROM area) and the pieces of the
    device's own mapped BARs by DMA_MAP without an fd. A real device cannot reach such memory,
    so each is refused (EOPNOTSUPP; one warning per session); QEMU logs the error reply and
    goes on: the device realizes and SeaBIOS sizes and programs its BARs through the server."""
    caplog.set_level(logging.INFO, logger="vfio_mediate.server")
    directory = Path(tempfile.mkdtemp(dir="/run"))
    sock, qmp_path, log = directory / "vf.sock", directory / "qmp.sock", directory / "qemu.log"
    backend = create_device(VF)
    server = BackgroundServer()
    qemu = None
    try:
        device = MediatedDevice(backend, MediatorRegistry.from_entry_points())
        server.add(device, sock)
        started = time.monotonic()
        option = {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": str(sock)}}
        argv = [
            "qemu-system-x86_64", "-machine", "q35,accel=tcg,memory-backend=mem", "-m", "64M",
            "-object", "memory-backend-memfd,id=mem,size=64M,share=on",
            "-display", "none", "-nodefaults", "-no-reboot",
            "-qmp", f"unix:{qmp_path},server=on,wait=off",
            "-device", json.dumps(option),
        ]  # fmt: skip
        with log.open("wb") as sink:
            qemu = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
        qmp = Qmp(qmp_path, timeout=60)
        try:
            entry = programmed_vf(qmp, started + 60)
        finally:
            qmp.close()
        took = time.monotonic() - started
        assert entry is not None, f"no BARs after {took:.0f} s: {log.read_text()}"
        bars = {bar["bar"]: bar for bar in entry["regions"]}
        assert bars[0]["size"] == 16 << 10 and bars[3]["size"] == 16 << 10
        # SeaBIOS's assignment reached the device's (vfio-virtualized) config space
        for index in (0, 3):
            low = int.from_bytes(backend.read(CONFIG, 0x10 + 4 * index, 4), "little")
            assert low & ~0xF == bars[index]["address"] & 0xFFFFFFF0, (index, bars)
        assert backend.container.mappings, "guest RAM (memfd) is in the IOMMU"
        messages = [(r.levelno, r.getMessage()) for r in caplog.records]
        refused = [m for level, m in messages if "DMA_MAP refused with ENOTSUP" in m]
        warned = [m for level, m in messages if level == logging.WARNING and "DMA_MAP" in m]
        assert len(warned) == 1, messages
        assert any("DMA_MAP 0xfffc0000+0x40000 without an fd" in m for m in refused), refused
        Path("/run/xchg/qemu_attach.json").write_text(json.dumps({"seconds": took}))
    finally:
        if qemu is not None:
            qemu.kill()
            qemu.wait()
        server.close()
        backend.close()


def programmed_vf(qmp: Any, deadline: float) -> dict[str, Any] | None:
    """The VF's ``query-pci`` entry once every BAR has an address (``None`` at the deadline)."""
    while time.monotonic() < deadline:
        for bus in qmp.command("query-pci"):
            for entry in bus["devices"]:
                if (entry["id"]["vendor"], entry["id"]["device"]) != (0x8086, 0x10CA):
                    continue
                if entry["regions"] and all(
                    bar["address"] not in (0, -1) for bar in entry["regions"]
                ):
                    found: dict[str, Any] = entry
                    return found
        time.sleep(0.5)
    return None
