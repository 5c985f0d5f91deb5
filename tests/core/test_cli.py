"""The ``vfio-mediate`` command as a user runs it: a subprocess of the installed script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

COMMAND = shutil.which("vfio-mediate") or str(Path(sys.executable).parent / "vfio-mediate")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COMMAND, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_list_json_shows_both_plugins() -> None:
    result = run("list", "--json")
    assert result.returncode == 0, result.stderr
    rows = {(row["group"], row["name"]): row for row in json.loads(result.stdout)}
    null = rows["vfio_mediate.mediators", "null"]
    assert null["distribution"] == "null-mediator" and null["status"] == "loaded"
    assert null["priority"] == "last" and null["error"] is None
    model = rows["vfio_mediate.devices", "i40e-vf"]
    assert model["distribution"] == "i40e-mediator" and model["version"]


def test_list_reports_broken_plugins(with_test_plugins: Path) -> None:
    result = run("list", "--json", env={"PYTHONPATH": str(with_test_plugins)})
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["broken-import"]["status"] == "error"
    assert "a_module_that_does_not_exist" in rows["broken-import"]["error"]
    assert rows["vendor-first"]["status"] == "loaded"
    assert rows["vendor-first"]["priority"] == "first"
    table = run("list", env={"PYTHONPATH": str(with_test_plugins)})
    assert "broken-signature" in table.stdout and "error:" in table.stdout


def test_probe_default_device() -> None:
    result = run("probe", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["vendor_id"], report["device_id"]) == (0x8086, 0x154C)
    assert report["mediator"] is not None
    sizes = {row["name"]: row["size"] for row in report["regions"]}
    assert sizes["BAR0"] == 0x10000 and sizes["BAR3"] == 0x4000 and sizes["CONFIG"] == 0x1000


def test_probe_a_spec_file_with_a_third_party_winner(
    tmp_path: Path, with_test_plugins: Path
) -> None:
    spec = tmp_path / "virtio.toml"
    spec.write_text(
        "vendor_id = 0x1af4\ndevice_id = 0x1041\nclass_code = 0x020000\n"
        '[[bars]]\nindex = 0\nsize = 0x4000\nkind = "mem64"\n'
    )
    env = {"PYTHONPATH": str(with_test_plugins)}
    report = json.loads(run("probe", "--device", str(spec), "--json", env=env).stdout)
    assert report["mediator"] == "vendor-first"
    assert [r["mediated"] for r in report["regions"] if r["name"] == "BAR0"] == [True]
    text = run("probe", "--device", str(spec), env=env).stdout
    assert "mediator vendor-first (vendor-first)" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("probe", "--device", "no-such-model"), "neither a spec file nor a device model"),
        (("probe", "--device", "missing.toml"), "cannot read device spec"),
    ],
)
def test_errors_are_one_line_without_traceback(args: tuple[str, ...], message: str) -> None:
    result = run(*args)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
