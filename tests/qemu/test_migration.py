"""What QEMU 11.1's vfio-user client does when a VM with a served VF is live-migrated.

QEMU's vfio-user client has no migration support in 10.1-11.1 (no MIG_DATA_READ/WRITE, dirty
tracking "Not supported"). These tests record what it does instead, as the evidence behind the
README's statement: the VM migrates and the device's state is not transferred.
"""

from __future__ import annotations

import time
import types
import uuid
from collections.abc import Callable
from typing import Any

import i40e_mediator.mediator as i40e
import pluggy

from vfio_mediate import MediatorRegistry
from vfio_mediate.uapi import MigrationState

from .conftest import RunningVm, ServedDevice, device_option
from .test_attach import wait_for_bars

hookimpl = pluggy.HookimplMarker("vfio_mediate")


def recording_i40e(arcs: list[tuple[int, int]], logging_starts: list[Any]) -> Any:
    """The real i40e mediator's hooks, recording migration arcs and dirty-logging starts."""
    hooks = {name: getattr(i40e, name) for name in dir(i40e) if name.startswith("mediator_")}
    real_set_state = hooks.pop("mediator_set_state")
    real_start = hooks.pop("mediator_dma_logging_start")

    @hookimpl
    def mediator_set_state(handle: Any, current: int, new: int) -> Any:
        arcs.append((current, new))
        return real_set_state(handle, current, new)

    @hookimpl
    def mediator_dma_logging_start(handle: Any, log: Any) -> None:
        logging_starts.append(log)
        real_start(handle, log)

    return types.SimpleNamespace(
        **hooks,
        mediator_set_state=mediator_set_state,
        mediator_dma_logging_start=mediator_dma_logging_start,
    )


def wait_migrated(vm: RunningVm, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status: dict[str, Any] = vm.qmp.command("query-migrate")
        if status.get("status") in ("completed", "failed", "cancelled"):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.1)


def test_qemu_migrates_the_vm_without_the_device_state(
    serve: Callable[..., ServedDevice], start_vm: Callable[..., RunningVm]
) -> None:
    arcs: list[tuple[int, int]] = []
    starts: list[Any] = []
    registry = MediatorRegistry()
    registry.register(recording_i40e(arcs, starts), "i40e")
    source_device = serve(registry=registry)
    destination_device = serve(registry=registry)
    source = start_vm("-device", device_option(source_device.socket_in_root))
    wait_for_bars(source)
    channel = f"/run/vfio-mediate/migrate-{uuid.uuid4().hex[:8]}.sock"
    destination = start_vm(
        "-device", device_option(destination_device.socket_in_root), "-incoming", "defer"
    )
    destination.qmp.command("migrate-incoming", uri=f"unix:{channel}")
    source.qmp.command("migrate", uri=f"unix:{channel}")
    status = wait_migrated(source)
    assert status["status"] == "completed", status
    assert status.get("vfio", {}).get("transferred", 0) == 0, status
    # the device was never asked to stop, save, resume or log: QEMU has no vfio-user migration
    assert arcs == [] and starts == []
    assert source_device.device.migration_state is MigrationState.RUNNING
    assert destination_device.device.migration_state is MigrationState.RUNNING
    assert destination.qmp.command("query-status")["status"] == "running"
