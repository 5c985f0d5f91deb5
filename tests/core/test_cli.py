"""The ``vfio-mediate`` command as a user runs it: a subprocess of the installed script."""

from __future__ import annotations

import codecs
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
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


BROKEN = "broken-import,broken-signature,hook-typo"
"""The test mediators that fail to load."""
VIRTIO_SPEC = (
    "vendor_id = 0x1af4\ndevice_id = 0x1041\nclass_code = 0x020000\n"
    '[[bars]]\nindex = 0\nsize = 0x4000\nkind = "mem64"\n'
)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *parts: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for part in parts:
        assert part in result.stderr


def test_list_json_shows_both_plugins() -> None:
    result = run("list", "--json")
    assert result.returncode == 0, result.stderr
    rows = {(row["group"], row["name"]): row for row in json.loads(result.stdout)}
    null = rows["vfio_mediate.mediators", "null"]
    assert null["distribution"] == "null-mediator" and null["status"] == "loaded"
    assert null["priority"] == "last" and null["error"] is None
    model = rows["vfio_mediate.devices", "i40e-vf"]
    assert model["distribution"] == "i40e-mediator" and model["version"]


def test_list_reports_broken_plugins_and_fails(with_test_plugins: Path) -> None:
    result = run("list", "--json", env={"PYTHONPATH": str(with_test_plugins)})
    assert result.returncode == 1, "a mediator failed to load: list says so by its status"
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["broken-import"]["status"] == "error"
    assert "a_module_that_does_not_exist" in rows["broken-import"]["error"]
    assert "mediator_get_region_inof" in rows["hook-typo"]["error"]
    assert rows["vendor-first"]["status"] == "loaded"
    assert rows["vendor-first"]["priority"] == "first"
    assert rows["i40e-vf"]["status"] == "loaded"
    table = run("list", env={"PYTHONPATH": str(with_test_plugins)})
    assert table.returncode == 1
    assert "broken-signature" in table.stdout and "error:" in table.stdout
    assert table.stderr == "", "the table reports the failures; no warnings besides"
    fixed = run("list", env={"PYTHONPATH": str(with_test_plugins), "VFIO_MEDIATE_DISABLE": BROKEN})
    assert fixed.returncode == 0 and "vendor-first" in fixed.stdout


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
    spec.write_text(VIRTIO_SPEC)
    env = {"PYTHONPATH": str(with_test_plugins), "VFIO_MEDIATE_DISABLE": BROKEN}
    report = json.loads(run("probe", "--device", str(spec), "--json", env=env).stdout)
    assert report["mediator"] == "vendor-first"
    assert [r["mediated"] for r in report["regions"] if r["name"] == "BAR0"] == [True]
    text = run("probe", "--device", str(spec), env=env).stdout
    assert "mediator vendor-first (vendor-first)" in text


def test_probe_and_migrate_demo_refuse_while_a_mediator_failed_to_load(
    tmp_path: Path, with_test_plugins: Path
) -> None:
    """The device may be the broken mediator's: "passthrough" would be a lie."""
    spec = tmp_path / "virtio.toml"
    spec.write_text(VIRTIO_SPEC)
    result = run("probe", "--device", str(spec), env={"PYTHONPATH": str(with_test_plugins)})
    assert_one_line_error(
        result,
        "'hook-typo' (hook-typo 0.0.4)",
        "'broken-import' (broken-import 0.0.1)",
        f"VFIO_MEDIATE_DISABLE={BROKEN}",
    )
    assert result.returncode == 1 and result.stdout == ""
    demo = run("migrate-demo", "--memory", "1", env={"PYTHONPATH": str(with_test_plugins)})
    assert_one_line_error(demo, "'broken-signature' (broken-signature 0.0.2)", f"={BROKEN}")
    assert demo.stdout == "", "no migration without the mediators installed"


def test_serve_refuses_while_a_mediator_failed_to_load(with_test_plugins: Path) -> None:
    """Serving a broken mediator's devices unmediated (traps and migration gone) with one
    warning line is refused; leaving the broken ones out by name serves."""
    directory = Path(tempfile.mkdtemp(prefix="vmc-"))
    try:
        spec, socket = directory / "virtio.toml", directory / "virtio.sock"
        spec.write_text(VIRTIO_SPEC)
        args = ("serve", "--device", str(spec), "--socket", str(socket))
        env = {"PYTHONPATH": str(with_test_plugins)}
        with subprocess.Popen(
            [COMMAND, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        ) as server:
            try:
                out, err = server.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                server.terminate()
                out, err = server.communicate()
                pytest.fail(f"serve started with a broken mediator installed: {out}")
        refused = subprocess.CompletedProcess(args, server.returncode, out, err)
        assert_one_line_error(refused, "'hook-typo' (hook-typo 0.0.4)", f"={BROKEN}")
        assert "serving" not in out and not socket.exists()
        env["VFIO_MEDIATE_DISABLE"] = BROKEN
        with subprocess.Popen(
            [COMMAND, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        ) as server:
            assert server.stdout is not None
            lines = [server.stdout.readline() for _ in range(2)]
            assert lines[0].startswith(f"serving virtio (1af4:1041) on {socket}"), lines
            assert socket.exists()
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=30) == 0
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_verbosity_flags_work_after_the_command_too() -> None:
    after = run("probe", "-v", "--json")
    assert after.returncode == 0, after.stderr
    assert "claimed by mediator 'i40e'" in after.stderr  # an INFO line
    assert json.loads(after.stdout)["mediator"] == "i40e"
    both = run("-v", "probe", "-v", "--json")
    assert "DEBUG" in both.stderr, "-v before and -v after count together"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("migrate-demo", "--memory", "0"), "argument --memory: must be at least 1, not 0"),
        (("migrate-demo", "--memory", "-5"), "argument --memory: must be at least 1, not -5"),
        (("migrate-demo", "--memory", str(1 << 40)), "MiB is more than this machine's"),
        (("migrate-demo", "--rounds", "-1"), "argument --rounds: must be 0 or more, not -1"),
        (("migrate-demo", "--stop-pages", "x"), "argument --stop-pages: 'x' is not an integer"),
        (("probe", "--no-such-flag"), "unrecognized arguments: --no-such-flag"),
        (("check",), "the following arguments are required: NAME (see"),
    ],
)
def test_usage_mistakes_are_one_line(args: tuple[str, ...], message: str) -> None:
    result = run(*args)
    assert_one_line_error(result, message, "--help")
    assert result.returncode == 2 and result.stdout == ""


@pytest.mark.parametrize("command", ["probe", "serve"])
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (VIRTIO_SPEC.encode("utf-16"), "not UTF-8 but UTF-16"),
        (VIRTIO_SPEC.encode("utf-16-le"), "not UTF-8 text (NUL bytes"),
        (b'name = "caf\xe9"\n', "not UTF-8 (TOML files are UTF-8): byte 0xe9 at offset 11"),
    ],
)
def test_a_spec_file_that_is_not_utf8_is_one_line(
    tmp_path: Path, command: str, content: bytes, message: str
) -> None:
    spec = tmp_path / "editor.toml"
    spec.write_bytes(content)
    socket = ("--socket", str(tmp_path / "s")) if command == "serve" else ()
    result = run(command, "--device", str(spec), *socket)
    assert_one_line_error(result, f"{spec}: {message}", "save it as UTF-8")
    assert result.returncode == 1


def test_a_spec_file_with_a_utf8_byte_order_mark_is_read(tmp_path: Path) -> None:
    spec = tmp_path / "notepad.toml"
    spec.write_bytes(codecs.BOM_UTF8 + VIRTIO_SPEC.encode())
    result = run("probe", "--device", str(spec), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["vendor_id"] == 0x1AF4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("probe", "--device", "no-such-model"), "neither a spec file nor a device model"),
        (("probe", "--device", "missing.toml"), "cannot read device spec"),
    ],
)
def test_errors_are_one_line_without_traceback(args: tuple[str, ...], message: str) -> None:
    result = run(*args)
    assert_one_line_error(result, message)
    assert result.returncode == 1


def test_output_whose_reader_has_gone_is_no_error() -> None:
    # `vfio-mediate probe --json | head -1`, with the reader gone before the first write.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [COMMAND, "probe", "--json"], stdout=write_end, stderr=subprocess.PIPE, timeout=60
        )
    finally:
        os.close(write_end)
    assert result.stderr == b""
    assert result.returncode == 141
