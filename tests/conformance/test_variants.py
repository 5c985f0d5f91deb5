"""Mediators that keep every rule in unusual ways pass the suite (``variants/``)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from suite_runs import SAMPLE, VARIANTS, SuiteRun


@pytest.mark.parametrize(
    "name",
    [
        # Importing the protocols under TYPE_CHECKING is no import of the core at run time.
        "sample-typed",
        # A shadow of registers in the handle, which the device may change under.
        "sample-handle-shadow",
        # Interrupts of an observed vector swallowed, every other one.
        "sample-irq-swallows",
    ],
)
def test_a_mediator_that_keeps_every_rule_its_own_way_passes(
    suite_on: Callable[..., SuiteRun], name: str
) -> None:
    run = suite_on("sample-typed", "sample-handle-shadow", "sample-irq-swallows")
    outcomes = run.of(name)
    assert outcomes, run.output[-3000:]
    assert {outcome.kind for outcome in outcomes.values()} == {"passed"}, outcomes


def test_the_protocols_type_check_a_mediator(tmp_path: Path) -> None:
    """A vendor's ``mypy --strict`` accepts hooks typed with ``Device`` and ``DirtyPageLog``
    (and would reject a use the protocols do not offer)."""
    typed = VARIANTS / "typed" / "sample_typed.py"
    wrong = tmp_path / "wrong_use.py"
    wrong.write_text(
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from vfio_mediate.hookspecs import Device\n"
        "def peek(device: Device) -> None:\n"
        "    assert device.dma is not None\n"
        "    device.dma.watch(print)\n"
    )

    def mypy(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(path)],
            cwd=tmp_path,
            env={**os.environ, "MYPYPATH": str(SAMPLE)},
            capture_output=True,
            text=True,
            check=False,
        )

    good = mypy(typed)
    assert good.returncode == 0, good.stdout
    bad = mypy(wrong)
    assert bad.returncode == 1
    assert '"DmaAccess" has no attribute "watch"' in bad.stdout, bad.stdout
