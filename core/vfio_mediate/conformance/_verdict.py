"""How the suite fails: every failure message starts with the id of the rule that was broken."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NoReturn, ParamSpec, TypeVar

import pytest

from .._errors import ContractViolation
from .._rules import Rule

__all__ = ["RuleFailure", "checks", "describe", "fail", "tagged"]

P = ParamSpec("P")
R = TypeVar("R")


class RuleFailure(AssertionError):
    """A broken rule, found inside code that pytest does not run directly (the migration state
    machine): an ``AssertionError`` so that hypothesis shrinks it like any failed check."""


def tagged(rule: str, message: str) -> str:
    """``[rule-id] message``: the form of every failure message of the suite."""
    return f"[{rule}] {message}"


def fail(rule: Rule, message: str) -> NoReturn:
    """Fail the running test because the mediator broke ``rule``."""
    pytest.fail(tagged(rule.value, message), pytrace=False)


def checks(rule: Rule) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Mark a test as the check of ``rule`` and make every way it can fail name a rule.

    A ``ContractViolation`` the core raises names its own rule (the core found it first); any
    other unexpected exception is reported under ``rule``, with the mediator's traceback.
    """

    def decorate(test: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(test)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return test(*args, **kwargs)
            except ContractViolation as exc:
                raise RuleFailure(tagged(exc.rule, str(exc))) from exc
            except RuleFailure:
                raise
            except Exception as exc:
                notes = "".join(f"\n{note}" for note in getattr(exc, "__notes__", ()))
                raise RuleFailure(
                    tagged(rule.value, f"{type(exc).__name__}: {exc}{notes}")
                ) from exc

        run.conformance_rule = rule  # type: ignore[attr-defined]
        return run

    return decorate


def describe(value: Any, limit: int = 60) -> str:
    """A short ``repr`` for failure messages (hook results can be large)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
