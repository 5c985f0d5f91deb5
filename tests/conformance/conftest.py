"""Fixtures for the conformance suite's own tests (helpers in ``suite_runs``)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from distributions import pip_install
from suite_runs import SuiteRun, digest, mediator_projects, run_pytest


@pytest.fixture(scope="session")
def plugin_path(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory where every test mediator is installed (for ``PYTHONPATH``), kept in
    pytest's cache under a hash of their sources, so that only a change rebuilds them."""
    projects = mediator_projects()
    cache = getattr(request.config, "cache", None)
    root = cache.mkdir("vfio-mediate-conformance") if cache else tmp_path_factory.mktemp("cache")
    key = digest(projects)
    installed = root / key
    if installed.is_dir():
        return installed
    building = root / f".{key}-{os.getpid()}"
    pip_install(projects, building, tmp_path_factory.mktemp("sources"))
    try:
        building.rename(installed)
    except OSError:  # another session installed the same sources meanwhile
        shutil.rmtree(building)
    for stale in root.iterdir():
        if stale.name != key and not stale.name.startswith("."):
            shutil.rmtree(stale, ignore_errors=True)
    return installed


@pytest.fixture(scope="session")
def suite_on(
    plugin_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., SuiteRun]:
    """``suite_on(*names, pytest_args=())``: the suite run on the named mediators in one pytest
    process, in an empty directory (each run once per session)."""
    runs: dict[tuple[tuple[str, ...], tuple[str, ...]], SuiteRun] = {}

    def run(*names: str, pytest_args: Sequence[str] = ()) -> SuiteRun:
        key = (names, tuple(pytest_args))
        if key not in runs:
            workdir = tmp_path_factory.mktemp("vendor-project")
            args = [arg for name in names for arg in ("--mediator", name)]
            runs[key] = run_pytest([*args, *pytest_args], workdir, plugin_path)
        return runs[key]

    return run
