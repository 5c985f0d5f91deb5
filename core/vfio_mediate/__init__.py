"""vfio-mediate: mediate VFIO device access through vendor plugins, serve it over vfio-user.

``MediatedDevice`` puts the first mediator that claims a device (``MediatorRegistry``) in front
of its backend (``EmulatedPciDevice``, or ``VfioPciDevice`` for a PCI address; built by
``create_device``); ``LiveMigration`` moves a
device and its guest memory to another, in this process or served (``vfio_mediate.server``).
``vfio_mediate.hookspecs`` is the contract mediators implement, ``vfio_mediate.uapi`` the Linux
VFIO numbers and types they share, and the errors below are every error the core raises.
"""

from ._backend import DeviceBackend
from ._device import MediatedDevice
from ._device_factory import create_device
from ._device_view import DeviceView
from ._dirty import DirtyLog
from ._dma import DmaSpace, anonymous_memory
from ._entry_points import PluginRecord
from ._errors import (
    AccessError,
    ContractViolation,
    DeviceNotOpenError,
    DeviceSpecError,
    DuplicateMediatorError,
    MediatorInUseError,
    MigrationError,
    PluginError,
    PluginLoadError,
    ProtocolError,
    RegistryError,
    VfioMediateError,
)
from ._live_migration import (
    LiveMigration,
    MigratableDevice,
    MigrationProgress,
    MigrationReport,
    Workload,
)
from ._pci import EmulatedPciDevice, PciConfig
from ._registry import MediatorRegistry
from ._rules import Rule
from ._spec import DeviceSpec
from ._vfio import VfioContainer, VfioDeviceError, VfioPciDevice

__all__ = [
    "AccessError",
    "ContractViolation",
    "DeviceBackend",
    "DeviceNotOpenError",
    "DeviceSpec",
    "DeviceSpecError",
    "DeviceView",
    "DirtyLog",
    "DmaSpace",
    "DuplicateMediatorError",
    "EmulatedPciDevice",
    "LiveMigration",
    "MediatedDevice",
    "MediatorInUseError",
    "MediatorRegistry",
    "MigratableDevice",
    "MigrationError",
    "MigrationProgress",
    "MigrationReport",
    "PciConfig",
    "PluginError",
    "PluginLoadError",
    "PluginRecord",
    "ProtocolError",
    "RegistryError",
    "Rule",
    "VfioContainer",
    "VfioDeviceError",
    "VfioMediateError",
    "VfioPciDevice",
    "Workload",
    "anonymous_memory",
    "create_device",
]
