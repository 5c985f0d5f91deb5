"""Boot ONE nested Linux guest (QEMU 11.1 from the cached trixie root, TCG, emulated Intel
IOMMU) in which real PCI devices bind to vfio-pci, run the in-guest checks there with pytest,
and bring their results back.

The guest's root is the cached trixie root over read-only virtio-9p (with Debian's python3,
pydantic, pluggy and pytest); the checkout is bind-mounted into it (read-only, at
``/mnt/checkout``) inside a private mount namespace of the QEMU process, and the project is
installed as distributions on the host (``pip install --no-deps --target``) into a writable
exchange share (``/run/xchg`` in the guest) that also receives the JUnit results.

Devices: an igb PF (0000:01:00.0, kept by igb) with two SR-IOV VFs (0000:01:10.0, 0000:01:10.2,
bound to vfio-pci), an e1000e (0000:00:02.0, vfio-pci), and two conventional e1000 behind a
PCIe-to-PCI bridge (one IOMMU group): the first on vfio-pci, the second left on e1000, so that
group is not viable.
"""

from __future__ import annotations

import lzma
import os
import shutil
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

CHECKOUT = Path(__file__).resolve().parents[2]
GUEST_DIR = CHECKOUT / "tests" / "vfio_pci" / "guest"
CHECKOUT_IN_ROOT = "/mnt/checkout"
KVER = "6.12.117+deb13-amd64"
NINEP_MODULES = (
    "kernel/fs/netfs/netfs.ko.xz",
    "kernel/net/9p/9pnet.ko.xz",
    "kernel/net/9p/9pnet_virtio.ko.xz",
    "kernel/fs/9p/9p.ko.xz",
)
BOOT_TIMEOUT = float(os.environ.get("VFIO_MEDIATE_GUEST_TIMEOUT", "420"))

INIT = """#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in netfs 9pnet 9pnet_virtio 9p; do insmod /lib/$m.ko || echo "insmod $m failed"; done
mkdir -p /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,ro,cache=loose root /newroot \\
  || echo "mounting the root failed"
mount -t tmpfs tmpfs /newroot/run
mount -t tmpfs tmpfs /newroot/tmp
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/run/xchg
mount -t devpts devpts /newroot/dev/pts
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 xchg /newroot/run/xchg
echo "vfio-mediate guest: running checks"
chroot /newroot /bin/sh CHECKOUT/tests/vfio_pci/guest/run.sh > /newroot/run/xchg/guest.log 2>&1
echo "vfio-mediate guest: checks exited $?"
sync
poweroff -f
""".replace("CHECKOUT", CHECKOUT_IN_ROOT)


@dataclass
class CheckResult:
    """One in-guest check: ``outcome`` passed, failed, error or skipped."""

    name: str
    outcome: str
    message: str = ""


@dataclass
class GuestRun:
    """What one boot gave: every check's result and the logs."""

    results: dict[str, CheckResult] = field(default_factory=dict)
    serial: str = ""
    guest_log: str = ""
    seconds: float = 0.0
    problem: str = ""
    outputs: dict[str, str] = field(default_factory=dict)
    """The JSON files the checks left in the exchange share (probe.json, bench.json), by name."""

    def describe(self) -> str:
        """The tail of the logs, for a failure message."""
        return (
            f"{self.problem}\n--- guest log (tail) ---\n{self.guest_log[-4000:]}\n"
            f"--- serial (tail) ---\n{self.serial[-2000:]}"
        )


def _modules(prov: Any) -> dict[str, bytes]:
    base = prov.host_path(f"/lib/modules/{KVER}")
    files = {}
    for relative in NINEP_MODULES:
        name = Path(relative).name.removesuffix(".ko.xz")
        files[f"lib/{name}.ko"] = lzma.decompress((base / relative).read_bytes())
    return files


def install_project(target: Path) -> None:
    """The core and the null mediator as distributions (entry points) into ``target``."""
    if target.exists():
        shutil.rmtree(target)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-compile",
            "--target",
            str(target),
            str(CHECKOUT),
            str(CHECKOUT / "plugins" / "null_mediator"),
        ],
        check=True,
        capture_output=True,
        text=True,
    )


def qemu_argv(prov: Any, initrd: str, xchg_in_root: str) -> list[str]:
    """The nested guest's QEMU command line (paths inside the root)."""
    return [
        prov.qemu, "-accel", "tcg,thread=multi", "-machine", "q35", "-cpu", "max",
        "-smp", "2", "-m", "2048", "-display", "none", "-nodefaults", "-no-reboot",
        "-serial", "stdio", "-monitor", "none",
        "-device", "intel-iommu,intremap=on,caching-mode=on",
        "-device", "pcie-root-port,id=rp1,chassis=1,slot=1,addr=01.0",
        "-device", "igb,bus=rp1,id=pf0",
        "-device", "e1000e,id=nic1,addr=02.0",
        "-device", "pcie-pci-bridge,id=br1,addr=03.0",
        "-device", "e1000,bus=br1,addr=01.0,id=nic2",
        "-device", "e1000,bus=br1,addr=02.0,id=nic3",
        "-kernel", prov.kernel, "-initrd", initrd,
        "-append", "console=ttyS0 quiet panic=-1 intel_iommu=on iommu=pt",
        "-virtfs", "local,path=/,mount_tag=root,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={xchg_in_root},mount_tag=xchg,security_model=none",
    ]  # fmt: skip


def boot_and_check(provisioner: ModuleType, prov: Any, work: Path) -> GuestRun:
    """Boot the guest once, run every in-guest check, return their results."""
    started = time.monotonic()
    run = GuestRun()
    shared = provisioner.shared_dir(prov)
    name = f"xchg-{uuid.uuid4().hex[:8]}"
    xchg = shared / name
    xchg.mkdir()
    xchg_in_root = f"{provisioner.SHARED_DIR_IN_ROOT}/{name}"
    try:
        install_project(xchg / "site")
        initrd = provisioner.build_initramfs(prov, INIT, _modules(prov))
        mount_point = prov.host_path(CHECKOUT_IN_ROOT)
        mount_point.mkdir(parents=True, exist_ok=True)
        chroot_argv = " ".join(_quote(a) for a in qemu_argv(prov, initrd, xchg_in_root))
        script = (
            "set -e; "
            f"mount -t proc proc {_quote(str(prov.host_path('/proc')))}; "
            f"mount --bind -o ro {_quote(str(CHECKOUT))} {_quote(str(mount_point))}; "
            f"exec chroot {_quote(str(prov.root))} {chroot_argv}"
        )
        serial_path = work / "serial.txt"
        with serial_path.open("wb") as sink:
            process = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env={**provisioner.ROOT_ENV},
            )
            try:
                process.wait(timeout=BOOT_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                run.problem = f"the guest did not power off within {BOOT_TIMEOUT:.0f} s"
        run.serial = serial_path.read_text(errors="replace")
        log = xchg / "guest.log"
        run.guest_log = log.read_text(errors="replace") if log.exists() else ""
        junit = xchg / "junit.xml"
        if junit.exists():
            run.results = parse_junit(junit)
        elif not run.problem:
            run.problem = "the guest wrote no results (junit.xml)"
        for extra in xchg.glob("*.json"):
            run.outputs[extra.name] = extra.read_text(errors="replace")
            (work / extra.name).write_bytes(extra.read_bytes())
        for keep in ("guest.log", "junit.xml"):
            if (xchg / keep).exists():
                shutil.copy(xchg / keep, work / keep)
    finally:
        shutil.rmtree(xchg, ignore_errors=True)
    run.seconds = time.monotonic() - started
    return run


def parse_junit(path: Path) -> dict[str, CheckResult]:
    """Each test case of a JUnit file: its outcome and failure message."""
    results = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "?")
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            element = case.find(kind)
            if element is not None:
                outcome = {"failure": "failed"}.get(kind, kind)
                message = (element.get("message") or "") + "\n" + (element.text or "")
                break
        results[name] = CheckResult(name, outcome, message.strip())
    return results


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)
