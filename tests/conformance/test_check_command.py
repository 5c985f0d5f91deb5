"""``vfio-mediate check NAME [pytest args]``: the suite alone, exit status pytest's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from suite_runs import run_pytest

CHECK = [str(Path(sys.executable).with_name("vfio-mediate")), "check"]


def test_check_passes_a_conforming_mediator_and_runs_nothing_else(
    tmp_path: Path, plugin_path: Path
) -> None:
    (tmp_path / "test_own.py").write_text("def test_own():\n    raise AssertionError\n")
    run = run_pytest([], tmp_path, plugin_path, command=[*CHECK, "sample"])
    assert run.status == 0, run.output
    assert {mediator for mediator, _ in run.outcomes} == {"sample"}
    assert {outcome.kind for outcome in run.outcomes.values()} == {"passed"}


def test_check_fails_a_broken_mediator_naming_the_rule(tmp_path: Path, plugin_path: Path) -> None:
    run = run_pytest(["-k", "quiet"], tmp_path, plugin_path, command=[*CHECK, "broken-prints"])
    assert run.status == 1
    assert "[quiet] 'broken-prints' (conformance-broken-prints 0.1.0): its hooks printed" in (
        run.output
    )


def test_check_of_a_name_that_is_not_installed(tmp_path: Path) -> None:
    run = run_pytest([], tmp_path, None, command=[*CHECK, "no-such-mediator"])
    assert run.status == 4
    assert "no installed mediator is named 'no-such-mediator'" in run.output


def test_without_pytest_the_other_commands_work_and_check_says_what_is_missing(
    tmp_path: Path,
) -> None:
    """Building the command line must not import pytest or hypothesis: a user who only serves
    devices has neither installed (a ``None`` in ``sys.modules`` makes a module missing)."""

    def main(*argv: str) -> subprocess.CompletedProcess[str]:
        script = (
            "import sys\n"
            "sys.modules.update(dict.fromkeys(['pytest', '_pytest', 'hypothesis']))\n"
            "from vfio_mediate.cli import main\n"
            f"sys.exit(main({list(argv)!r}))\n"
        )
        return subprocess.run(
            [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True
        )

    listed = main("list")
    assert listed.returncode == 0 and "null" in listed.stdout, listed.stderr
    checked = main("check", "null")
    assert checked.returncode == 2
    assert "check needs pytest and hypothesis" in checked.stderr
