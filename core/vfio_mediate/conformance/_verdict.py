"""How the suite fails: each broken rule once, in one line, ``[rule] plugin: what, where``, with
any detail (the plugin's own traceback, the steps that reproduce it) on the lines after.

A broken rule shows in every test that happens to run into it (a bad region info at every
open, a wrong read length in every workout). The ``Ledger`` of a mediator decides where it is
reported: by a test of that rule (``checks``), or, when none of those runs, by the first test
that met it. Every other test that meets it is skipped, naming it, instead of failing again.
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, ParamSpec, TypeVar, final

import pluggy
import pytest

from .._errors import ContractViolation
from .._rules import Rule

__all__ = [
    "Ledger",
    "RuleFailure",
    "checks",
    "core_message",
    "describe",
    "fail",
    "plugin_frames",
    "reporting_to",
    "rules_of",
    "tagged",
]

P = ParamSpec("P")
R = TypeVar("R")

_CORE = Path(__file__).parents[1]
_PLUGGY = Path(pluggy.__file__).parent
_FRAMES = 6
"""The plugin's innermost frames shown under a failure."""


class RuleFailure(AssertionError):
    """A broken rule found inside code that pytest does not run directly (the migration state
    machine): an ``AssertionError`` so that hypothesis shrinks it like any failed check."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(tagged(rule, message))
        self.rule = rule
        self.message = message


def tagged(rule: str, message: str) -> str:
    """``[rule-id] message``: the form of every failure message of the suite."""
    return f"[{rule}] {message}"


def core_message(exc: ContractViolation) -> str:
    """What a ``ContractViolation`` says, without the plugin and rule it already names."""
    return str(exc).removeprefix(f"{exc.plugin}: ").removeprefix(f"broke rule {exc.rule!r}: ")


def plugin_frames(exc: BaseException | None) -> str:
    """The traceback of ``exc`` in the plugin's own code (no frame of the core, pluggy or the
    suite), innermost last, or ``""``."""
    if exc is None or exc.__traceback__ is None:
        return ""
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if not Path(frame.filename).is_relative_to(_CORE)
        and not Path(frame.filename).is_relative_to(_PLUGGY)
    ][-_FRAMES:]
    if not frames:
        return ""
    lines = "".join(traceback.format_list(frames))
    return f"in the plugin:\n{lines}{type(exc).__name__}: {exc}"


@final
@dataclass
class Ledger:
    """Where each rule a mediator broke is reported, over one run of its suite.

    ``selected`` counts, per rule, the tests of that rule still to run (after ``-k``/``-m``);
    each test of the suite runs inside ``running``.
    """

    plugin: str
    """The mediator, as failures name it (``'name' (distribution version)``)."""
    selected: dict[str, int] = field(default_factory=dict)
    reported: dict[str, str] = field(default_factory=dict)
    """Rule -> the test that reported it."""
    pending: dict[str, str] = field(default_factory=dict)
    """Rule -> the message of a violation that tests of other rules met, not yet reported."""
    test: str = ""
    rule: str | None = None
    """The test running now and the rule it checks."""

    @contextmanager
    def running(self, test: str, rule: str) -> Iterator[None]:
        """Around one test of ``rule``: when it is the last of that rule to run, it also
        reports what tests of other rules met of it (whatever its own outcome)."""
        self.test, self.rule = test, rule
        own: list[str] = []
        try:
            yield
        except (pytest.fail.Exception, pytest.skip.Exception) as outcome:
            due = self._due(rule)
            if not due:
                raise
            if isinstance(outcome, pytest.fail.Exception):
                own.append(str(outcome.msg))
        else:
            due = self._due(rule)
        finally:
            self.test, self.rule = "", None
        if due:  # raised here, not while handling the test's outcome: one message, no chain
            pytest.fail("\n".join([*own, *due]), pytrace=False)

    def _due(self, rule: str) -> list[str]:
        self.selected[rule] = self.selected.get(rule, 1) - 1
        due = []
        for waiting in list(self.pending):
            if waiting in self.reported:
                del self.pending[waiting]
            elif self.selected.get(waiting, 0) <= 0:
                due.append(self.pending.pop(waiting))
                self.reported[waiting] = self.test
        return due

    def broken(self, rule: str, what: str, detail: str = "") -> NoReturn:
        """The mediator broke ``rule``: fail the running test, or skip it when the rule is
        reported elsewhere (already, or later by a test of that rule)."""
        message = tagged(rule, f"{self.plugin}: {what}") + (f"\n{detail}" if detail else "")
        if rule in self.reported:
            pytest.skip(f"the mediator breaks [{rule}], reported by {self.reported[rule]}")
        if rule != self.rule and self.selected.get(rule, 0) > 0:
            self.pending.setdefault(rule, message)
            pytest.skip(f"the mediator breaks [{rule}], which a test of that rule reports")
        self.reported[rule] = self.test
        self.pending.pop(rule, None)
        pytest.fail(message, pytrace=False)


_current: list[Ledger] = []


@contextmanager
def reporting_to(ledger: Ledger) -> Iterator[None]:
    """Make ``ledger`` the one ``fail`` and ``checks`` report to (around one test)."""
    _current.append(ledger)
    try:
        yield
    finally:
        _current.pop()


def fail(rule: Rule, message: str, detail: str = "") -> NoReturn:
    """The mediator broke ``rule`` (``message`` says what and where)."""
    if not _current:  # outside a test of the suite (a helper called on its own)
        pytest.fail(tagged(rule.value, message), pytrace=False)
    _current[-1].broken(rule.value, message, detail)


def checks(rule: Rule) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Mark a test as a check of ``rule`` and make every way it can fail name a rule.

    A ``ContractViolation`` the core raises names its own rule (the core found it first); a
    ``RuleFailure`` its rule; any other exception is reported under ``rule``, with the
    plugin's frames of its traceback.
    """

    def decorate(test: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(test)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            if not _current:
                return _checked(*args, **kwargs)
            with _current[-1].running(test.__qualname__, rule.value):
                return _checked(*args, **kwargs)

        def _checked(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return test(*args, **kwargs)
            except ContractViolation as exc:
                found = (Rule(exc.rule), core_message(exc), plugin_frames(exc.__cause__))
            except RuleFailure as exc:
                found = (Rule(exc.rule), exc.message, "\n".join(getattr(exc, "__notes__", ())))
            except Exception as exc:
                found = (rule, f"{type(exc).__name__}: {exc}", plugin_frames(exc))
            # Failed outside the handler, so that pytest shows the message, not the chain.
            fail(*found)

        run.conformance_rule = rule  # type: ignore[attr-defined]
        return run

    return decorate


def rules_of(tests: Collection[Any]) -> dict[str, int]:
    """How many of ``tests`` (test functions) check each rule."""
    counts: dict[str, int] = {}
    for test in tests:
        rule = getattr(test, "conformance_rule", None)
        if rule is not None:
            counts[rule.value] = counts.get(rule.value, 0) + 1
    return counts


def describe(value: Any, limit: int = 60) -> str:
    """A short ``repr`` for failure messages (hook results can be large)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
