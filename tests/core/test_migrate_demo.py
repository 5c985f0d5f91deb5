"""``migrate-demo`` over both transports: the same migration in one process and between two
``vfio-mediate serve`` processes (the demo as their VMM, everything else over the sockets)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from vfio_mediate.cli import main


def demo(capsys: pytest.CaptureFixture[str], *options: str) -> dict[str, Any]:
    status = main(["migrate-demo", "--json", "--memory", "4", "--slices", "5", *options])
    result: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert status == (0 if result["ok"] else 1)
    return result


def test_a_vf_migrates_under_traffic_between_two_serve_processes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    served = demo(capsys, "--transport", "vfio-user")
    assert served["transport"] == "vfio-user"
    assert served["ok"] and served["memory_equal"] and served["state_equal"]
    assert served["traffic_continues"] and served["traffic_after"]["corrupt"] == 0
    assert served["state_bytes"] > 0 and served["downtime"] > 0
    pre_copy = [done for done in served["rounds"] if done["phase"] == "pre-copy"]
    assert pre_copy and all(done["device_pages"] > 0 for done in pre_copy), (
        "the served device's dirty log came over the socket"
    )

    # The same guest (same seed) dirties the same pages whichever way the device is reached.
    local = demo(capsys)
    assert local["transport"] == "in-process" and local["ok"]
    pages = [(done["phase"], done["device_pages"], done["pages"]) for done in served["rounds"]]
    assert pages == [
        (done["phase"], done["device_pages"], done["pages"]) for done in local["rounds"]
    ]


def test_an_unknown_transport_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["migrate-demo", "--transport", "carrier-pigeon"])
    assert "invalid choice: 'carrier-pigeon'" in capsys.readouterr().err


def test_served_devices_without_migration_are_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VFIO_MEDIATE_DISABLE", "i40e")  # both servers serve the VF unmediated
    assert main(["migrate-demo", "--transport", "vfio-user", "--memory", "2"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0
    assert "i40e-vf-source and i40e-vf-destination must both support migration" in error
