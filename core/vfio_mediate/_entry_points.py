"""The entry-point groups of vfio-mediate and their discovery, in one place.

Every group is read the same way: the entry points the environment allows (``ENV_ONLY``,
``ENV_DISABLE``, for every group), sorted by name then distribution, each imported on its own
so that one that fails is recorded (``PluginRecord.error``) and the others still load.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from importlib import metadata
from typing import TYPE_CHECKING, Any, NamedTuple

from ._errors import PluginLoadError, RegistryError

if TYPE_CHECKING:
    from ._live_migration import Workload

__all__ = [
    "DEVICE_GROUP",
    "ENV_DISABLE",
    "ENV_ONLY",
    "MEDIATOR_GROUP",
    "WORKLOAD_GROUP",
    "EntryPointFilter",
    "PluginRecord",
    "Priority",
    "default_device_model",
    "discover_device_models",
    "entry_points",
    "find_workload",
    "load_entry_point",
    "load_factories",
]

logger = logging.getLogger(__name__)

MEDIATOR_GROUP = "vfio_mediate.mediators"
"""Mediators: a module or an object whose attributes implement ``vfio_mediate.hookspecs``."""
DEVICE_GROUP = "vfio_mediate.devices"
"""Device models: a factory returning ``(spec, model)`` (see ``create_from_model``)."""
WORKLOAD_GROUP = "vfio_mediate.workloads"
"""Guest workloads: a factory named after the device model it drives (see ``Workload``)."""
ENV_DISABLE = "VFIO_MEDIATE_DISABLE"
"""Comma-separated entry-point names that are not imported at all."""
ENV_ONLY = "VFIO_MEDIATE_ONLY"
"""Comma-separated entry-point names: when set, only these are imported."""


class Priority(IntEnum):
    """Where a mediator is asked: from ``tryfirst``/``trylast`` on its ``mediator_open``."""

    FIRST = 0
    DEFAULT = 1
    LAST = 2


@dataclass(eq=False)
class PluginRecord:
    """What the registry knows of one plugin (mediator or device model), loaded or not."""

    name: str
    group: str
    distribution: str | None = None
    version: str | None = None
    plugin: Any = None
    priority: Priority | None = None
    error: str | None = None
    users: set[Any] = field(default_factory=set, repr=False)

    @property
    def status(self) -> str:
        """``loaded`` or ``error``."""
        return "error" if self.error is not None else "loaded"

    def describe(self) -> str:
        """``name (distribution version)``: how errors name the plugin."""
        if self.distribution is None:
            return repr(self.name)
        return f"{self.name!r} ({self.distribution} {self.version})"

    def as_dict(self) -> dict[str, Any]:
        """The record as plain data (``vfio-mediate list --json``)."""
        return {
            "name": self.name,
            "group": self.group,
            "distribution": self.distribution,
            "version": self.version,
            "priority": None if self.priority is None else self.priority.name.lower(),
            "status": self.status,
            "error": self.error,
        }


def _names(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


class EntryPointFilter(NamedTuple):
    """The names ``VFIO_MEDIATE_ONLY`` and ``VFIO_MEDIATE_DISABLE`` select, read at discovery."""

    only: set[str] | None
    disabled: set[str]

    @classmethod
    def from_environment(cls) -> EntryPointFilter:
        """Read both variables."""
        return cls(_names(ENV_ONLY), _names(ENV_DISABLE) or set())

    def allows(self, name: str) -> bool:
        """Whether the entry point ``name`` may be imported."""
        if name in self.disabled:
            return False
        return self.only is None or name in self.only


def entry_points(group: str) -> list[metadata.EntryPoint]:
    """The group's entry points that the environment allows, by name then distribution name
    (never in the order the file system lists distributions)."""
    selected = EntryPointFilter.from_environment()
    found = [ep for ep in metadata.entry_points(group=group) if selected.allows(ep.name)]
    return sorted(found, key=lambda ep: (ep.name, ep.dist.name if ep.dist else ""))


def load_entry_point(ep: metadata.EntryPoint, group: str) -> tuple[PluginRecord, Any]:
    """Import an entry point; a failure becomes the record's ``error``, never an exception."""
    dist = ep.dist
    record = PluginRecord(
        ep.name, group, dist.name if dist else None, dist.version if dist else None
    )
    try:
        return record, ep.load()
    except Exception as exc:  # any import failure of a third-party module is reported
        record.error = f"import of {ep.value!r} failed: {type(exc).__name__}: {exc}"
        logger.warning("plugin %s not loaded: %s", record.describe(), record.error)
        return record, None


def load_factories(group: str, name: str | None = None) -> list[PluginRecord]:
    """Import the group's entry points (only those called ``name``, if given) as factories:
    each record's ``plugin`` is the callable, or its ``error`` says why there is none."""
    records = []
    for ep in entry_points(group):
        if name is not None and ep.name != name:
            continue
        record, factory = load_entry_point(ep, group)
        if factory is not None and not callable(factory):
            record.error = f"{ep.value!r} is not a callable factory"
        else:
            record.plugin = factory
        records.append(record)
    return records


def discover_device_models() -> list[PluginRecord]:
    """Every device model the environment allows (``DEVICE_GROUP``), loaded or not."""
    return load_factories(DEVICE_GROUP)


def find_workload(model: str) -> Callable[..., Workload]:
    """The guest workload factory registered for device model ``model`` (``WORKLOAD_GROUP``);
    ``RegistryError`` when there is none, ``PluginLoadError`` when it does not load."""
    for record in load_factories(WORKLOAD_GROUP, model):
        if record.error is not None:
            raise PluginLoadError(record.describe(), record.error)
        factory: Callable[..., Workload] = record.plugin
        return factory
    raise RegistryError(f"no guest workload for device model {model!r} ({WORKLOAD_GROUP})")


def default_device_model(*, with_workload: bool = False) -> str:
    """The device model a command uses when none is named: the first installed one that
    loads, in discovery order (by name), and with ``with_workload`` the first that also has a
    guest workload. The core names no vendor's model; ``RegistryError`` when none fits."""
    workloads = {ep.name for ep in entry_points(WORKLOAD_GROUP)} if with_workload else None
    for record in discover_device_models():
        if record.error is None and (workloads is None or record.name in workloads):
            return record.name
    wanted = f" with a guest workload ({WORKLOAD_GROUP})" if with_workload else ""
    raise RegistryError(f"no device model{wanted} is installed ({DEVICE_GROUP}); name one")
