"""What live migration costs: a dirty report over 4 GiB of logged IOVA, and STOP_COPY
throughput over the socket against a memory copy of the same bytes.

Run: ``python benchmarks/bench_migration.py`` (or through ``run.py``). The report is the
``DirtyLog`` a mediator fills (one page in every 512 dirty); STOP_COPY is the i40e VF served by
a ``BackgroundServer`` and read with ``VfioUserClient`` in 64 KiB MIG_DATA_READs.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from vfio_mediate import DirtyLog, MediatedDevice, MediatorRegistry, create_device
from vfio_mediate.server import BackgroundServer, VfioUserClient
from vfio_mediate.uapi import PAGE_SIZE, MigrationState

LOGGED = 4 << 30


def dirty_report_ms() -> float:
    """Milliseconds of one report (and clear) over 4 GiB at 4 KiB pages, best of three."""
    log = DirtyLog(PAGE_SIZE, [(0, LOGGED)])
    results = []
    for _ in range(3):
        for page in range(0, LOGGED, 512 * PAGE_SIZE):
            log.mark(page, 8)
        started = time.perf_counter()
        log.report(0, LOGGED, PAGE_SIZE)
        results.append((time.perf_counter() - started) * 1e3)
    return min(results)


def stop_copy() -> dict[str, float]:
    """Bytes of the i40e VF's STOP_COPY state, MB/s read over the socket, and MB/s of a copy."""
    backend = create_device("i40e-vf")
    device = MediatedDevice(backend, MediatorRegistry.from_entry_points())
    try:
        with tempfile.TemporaryDirectory() as directory, BackgroundServer() as server:
            endpoint = server.add(device, Path(directory) / "vf.sock")
            with VfioUserClient.connect(endpoint.path) as client:
                rates, size = [], 0
                for _ in range(5):
                    client.set_migration_state(MigrationState.STOP_COPY)
                    started = time.perf_counter()
                    size = len(client.read_all_migration_data())
                    rates.append(size / (time.perf_counter() - started) / 1e6)
                    client.set_migration_state(MigrationState.STOP)
                    client.set_migration_state(MigrationState.RUNNING)
    finally:
        backend.close()
    source = bytes(size)
    started = time.perf_counter()
    for _ in range(1000):
        bytearray(source)
    copy = size * 1000 / (time.perf_counter() - started) / 1e6
    return {"state_bytes": size, "stop_copy_mb_s": max(rates), "memcpy_mb_s": copy}


def measurements() -> dict[str, Any]:
    """The dirty report time and the STOP_COPY figures."""
    return {"dirty_report_4gib_ms": dirty_report_ms(), **stop_copy()}


if __name__ == "__main__":
    print(json.dumps(measurements(), indent=1))
