"""The pytest plugin: loaded everywhere through its entry point, active only with --mediator."""

from __future__ import annotations

from pathlib import Path

from suite_runs import run_pytest

OWN_TEST = "def test_own():\n    pass\n"


def test_entry_point_loads_the_plugin_in_every_pytest_run(tmp_path: Path) -> None:
    run = run_pytest(["--help"], tmp_path, None)
    assert run.status == 0
    assert "--mediator=NAME" in run.output and "--conformance-only" in run.output


def test_without_mediator_nothing_is_added(tmp_path: Path) -> None:
    (tmp_path / "test_own.py").write_text(OWN_TEST)
    run = run_pytest([], tmp_path, None)
    assert run.status == 0, run.output
    assert list(run.outcomes) == [("test_own", "test_own")]
    assert "vfio-mediate conformance" not in run.output


def test_the_suite_runs_beside_the_projects_tests_and_obeys_selection(tmp_path: Path) -> None:
    (tmp_path / "test_own.py").write_text(OWN_TEST)
    run = run_pytest(["--mediator", "null", "-k", "own or rw_result"], tmp_path, None)
    assert run.status == 0, run.output
    assert set(run.outcomes) == {("test_own", "test_own"), ("null", "test_rw_result")}
    assert "vfio-mediate conformance: null (null-mediator " in run.output


def test_conformance_only_collects_nothing_of_the_project(tmp_path: Path) -> None:
    (tmp_path / "test_own.py").write_text("def test_own():\n    raise AssertionError\n")
    run = run_pytest(["--mediator", "null", "--conformance-only"], tmp_path, None)
    assert run.status == 0, run.output
    assert {mediator for mediator, _ in run.outcomes} == {"null"}


def test_a_mediator_that_is_not_installed_is_a_usage_error(tmp_path: Path) -> None:
    run = run_pytest(["--mediator", "no-such-mediator"], tmp_path, None)
    assert run.status == 4
    assert "no installed mediator is named 'no-such-mediator'" in run.output
    assert "null" in run.output  # the names that are installed
