"""One nested guest per test session (see nested.py): every in-guest check runs in that boot.

Under ``CI=true`` the guest must boot (a failure to provision or boot fails the tests);
elsewhere the tests skip, saying why.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from distributions import load_provisioner

from .nested import GuestRun, boot_and_check

collect_ignore = ["guest"]  # the in-guest checks run inside the guest, not on the host


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the nested vfio-pci tests, but {reason}")
    pytest.skip(f"nested vfio-pci guest not available here: {reason}")


@pytest.fixture(scope="session")
def guest_run(tmp_path_factory: pytest.TempPathFactory) -> GuestRun:
    """Boot the nested guest once and run every in-guest check; their results."""
    if os.geteuid() != 0:
        _unavailable("it needs root (chroot, mount namespaces)")
    if shutil.which("unshare") is None:
        _unavailable("it needs unshare (util-linux)")
    provisioner: Any = load_provisioner()
    try:
        prov = provisioner.provision()
    except provisioner.ProvisionError as exc:
        _unavailable(f"QEMU could not be provisioned: {exc}")
    work: Path = tmp_path_factory.mktemp("nested-vfio")
    run = boot_and_check(provisioner, prov, work)
    if not run.results:
        pytest.fail(f"the nested guest gave no results after {run.seconds:.0f} s: {run.describe()}")
    return run
