"""Building a device from a SPEC: a device model name, a TOML file or a ``DeviceSpec``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ._backend import DeviceBackend
from ._entry_points import PluginRecord, discover_device_models
from ._errors import DeviceSpecError
from ._pci import EmulatedPciDevice
from ._spec import DeviceSpec, load_spec
from ._vfio import VfioPciDevice, is_pci_address

__all__ = ["create_device", "create_from_model"]

logger = logging.getLogger(__name__)


def create_device(spec: str | Path | DeviceSpec, *, name: str | None = None) -> DeviceBackend:
    """Build a device backend from a model name, a TOML spec path or a ``DeviceSpec`` (an
    ``EmulatedPciDevice``), or open the device at a PCI address in sysfs form such as
    ``0000:01:10.0`` through ``/dev/vfio`` (a ``VfioPciDevice``; it must be bound to vfio-pci).

    A model's factory returns ``(spec, model)``: the spec as plain data and the behaviour object.
    A PCI device that cannot be opened raises ``VfioDeviceError`` (a ``DeviceSpecError``) whose
    one-line message says what to do.
    """
    if isinstance(spec, DeviceSpec):
        return EmulatedPciDevice(spec.model_copy(update={"name": name}) if name else spec)
    text = str(spec)
    if is_pci_address(text) and not Path(text).is_file():
        return VfioPciDevice(text, name=name)
    if text.endswith(".toml") or Path(text).is_file():
        loaded = load_spec(text)
        return EmulatedPciDevice(loaded.model_copy(update={"name": name}) if name else loaded)
    models = {record.name: record for record in discover_device_models()}
    record = models.get(text)
    if record is None:
        known = ", ".join(sorted(models)) or "none installed"
        raise DeviceSpecError(
            f"{text!r} is neither a spec file nor a device model (models: {known})"
        )
    if record.error is not None:
        raise DeviceSpecError(f"device model {record.describe()} failed to load: {record.error}")
    return create_from_model(record, name or text)


def create_from_model(record: PluginRecord, name: str) -> EmulatedPciDevice:
    """Build device ``name`` from a discovered model's factory (no new entry-point scan)."""
    try:
        made: Any = record.plugin()
        plain, model = made
    except Exception as exc:
        raise DeviceSpecError(
            f"device model {record.describe()}: factory failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(plain, dict):
        raise DeviceSpecError(f"device model {record.describe()}: spec must be a dict")
    spec = DeviceSpec.from_plain(
        {**plain, "name": name}, source=f"device model {record.describe()}"
    )
    return EmulatedPciDevice(spec, model)
