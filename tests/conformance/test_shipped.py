"""The mediators this project ships pass the suite (both installed as their distributions)."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from suite_runs import SuiteRun

from vfio_mediate.conformance import DIRTY_LOGGING_PROPERTY
from vfio_mediate.conformance._mediator import installed_mediators

CAPABILITY_TESTS = {
    "test_declines_other_devices": "is a fallback (trylast=True on mediator_open)",
    "test_device_regions_valid": "adds no device-specific regions",
    "test_migration_flags": "declares no migration v2 support",
    "test_migration_round_trip": "declares no migration v2 support",
    "test_migration_restores_what_it_saved": "declares no migration v2 support",
    "test_migration_refuses_another_models_stream": "declares no migration v2 support",
    "test_migration_state_machine": "declares no migration v2 support",
    "test_dirty_logging_lifecycle": "declares no dirty logging",
    "test_dirty_logging_reports_device_writes": "declares no dirty logging",
}
"""What the null mediator does not offer: the tests that skip, and why."""

MEASURED = re.compile(
    r"model 'i40e-vf' \(8086:154c\): \d+ slices of guest traffic in (?P<sessions>\d+) logging "
    r"sessions, (?P<reports>\d+) reports: (?P<written>\d+) pages written while logging, "
    r"(?P<reported>\d+) reported, none missed; over-report ratio (?P<ratio>\d+\.\d{3})"
)
"""What the dirty-logging check records for the i40e-vf target."""


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


def require_i40e() -> None:
    """Skip the test when the i40e mediator is not installed."""
    if "i40e" not in installed_mediators():
        pytest.skip(
            "the i40e mediator is not installed (no entry point 'i40e' in vfio_mediate.mediators)"
        )


def test_i40e_mediator_passes_every_test(shipped_run: SuiteRun) -> None:
    """Nothing skipped either (the i40e-vf model's workload gives dirty logging traffic) but
    the stream of another model, which a mediator of one model has none of."""
    require_i40e()
    outcomes = shipped_run.of("i40e")
    assert outcomes, shipped_run.output[-3000:]
    skipped = outcomes.pop("test_migration_refuses_another_models_stream")
    assert "'i40e' migrates one kind of device only" in skipped.message
    assert {outcome.kind for outcome in outcomes.values()} == {"passed"}, outcomes


def test_i40e_dirty_logging_is_checked_under_its_workloads_traffic(shipped_run: SuiteRun) -> None:
    require_i40e()
    test = "test_dirty_logging_reports_device_writes"
    outcome = shipped_run.of("i40e")[test]
    assert outcome.kind == "passed", outcome
    (measured,) = outcome.property(DIRTY_LOGGING_PROPERTY)
    found = MEASURED.fullmatch(measured)
    assert found is not None, measured
    assert int(found["sessions"]) >= 2 and int(found["reports"]) > int(found["sessions"])
    written, reported = int(found["written"]), int(found["reported"])
    assert written > 0
    assert float(found["ratio"]) == pytest.approx(reported / written, abs=1e-3)
    assert f"conformance[i40e]::TestDirtyLogging::{test}: {measured}" in shipped_run.output


def test_shipped_mediators_pass_as_a_whole(shipped_run: SuiteRun) -> None:
    assert shipped_run.status == 0, shipped_run.output[-3000:]
