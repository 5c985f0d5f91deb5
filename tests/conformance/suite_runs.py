"""Helpers of the conformance suite's own tests: the test mediators and runs of the suite.

The test mediators (``sample/``, each ``broken/<name>/`` and each ``variants/<name>/``, a
mediator changed in a way that keeps every rule) are real distributions: pip builds and installs
them into one directory, which runs of the suite get on ``PYTHONPATH``, so the suite finds them
through their entry points exactly as it finds a vendor's. The install is cached in
pytest's cache directory by a hash of the sources. The suite always runs in a fresh pytest
process in an empty directory, as a vendor runs it in their own project.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
SAMPLE = HERE / "sample"
BROKEN = HERE / "broken"
VARIANTS = HERE / "variants"


def mediator_projects() -> list[Path]:
    """Every test mediator's project directory."""
    return [
        SAMPLE,
        *(
            path
            for folder in (BROKEN, VARIANTS)
            for path in sorted(folder.iterdir())
            if path.is_dir()
        ),
    ]


def digest(projects: Iterable[Path]) -> str:
    """A short hash of the projects' files (and the Python version): the install's cache key."""
    digest = hashlib.sha256(sys.version.encode())
    for project in projects:
        for path in sorted(project.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(HERE)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def environment(plugin_path: Path | None) -> dict[str, str]:
    """The environment of a child process that sees the test mediators."""
    env = dict(os.environ)
    if plugin_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(plugin_path), *filter(None, [env.get("PYTHONPATH")])]
        )
    return env


@dataclass(frozen=True)
class Outcome:
    """One test of a run of the suite: ``passed``, ``failed``, ``error`` or ``skipped``."""

    kind: str
    message: str = ""
    properties: tuple[tuple[str, str], ...] = ()
    """The test's user properties (``name``, ``value``), as the JUnit XML holds them."""

    def property(self, name: str) -> list[str]:
        """The values of the properties named ``name``."""
        return [value for key, value in self.properties if key == name]


@dataclass(frozen=True)
class SuiteRun:
    """A finished pytest run: exit status, output and every test's outcome."""

    status: int
    output: str
    outcomes: Mapping[tuple[str, str], Outcome]
    """By ``(mediator, test function name)``; a project's own test by ``(module, name)``."""

    def of(self, mediator: str) -> dict[str, Outcome]:
        """The outcomes of the suite collected for ``mediator``, by test name."""
        return {
            test: outcome for (name, test), outcome in self.outcomes.items() if name == mediator
        }


def _outcomes(junit: Path) -> dict[tuple[str, str], Outcome]:
    outcomes = {}
    for case in ElementTree.parse(junit).iter("testcase"):
        # The suite's class names are "conformance[NAME].TestClass"; a project test's, its module.
        owner = case.get("classname", "")
        if owner.startswith("conformance["):
            owner = owner[len("conformance[") : owner.rindex("]")]
        properties = tuple(
            (str(found.get("name")), str(found.get("value")))
            for found in case.iterfind("properties/property")
        )
        outcome = Outcome("passed", properties=properties)
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                text = found.get("message") or found.text or ""
                outcome = Outcome("failed" if kind == "failure" else kind, text, properties)
                break
        outcomes[(owner, str(case.get("name")))] = outcome
    return outcomes


def run_pytest(
    args: Sequence[str], workdir: Path, plugin_path: Path | None, *, command: Sequence[str] = ()
) -> SuiteRun:
    """Run pytest (or ``command``, which must pass its arguments to pytest) in ``workdir``."""
    junit = workdir / "junit.xml"
    launcher = list(command) or [sys.executable, "-m", "pytest"]
    done = subprocess.run(
        [*launcher, "-p", "no:cacheprovider", f"--junitxml={junit}", *args],
        cwd=workdir,
        env=environment(plugin_path),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    outcomes = _outcomes(junit) if junit.exists() else {}
    return SuiteRun(done.returncode, done.stdout + done.stderr, outcomes)
