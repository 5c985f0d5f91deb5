"""The provisioning script: a cached run does nothing, and what it cannot do it says in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from distributions import PROVISION_SCRIPT as SCRIPT


def run_script(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_cached_provision_is_reused_as_it_is(qemu_root: Any, provisioner: ModuleType) -> None:
    stamp = next(qemu_root.root.glob(".vfio-mediate-provisioned*"))
    before = stamp.stat().st_mtime_ns
    again = provisioner.provision(qemu_root.root.parent)
    assert again == qemu_root
    assert stamp.stat().st_mtime_ns == before
    printed = run_script("--cache-dir", str(qemu_root.root.parent), "--print")
    assert printed.returncode == 0, printed.stderr
    paths = json.loads(printed.stdout)
    assert paths["qemu"] == qemu_root.qemu and paths["kernel"] == qemu_root.kernel


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The one ``error:`` line (progress lines and the tool's own output may surround it)."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "provision_qemu: error:" in line]
    return line


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_provisioning_without_root_says_so(tmp_path: Path) -> None:
    tmp_path.chmod(0o777)
    nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
    line = one_line_error(run_script("--cache-dir", str(tmp_path / "cache"), prefix=nobody))
    assert "must run as root" in line


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare"
)
def test_provisioning_without_network_says_so(qemu_root: Any, tmp_path: Path) -> None:
    # the provisioned root guarantees debootstrap is here; an empty cache forces a download
    offline = ("unshare", "--net")
    result = run_script("--cache-dir", str(tmp_path / "cache"), prefix=offline)
    line = one_line_error(result)
    assert "debootstrap failed" in line and "mirror reachable" in line, result.stderr
    assert not (tmp_path / "cache" / "trixie-root" / "proc" / "cpuinfo").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_a_provision_without_the_added_packages_asks_for_root_once(
    provisioner: ModuleType,
) -> None:
    # outside pytest's own temporary root (mode 0700) so that "nobody" can read the stamp
    tmp_path = Path(tempfile.mkdtemp(prefix="vfio-mediate-stamp-"))
    try:
        check_old_stamp(provisioner, tmp_path)
    finally:
        shutil.rmtree(tmp_path)


def check_old_stamp(provisioner: ModuleType, tmp_path: Path) -> None:
    # a finished root of this recipe made before the guest's Python packages were added
    root = tmp_path / "cache" / "trixie-root"
    for inner in ("usr/bin/qemu-system-x86_64", "boot/vmlinuz-test"):
        (root / inner).parent.mkdir(parents=True, exist_ok=True)
        (root / inner).write_text("")
    stamp = {
        "recipe": provisioner.RECIPE_VERSION,
        "qemu": "/usr/bin/qemu-system-x86_64",
        "kernel": "/boot/vmlinuz-test",
        "bios_dir": "/usr/share/qemu",
    }
    (root / ".vfio-mediate-provisioned.json").write_text(json.dumps(stamp))
    assert provisioner.load_provision(tmp_path / "cache") is None  # not reused as it is
    for path in (tmp_path, tmp_path / "cache", root):
        path.chmod(0o777)
    nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
    line = one_line_error(run_script("--cache-dir", str(tmp_path / "cache"), prefix=nobody))
    assert "lacks packages added since it was made" in line and "python3-pydantic" in line
