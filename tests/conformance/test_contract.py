"""The contract as the core enforces it: one rule per clause, named the same in the hookspecs,
in the core's errors and in the suite; what the core hands in is what the protocols say."""

from __future__ import annotations

import errno
import re
from typing import Any

import pluggy
import pytest

from vfio_mediate import (
    ContractViolation,
    DeviceSpec,
    EmulatedPciDevice,
    MediatedDevice,
    MediatorRegistry,
    Rule,
    hookspecs,
)
from vfio_mediate._dma_view import DmaView
from vfio_mediate._hook_types import Device, DirtyPageLog, DmaAccess
from vfio_mediate._model import Bus, DeviceModel
from vfio_mediate._rules import HOOK_RULES
from vfio_mediate.uapi import IrqIndex, MigrationState

hookimpl = pluggy.HookimplMarker("vfio_mediate")
S = MigrationState


def test_every_rule_is_stated_by_its_id_and_every_hook_has_one() -> None:
    text = (hookspecs.__doc__ or "") + "".join(
        getattr(hookspecs, name).__doc__ or "" for name in dir(hookspecs)
    )
    stated = set(re.findall(r"``([a-z]+(?:-[a-z]+)+|quiet|isolation|reopen|migration)``", text))
    assert {rule.value for rule in Rule} <= stated
    hooks = {name for name in dir(hookspecs) if name.startswith("mediator_")}
    assert set(HOOK_RULES) == hooks
    for hook, rule in HOOK_RULES.items():
        assert f"``{rule.value}``" in (getattr(hookspecs, hook).__doc__ or ""), hook


class Recorder:
    """A mediator of every device that raises ``RuntimeError`` in hook ``failing`` and keeps
    what the core handed in."""

    def __init__(self, failing: str | None = None) -> None:
        self.failing = failing
        self.device: Any = None
        self.log: Any = None

    def _maybe_fail(self, hook: str) -> None:
        if hook == self.failing:
            raise RuntimeError(f"{hook} has a bug")

    @hookimpl
    def mediator_open(self, device: Any) -> object:
        self.device = device
        return self

    @hookimpl
    def mediator_regions(self, handle: Any) -> list[int]:
        self._maybe_fail("mediator_regions")
        return [0]

    @hookimpl
    def mediator_get_region_info(self, handle: Any, info: dict[str, Any]) -> None:
        self._maybe_fail("mediator_get_region_info")

    @hookimpl
    def mediator_device_regions(self, handle: Any) -> list[Any]:
        self._maybe_fail("mediator_device_regions")
        return []

    @hookimpl
    def mediator_rw(
        self, handle: Any, index: int, offset: int, count: int, data: Any, is_write: bool
    ) -> None:
        self._maybe_fail("mediator_rw")

    @hookimpl
    def mediator_mmap(self, handle: Any, index: int, offset: int, length: int) -> None:
        self._maybe_fail("mediator_mmap")

    @hookimpl
    def mediator_reset(self, handle: Any) -> None:
        self._maybe_fail("mediator_reset")

    @hookimpl
    def mediator_irq_observe(self, handle: Any, index: int) -> list[int]:
        self._maybe_fail("mediator_irq_observe")
        return [0]

    @hookimpl
    def mediator_migration_flags(self, handle: Any) -> int:
        self._maybe_fail("mediator_migration_flags")
        return 1

    @hookimpl
    def mediator_set_state(self, handle: Any, current: int, new: int) -> bytes | None:
        self._maybe_fail("mediator_set_state")
        return b"state" if new == S.STOP_COPY else None

    @hookimpl
    def mediator_load_state(self, handle: Any, data: bytes) -> None:
        self._maybe_fail("mediator_load_state")

    @hookimpl
    def mediator_dma_logging_start(self, handle: Any, log: Any) -> None:
        self.log = log
        self._maybe_fail("mediator_dma_logging_start")

    @hookimpl
    def mediator_dma_logging_report(self, handle: Any, log: Any, iova: int, length: int) -> None:
        self._maybe_fail("mediator_dma_logging_report")

    @hookimpl
    def mediator_dma_logging_stop(self, handle: Any) -> None:
        self._maybe_fail("mediator_dma_logging_stop")


def drive(device: MediatedDevice) -> None:
    """Call every hook the core calls strictly, in an order that reaches each."""
    device.open()
    device.read(0, 0, 4)
    device.mmap(0, 0, 0x1000)
    device.reset()
    device.set_irq_triggers(IrqIndex.MSIX, 0, [lambda: None])
    device.set_migration_state(S.STOP_COPY)
    device.set_migration_state(S.STOP)
    device.set_migration_state(S.RESUMING)
    device.write_migration_data(bytes(8))  # one chunk, empty
    device.set_migration_state(S.STOP)
    device.dma.map_memory(0, bytearray(0x2000))
    device.dma_logging_start(0x1000, [(0, 0x2000)])
    device.dma_logging_report(0, 0x2000, 0x1000)
    device.dma_logging_stop()


NOT_STRICT = {"mediator_open", "mediator_targets", "mediator_release", "mediator_irq"}
STRICT = sorted(set(HOOK_RULES) - NOT_STRICT)
"""The hooks whose exceptions the core turns into a ``ContractViolation`` on an emulated device
(``mediator_open``, ``mediator_release`` and ``mediator_irq`` are logged and skipped;
``mediator_targets`` is the suite's)."""


@pytest.mark.parametrize("hook", STRICT)
def test_each_hook_that_raises_breaks_the_rule_of_its_own_clause(
    virtio_device: EmulatedPciDevice, hook: str
) -> None:
    registry = MediatorRegistry()
    registry.register(Recorder(hook), "raises")
    device = MediatedDevice(virtio_device, registry)
    with pytest.raises(ContractViolation, match=f"RuntimeError\\('{hook} has a bug'\\)") as error:
        drive(device)
    assert error.value.rule == HOOK_RULES[hook].value
    assert str(error.value).startswith(f"'raises': broke rule '{HOOK_RULES[hook].value}': ")


def test_the_core_hands_in_what_the_protocols_say(virtio_device: EmulatedPciDevice) -> None:
    """The device is a ``Device``, its DMA reads and writes the device's memory and offers
    nothing else (no ``watch``, the record dirty logging is judged by), the log is a
    ``DirtyPageLog``."""
    plugin = Recorder()
    registry = MediatorRegistry()
    registry.register(plugin, "recorder")
    device = MediatedDevice(virtio_device, registry)
    drive(device)
    handed: Device = plugin.device
    assert isinstance(handed.dma, DmaView)
    dma: DmaAccess = handed.dma
    assert [name for name in dir(dma) if not name.startswith("_")] == ["read", "write"]
    dma.write(0x10, b"seen")
    assert virtio_device.dma.read(0x10, 4) == b"seen"
    with pytest.raises(OSError) as unmapped:
        dma.read(0x10_0000, 4)
    assert unmapped.value.errno == errno.EFAULT
    log: DirtyPageLog = plugin.log
    assert log.page_size == 0x1000 and log.ranges == [(0, 0x2000)]
    assert handed.region_info(0) == virtio_device.region_info(0).to_plain()
    assert handed.read(0, 0, 4) == virtio_device.read(0, 0, 4)
    device.close()


class FullModel:
    """A device model with every ``DeviceModel`` method: a register that counts its reads."""

    def __init__(self) -> None:
        self.bus: Bus | None = None
        self.reads = 0
        self.resets = 0

    def attach(self, bus: Bus) -> None:
        self.bus = bus

    def bar_read(self, bar: int, offset: int, count: int) -> bytes | None:
        self.reads += 1
        return self.reads.to_bytes(count, "little") if offset == 0 else None

    def bar_write(self, bar: int, offset: int, data: bytes) -> bool:
        return False

    def mmap_areas(self, bar: int) -> list[tuple[int, int]] | None:
        return [(0x1000, 0x3000)] if bar == 0 else None

    def reset(self) -> None:
        self.resets += 1


def test_a_model_is_driven_through_its_device_model_methods(virtio_spec: DeviceSpec) -> None:
    """Each method is called as ``DeviceModel`` says, and the bus's DMA is the same view a
    mediator gets: reads and writes only."""
    model = FullModel()
    typed: DeviceModel = model
    device = EmulatedPciDevice(virtio_spec, typed)
    try:
        assert model.bus is not None and isinstance(model.bus.dma, DmaView)
        assert not hasattr(model.bus.dma, "watch")
        assert device.read(0, 0, 4) == (1).to_bytes(4, "little")
        assert [(a.offset, a.size) for a in device.region_info(0).mmap_areas()] == [
            (0x1000, 0x3000)
        ]
        device.reset()
        assert model.resets == 1
    finally:
        device.close()
