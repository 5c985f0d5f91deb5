"""The exception tree of vfio-mediate.

::

    VfioMediateError
    ├── PluginError                 a plugin, named with its distribution and version
    │   ├── PluginLoadError         import, hook signature or registration failed
    │   └── ContractViolation       a plugin broke a rule of the hook contract (``rule`` names it)
    ├── RegistryError
    │   ├── DuplicateMediatorError  the same name or object registered twice
    │   └── MediatorInUseError      unregistering a mediator that an open device uses
    ├── DeviceSpecError             a device spec or model that cannot be built
    ├── ProtocolError (also ConnectionError)  a vfio-user peer broke the protocol
    └── AccessError (also OSError)  a refused device access; ``errno`` is what goes on the wire
        ├── DeviceNotOpenError      any operation but ``open`` on a closed device (``ENODEV``)
        └── MigrationError          a refused or failed migration state change

Errors a device or a mediator raises on purpose for an access are ``OSError`` with an errno;
the server sends that errno to the client.

Outside the tree, on purpose: ``ValueError`` for a Python caller's invalid argument (a
``ServerConfig`` or ``LiveMigration`` out of range, ``vfio_mediate.uapi`` types built from bad
values), and ``OSError`` with an errno from the operating system, e.g. a socket path or
directory the server refuses (``PermissionError``, ``FileExistsError``) or a failed ``mmap``.
"""

from __future__ import annotations

import errno as _errno

__all__ = [
    "AccessError",
    "ContractViolation",
    "DeviceNotOpenError",
    "DeviceSpecError",
    "DuplicateMediatorError",
    "MediatorInUseError",
    "MigrationError",
    "PluginError",
    "PluginLoadError",
    "ProtocolError",
    "RegistryError",
    "VfioMediateError",
]


class VfioMediateError(Exception):
    """Base of every error vfio-mediate raises."""


class PluginError(VfioMediateError):
    """A plugin failed; ``plugin`` is its description (name, distribution and version)."""

    def __init__(self, plugin: str, message: str) -> None:
        super().__init__(f"{plugin}: {message}")
        self.plugin = plugin


class PluginLoadError(PluginError):
    """A plugin could not be imported, validated or registered."""


class ContractViolation(PluginError):
    """A plugin broke a rule of the hook contract; ``rule`` is the rule's id (see ``Rule``)."""

    def __init__(self, plugin: str, rule: str, message: str) -> None:
        super().__init__(plugin, f"broke rule {rule!r}: {message}")
        self.rule = rule


class RegistryError(VfioMediateError):
    """A registry operation that cannot be done."""


class DuplicateMediatorError(RegistryError):
    """A mediator name or object is already registered."""


class MediatorInUseError(RegistryError):
    """A mediator cannot be unregistered while a device it claimed is open."""


class DeviceSpecError(VfioMediateError):
    """A device spec (TOML file, model factory) is invalid."""


class ProtocolError(VfioMediateError, ConnectionError):
    """A peer broke the vfio-user protocol (a malformed or unexpected message)."""


class AccessError(VfioMediateError, OSError):
    """A refused access to a device; an ``OSError`` whose ``errno`` goes on the wire."""

    def __init__(self, code: int, message: str) -> None:
        OSError.__init__(self, code, message)

    def __str__(self) -> str:
        return f"[{_errno.errorcode.get(self.errno or 0, self.errno)}] {self.strerror}"


class MigrationError(AccessError):
    """A refused migration state change or a migration step that failed."""


class DeviceNotOpenError(AccessError):
    """The device is not open (``ENODEV``): every operation but ``open`` needs it open."""

    def __init__(self, device: str) -> None:
        super().__init__(_errno.ENODEV, f"{device} is not open")
