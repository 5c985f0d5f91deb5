"""The ``no-core-import`` checks: at import time, in a fresh interpreter that refuses the core,
and at run time, by watching every import statement the plugin's own code runs."""

from __future__ import annotations

import builtins
import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from .._entry_points import MEDIATOR_GROUP

__all__ = ["CORE", "ImportReport", "core_imports_by", "import_fresh"]

CORE = "vfio_mediate"
_PROBE = Path(__file__).with_name("_import_probe.py")


@dataclass(frozen=True)
class ImportReport:
    """What importing a mediator in a fresh interpreter did."""

    attempts: tuple[str, ...]
    """Modules of the core it tried to import (each refused)."""
    error: str | None
    """The exception its import ended with, if any."""
    printed: str
    """What it wrote to stdout while being imported."""


def import_fresh(name: str, workdir: Path) -> ImportReport:
    """Import the mediator's entry point ``name`` in a new interpreter (same ``sys.path``) where
    every import of ``vfio_mediate`` is refused."""
    report = workdir / f"import-{name}.json"
    request = {"path": sys.path, "group": MEDIATOR_GROUP, "name": name, "report": str(report)}
    done = subprocess.run(
        [sys.executable, "-I", str(_PROBE), json.dumps(request)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if not report.exists():
        raise RuntimeError(f"the import probe failed (status {done.returncode}): {done.stderr}")
    data = json.loads(report.read_text(encoding="utf-8"))
    return ImportReport(tuple(data["attempts"]), data["error"], done.stdout)


def _is_core(name: str) -> bool:
    return name == CORE or name.startswith(CORE + ".")


@contextlib.contextmanager
def core_imports_by(modules: frozenset[str]) -> Iterator[list[str]]:
    """Record each import statement of the core that code of ``modules`` (top-level module
    names) runs inside the ``with`` block, even of modules already imported.

    ``import`` statements call ``builtins.__import__`` whether or not the module is loaded, so
    a plugin that imports the core lazily in a hook is seen too.
    """
    seen: list[str] = []
    original = builtins.__import__

    def watching(
        name: str,
        globals: Mapping[str, object] | None = None,
        locals: Mapping[str, object] | None = None,
        fromlist: Sequence[str] | None = (),
        level: int = 0,
    ) -> ModuleType:
        # The interpreter passes the importing module's globals: their __name__ says who imports.
        if level == 0 and _is_core(name):
            importer = str((globals or {}).get("__name__", ""))
            if importer.partition(".")[0] in modules:
                seen.append(f"{importer} imports {name}")
        return original(name, globals, locals, fromlist, level)

    builtins.__import__ = watching
    try:
        yield seen
    finally:
        builtins.__import__ = original
