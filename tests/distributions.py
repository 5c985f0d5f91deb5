"""Installing test projects as real distributions, the way users' environments get them."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import pytest

PROVISION_SCRIPT = Path(__file__).parents[1] / "scripts" / "provision_qemu.py"
"""The QEMU provisioning script (a script, not a package)."""


def load_provisioner() -> ModuleType:
    """The provisioning script, loaded as a module."""
    spec = importlib.util.spec_from_file_location("provision_qemu", PROVISION_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pip_install(projects: Sequence[Path], target: Path, scratch: Path) -> None:
    """``pip install --target`` the projects, built from copies (no build files in the tree)."""
    copies = []
    for project in projects:
        copy = scratch / project.name
        shutil.copytree(project, copy, ignore=shutil.ignore_patterns("__pycache__"))
        copies.append(str(copy))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            *copies,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        pytest.fail(f"pip could not install the test mediators:\n{done.stdout}\n{done.stderr}")
