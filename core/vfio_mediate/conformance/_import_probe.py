"""Run by path in a fresh interpreter: import one mediator's entry point with ``vfio_mediate``
refused, and write what was attempted to a JSON report.

It is never imported as a module of ``vfio_mediate`` (that would import the core it checks
for), so it imports nothing of it: argv[1] is a JSON request with ``path`` (``sys.path`` to
use), ``group``, ``name`` (the entry point) and ``report`` (where to write the result).
"""

from __future__ import annotations

import importlib.abc
import json
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any

CORE = "vfio_mediate"


class RefuseCore(importlib.abc.MetaPathFinder):
    """Refuses every import of the core and remembers each attempt."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        """Refuse ``vfio_mediate`` and its modules; leave every other import alone."""
        if fullname == CORE or fullname.startswith(CORE + "."):
            self.attempts.append(fullname)
            raise ModuleNotFoundError(f"{fullname} is refused (a mediator must not import it)")


def main(argv: Sequence[str]) -> int:
    """Import the entry point, then write ``{"attempts": [...], "error": str | None}``."""
    request = json.loads(argv[1])
    sys.path[:] = request["path"]
    finder = RefuseCore()
    sys.meta_path.insert(0, finder)
    error = None
    try:
        found = [
            ep for ep in metadata.entry_points(group=request["group"]) if ep.name == request["name"]
        ]
        found[0].load()
    except BaseException as exc:  # whatever the plugin raises at import is the report
        error = f"{type(exc).__name__}: {exc}"
    with open(request["report"], "w", encoding="utf-8") as report:
        json.dump({"attempts": finder.attempts, "error": error}, report)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
