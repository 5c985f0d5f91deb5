"""The suite fails each deliberately broken mediator, and the failure names the broken rule.

Each ``broken/<name>/`` is the sample mediator (which keeps every rule) with one hook changed,
or, where a rule shows only under a real device's traffic, a shipped mediator wrapped with one
hook changed; all of them are checked in one pytest run of the suite, as a vendor would check
theirs.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from suite_runs import BROKEN, SuiteRun

from vfio_mediate import Rule
from vfio_mediate.conformance import DIRTY_LOGGING_PROPERTY
from vfio_mediate.conformance._mediator import installed_mediators

CAUGHT_BY: dict[str, tuple[str, Rule]] = {
    "bad-signature": ("load", Rule.HOOK_SIGNATURE),
    "claims-others": ("test_declines_other_devices", Rule.OPEN_TARGETS),
    "core-import": ("test_does_not_import_the_core", Rule.NO_CORE_IMPORT),
    "declines-with-false": ("test_open_result", Rule.OPEN_RESULT),
    "dirty-reads-oracle": ("test_dirty_logging_lifecycle", Rule.DIRTY_LOGGING),
    "hook-name-typo": ("load", Rule.HOOK_SIGNATURE),
    "irq-observes-absent-vectors": ("test_interrupt_routing", Rule.ACCESS_ERRORS),
    "core-import-late": ("test_does_not_import_the_core", Rule.NO_CORE_IMPORT),
    "device-regions-unmappable": ("test_device_regions_valid", Rule.DEVICE_REGIONS_VALID),
    "dirty-misses": ("test_dirty_logging_reports_device_writes", Rule.DIRTY_LOGGING),
    "errors-without-errno": ("test_access_errors", Rule.ACCESS_ERRORS),
    "i40e-drops-rx-buffers": ("test_dirty_logging_reports_device_writes", Rule.DIRTY_LOGGING),
    "migration-hook-raises": ("test_migration_round_trip", Rule.MIGRATION),
    "migration-loads-garbage": ("test_migration_state_machine", Rule.MIGRATION),
    "migration-loads-other-model": (
        "test_migration_refuses_another_models_stream",
        Rule.MIGRATION,
    ),
    "migration-no-state": ("test_migration_round_trip", Rule.MIGRATION),
    "migration-restores-nothing": ("test_migration_restores_what_it_saved", Rule.MIGRATION),
    "mmap-garbage": ("test_mmap_result", Rule.MMAP_RESULT),
    "mmap-on-io-bar": ("test_region_info_valid", Rule.REGION_INFO_VALID),
    "never-claims": ("test_claims_its_targets", Rule.OPEN_TARGETS),
    "no-reopen": ("test_reopen", Rule.REOPEN),
    "open-raises": ("test_open_result", Rule.OPEN_RESULT),
    "prints": ("test_quiet", Rule.QUIET),
    "region-info-maps-trapped": ("test_region_info_valid", Rule.REGION_INFO_VALID),
    "region-info-unmediated": ("test_region_info_valid", Rule.REGION_INFO_VALID),
    "regions-not-indexes": ("test_regions_result", Rule.REGIONS_RESULT),
    "release-raises": ("test_release_once", Rule.RELEASE_ONCE),
    "reopen-refuses": ("test_reopen", Rule.REOPEN),
    "rw-crashes-at-one-register": ("test_access_errors", Rule.ACCESS_ERRORS),
    "rw-one-register": ("test_rw_result", Rule.RW_RESULT),
    "rw-outside": ("test_rw_result", Rule.RW_RESULT),
    "rw-raises": ("test_access_errors", Rule.ACCESS_ERRORS),
    "rw-short-read": ("test_rw_result", Rule.RW_RESULT),
    "shared-one-register": ("test_isolation", Rule.ISOLATION),
    "shared-state": ("test_isolation", Rule.ISOLATION),
}
"""Each broken mediator: the suite's test that must catch it and the rule it must name
(``load``: it cannot be loaded, and that one failure is all its suite has)."""

ALSO_FAILS = {"shared-state": {"test_migration_restores_what_it_saved": Rule.MIGRATION}}
"""Broken mediators whose fault breaks a second rule too: a register page shadowed in a module
global shows a device loaded with another's state the registers of every other device."""

MESSAGE_LINES = 12
"""A failure is one line, ``[rule] plugin: what, where``, and a few lines of detail."""

WRAPS = {"i40e-drops-rx-buffers": "i40e"}
"""Broken mediators that wrap a shipped mediator: the one they need installed."""

RULE_TAG = re.compile(r"\[([a-z-]+)\]")


def wrapped_is_installed(name: str) -> bool:
    """Whether the shipped mediator that broken mediator ``name`` wraps, if any, is installed."""
    return name not in WRAPS or WRAPS[name] in installed_mediators()


@pytest.fixture(scope="module")
def broken_run(suite_on: Callable[..., SuiteRun]) -> SuiteRun:
    """The suite, run once on the sample and every broken mediator.

    The migration state machine takes most of a run's time, so it runs only where it has
    something to find: on the sample and on the mediator that loads garbage.
    """
    names = [f"broken-{name}" for name in sorted(CAUGHT_BY) if wrapped_is_installed(name)]
    selection = "not test_migration_state_machine or sample or garbage"
    return suite_on("sample", *names, pytest_args=["-k", selection, "--tb=short"])


def test_every_broken_mediator_is_listed_and_every_rule_is_broken() -> None:
    assert sorted(CAUGHT_BY) == sorted(path.name for path in BROKEN.iterdir() if path.is_dir())
    assert {rule for _, rule in CAUGHT_BY.values()} == set(Rule)


@pytest.mark.parametrize("name", sorted(CAUGHT_BY))
def test_suite_fails_the_broken_mediator_naming_its_rule(broken_run: SuiteRun, name: str) -> None:
    """One failure, by the test of the rule, in one line that names the rule and the plugin,
    and a few lines of detail; every other test that met the fault passed or was skipped."""
    if not wrapped_is_installed(name):
        pytest.skip(f"broken-{name} wraps the {WRAPS[name]!r} mediator, which is not installed")
    test, rule = CAUGHT_BY[name]
    outcomes = broken_run.of(f"broken-{name}")
    assert outcomes, broken_run.output[-3000:]
    failed = {
        other: outcome for other, outcome in outcomes.items() if outcome.kind in ("failed", "error")
    }
    expected = {test: rule, **ALSO_FAILS.get(name, {})}
    assert set(failed) == set(expected), failed
    for other, outcome in failed.items():
        first, *detail = outcome.message.removeprefix("Failed: ").splitlines()
        assert first.startswith(f"[{expected[other].value}] 'broken-{name}' ("), first
        assert len(detail) < MESSAGE_LINES, outcome.message
    if test == "load":
        assert set(outcomes) == {"load"}


def test_no_rule_is_reported_twice_and_skips_say_where_it_was(broken_run: SuiteRun) -> None:
    """A fault every test runs into (a bad region info at each open) fails one test; the
    others that met it are skipped, naming the rule and where it was reported."""
    outcomes = broken_run.of("broken-region-info-maps-trapped")
    skipped = [outcome.message for outcome in outcomes.values() if outcome.kind == "skipped"]
    assert any(
        "the mediator breaks [region-info-valid], reported by TestRegions.test_region_info_valid"
        in message
        for message in skipped
    ), skipped
    failed = [outcome for outcome in outcomes.values() if outcome.kind in ("failed", "error")]
    assert [RULE_TAG.findall(outcome.message) for outcome in failed] == [["region-info-valid"]]


def test_the_same_mediator_unbroken_passes_every_test(broken_run: SuiteRun) -> None:
    outcomes = broken_run.of("sample")
    assert {outcome.kind for outcome in outcomes.values()} == {"passed"}, outcomes
    assert set(outcomes) == {test for test, _ in CAUGHT_BY.values()} - {"load"} | {
        "test_hooks_are_the_contracts",
        "test_targets",
        "test_migration_flags",
    }


def test_terminal_output_names_the_rule(broken_run: SuiteRun) -> None:
    assert broken_run.status == 1
    assert "FAILED conformance[broken-prints]::TestConduct::test_quiet" in broken_run.output
    assert (
        "[quiet] 'broken-prints' (conformance-broken-prints 0.1.0): its hooks printed 'claimed "
        "quiet-" in broken_run.output
    )
    assert "Traceback" not in broken_run.output
    assert "During handling of the above exception" not in broken_run.output


def test_migration_failures_show_the_steps_that_reproduce_them(broken_run: SuiteRun) -> None:
    caught = broken_run.of("broken-migration-loads-garbage")["test_migration_state_machine"]
    assert "state = MigrationMachine()" in caught.message, caught.message
    assert "state.write_garbage(" in caught.message, caught.message


def test_dirty_logging_under_traffic_names_the_pages_missed(broken_run: SuiteRun) -> None:
    """The i40e mediator minus its RX buffer marks logs every descriptor and ring: only the
    i40e-vf workload's traffic, which fills RX buffers, shows what it misses."""
    if not wrapped_is_installed("i40e-drops-rx-buffers"):
        pytest.skip("the i40e mediator is not installed")
    outcomes = broken_run.of("broken-i40e-drops-rx-buffers")
    caught = outcomes.pop("test_dirty_logging_reports_device_writes")
    skipped = outcomes.pop("test_migration_refuses_another_models_stream")
    assert "migrates one kind of device only" in skipped.message
    assert {outcome.kind for outcome in outcomes.values()} == {"passed"}, outcomes
    assert caught.message.removeprefix("Failed: ").startswith(
        "[dirty-logging] 'broken-i40e-drops-rx-buffers' (conformance-broken-i40e-drops-rx-buffers"
        " 0.1.0): model 'i40e-vf' (8086:154c): under its guest workload's traffic the device "
        "wrote "
    ), caught.message
    assert re.search(
        r"no later report of the same logging session had: page\(s\) \d+", caught.message
    )
    (measured,) = caught.property(DIRTY_LOGGING_PROPERTY)
    assert re.search(r"\d+ reported, [1-9]\d* missed; over-report ratio", measured), measured


def test_a_mediator_that_cannot_load_fails_the_run_at_once_in_one_message(
    suite_on: Callable[..., SuiteRun],
) -> None:
    """A one-letter hook typo: one failure saying which hook it may mean, no traceback, and
    nothing else of the suite runs."""
    run = suite_on("broken-hook-name-typo")
    assert run.status == 1
    assert list(run.outcomes) == [("broken-hook-name-typo", "load")], run.output
    assert "FAILED conformance[broken-hook-name-typo]::load - Failed: [hook-signature] " in (
        run.output
    )
    assert "mediator_rww (did you mean mediator_rw?): not a hook of the vfio_mediate contract" in (
        run.output
    )
    assert "Traceback" not in run.output
    assert len(run.output.splitlines()) < 20, run.output


def test_an_mmap_flag_on_an_io_bar_is_named_as_what_it_is(broken_run: SuiteRun) -> None:
    caught = broken_run.of("broken-mmap-on-io-bar")["test_region_info_valid"]
    assert "region 1: flags <RegionFlag.MMAP: 4> the device lacks" in caught.message
    assert "page-aligned" not in caught.message
