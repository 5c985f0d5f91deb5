"""Where the suite reports a broken rule (``Ledger``): once, by a test of that rule when one runs,
else by the first test that met it; never lost."""

from __future__ import annotations

import pytest

from vfio_mediate.conformance._verdict import Ledger

Failed = pytest.fail.Exception
Skipped = pytest.skip.Exception


def run(ledger: Ledger, test: str, rule: str, broken: str | None = None) -> BaseException | None:
    """Run a test of ``rule`` that meets a violation of ``broken`` (if any); its outcome."""
    try:
        with ledger.running(test, rule):
            if broken is not None:
                ledger.broken(broken, f"{broken} is broken", "detail")
    except (Failed, Skipped) as outcome:
        return outcome
    return None


def test_a_rule_met_elsewhere_first_is_reported_by_its_own_test_once() -> None:
    ledger = Ledger("'m' (d 1)", selected={"rw-result": 1, "isolation": 1, "quiet": 1})
    met = run(ledger, "TestConduct.test_isolation", "isolation", broken="rw-result")
    assert isinstance(met, Skipped) and "[rw-result]" in str(met.msg)
    own = run(ledger, "TestAccess.test_rw_result", "rw-result")
    assert isinstance(own, Failed)
    assert own.msg == "[rw-result] 'm' (d 1): rw-result is broken\ndetail"
    later = run(ledger, "TestConduct.test_quiet", "quiet", broken="rw-result")
    assert isinstance(later, Skipped)
    assert "reported by TestAccess.test_rw_result" in str(later.msg)


def test_a_rule_whose_tests_do_not_run_is_reported_where_it_is_met() -> None:
    ledger = Ledger("'m' (d 1)", selected={"quiet": 1})
    met = run(ledger, "TestConduct.test_quiet", "quiet", broken="rw-result")
    assert isinstance(met, Failed) and met.msg is not None
    assert met.msg.startswith("[rw-result] 'm' (d 1): ")
    assert ledger.reported == {"rw-result": "TestConduct.test_quiet"}


def test_the_last_test_of_a_rule_reports_what_others_met_even_when_it_fails_itself() -> None:
    ledger = Ledger("'m' (d 1)", selected={"rw-result": 1, "quiet": 1})
    run(ledger, "TestConduct.test_quiet", "quiet", broken="rw-result")
    own = run(ledger, "TestAccess.test_rw_result", "rw-result", broken="access-errors")
    assert isinstance(own, Failed) and own.msg is not None
    assert [line[:14] for line in own.msg.splitlines() if line.startswith("[")] == [
        "[access-errors",
        "[rw-result] 'm",
    ]
    assert not ledger.pending


def test_a_rule_whose_tests_never_ran_stays_pending_for_the_end_of_the_run() -> None:
    ledger = Ledger("'m' (d 1)", selected={"rw-result": 1, "quiet": 1})
    run(ledger, "TestConduct.test_quiet", "quiet", broken="rw-result")
    assert list(ledger.pending) == ["rw-result"]
