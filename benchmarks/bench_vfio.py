"""Per-access cost on a device bound to vfio-pci: through the backend vs the bare device fd.

Run where a device is bound to vfio-pci (e.g. inside the nested guest of tests/vfio_pci)::

    python benchmarks/bench_vfio.py 0000:01:10.0 [-n 20000] [--json]

Measures a 4-byte config read and a 4-byte BAR0 read through ``VfioPciDevice`` and through
``MediatedDevice`` (BAR0 mediated by ``bench_rw``'s pass-through mediator: the trapped path)
against a bare ``os.pread`` of the VFIO device fd; and a read of a BAR0 word mapped by a
vfio-user client (the device fd the server handed out in region info) against a read of the
server's own mapping of the device fd. Each number is the best of 5 rounds, per access.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))  # run as a file (runpy) as well as a script

from bench_rw import PassThrough, best_ns

from vfio_mediate import MediatedDevice, MediatorRegistry, VfioPciDevice
from vfio_mediate.server import BackgroundServer, VfioUserClient

CONFIG, BAR0 = 7, 0


def best(call: Any, number: int) -> float:
    """Best of 5 rounds, in microseconds per call."""
    return best_ns(call, number) / 1000


def run(address: str, number: int) -> dict[str, float]:
    """Every measurement, in microseconds per 4-byte access."""
    backend = VfioPciDevice(address)
    results: dict[str, float] = {}
    try:
        fd = backend.fd
        config_at = backend.region_info(CONFIG).file_offset
        bar_at = backend.region_info(BAR0).file_offset
        command = int.from_bytes(backend.read(CONFIG, 4, 2), "little") | 0x2
        backend.write(CONFIG, 4, command.to_bytes(2, "little"))  # memory space on
        results["config pread of the device fd"] = best(
            lambda: os.pread(fd, 4, config_at + 0), number
        )
        results["config read, VfioPciDevice"] = best(lambda: backend.read(CONFIG, 0, 4), number)
        results["BAR0 pread of the device fd"] = best(lambda: os.pread(fd, 4, bar_at + 8), number)
        results["BAR0 read, VfioPciDevice"] = best(lambda: backend.read(BAR0, 8, 4), number)
        registry = MediatorRegistry()
        registry.register(PassThrough(), "pass-through")
        device = MediatedDevice(backend, registry)
        with device:
            results["config read, MediatedDevice"] = best(lambda: device.read(CONFIG, 0, 4), number)
            results["BAR0 read, MediatedDevice (trapped, pass-through)"] = best(
                lambda: device.read(BAR0, 8, 4), number
            )
        own = mmap.mmap(fd, mmap.PAGESIZE, offset=bar_at)
        view = memoryview(own)
        try:
            results["BAR0 read of the device fd's own mapping"] = best(
                lambda: view[8:12].tobytes(), number
            )
            served = MediatedDevice(backend, MediatorRegistry())
            server = BackgroundServer()
            try:
                path = Path(tempfile.mkdtemp()) / "bench.sock"
                server.add(served, path)
                with VfioUserClient.connect(path) as client:
                    mapped = client.map_area(BAR0, 0, mmap.PAGESIZE)
                    window = memoryview(mapped)
                    try:
                        results["BAR0 read mapped in the vfio-user client"] = best(
                            lambda: window[8:12].tobytes(), number
                        )
                        results["BAR0 REGION_READ over the socket"] = best(
                            lambda: client.read(BAR0, 8, 4), max(number // 20, 100)
                        )
                    finally:
                        window.release()
                        mapped.close()
            finally:
                server.close()
        finally:
            view.release()
            own.close()
    finally:
        backend.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("address", help="PCI address of a device bound to vfio-pci")
    parser.add_argument("-n", "--number", type=int, default=20_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = run(args.address, args.number)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for label, micros in results.items():
        print(f"{label:<52} {micros:8.2f} us")


if __name__ == "__main__":
    main()
