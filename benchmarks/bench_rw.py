"""Per-access cost of a region read: direct backend call vs MediatedDevice vs the RFC's design.

Run: ``python benchmarks/bench_rw.py``. Targets (README.md, "Performance"): an unmediated
region within a small factor of the direct backend call, a mediated one adding one plain call,
both far below a pluggy ``firstresult`` dispatch per access (what the 2019 RFC did).
"""

from __future__ import annotations

import argparse
import timeit
from typing import Any

import pluggy

from vfio_mediate import DeviceSpec, EmulatedPciDevice, MediatedDevice, MediatorRegistry, hookspecs

hookimpl = pluggy.HookimplMarker("vfio_mediate")

SPEC = DeviceSpec.model_validate(
    {
        "name": "bench",
        "vendor_id": 0x1AF4,
        "device_id": 0x1041,
        "class_code": 0x020000,
        "bars": [{"index": 0, "size": 0x4000, "kind": "mem32"}, {"index": 2, "size": 0x4000}],
    }
)


class PassThrough:
    """Mediates BAR0 only and passes every access through."""

    @hookimpl
    def mediator_open(self, device: Any) -> object:
        return object()

    @hookimpl
    def mediator_regions(self, handle: Any) -> list[int]:
        return [0]

    @hookimpl
    def mediator_rw(
        self, handle: Any, index: int, offset: int, count: int, data: Any, is_write: bool
    ) -> None:
        return None


def best_ns(call: Any, number: int) -> float:
    """Nanoseconds per call, best of five runs of ``number``."""
    return min(timeit.repeat(call, number=number, repeat=5)) / number * 1e9


def measurements(number: int) -> dict[str, float]:
    """Nanoseconds per 4-byte read on each path."""
    backend = EmulatedPciDevice(SPEC)
    registry = MediatorRegistry()
    registry.register(PassThrough(), "pass")
    device = MediatedDevice(backend, registry)
    device.open()

    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    manager.register(PassThrough(), "pass")
    hook = manager.hook.mediator_rw

    def rfc_style() -> bytes:
        # the RFC asked the ops on every access: a hook dispatch, then the device
        result = hook(handle=None, index=0, offset=0x10, count=4, data=None, is_write=False)
        return result if result is not None else backend.read(0, 0x10, 4)

    try:
        return {
            "direct backend call (floor)": best_ns(lambda: backend.read(2, 0x10, 4), number),
            "MediatedDevice, unmediated region": best_ns(lambda: device.read(2, 0x10, 4), number),
            "MediatedDevice, mediated region": best_ns(lambda: device.read(0, 0x10, 4), number),
            "pluggy dispatch per access (RFC style)": best_ns(rfc_style, number),
        }
    finally:
        device.close()
        backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--number", type=int, default=200_000)
    number = parser.parse_args().number
    print(f"4-byte region read, best of 5 x {number}:")
    for label, value in measurements(number).items():
        print(f"{label:<52} {value:8.0f} ns")


if __name__ == "__main__":
    main()
