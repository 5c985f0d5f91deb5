"""Real devices on vfio-pci, mediated and served, checked inside ONE nested guest.

Each in-guest check (tests/vfio_pci/guest/check_*.py) is reported here as a test of its own,
with its failure message; the guest boots once for all of them (the ``guest_run`` fixture).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from .nested import GUEST_DIR, GuestRun


def guest_checks() -> list[str]:
    """The names of the in-guest checks (test functions of guest/check_*.py)."""
    names = []
    for path in sorted(GUEST_DIR.glob("check_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names += [
            node.name
            for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
        ]
    return names


@pytest.mark.parametrize("check", guest_checks())
def test_in_guest(guest_run: GuestRun, check: str) -> None:
    result = guest_run.results.get(check)
    if result is None:
        pytest.fail(f"check {check} did not run in the guest: {guest_run.describe()}")
    if result.outcome == "skipped":
        pytest.skip(result.message)
    assert result.outcome == "passed", f"{check} {result.outcome} in the guest:\n{result.message}"


def test_the_benchmark_numbers_are_reported(guest_run: GuestRun) -> None:
    """benchmarks/bench_vfio.py ran in the guest (see -rP for its numbers)."""
    text = guest_run.outputs.get("bench.json")
    if text is None:
        pytest.fail("the in-guest benchmark left no bench.json")
    for label, micros in json.loads(text).items():
        print(f"{label:<52} {micros:8.2f} us")


def test_qemu_in_the_guest_programmed_the_bars_within_a_minute(guest_run: GuestRun) -> None:
    """guest/check_qemu_attach.py left how long QEMU took (see -rP)."""
    text = guest_run.outputs.get("qemu_attach.json")
    if text is None:
        pytest.fail("the in-guest QEMU attach check left no qemu_attach.json")
    seconds = json.loads(text)["seconds"]
    print(f"QEMU in the guest: VF realized and its BARs programmed after {seconds:.1f} s")
    assert seconds < 60


def test_the_guest_run_stays_within_its_budget(guest_run: GuestRun) -> None:
    # A boot is ~6 s quiet, ~20 s loaded; the checks start several Python processes under TCG.
    assert guest_run.seconds < 240, f"boot and checks took {guest_run.seconds:.0f} s"


def test_every_check_is_listed() -> None:
    assert len(guest_checks()) >= 10
    assert Path(GUEST_DIR / "run.sh").is_file()
