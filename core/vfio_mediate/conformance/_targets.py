"""The devices a mediator says it targets (``mediator_targets``) and the decoys it must decline."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .._device_factory import create_from_model
from .._entry_points import PluginRecord, discover_device_models
from .._errors import DeviceSpecError
from .._pci import EmulatedPciDevice
from .._spec import DeviceSpec

__all__ = ["Target", "TargetError", "decoys_for", "targets_from"]


class TargetError(ValueError):
    """``mediator_targets`` is missing or returned something that names no device."""


@dataclass(frozen=True)
class Target:
    """A device the mediator targets: a device model (by entry-point name) or a plain spec."""

    label: str
    spec: DeviceSpec
    model: PluginRecord | None = field(default=None, compare=False)
    """The ``vfio_mediate.devices`` entry point (loaded) that builds the device with its
    behaviour; looked up once, since every test builds devices."""

    @property
    def identity(self) -> tuple[int, int]:
        """``(vendor_id, device_id)``."""
        return self.spec.vendor_id, self.spec.device_id

    @property
    def is_plain(self) -> bool:
        """Whether the device is only its spec: BARs are plain memory, accesses have no side
        effects, so the suite may write any pattern and compare every byte around an access."""
        return self.model is None

    def build(self, name: str) -> EmulatedPciDevice:
        """A new device of this kind named ``name`` (a model builds a new behaviour object)."""
        if self.model is not None:
            return create_from_model(self.model, name)
        return EmulatedPciDevice(self.spec.model_copy(update={"name": name}))

    def __str__(self) -> str:
        vendor, device = self.identity
        return f"{self.label} ({vendor:04x}:{device:04x})"


def targets_from(answer: Any) -> tuple[Target, ...]:
    """Validate what ``mediator_targets`` returned: a non-empty list of device model names and
    plain spec dicts."""
    if isinstance(answer, str | bytes | dict) or not isinstance(answer, Sequence):
        raise TargetError(
            f"mediator_targets must return a list of device model names or spec dicts, "
            f"not {type(answer).__name__}"
        )
    if not answer:
        raise TargetError("mediator_targets returned no device: the suite has nothing to open")
    models: dict[str, PluginRecord] = {}
    if any(isinstance(entry, str) for entry in answer):
        models = {record.name: record for record in discover_device_models()}
    targets = []
    for number, entry in enumerate(answer):
        if isinstance(entry, str):
            targets.append(_model_target(entry, models))
        elif isinstance(entry, dict):
            source = f"mediator_targets()[{number}]"
            try:
                spec = DeviceSpec.from_plain(entry, source=source)
            except DeviceSpecError as exc:
                raise TargetError(str(exc)) from exc
            targets.append(Target(f"spec {spec.name!r}", spec))
        else:
            raise TargetError(
                f"mediator_targets()[{number}] is a {type(entry).__name__}, "
                "neither a device model name nor a spec dict"
            )
    return tuple(targets)


def _model_target(name: str, models: dict[str, PluginRecord]) -> Target:
    record = models.get(name)
    if record is None or record.error is not None:
        why = "is not installed" if record is None else f"failed to load: {record.error}"
        raise TargetError(f"target device model {name!r} {why}")
    try:
        device = create_from_model(record, name)
    except DeviceSpecError as exc:
        raise TargetError(f"target device model {name!r}: {exc}") from exc
    try:
        return Target(f"model {name!r}", device.spec, record)
    finally:
        device.close()


def decoys_for(targets: Sequence[Target]) -> tuple[Target, ...]:
    """Devices shaped like the targets (same BARs, MSI-X, class) whose vendor or device id is
    none of the targets': a mediator that is not a fallback must decline each of them."""
    taken = {target.identity for target in targets}
    decoys: list[Target] = []
    for target in targets:
        vendor, device = target.identity
        for other in ((vendor, device ^ 0xFFFF), (vendor ^ 0xFFFF, device)):
            if other in taken:
                continue
            taken.add(other)
            spec = DeviceSpec.model_validate(
                {
                    **target.spec.model_dump(),
                    "name": f"decoy-{other[0]:04x}-{other[1]:04x}",
                    "vendor_id": other[0],
                    "device_id": other[1],
                    "subsystem_vendor_id": other[0],
                }
            )
            decoys.append(Target(f"decoy shaped like {target.label}", spec))
    return tuple(decoys)
