"""VFIO uAPI numbers and types, as Linux's ``include/uapi/linux/vfio.h`` defines them.

The numbers (region indexes, flags, capability ids, migration states) are the stable contract
between the core and its plugins: plugins use the plain integers and never import this module.
The pydantic models refuse what Linux would refuse; they validate data that crosses a boundary
(a plugin's answer, a device spec), once, never on the per-access path.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "FEATURE_MASK",
    "PAGE_SIZE",
    "PCI_CONFIG_SPACE_SIZE",
    "PCI_EXP_CONFIG_SPACE_SIZE",
    "PCI_NUM_REGIONS",
    "REGION_TYPE_PCI_VENDOR_MASK",
    "REGION_TYPE_PCI_VENDOR_TYPE",
    "VFIO_PCI_OFFSET_SHIFT",
    "CapId",
    "DeviceFeature",
    "DeviceFlag",
    "DeviceInfo",
    "FeatureFlag",
    "IrqIndex",
    "IrqInfo",
    "IrqInfoFlag",
    "IrqSetFlag",
    "MigrationFlag",
    "MigrationState",
    "RegionFlag",
    "RegionIndex",
    "RegionInfo",
    "RegionType",
    "SparseMmapArea",
]

PAGE_SIZE = 4096
VFIO_PCI_OFFSET_SHIFT = 40
PCI_NUM_REGIONS = 9
PCI_CONFIG_SPACE_SIZE = 256
PCI_EXP_CONFIG_SPACE_SIZE = 4096
REGION_TYPE_PCI_VENDOR_TYPE = 1 << 31
REGION_TYPE_PCI_VENDOR_MASK = 0xFFFF


class RegionIndex(IntEnum):
    """vfio-pci region indexes; device-specific regions start at ``PCI_NUM_REGIONS``."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


class RegionFlag(IntFlag):
    """``VFIO_REGION_INFO_FLAG_*``."""

    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


class DeviceFlag(IntFlag):
    """``VFIO_DEVICE_FLAGS_*``."""

    RESET = 1 << 0
    PCI = 1 << 1
    PLATFORM = 1 << 2
    AMBA = 1 << 3
    CCW = 1 << 4
    AP = 1 << 5
    FSL_MC = 1 << 6
    CAPS = 1 << 7


class CapId(IntEnum):
    """Region info capability ids (``VFIO_REGION_INFO_CAP_*``)."""

    SPARSE_MMAP = 1
    TYPE = 2
    MSIX_MAPPABLE = 3


class IrqIndex(IntEnum):
    """vfio-pci interrupt indexes."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


class IrqInfoFlag(IntFlag):
    """``VFIO_IRQ_INFO_*``."""

    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class IrqSetFlag(IntFlag):
    """``VFIO_IRQ_SET_*``: one DATA_ and one ACTION_ bit per request."""

    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5


class FeatureFlag(IntFlag):
    """``VFIO_DEVICE_FEATURE_*`` bits beside the feature number (low 16 bits)."""

    GET = 1 << 16
    SET = 1 << 17
    PROBE = 1 << 18


FEATURE_MASK = 0xFFFF


class DeviceFeature(IntEnum):
    """``VFIO_DEVICE_FEATURE_*`` numbers."""

    PCI_VF_TOKEN = 0
    MIGRATION = 1
    MIG_DEVICE_STATE = 2
    LOW_POWER_ENTRY = 3
    LOW_POWER_ENTRY_WITH_WAKEUP = 4
    LOW_POWER_EXIT = 5
    DMA_LOGGING_START = 6
    DMA_LOGGING_STOP = 7
    DMA_LOGGING_REPORT = 8
    MIG_DATA_SIZE = 9


class MigrationFlag(IntFlag):
    """``VFIO_MIGRATION_*``: what a device's migration v2 support offers."""

    STOP_COPY = 1 << 0
    P2P = 1 << 1
    PRE_COPY = 1 << 2


class MigrationState(IntEnum):
    """``enum vfio_device_mig_state``."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF


def _unknown_bits(value: int, known: int, what: str) -> None:
    if int(value) & ~int(known):
        raise ValueError(f"unknown {what} bits {int(value) & ~int(known):#x}")


class SparseMmapArea(BaseModel):
    """One mmap-able area of a region (``struct vfio_region_sparse_mmap_area``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    offset: int = Field(ge=0, le=_U64)
    size: int = Field(gt=0, le=_U64)

    @property
    def end(self) -> int:
        """The first offset past the area."""
        return self.offset + self.size


class RegionType(BaseModel):
    """The TYPE capability: ``type`` and ``subtype`` of a device-specific region."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: int = Field(ge=0, le=_U32)
    subtype: int = Field(ge=0, le=_U32)


class RegionInfo(BaseModel):
    """``struct vfio_region_info`` with its capability chain.

    ``flags`` never carries ``CAPS``: it follows from the capabilities present (see ``wire_flags``).
    ``offset`` is the region's offset in the device file (``index << 40`` in vfio-pci).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int = Field(ge=0, le=_U32)
    flags: int = Field(default=0, ge=0, le=_U32)
    size: int = Field(default=0, ge=0, le=_U64)
    offset: int | None = Field(default=None, ge=0, le=_U64)
    sparse_mmap: tuple[SparseMmapArea, ...] | None = None
    type: RegionType | None = None
    msix_mappable: bool = False

    @model_validator(mode="after")
    def _check(self) -> Self:
        _unknown_bits(
            self.flags, RegionFlag.READ | RegionFlag.WRITE | RegionFlag.MMAP, "region flag"
        )
        if self.offset is None:
            object.__setattr__(self, "offset", self.index << VFIO_PCI_OFFSET_SHIFT)
        if self.index >= PCI_NUM_REGIONS and self.type is None:
            raise ValueError(f"device-specific region {self.index} needs a TYPE capability")
        if self.size == 0 and self.flags:
            raise ValueError("a region of size 0 cannot have access flags")
        if self.sparse_mmap is not None:
            if not self.flags & RegionFlag.MMAP:
                raise ValueError("a sparse mmap capability needs the MMAP flag")
            previous_end = 0
            for area in sorted(self.sparse_mmap, key=lambda a: a.offset):
                if area.offset % PAGE_SIZE or area.size % PAGE_SIZE:
                    raise ValueError(
                        f"mmap area {area.offset:#x}+{area.size:#x} is not page-aligned"
                    )
                if area.end > self.size:
                    raise ValueError(
                        f"mmap area {area.offset:#x}+{area.size:#x} lies outside the region "
                        f"of size {self.size:#x}"
                    )
                if area.offset < previous_end:
                    raise ValueError(f"mmap area at {area.offset:#x} overlaps the one before it")
                previous_end = area.end
        elif self.flags & RegionFlag.MMAP and self.size % PAGE_SIZE:
            raise ValueError(f"an mmap-able region's size {self.size:#x} is not page-aligned")
        return self

    @property
    def file_offset(self) -> int:
        """The region's offset in the device file (never ``None`` after validation)."""
        assert self.offset is not None
        return self.offset

    @property
    def wire_flags(self) -> int:
        """``flags`` as the uAPI sends them: ``CAPS`` set when a capability is present."""
        if self.sparse_mmap is not None or self.type is not None or self.msix_mappable:
            return self.flags | RegionFlag.CAPS
        return self.flags

    def mmap_areas(self) -> tuple[SparseMmapArea, ...]:
        """The areas a client may map: the sparse areas, all of the region, or none."""
        if not self.flags & RegionFlag.MMAP:
            return ()
        if self.sparse_mmap is not None:
            return self.sparse_mmap
        return (SparseMmapArea(offset=0, size=self.size),)

    def to_plain(self) -> dict[str, Any]:
        """This info as the plain data a plugin receives: ints, lists and ``None``."""
        return {
            "index": self.index,
            "flags": self.flags,
            "size": self.size,
            "offset": self.file_offset,
            "sparse_mmap": None
            if self.sparse_mmap is None
            else [[a.offset, a.size] for a in self.sparse_mmap],
            "type": None if self.type is None else [self.type.type, self.type.subtype],
            "msix_mappable": self.msix_mappable,
        }

    @classmethod
    def from_plain(cls, data: Any) -> RegionInfo:
        """Validate plain data (the shape ``to_plain`` gives) into a ``RegionInfo``."""
        if not isinstance(data, dict):
            raise ValueError(f"region info must be a dict, not {type(data).__name__}")
        fields = dict(data)
        areas = fields.get("sparse_mmap")
        if areas is not None:
            if not isinstance(areas, list | tuple):
                raise ValueError("sparse_mmap must be a list of [offset, size] pairs")
            fields["sparse_mmap"] = [_pair(a, "offset", "size") for a in areas]
        region_type = fields.get("type")
        if region_type is not None:
            fields["type"] = _pair(region_type, "type", "subtype")
        return cls.model_validate(fields)


def _pair(value: Any, first: str, second: str) -> Any:
    if isinstance(value, list | tuple):
        if len(value) != 2:
            raise ValueError(f"expected [{first}, {second}], got {value!r}")
        return {first: value[0], second: value[1]}
    return value


class DeviceInfo(BaseModel):
    """``struct vfio_device_info`` (without the capability chain)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    flags: int = Field(ge=0, le=_U32)
    num_regions: int = Field(ge=0, le=_U32)
    num_irqs: int = Field(ge=0, le=_U32)

    @model_validator(mode="after")
    def _check(self) -> Self:
        _unknown_bits(self.flags, int(sum(DeviceFlag)), "device flag")
        return self


class IrqInfo(BaseModel):
    """``struct vfio_irq_info``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int = Field(ge=0, le=_U32)
    flags: int = Field(default=0, ge=0, le=_U32)
    count: int = Field(default=0, ge=0, le=_U32)

    @model_validator(mode="after")
    def _check(self) -> Self:
        _unknown_bits(self.flags, int(sum(IrqInfoFlag)), "irq info flag")
        return self
