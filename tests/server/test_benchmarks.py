"""The benchmark runner works: one JSON object with every section and the targets it checks
(the speeds themselves are the runner's business, never a test's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RUNNER = Path(__file__).parents[2] / "benchmarks" / "run.py"


def test_the_runner_prints_every_section_and_target_as_json() -> None:
    result = subprocess.run(
        [sys.executable, str(RUNNER), "--json", "--rounds", "1", "--load", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(result.stdout)
    sections = {"per_access_ns", "socket", "socket_loaded", "migration", "soak", "targets"}
    assert set(report) == sections | {"targets_loaded"}
    assert len(report["socket_loaded"]["load_cpus"]) == 1
    for socket_report, checks in (
        (report["socket"], report["targets"]),
        (report["socket_loaded"], report["targets_loaded"]),
    ):
        for measure in ("config_read_4", "config_write_4", "bar_read_256", "region_info"):
            assert socket_report["us"][f"raw {measure}"] > 0
            assert socket_report["us"][f"VfioUserClient {measure}"] > 0
            assert f"VfioUserClient/raw {measure}" in checks
        assert "ours_over_c" not in socket_report, "no peer, no ratio"
    soak = report["soak"]
    assert soak["server_alive"] and soak["fds_after"] <= soak["fds_before"] + 2
    assert soak["fuzzed_messages"] > 0 and soak["sessions"] > 300


def test_a_missing_peer_is_one_line() -> None:
    result = subprocess.run(
        [sys.executable, str(RUNNER), "--peer", "/nonexistent/gpio-pci-idio-16"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert result.stderr.strip() == "run.py: --peer /nonexistent/gpio-pci-idio-16: no such file"
