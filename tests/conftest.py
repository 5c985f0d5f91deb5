"""Fixtures shared by every test directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from distributions import pip_install

from vfio_mediate import DeviceSpec, EmulatedPciDevice

TESTS = Path(__file__).parent


@pytest.fixture(scope="session")
def core_test_plugins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test mediators of tests/core/plugins installed into one directory (not on sys.path)."""
    projects = sorted(p for p in (TESTS / "core" / "plugins").iterdir() if p.is_dir())
    site = tmp_path_factory.mktemp("site")
    pip_install(projects, site, tmp_path_factory.mktemp("sources"))
    return site


@pytest.fixture
def with_test_plugins(core_test_plugins: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put the test mediators on ``sys.path`` for this test only."""
    monkeypatch.syspath_prepend(str(core_test_plugins))
    return core_test_plugins


@pytest.fixture
def virtio_spec() -> DeviceSpec:
    """A small device of vendor 0x1af4 with a 64-bit BAR0, an I/O BAR2 and MSI-X in BAR4."""
    return DeviceSpec.model_validate(
        {
            "name": "testdev",
            "vendor_id": 0x1AF4,
            "device_id": 0x1041,
            "class_code": 0x020000,
            "subsystem_vendor_id": 0x1AF4,
            "subsystem_id": 0x0001,
            "revision": 1,
            "bars": [
                {"index": 0, "size": 0x4000, "kind": "mem64"},
                {"index": 2, "size": 0x20, "kind": "io"},
                {"index": 4, "size": 0x2000, "kind": "mem32"},
            ],
            "msix": {"vectors": 4, "table_bar": 4, "pba_bar": 4, "pba_offset": 0x1000},
        }
    )


@pytest.fixture
def virtio_device(virtio_spec: DeviceSpec) -> Iterator[EmulatedPciDevice]:
    """An ``EmulatedPciDevice`` of ``virtio_spec``, closed after the test."""
    device = EmulatedPciDevice(virtio_spec)
    yield device
    device.close()
