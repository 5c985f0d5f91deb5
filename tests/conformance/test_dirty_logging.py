"""The dirty-logging check when there is nothing to compare the log with: neither the suite's
accesses nor a guest workload make any target write guest memory (the runs under traffic are in
``test_shipped`` and ``test_broken``)."""

from __future__ import annotations

from collections.abc import Callable

from suite_runs import SuiteRun


def test_without_dma_or_a_workload_the_check_skips_and_says_why(
    suite_on: Callable[..., SuiteRun],
) -> None:
    run = suite_on("sample-plain-only", pytest_args=["-k", "dirty_logging"])
    outcomes = run.of("sample-plain-only")
    assert outcomes["test_dirty_logging_lifecycle"].kind == "passed", run.output[-3000:]
    skipped = outcomes["test_dirty_logging_reports_device_writes"]
    assert skipped.kind == "skipped", skipped
    assert "register accesses made none of the targets write guest memory by DMA" in (
        skipped.message
    )
    assert "ships a guest workload" in skipped.message
    assert "vfio_mediate.workloads" in skipped.message
