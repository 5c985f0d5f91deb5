"""vfio-mediate: mediate VFIO device access through vendor plugins, serve it over vfio-user.

``MediatedDevice`` puts the first mediator that claims a device (``MediatorRegistry``) in front
of its backend (``EmulatedPciDevice``); ``vfio_mediate.hookspecs`` is the contract mediators
implement and ``vfio_mediate.uapi`` the Linux VFIO numbers and types they share.
"""

from ._backend import DeviceBackend, DeviceIdentity, RegionMapping, Trigger
from ._device import MediatedDevice, MediatorDevice, MigrationStream
from ._devices import create_device, create_from_model, discover_device_models
from ._dirty import DirtyBitmap, DirtyLog, bitmap_pages
from ._dma import DmaMapping, DmaSpace, RemoteMemory, anonymous_memory
from ._errors import (
    AccessError,
    ContractViolation,
    DeviceSpecError,
    DeviceStateError,
    DuplicateMediatorError,
    MediatorInUseError,
    MigrationError,
    PluginError,
    PluginLoadError,
    ProtocolError,
    RegistryError,
    VfioMediateError,
)
from ._migrate import (
    WORKLOAD_GROUP,
    CopyRound,
    GuestWorkload,
    LiveMigration,
    MigrationProgress,
    MigrationReport,
    Workload,
    find_workload,
)
from ._migration import ARCS, SAVING_ARCS, migration_path, next_step
from ._pci import Config, DeviceBus, EmulatedPciDevice
from ._registry import (
    DEVICE_GROUP,
    ENV_DISABLE,
    ENV_ONLY,
    MEDIATOR_GROUP,
    Claim,
    MediatorRegistry,
    PluginRecord,
    Priority,
)
from ._rules import Rule
from ._spec import BarSpec, DeviceSpec, MsixSpec, load_spec
from ._vfio import VfioContainer, VfioDeviceError, VfioPciDevice, is_pci_address

__all__ = [
    "ARCS",
    "DEVICE_GROUP",
    "ENV_DISABLE",
    "ENV_ONLY",
    "MEDIATOR_GROUP",
    "SAVING_ARCS",
    "WORKLOAD_GROUP",
    "AccessError",
    "BarSpec",
    "Claim",
    "Config",
    "ContractViolation",
    "CopyRound",
    "DeviceBackend",
    "DeviceBus",
    "DeviceIdentity",
    "DeviceSpec",
    "DeviceSpecError",
    "DeviceStateError",
    "DirtyBitmap",
    "DirtyLog",
    "DmaMapping",
    "DmaSpace",
    "DuplicateMediatorError",
    "EmulatedPciDevice",
    "GuestWorkload",
    "LiveMigration",
    "MediatedDevice",
    "MediatorDevice",
    "MediatorInUseError",
    "MediatorRegistry",
    "MigrationError",
    "MigrationProgress",
    "MigrationReport",
    "MigrationStream",
    "MsixSpec",
    "PluginError",
    "PluginLoadError",
    "PluginRecord",
    "Priority",
    "ProtocolError",
    "RegionMapping",
    "RegistryError",
    "RemoteMemory",
    "Rule",
    "Trigger",
    "VfioContainer",
    "VfioDeviceError",
    "VfioMediateError",
    "VfioPciDevice",
    "Workload",
    "anonymous_memory",
    "bitmap_pages",
    "create_device",
    "create_from_model",
    "discover_device_models",
    "find_workload",
    "is_pci_address",
    "load_spec",
    "migration_path",
    "next_step",
]
