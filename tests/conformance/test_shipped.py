"""The mediators this project ships pass the suite (both installed as their distributions)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from suite_runs import SuiteRun

from vfio_mediate.conformance._mediator import installed_mediators

CAPABILITY_TESTS = {
    "test_declines_other_devices": "is a fallback (trylast=True on mediator_open)",
    "test_device_regions_valid": "adds no device-specific regions",
    "test_migration_flags": "declares no migration v2 support",
    "test_migration_round_trip": "declares no migration v2 support",
    "test_migration_state_machine": "declares no migration v2 support",
    "test_dirty_logging_lifecycle": "declares no dirty logging",
    "test_dirty_logging_reports_device_writes": "declares no dirty logging",
}
"""What the null mediator does not offer: the tests that skip, and why."""


@pytest.fixture(scope="module")
def shipped_run(suite_on: Callable[..., SuiteRun]) -> SuiteRun:
    """The suite, run once on each shipped mediator that is installed."""
    return suite_on(*(name for name in ("null", "i40e") if name in installed_mediators()))


def test_null_mediator_passes_and_skips_what_it_does_not_offer(shipped_run: SuiteRun) -> None:
    outcomes = shipped_run.of("null")
    assert outcomes, shipped_run.output[-3000:]
    skipped = {test: outcome for test, outcome in outcomes.items() if outcome.kind == "skipped"}
    assert set(skipped) == set(CAPABILITY_TESTS)
    for test, reason in CAPABILITY_TESTS.items():
        assert reason in skipped[test].message and "'null'" in skipped[test].message
    assert {outcome.kind for test, outcome in outcomes.items() if test not in skipped} == {"passed"}


def test_i40e_mediator_passes(shipped_run: SuiteRun) -> None:
    if "i40e" not in installed_mediators():
        pytest.skip(
            "the i40e mediator is not installed (no entry point 'i40e' in vfio_mediate.mediators)"
        )
    outcomes = shipped_run.of("i40e")
    assert outcomes, shipped_run.output[-3000:]
    failed = {test: outcome for test, outcome in outcomes.items() if outcome.kind != "passed"}
    assert all(outcome.kind == "skipped" for outcome in failed.values()), failed


def test_shipped_mediators_pass_as_a_whole(shipped_run: SuiteRun) -> None:
    assert shipped_run.status == 0, shipped_run.output[-3000:]
