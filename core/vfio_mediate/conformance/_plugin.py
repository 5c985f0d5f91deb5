"""The pytest side: ``--mediator NAME`` adds the conformance suite for that installed mediator.

Without ``--mediator`` nothing is collected and nothing changes: the plugin is loaded in every
pytest run of an environment that has vfio-mediate (its ``pytest11`` entry point), so a
project's own tests must not notice it.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest

from .._errors import ContractViolation, PluginLoadError

if TYPE_CHECKING:
    from ._mediator import MediatorUnderTest

__all__ = [
    "DIRTY_LOGGING_PROPERTY",
    "LOADED",
    "MEDIATOR_NAME",
    "ConformanceModule",
    "LoadFailure",
    "pytest_addoption",
    "pytest_collection_finish",
    "pytest_collection_modifyitems",
    "pytest_configure",
    "pytest_ignore_collect",
    "pytest_report_header",
    "pytest_runtest_makereport",
    "pytest_sessionfinish",
    "pytest_terminal_summary",
]

SUITE = "vfio_mediate.conformance._suite"
MEDIATOR_NAME = pytest.StashKey[str]()
"""Stashed on each suite module node: the entry-point name of the mediator it checks."""
LOADED = pytest.StashKey[Any]()
"""Stashed on each suite module node: the ``MediatorUnderTest``, loaded at collection."""
LEDGER = pytest.StashKey[Any]()
"""Stashed on each suite module node: its ``Ledger`` (where each broken rule is reported)."""
DIRTY_LOGGING_PROPERTY = "dirty-logging"
"""The user property (``TestReport.user_properties``, a JUnit XML property) in which the
dirty-logging check records, per target, what it measured under traffic: pages written and
reported and the over-report ratio. The terminal summary shows each."""


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--mediator NAME`` (repeatable) and ``--conformance-only``."""
    group = parser.getgroup("vfio-mediate", "vfio-mediate plugin conformance suite")
    group.addoption(
        "--mediator",
        action="append",
        default=[],
        metavar="NAME",
        dest="vfio_mediate_mediators",
        help="run the conformance suite on the installed mediator NAME (its entry point in "
        "vfio_mediate.mediators); may be given more than once",
    )
    group.addoption(
        "--conformance-only",
        action="store_true",
        dest="vfio_mediate_conformance_only",
        help="with --mediator: collect only the conformance suite, none of the project's tests",
    )


def _mediators(config: pytest.Config) -> list[str]:
    names: list[str] = config.getoption("vfio_mediate_mediators")
    return list(dict.fromkeys(names))


def pytest_configure(config: pytest.Config) -> None:
    """Check that every ``--mediator`` names an installed mediator (without importing it)."""
    names = _mediators(config)
    if not names:
        return
    from ._mediator import installed_mediators

    installed = installed_mediators()
    missing = [name for name in names if name not in installed]
    if missing:
        known = ", ".join(sorted(installed)) or "none"
        raise pytest.UsageError(
            f"--mediator: no installed mediator is named {', '.join(map(repr, missing))} "
            f"(entry points of vfio_mediate.mediators: {known})"
        )


def pytest_report_header(config: pytest.Config) -> str | None:
    """Name the mediators being checked and where they come from."""
    names = _mediators(config)
    if not names:
        return None
    from ._mediator import installed_mediators

    installed = installed_mediators()
    described = []
    for name in names:
        dists = {f"{ep.dist.name} {ep.dist.version}" for ep in installed[name] if ep.dist}
        described.append(f"{name} ({', '.join(sorted(dists)) or 'no distribution'})")
    return f"vfio-mediate conformance: {'; '.join(described)}"


UNREPORTED = pytest.StashKey[list[str]]()
"""Stashed on the config: broken rules no test reported (see ``pytest_sessionfinish``)."""


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A rule the tests of other rules met, and whose own tests never ran to the end (a fixture
    of theirs failed), is reported here: the run fails and the summary names it."""
    ledgers = {
        id(module): module.stash[LEDGER]
        for item in session.items
        if (module := item.getparent(ConformanceModule)) is not None
    }
    unreported = [message for ledger in ledgers.values() for message in ledger.pending.values()]
    if unreported:
        session.config.stash[UNREPORTED] = unreported
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Show what the suite measured (``DIRTY_LOGGING_PROPERTY``), whatever the verdicts, and
    any broken rule no test reported."""
    unreported = terminalreporter.config.stash.get(UNREPORTED, [])
    if unreported:
        terminalreporter.section("vfio-mediate conformance: broken rules no test reported")
        for message in unreported:
            terminalreporter.write_line(message)
    measured = [
        (report.nodeid, value)
        for reports in terminalreporter.stats.values()
        for report in reports
        if isinstance(report, pytest.TestReport) and report.when == "call"
        for name, value in report.user_properties
        if name == DIRTY_LOGGING_PROPERTY
    ]
    if not measured:
        return
    terminalreporter.section("vfio-mediate conformance: dirty logging under traffic")
    for nodeid, value in measured:
        terminalreporter.write_line(f"{nodeid}: {value}")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """With ``--conformance-only``, the project's own files are not collected."""
    if _mediators(config) and config.getoption("vfio_mediate_conformance_only"):
        return True
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Add the suite once per ``--mediator``, before other plugins select (``-k``, ``-m``)
    and order the items."""
    names = _mediators(config)
    if not names:
        return
    from ._verdict import Ledger

    spec = importlib.util.find_spec(SUITE)
    assert spec is not None and spec.origin is not None
    for name in names:
        node = f"conformance[{name}]"
        loaded = _load(name)
        if isinstance(loaded, str):
            items.append(
                LoadFailure.from_parent(session, name="load", nodeid=f"{node}::load", why=loaded)
            )
            continue
        module = ConformanceModule.from_parent(
            session, path=Path(spec.origin), name=node, nodeid=node
        )
        module.stash[MEDIATOR_NAME] = name
        module.stash[LOADED] = loaded
        module.stash[LEDGER] = Ledger(loaded.describe())
        items.extend(session.genitems(module))


def _load(name: str) -> MediatorUnderTest | str:
    """The installed mediator ``name``, loaded, or why it cannot be."""
    from ._mediator import MediatorUnderTest
    from ._verdict import core_message, tagged

    try:
        return MediatorUnderTest.load(name)
    except ContractViolation as exc:
        return tagged(exc.rule, f"{exc.plugin}: cannot be loaded: {core_message(exc)}")
    except (LookupError, PluginLoadError) as exc:
        return f"mediator {name!r} cannot be loaded: {exc}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failure of the suite is its message: the core's logs of the same fault (with the
    plugin's traceback, which the message shows already) are left out of the report."""
    report = yield
    if report.failed and item.getparent(ConformanceModule) is not None:
        report.sections = [
            (title, text) for title, text in report.sections if not title.startswith("Captured log")
        ]
    return report


def pytest_collection_finish(session: pytest.Session) -> None:
    """Count, per mediator, the tests of each rule that will run (after ``-k`` and ``-m``):
    a broken rule is reported by the last of them to run (``Ledger``)."""
    from ._verdict import rules_of

    tests: dict[ConformanceModule, list[Any]] = {}
    for item in session.items:
        module = item.getparent(ConformanceModule)
        if module is not None and isinstance(item, pytest.Function):
            tests.setdefault(module, []).append(item.function)
    for module, functions in tests.items():
        module.stash[LEDGER].selected.update(rules_of(functions))


class ConformanceModule(pytest.Module):
    """The suite module, collected for one mediator (its name is in the node's stash)."""

    def _getobj(self) -> ModuleType:
        # The suite is a module of this package, already importable: import it as such rather
        # than by path, whatever the project's import mode is.
        return importlib.import_module(SUITE)


class LoadFailure(pytest.Item):
    """The one test of a mediator that cannot be loaded: it fails, saying why, and nothing else
    of the suite runs for it."""

    def __init__(self, *, why: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.why = why

    def runtest(self) -> None:
        """Fail with the reason."""
        pytest.fail(self.why, pytrace=False)

    def reportinfo(self) -> tuple[Path | str, int | None, str]:
        """Where the failure is: the mediator, not a file."""
        return self.name, None, self.name
