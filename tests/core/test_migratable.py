"""``MediatedDevice`` and ``VfioUserClient`` are one ``MigratableDevice``: the same calls give
the same answers whether the device is in this process or served over a socket."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vfio_mediate import (
    MediatedDevice,
    MediatorRegistry,
    MigratableDevice,
    anonymous_memory,
    create_device,
)
from vfio_mediate.server import BackgroundServer, VfioUserClient
from vfio_mediate.uapi import PAGE_SIZE, MigrationState

IOVA = 0x1_0000_0000
PAGES = 16


def exercise(device: MigratableDevice) -> dict[str, Any]:
    """Logging and a pre-copy save, through the protocol alone."""
    seen: dict[str, Any] = {
        "flags": device.migration_flags,
        "state": device.migration_state,
        "logging_before": device.dma_logging,
        "page_size": device.dma_logging_start(PAGE_SIZE, [(IOVA, PAGES * PAGE_SIZE)]),
        "logging": device.dma_logging,
        "bitmap_bytes": len(device.dma_logging_report(IOVA, PAGES * PAGE_SIZE, PAGE_SIZE)),
    }
    device.dma_logging_stop()
    seen["logging_after"] = device.dma_logging
    seen["pre_copy"] = device.set_migration_state(MigrationState.PRE_COPY)
    seen["pending"] = device.migration_pending > 0
    saved = b""
    while chunk := device.read_migration_data(4096):
        saved += chunk
    seen["saved_bytes"] = len(saved)
    seen["pending_after"] = device.migration_pending
    seen["running"] = device.set_migration_state(MigrationState.RUNNING)
    return seen


@pytest.fixture
def local() -> Iterator[MediatedDevice]:
    backend = create_device("i40e-vf", name="local")
    fd, memory = anonymous_memory(PAGES * PAGE_SIZE, "guest")
    os.close(fd)
    backend.dma.map_memory(IOVA, memory)
    device = MediatedDevice(backend, MediatorRegistry.from_entry_points())
    with device:
        yield device
    backend.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[VfioUserClient]:
    backend = create_device("i40e-vf", name="served")
    device = MediatedDevice(backend, MediatorRegistry.from_entry_points())
    with BackgroundServer() as server:
        server.add(device, tmp_path / "vf.sock")
        with VfioUserClient.connect(tmp_path / "vf.sock") as client:
            client.dma_map_memfd(IOVA, PAGES * PAGE_SIZE)
            yield client
    backend.close()


def test_a_served_device_answers_as_the_local_one(
    local: MediatedDevice, served: VfioUserClient
) -> None:
    here, there = exercise(local), exercise(served)
    assert here == there
    assert here["flags"] and here["logging"] and not here["logging_after"]
    assert here["pre_copy"] is MigrationState.PRE_COPY and here["saved_bytes"] > 0
    assert here["bitmap_bytes"] == 8  # one u64 word for 16 pages
