"""Linux guests that drive served X710 VFs with their own ``iavf`` driver, and the
``vfio-mediate serve`` process they attach to.

Each guest is QEMU (q35, TCG, guest RAM in a shared memfd) booting the provisioned Debian kernel
with a busybox initramfs that holds the kernel's own ``libie``, ``libeth`` and ``iavf`` modules.
Its first serial port is a shell on QEMU's stdin/stdout: ``Guest.run`` sends a command line and
returns what it printed once its exit status arrives. The kernel's console (warnings and worse)
is the second serial port, a file: it explains a guest whose shell no longer answers.
"""

from __future__ import annotations

import contextlib
import lzma
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from .conftest import GUEST_RAM, device_option

MODULES = ("libie", "libeth", "iavf")  # in load order (modules.dep)
COMMAND = shutil.which("vfio-mediate") or str(Path(sys.executable).parent / "vfio-mediate")

INIT = r"""
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp
for module in MODULES; do insmod /lib/modules/$module.ko || echo "insmod $module failed"; done
ip link set lo up
# The shell holds the serial port open from here on, so no command sent after the banner is lost.
export PS1= PS2=
exec sh -c 'stty -echo -onlcr; echo GUEST-SHELL-READY; exec sh' </dev/ttyS0 >/dev/ttyS0 2>&1
"""


class GuestError(AssertionError):
    """A guest command failed or timed out; the message has its output and the kernel log."""


def guest_initramfs(provisioner: ModuleType, root: Any) -> str:
    """The initramfs (path inside the root): busybox, ``INIT`` and the kernel's own iavf
    modules, decompressed for busybox ``insmod``."""
    release = Path(root.kernel).name.removeprefix("vmlinuz-")
    modules = root.host_path(f"/lib/modules/{release}")
    dependencies = {}
    for line in (modules / "modules.dep").read_text().splitlines():
        name, _, _ = line.partition(":")
        dependencies[Path(name).name.split(".")[0]] = name
    files: dict[str, bytes] = {}
    for module in MODULES:
        if module not in dependencies:
            raise FileNotFoundError(f"kernel {release} has no {module} module")
        data = (modules / dependencies[module]).read_bytes()
        if dependencies[module].endswith(".xz"):
            data = lzma.decompress(data)
        files[f"lib/modules/{module}.ko"] = data
    script = INIT.replace("MODULES", " ".join(MODULES))
    inner: str = provisioner.build_initramfs(root, script, files)
    return inner


class Guest:
    """One running guest: its QEMU process, its shell and its kernel log."""

    def __init__(
        self,
        provisioner: ModuleType,
        root: Any,
        name: str,
        initramfs: str,
        socket_in_root: str,
        context: Callable[[], str] = str,
    ) -> None:
        self.name = name
        self._context = context
        shared = provisioner.shared_dir(root)
        self.kernel_log_path: Path = shared / f"kernel-{name}-{os.getpid()}.txt"
        self.kernel_log_path.unlink(missing_ok=True)
        argv = [
            root.qemu, "-machine", "q35,accel=tcg,memory-backend=mem", "-m", GUEST_RAM,
            "-object", f"memory-backend-memfd,id=mem,size={GUEST_RAM},share=on",
            "-display", "none", "-nodefaults", "-no-reboot",
            "-kernel", root.kernel, "-initrd", initramfs,
            "-append", "console=ttyS1 loglevel=4 panic=-1",
            "-serial", "stdio",
            "-serial", f"file:{provisioner.SHARED_DIR_IN_ROOT}/{self.kernel_log_path.name}",
            "-device", device_option(socket_in_root),
        ]  # fmt: skip
        self.process = provisioner.run_in_root(
            root, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._output = bytearray()
        self._arrived = threading.Condition()
        self._commands = 0
        self._reader = threading.Thread(target=self._read, name=f"guest {name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            with self._arrived:
                if not chunk:
                    self._output += b"\n[QEMU exited]\n"
                    self._arrived.notify_all()
                    return
                self._output += chunk
                self._arrived.notify_all()

    def _explain(self) -> str:
        return f"kernel log (end):\n{self.kernel_log()[-6000:]}\n{self._context()}"

    def _wait_for(self, pattern: re.Pattern[bytes], start: int, timeout: float) -> re.Match[bytes]:
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                found = pattern.search(self._output, start)
                if found:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or (self.process.poll() is not None and not self._reader.is_alive()):
                    raise GuestError(
                        f"{self.name}: waited {timeout:.0f} s for {pattern.pattern!r}\n"
                        f"console: {self._output[start:].decode(errors='replace')[-3000:]}\n"
                        + self._explain()
                    )
                self._arrived.wait(left)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until the initramfs has loaded the modules and started the shell."""
        self._wait_for(re.compile(rb"GUEST-SHELL-READY"), 0, timeout)
        self.run("true")  # takes the shell's banner, which must not end up in a command's output

    def run(self, command: str, timeout: float = 30.0, check: bool = True) -> str:
        """Run one shell command line in the guest; its output. A non-zero status raises
        ``GuestError`` when ``check``."""
        self._commands += 1
        marker = f"@@{self._commands}@@"
        with self._arrived:
            start = len(self._output)
        assert self.process.stdin is not None
        self.process.stdin.write(f"{command}\necho {marker}$?\n".encode())
        self.process.stdin.flush()
        found = self._wait_for(
            re.compile(re.escape(marker.encode()) + rb"(\d+)\r?\n"), start, timeout
        )
        output = self._output[start : found.start()].decode(errors="replace")
        if check and found.group(1) != b"0":
            raise GuestError(
                f"{self.name}: `{command}` exited {found.group(1).decode()}:\n{output}\n"
                + self._explain()
            )
        return output

    def wait_until(self, command: str, timeout: float, interval: float = 0.5) -> str:
        """Run ``command`` until it succeeds (its output), at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                return self.run(command, timeout=max(left, 5.0))
            except GuestError:
                if time.monotonic() + interval > deadline:
                    raise
            time.sleep(interval)

    def kernel_log(self) -> str:
        """What the guest kernel printed so far."""
        try:
            return self.kernel_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Power the guest off (kill QEMU if it does not go)."""
        with contextlib.suppress(OSError, ValueError):
            assert self.process.stdin is not None
            self.process.stdin.write(b"poweroff -f\n")
            self.process.stdin.close()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=5)
        self.kernel_log_path.unlink(missing_ok=True)


class Server:
    """``vfio-mediate -v serve`` with one device per socket, its log (stderr) in a file."""

    def __init__(self, sockets: list[Path], log: Path, devices: str = "i40e-vf") -> None:
        self.log = log
        argv = [COMMAND, "-v", "serve"]
        for path in sockets:
            argv += ["--device", devices, "--socket", str(path)]
        self.sockets = sockets
        with log.open("wb") as sink:
            self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=sink)
        printed = b""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + 30
        while b"Ctrl-C stops" not in printed:  # printed once every socket listens
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.stop()
                raise AssertionError(f"no server after 30 s: {printed!r}\n{self.log_text()}")
            chunk = os.read(fd, 4096)
            if not chunk:
                self.stop()
                raise AssertionError(f"the server exited: {printed!r}\n{self.log_text()}")
            printed += chunk
        self.printed = printed

    def log_text(self) -> str:
        """What the server logged so far."""
        return self.log.read_text(errors="replace")

    def log_tail(self) -> str:
        """The end of the server's log, to explain a guest's failure."""
        return "server log (end):\n" + self.log_text()[-4000:]

    def stop(self) -> int:
        """Stop it the way a user does (SIGINT); its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.communicate()
        return self.process.returncode
