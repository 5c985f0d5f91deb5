"""The vendor's three steps in ``CONTRIBUTING.md`` work as written: a project made of the
document's snippets, installed as a distribution, passes the suite by both commands."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from distributions import pip_install
from suite_runs import environment

DOC = Path(__file__).parents[2] / "CONTRIBUTING.md"
FILE_BLOCK = re.compile(r"^`(?P<name>[\w.]+)`:\n\n```\w+\n(?P<body>.*?)^```$", re.M | re.S)
SHELL_BLOCK = re.compile(r"^```sh\n(?P<body>.*?)^```$", re.M | re.S)
INSTALL = "pip install -e . 'vfio-mediate[check]'"
"""Step 3's install, which the test does without network: vfio-mediate is installed already,
and the project goes into a directory of its own (pip cannot install editable to a target)."""

PROGRAMS = {
    "vfio-mediate": [str(Path(sys.executable).with_name("vfio-mediate"))],
    "pytest": [sys.executable, "-m", "pytest"],
}


def test_the_three_steps_from_an_empty_directory(tmp_path: Path) -> None:
    text = DOC.read_text(encoding="utf-8")
    project = tmp_path / "my-mediator"
    project.mkdir()
    files = {match["name"]: match["body"] for match in FILE_BLOCK.finditer(text)}
    assert sorted(files) == ["my_mediator.py", "pyproject.toml"]
    for name, body in files.items():
        (project / name).write_text(body, encoding="utf-8")
    (shell,) = SHELL_BLOCK.finditer(text)
    install, *checks = shell["body"].splitlines()
    assert install == INSTALL and checks

    site = tmp_path / "site"
    pip_install([project], site, tmp_path / "build")
    for line in checks:
        program, *args = shlex.split(line)
        done = subprocess.run(
            [*PROGRAMS[program], *args, "-p", "no:cacheprovider"],
            cwd=project,
            env=environment(site),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
        assert " passed" in done.stdout and "failed" not in done.stdout, done.stdout
