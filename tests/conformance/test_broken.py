"""The suite fails each deliberately broken mediator, and the failure names the broken rule.

Each ``broken/<name>/`` is the sample mediator (which keeps every rule) with one hook changed;
all of them are checked in one pytest run of the suite, as a vendor would check theirs.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from suite_runs import BROKEN, SuiteRun

from vfio_mediate import Rule

CAUGHT_BY: dict[str, tuple[str, Rule]] = {
    "bad-signature": ("test_hooks_are_the_contracts", Rule.HOOK_SIGNATURE),
    "claims-others": ("test_declines_other_devices", Rule.OPEN_TARGETS),
    "core-import": ("test_does_not_import_the_core", Rule.NO_CORE_IMPORT),
    "core-import-late": ("test_does_not_import_the_core", Rule.NO_CORE_IMPORT),
    "device-regions-unmappable": ("test_device_regions_valid", Rule.DEVICE_REGIONS_VALID),
    "dirty-misses": ("test_dirty_logging_reports_device_writes", Rule.DIRTY_LOGGING),
    "errors-without-errno": ("test_access_errors", Rule.ACCESS_ERRORS),
    "migration-loads-garbage": ("test_migration_state_machine", Rule.MIGRATION),
    "migration-no-state": ("test_migration_round_trip", Rule.MIGRATION),
    "mmap-garbage": ("test_mmap_result", Rule.MMAP_RESULT),
    "never-claims": ("test_claims_its_targets", Rule.OPEN_TARGETS),
    "no-reopen": ("test_reopen", Rule.REOPEN),
    "open-raises": ("test_open_result", Rule.OPEN_RESULT),
    "prints": ("test_quiet", Rule.QUIET),
    "region-info-maps-trapped": ("test_region_info_valid", Rule.REGION_INFO_VALID),
    "region-info-unmediated": ("test_region_info_valid", Rule.REGION_INFO_VALID),
    "release-raises": ("test_release_once", Rule.RELEASE_ONCE),
    "rw-outside": ("test_rw_result", Rule.RW_RESULT),
    "rw-raises": ("test_access_errors", Rule.ACCESS_ERRORS),
    "rw-short-read": ("test_rw_result", Rule.RW_RESULT),
    "shared-state": ("test_isolation", Rule.ISOLATION),
}
"""Each broken mediator: the suite's test that must catch it and the rule it must name."""

RULE_TAG = re.compile(r"\[([a-z-]+)\]")


@pytest.fixture(scope="module")
def broken_run(suite_on: Callable[..., SuiteRun]) -> SuiteRun:
    """The suite, run once on the sample and every broken mediator.

    The migration state machine takes most of a run's time, so it runs only where it has
    something to find: on the sample and on the mediator that loads garbage.
    """
    names = [f"broken-{name}" for name in sorted(CAUGHT_BY)]
    selection = "not test_migration_state_machine or sample or garbage"
    return suite_on("sample", *names, pytest_args=["-k", selection, "--tb=short"])


def test_every_broken_mediator_is_listed_and_every_rule_is_broken_once() -> None:
    assert sorted(CAUGHT_BY) == sorted(path.name for path in BROKEN.iterdir() if path.is_dir())
    assert {rule for _, rule in CAUGHT_BY.values()} == set(Rule)


@pytest.mark.parametrize("name", sorted(CAUGHT_BY))
def test_suite_fails_the_broken_mediator_naming_its_rule(broken_run: SuiteRun, name: str) -> None:
    test, rule = CAUGHT_BY[name]
    outcomes = broken_run.of(f"broken-{name}")
    assert outcomes, broken_run.output[-3000:]
    caught = outcomes[test]
    assert caught.kind in ("failed", "error"), f"{test} did not fail: {caught}"
    assert f"[{rule.value}]" in caught.message, caught.message
    for other, outcome in outcomes.items():
        if outcome.kind in ("failed", "error"):
            tag = RULE_TAG.search(outcome.message)
            assert tag is not None and tag.group(1) in set(Rule), (other, outcome.message)


def test_the_same_mediator_unbroken_passes_every_test(broken_run: SuiteRun) -> None:
    outcomes = broken_run.of("sample")
    assert {outcome.kind for outcome in outcomes.values()} == {"passed"}, outcomes
    assert set(outcomes) == {test for test, _ in CAUGHT_BY.values()} | {
        "test_targets",
        "test_migration_flags",
        "test_dirty_logging_lifecycle",
    }


def test_terminal_output_names_the_rule(broken_run: SuiteRun) -> None:
    assert broken_run.status == 1
    assert "FAILED conformance[broken-prints]::TestConduct::test_quiet" in broken_run.output
    assert "[quiet] its hooks printed 'claimed quiet-" in broken_run.output


def test_migration_failures_show_the_steps_that_reproduce_them(broken_run: SuiteRun) -> None:
    caught = broken_run.of("broken-migration-loads-garbage")["test_migration_state_machine"]
    assert "state = MigrationMachine()" in caught.message, caught.message
    assert "state.write_garbage(" in caught.message, caught.message
