"""A backend for a real PCI device bound to vfio-pci: group, type1v2 container, device fd.

Standard library only (``fcntl.ioctl``, ``struct``, ``ctypes`` for ``mmap``). The device's
mmap-able areas are the VFIO device fd itself at the region's offset (a client maps the real
BAR); trapped accesses are ``pread``/``pwrite`` on that fd; memory a client gives the device is
mapped into the server (for a mediator's descriptor reads) and into the container's IOMMU at the
same IOVA (``VFIO_IOMMU_MAP_DMA``); interrupts go to eventfds with ``VFIO_DEVICE_SET_IRQS``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import re
import select
import struct
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, final

from ._backend import DeviceIdentity, RegionMapping, Trigger
from ._dma import DmaMapping, DmaSpace, RemoteMemory
from ._dma_memory import map_address, unmap_address
from ._errors import AccessError, DeviceSpecError
from .uapi import (
    PAGE_SIZE,
    PCI_NUM_REGIONS,
    DeviceInfo,
    IrqInfo,
    IrqSetFlag,
    RegionIndex,
    RegionInfo,
    RegionType,
    SparseMmapArea,
)

__all__ = [
    "PCI_ADDRESS",
    "VfioContainer",
    "VfioDeviceError",
    "VfioPciDevice",
    "is_pci_address",
]

logger = logging.getLogger(__name__)

PCI_ADDRESS = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")
"""A PCI address in sysfs form, ``0000:01:10.0`` (the domain may be left out)."""

# -- ioctl numbers (include/uapi/linux/vfio.h: _IO(';', 100 + n)) ------------------------------
_BASE = (ord(";") << 8) | 100
GET_API_VERSION = _BASE + 0
CHECK_EXTENSION = _BASE + 1
SET_IOMMU = _BASE + 2
GROUP_GET_STATUS = _BASE + 3
GROUP_SET_CONTAINER = _BASE + 4
GROUP_UNSET_CONTAINER = _BASE + 5
GROUP_GET_DEVICE_FD = _BASE + 6
DEVICE_GET_INFO = _BASE + 7
DEVICE_GET_REGION_INFO = _BASE + 8
DEVICE_GET_IRQ_INFO = _BASE + 9
DEVICE_SET_IRQS = _BASE + 10
DEVICE_RESET = _BASE + 11
IOMMU_GET_INFO = _BASE + 12
IOMMU_MAP_DMA = _BASE + 13
IOMMU_UNMAP_DMA = _BASE + 14
IOMMU_DIRTY_PAGES = _BASE + 17
DEVICE_FEATURE = _BASE + 17

API_VERSION = 0
TYPE1_IOMMU, TYPE1v2_IOMMU = 1, 3
GROUP_FLAGS_VIABLE = 1 << 0
DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE = 1 << 0, 1 << 1
DIRTY_PAGES_FLAG_START, DIRTY_PAGES_FLAG_STOP, DIRTY_PAGES_FLAG_GET_BITMAP = 1, 2, 4
FEATURE_PROBE = 1 << 18
FEATURE_MIGRATION, FEATURE_DMA_LOGGING_START = 1, 6

_INFO = struct.Struct("=IIIIII")  # argsz flags num_regions num_irqs cap_offset pad
_REGION = struct.Struct("=IIIIQQ")  # argsz flags index cap_offset size offset
_CAP_HEADER = struct.Struct("=HHI")
_IRQ_INFO = struct.Struct("=IIII")
_IRQ_SET = struct.Struct("=IIIII")
_DMA_MAP = struct.Struct("=IIQQQ")
_DMA_UNMAP = struct.Struct("=IIQQ")
_IOMMU_INFO = struct.Struct("=IIQII")  # argsz flags iova_pgsizes cap_offset pad
_IOMMU_INFO_CAPS = 1 << 1
_IOMMU_CAP_MIGRATION = 2  # VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION
_IOMMU_CAP_MIGRATION_BODY = struct.Struct("=I4xQQ")  # flags pgsize_bitmap max_dirty_bitmap_size
_DIRTY = struct.Struct("=II")
_DIRTY_GET = struct.Struct("=QQQQQ")  # iova size pgsize bitmap.size bitmap.data
_CAP_SPARSE_MMAP, _CAP_TYPE, _CAP_MSIX_MAPPABLE = 1, 2, 3

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_char_p]
_libc.ioctl.restype = ctypes.c_int


class VfioDeviceError(DeviceSpecError, OSError):
    """A PCI device cannot be opened through ``/dev/vfio``; the message says what to do."""

    def __init__(self, code: int, message: str) -> None:
        OSError.__init__(self, code, message)
        self.args = (message,)

    def __str__(self) -> str:
        return str(self.strerror)


def is_pci_address(text: str) -> bool:
    """Whether ``text`` is a PCI address in sysfs form (``0000:01:10.0`` or ``01:10.0``)."""
    return PCI_ADDRESS.match(text) is not None


def normalize_address(text: str) -> str:
    """``01:10.0`` -> ``0000:01:10.0`` (lower case)."""
    match = PCI_ADDRESS.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a PCI address")
    domain, bus, slot, function = match.groups()
    return f"{(domain or '0000').lower()}:{bus.lower()}:{slot.lower()}.{function}"


def _ioctl(fd: int, request: int, arg: Any = 0, what: str = "") -> Any:
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        raise AccessError(
            exc.errno or errno.EIO, f"{what or hex(request)}: {exc.strerror}"
        ) from None


def _driver(device_dir: Path) -> str | None:
    link = device_dir / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def _rebind_hint(address: str) -> str:
    device = f"/sys/bus/pci/devices/{address}"
    return (
        f"echo vfio-pci > {device}/driver_override; echo {address} > {device}/driver/unbind; "
        f"echo {address} > /sys/bus/pci/drivers_probe"
    )


@final
class VfioContainer:
    """``/dev/vfio/vfio`` with the type1v2 IOMMU: the DMA address space of its groups' devices.

    Several groups (hence devices) may share one container; their IOVA space is then one.
    ``dma`` is the server's own view of the memory mapped into the IOMMU, at the same IOVAs.
    """

    def __init__(self, dev: Path = Path("/dev")) -> None:
        path = dev / "vfio" / "vfio"
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VfioDeviceError(
                errno.ENOENT, f"no {path}: load VFIO with 'modprobe vfio-pci'"
            ) from None
        except PermissionError:
            raise VfioDeviceError(
                errno.EACCES, f"no permission on {path}: run as root or give your user access"
            ) from None
        self.dev = dev
        self.dma = DmaSpace()
        self._lock = threading.RLock()
        self._iommu_set = False
        self._groups: dict[int, int] = {}  # group number -> fd
        self._users: dict[int, int] = {}  # group number -> devices open in it
        self._vaddrs: dict[tuple[int, int], tuple[int, int]] = {}  # (iova, size) -> (addr, len)
        self.dirty_tracking = False
        self._dirty_capability: tuple[int, int] | None = None
        try:
            version = _ioctl(self.fd, GET_API_VERSION, 0, "VFIO_GET_API_VERSION")
            if version != API_VERSION:
                raise VfioDeviceError(errno.EINVAL, f"VFIO API version {version}, not 0")
            if not _ioctl(self.fd, CHECK_EXTENSION, TYPE1v2_IOMMU, "VFIO_CHECK_EXTENSION"):
                raise VfioDeviceError(
                    errno.ENODEV, "no IOMMU: VFIO offers no type1v2 IOMMU (modprobe "
                    "vfio_iommu_type1; boot with intel_iommu=on or amd_iommu=on)",
                )  # fmt: skip
        except BaseException:
            os.close(self.fd)
            raise

    # -- groups --------------------------------------------------------------------------

    def attach_group(self, group: int, sysfs: Path = Path("/sys")) -> int:
        """Open ``/dev/vfio/<group>`` into this container (once); returns the group fd."""
        with self._lock:
            if group in self._groups:
                self._users[group] += 1
                return self._groups[group]
            path = self.dev / "vfio" / str(group)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except PermissionError:
                raise VfioDeviceError(
                    errno.EACCES,
                    f"no permission on {path}: run as root, or chown it to your user "
                    f"(e.g. chown $USER {path})",
                ) from None
            except FileNotFoundError:
                raise VfioDeviceError(
                    errno.ENOENT, f"no {path}: is the device bound to vfio-pci?"
                ) from None
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    raise VfioDeviceError(
                        errno.EBUSY,
                        f"{path} is held by another process (a serve or probe of a device in "
                        f"IOMMU group {group}); stop it first",
                    ) from None
                raise VfioDeviceError(
                    exc.errno or errno.EIO, f"cannot open {path}: {exc}"
                ) from None
            try:
                status = bytearray(8)
                struct.pack_into("=II", status, 0, 8, 0)
                _ioctl(fd, GROUP_GET_STATUS, status, "VFIO_GROUP_GET_STATUS")
                if not struct.unpack_from("=II", status)[1] & GROUP_FLAGS_VIABLE:
                    raise VfioDeviceError(errno.EPERM, _not_viable(group, sysfs))
                _ioctl(fd, GROUP_SET_CONTAINER, struct.pack("=i", self.fd), "SET_CONTAINER")
                if not self._iommu_set:
                    _ioctl(self.fd, SET_IOMMU, TYPE1v2_IOMMU, "VFIO_SET_IOMMU")
                    self._iommu_set = True
                    self._dirty_capability = self._read_dirty_capability()
            except BaseException:
                os.close(fd)
                raise
            self._groups[group] = fd
            self._users[group] = 1
            return fd

    def release_group(self, group: int) -> None:
        """One device of ``group`` closed; the last closes the group (another process may then
        open it)."""
        with self._lock:
            if group not in self._users:
                return
            self._users[group] -= 1
            if self._users[group]:
                return
            del self._users[group]
            fd = self._groups.pop(group)
            if not self._groups:
                self.unmap_all()
            try:
                fcntl.ioctl(fd, GROUP_UNSET_CONTAINER)
            except OSError as exc:
                logger.debug("unset container of group %d: %s", group, exc)
            os.close(fd)
            if not self._groups:
                self._iommu_set = False
                self._dirty_capability = None

    @property
    def groups(self) -> tuple[int, ...]:
        """The IOMMU groups attached."""
        return tuple(self._groups)

    # -- IOMMU ---------------------------------------------------------------------------

    def map_dma(
        self, iova: int, size: int, fd: int, offset: int, *, readable: bool, writable: bool
    ) -> DmaMapping:
        """Map ``size`` bytes of ``fd`` at ``iova``: in the server (``dma``) and the IOMMU."""
        with self._lock:
            mapping = self.dma.map_fd(iova, size, fd, offset, readable=True, writable=writable)
            try:
                # The IOMMU needs an address of ours for the memory: a mapping of its own, which
                # this process never touches (the server's view may read through the fd).
                try:
                    addr = map_address(fd, size, offset, writable=writable)
                except OSError as exc:
                    code = exc.errno or errno.EIO
                    raise AccessError(code, f"mmap of the DMA fd: {exc.strerror}") from None
                try:
                    flags = (DMA_MAP_FLAG_READ if readable or not writable else 0) | (
                        DMA_MAP_FLAG_WRITE if writable else 0
                    )
                    _ioctl(
                        self.fd,
                        IOMMU_MAP_DMA,
                        _DMA_MAP.pack(_DMA_MAP.size, flags, addr, iova, size),
                        f"VFIO_IOMMU_MAP_DMA {iova:#x}+{size:#x}",
                    )
                except BaseException:
                    unmap_address(addr, size)
                    raise
            except BaseException:
                self.dma.unmap(iova, size)
                raise
            self._vaddrs[(iova, size)] = (addr, size)
            return mapping

    def unmap_dma(self, iova: int, size: int) -> None:
        """Unmap: IOMMU first (the device stops reaching the memory), then the server's view."""
        with self._lock:
            key = (iova, size)
            if key not in self._vaddrs:
                raise AccessError(errno.EINVAL, f"no DMA mapping is exactly {iova:#x}+{size:#x}")
            try:
                _ioctl(
                    self.fd,
                    IOMMU_UNMAP_DMA,
                    _DMA_UNMAP.pack(_DMA_UNMAP.size, 0, iova, size),
                    f"VFIO_IOMMU_UNMAP_DMA {iova:#x}+{size:#x}",
                )
            finally:
                addr, length = self._vaddrs.pop(key)
                unmap_address(addr, length)
                self.dma.unmap(iova, size)

    def unmap_all(self) -> None:
        """Unmap every DMA mapping."""
        with self._lock:
            for iova, size in list(self._vaddrs):
                try:
                    self.unmap_dma(iova, size)
                except OSError as exc:
                    logger.warning("unmapping %#x+%#x: %s", iova, size, exc)

    @property
    def mappings(self) -> tuple[tuple[int, int], ...]:
        """The ``(iova, size)`` of every mapping in the IOMMU."""
        return tuple(sorted(self._vaddrs))

    # -- type1 dirty tracking (every pinned page is reported dirty) ------------------------

    def _read_dirty_capability(self) -> tuple[int, int] | None:
        """``VFIO_IOMMU_GET_INFO``'s migration capability: (page size bitmap, largest bitmap)."""
        size = _IOMMU_INFO.size
        while True:
            buf = bytearray(size)
            _IOMMU_INFO.pack_into(buf, 0, size, 0, 0, 0, 0)
            _ioctl(self.fd, IOMMU_GET_INFO, buf, "VFIO_IOMMU_GET_INFO")
            argsz, flags, _, cap_offset, _ = _IOMMU_INFO.unpack_from(buf)
            if argsz <= size:
                break
            size = argsz
        at = cap_offset if flags & _IOMMU_INFO_CAPS else 0
        while at and at + _CAP_HEADER.size + _IOMMU_CAP_MIGRATION_BODY.size <= len(buf):
            cap_id, _, following = _CAP_HEADER.unpack_from(buf, at)
            if cap_id == _IOMMU_CAP_MIGRATION:
                _, page_sizes, max_bitmap = _IOMMU_CAP_MIGRATION_BODY.unpack_from(buf, at + 8)
                return page_sizes, max_bitmap
            at = following
        return None

    @property
    def dirty_capability(self) -> tuple[int, int] | None:
        """``(page size bitmap, largest bitmap in bytes)`` of type1's dirty page tracking, or
        ``None`` when the IOMMU does not offer it (or no group is attached yet)."""
        return self._dirty_capability

    def dirty_start(self) -> None:
        """``VFIO_IOMMU_DIRTY_PAGES`` START."""
        _ioctl(self.fd, IOMMU_DIRTY_PAGES, _DIRTY.pack(8, DIRTY_PAGES_FLAG_START), "DIRTY START")
        self.dirty_tracking = True

    def dirty_stop(self) -> None:
        """``VFIO_IOMMU_DIRTY_PAGES`` STOP."""
        self.dirty_tracking = False
        _ioctl(self.fd, IOMMU_DIRTY_PAGES, _DIRTY.pack(8, DIRTY_PAGES_FLAG_STOP), "DIRTY STOP")

    def dirty_bitmap(self, iova: int, size: int, page_size: int = 4096) -> bytes:
        """The dirty bitmap of ``[iova, iova + size)`` (one mapping), read and cleared."""
        pages = size // page_size
        bitmap = ctypes.create_string_buffer(((pages + 63) // 64) * 8)
        arg = _DIRTY.pack(8 + _DIRTY_GET.size, DIRTY_PAGES_FLAG_GET_BITMAP) + _DIRTY_GET.pack(
            iova, size, page_size, len(bitmap), ctypes.addressof(bitmap)
        )
        _ioctl(self.fd, IOMMU_DIRTY_PAGES, arg, "DIRTY GET_BITMAP")
        return bitmap.raw[: (pages + 7) // 8]

    def close(self) -> None:
        """Close every group and the container."""
        with self._lock:
            for group in list(self._groups):
                self._users[group] = 1
                self.release_group(group)
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


def _not_viable(group: int, sysfs: Path) -> str:
    devices = sysfs / "kernel" / "iommu_groups" / str(group) / "devices"
    others = []
    for entry in sorted(devices.iterdir()) if devices.is_dir() else []:
        driver = _driver(entry)
        if driver not in (None, "vfio-pci", "pci-stub", "pcieport"):
            others.append(f"{entry.name} (bound to {driver})")
    listed = ", ".join(others) or "a device of the group"
    return (
        f"IOMMU group {group} is not viable: {listed} must be bound to vfio-pci "
        f"(or unbound) too, since the IOMMU cannot separate the devices of one group"
    )


class _IrqRelay:
    """Eventfds the kernel signals for vectors Python must see: each is read here and its
    trigger called (a mediator observing a vector, or an emulated-style trigger callable)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._fds: dict[int, Trigger] = {}  # relay eventfd -> trigger
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def add(self, trigger: Trigger) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        with self._lock:
            self._fds[fd] = trigger
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"{self._name}-irq-relay", daemon=True
                )
                self._thread.start()
        os.write(self._wake_w, b"x")
        return fd

    def remove(self, fd: int) -> None:
        with self._lock:
            if self._fds.pop(fd, None) is None:
                return
        os.write(self._wake_w, b"x")
        os.close(fd)

    def _run(self) -> None:
        while not self._stopping:
            with self._lock:
                fds = list(self._fds)
            try:
                ready, _, _ = select.select([self._wake_r, *fds], [], [])
            except (OSError, ValueError):
                continue
            for fd in ready:
                if fd == self._wake_r:
                    os.read(self._wake_r, 4096)
                    continue
                try:
                    count = os.eventfd_read(fd)
                except OSError:
                    continue
                trigger = self._fds.get(fd)
                if trigger is not None and count:
                    try:
                        trigger()
                    except Exception:
                        logger.exception("%s: interrupt relay trigger failed", self._name)

    def close(self) -> None:
        self._stopping = True
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=2)
        with self._lock:
            for fd in self._fds:
                os.close(fd)
            self._fds.clear()
        os.close(self._wake_r)
        os.close(self._wake_w)


@final
class VfioPciDevice:
    """A device bound to vfio-pci, opened through its IOMMU group: the ``DeviceBackend`` of a
    ``MediatedDevice``. Identity comes from config space (as vfio-pci virtualizes it)."""

    direct_irqs = True
    """Interrupts go to the client's eventfds in the kernel (``set_irq_eventfds``)."""
    model = None

    def __init__(
        self,
        address: str,
        *,
        name: str | None = None,
        container: VfioContainer | None = None,
        sysfs: Path = Path("/sys"),
        dev: Path = Path("/dev"),
    ) -> None:
        self.address = normalize_address(address)
        self.name = name or self.address
        self.sysfs_dir = sysfs / "bus" / "pci" / "devices" / self.address
        self.group = _check_sysfs(self.address, self.sysfs_dir)
        self._own_container = container is None
        self.container = container if container is not None else VfioContainer(dev)
        self.fd = -1
        self._attached = False
        self._closed = False
        self._relay = _IrqRelay(self.name)
        self._relayed: dict[tuple[int, int], int] = {}
        try:
            group_fd = self.container.attach_group(self.group, sysfs)
            self._attached = True
            # The name goes by address: with a bytes argument ioctl returns bytes, not the fd.
            # The name goes by pointer (a bytes argument to fcntl.ioctl returns bytes).
            fd = _libc.ioctl(group_fd, GROUP_GET_DEVICE_FD, self.address.encode())
            if fd < 0:
                code = ctypes.get_errno()
                raise AccessError(code, f"VFIO_GROUP_GET_DEVICE_FD: {os.strerror(code)}")
            self.fd = fd
            self._info = self._device_info()
            self._regions = [self._region_info(index) for index in range(self._info.num_regions)]
            self._irqs = [self._irq_info(index) for index in range(self._info.num_irqs)]
            self.identity = self._read_identity()
            self.migration_feature = self._probe_feature(FEATURE_MIGRATION)
            self.dma_logging_feature = self._probe_feature(FEATURE_DMA_LOGGING_START)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"<VfioPciDevice {self.address} group {self.group}>"

    # -- discovery -------------------------------------------------------------------------

    def _device_info(self) -> DeviceInfo:
        buf = bytearray(_INFO.pack(_INFO.size, 0, 0, 0, 0, 0))
        _ioctl(self.fd, DEVICE_GET_INFO, buf, "VFIO_DEVICE_GET_INFO")
        _, flags, regions, irqs, _, _ = _INFO.unpack(buf)
        return DeviceInfo(flags=flags & 0x7F, num_regions=regions, num_irqs=irqs)

    def _region_info(self, index: int) -> RegionInfo:
        size = _REGION.size
        while True:
            buf = bytearray(size)
            _REGION.pack_into(buf, 0, size, 0, index, 0, 0, 0)
            try:
                fcntl.ioctl(self.fd, DEVICE_GET_REGION_INFO, buf)
            except OSError as exc:
                if exc.errno == errno.EINVAL:  # e.g. VGA on a device without it: not there
                    return RegionInfo(index=index, offset=index << 40)
                raise AccessError(exc.errno or errno.EIO, f"region {index} info: {exc}") from None
            argsz, flags, _, cap_offset, rsize, offset = _REGION.unpack_from(buf)
            if argsz <= size:
                break
            size = argsz
        sparse: list[SparseMmapArea] | None = None
        region_type: RegionType | None = None
        msix_mappable = False
        at = cap_offset if flags & 0x8 else 0
        while at and at + _CAP_HEADER.size <= len(buf):
            cap_id, _, following = _CAP_HEADER.unpack_from(buf, at)
            if cap_id == _CAP_SPARSE_MMAP:
                (count,) = struct.unpack_from("=I", buf, at + 8)
                sparse = [
                    SparseMmapArea(offset=o, size=s)
                    for o, s in struct.iter_unpack("=QQ", buf[at + 16 : at + 16 + 16 * count])
                    if s
                ]
            elif cap_id == _CAP_TYPE:
                kind, subtype = struct.unpack_from("=II", buf, at + 8)
                region_type = RegionType(type=kind, subtype=subtype)
            elif cap_id == _CAP_MSIX_MAPPABLE:
                msix_mappable = True
            at = following
        access = flags & 0x7
        if not rsize:
            access = 0
        if sparse is not None and not sparse:
            access &= ~0x4  # no area may be mapped
            sparse = None
        if index >= PCI_NUM_REGIONS and region_type is None:
            region_type = RegionType(type=0, subtype=0)
        return RegionInfo(
            index=index,
            flags=access,
            size=rsize,
            offset=offset,
            sparse_mmap=tuple(sparse) if sparse is not None and access & 0x4 else None,
            type=region_type,
            msix_mappable=msix_mappable,
        )

    def _irq_info(self, index: int) -> IrqInfo:
        buf = bytearray(_IRQ_INFO.pack(_IRQ_INFO.size, 0, index, 0))
        _ioctl(self.fd, DEVICE_GET_IRQ_INFO, buf, f"VFIO_DEVICE_GET_IRQ_INFO {index}")
        _, flags, _, count = _IRQ_INFO.unpack(buf)
        return IrqInfo(index=index, flags=flags & 0xF, count=count)

    def _read_identity(self) -> DeviceIdentity:
        config = os.pread(self.fd, 0x30, self._regions[RegionIndex.CONFIG].file_offset)
        vendor, device = struct.unpack_from("<HH", config, 0)
        revision = config[8]
        class_code = int.from_bytes(config[9:12], "little")
        sub_vendor, sub_id = struct.unpack_from("<HH", config, 0x2C)
        return DeviceIdentity(vendor, device, sub_vendor, sub_id, class_code, revision)

    def _probe_feature(self, feature: int) -> bool:
        try:
            fcntl.ioctl(self.fd, DEVICE_FEATURE, struct.pack("=II", 8, FEATURE_PROBE | feature))
        except OSError:
            return False  # ENOTTY without a vfio-pci variant driver
        return True

    # -- DeviceBackend -----------------------------------------------------------------------

    @property
    def dma(self) -> DmaSpace:
        """The server's view of the memory mapped into the IOMMU (for a mediator's reads)."""
        return self.container.dma

    def device_info(self) -> DeviceInfo:
        """Flags, number of regions and of IRQ indexes (``VFIO_DEVICE_GET_INFO``)."""
        return self._info

    def region_info(self, index: int) -> RegionInfo:
        """Region ``index``'s info with its capabilities (an absent region has size 0)."""
        return self._regions[index]

    def read(self, index: int, offset: int, count: int) -> bytes:
        """``pread`` of the device fd at the region's offset."""
        try:
            data = os.pread(self.fd, count, self._regions[index].file_offset + offset)
        except OSError as exc:
            raise AccessError(exc.errno or errno.EIO, f"{self.name}: read of region {index} "
                              f"at {offset:#x}: {exc.strerror}") from None  # fmt: skip
        if len(data) != count:
            data += b"\xff" * (count - len(data))
        return data

    def write(self, index: int, offset: int, data: bytes) -> int:
        """``pwrite`` of the device fd at the region's offset."""
        try:
            return os.pwrite(self.fd, data, self._regions[index].file_offset + offset)
        except OSError as exc:
            raise AccessError(exc.errno or errno.EIO, f"{self.name}: write of region {index} "
                              f"at {offset:#x}: {exc.strerror}") from None  # fmt: skip

    def mmap(self, index: int, offset: int, length: int) -> RegionMapping:
        """The device fd at region offset + area offset: the client maps the real BAR."""
        info = self._regions[index]
        if not any(a.offset <= offset and offset + length <= a.end for a in info.mmap_areas()):
            raise AccessError(
                errno.EINVAL, f"{self.name}: region {index} {offset:#x} not mmap-able"
            )
        return RegionMapping(self.fd, info.file_offset + offset)

    def irq_info(self, index: int) -> IrqInfo:
        """``VFIO_DEVICE_GET_IRQ_INFO``."""
        if not 0 <= index < len(self._irqs):
            raise AccessError(errno.EINVAL, f"{self.name} has no IRQ index {index}")
        return self._irqs[index]

    def _set_irqs(self, flags: int, index: int, start: int, count: int, data: bytes = b"") -> None:
        arg = _IRQ_SET.pack(_IRQ_SET.size + len(data), flags, index, start, count) + data
        _ioctl(self.fd, DEVICE_SET_IRQS, arg, f"VFIO_DEVICE_SET_IRQS index {index} {start}+{count}")

    def set_irq_eventfds(self, index: int, start: int, fds: Sequence[int]) -> None:
        """Route vectors ``start`` onward to eventfds (``-1`` unsets one) in the kernel: an
        interrupt reaches the eventfd's reader without passing through Python."""
        for vector in range(start, start + len(fds)):
            self._stop_relaying(index, vector)
        self._route_to_eventfds(index, start, fds)

    def disable_irqs(self, index: int) -> None:
        """Turn off every vector of ``index`` (DATA_NONE|TRIGGER with count 0)."""
        for key in [key for key in self._relayed if key[0] == index]:
            self._stop_relaying(*key)
        self._set_irqs(IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER, index, 0, 0)

    def set_irq_triggers(self, index: int, start: int, triggers: Sequence[Trigger | None]) -> None:
        """Callables as triggers: each vector gets an eventfd of its own that a relay thread
        reads and turns into a call (the path of a vector a mediator observes); a trigger with
        a ``fileno()`` (an eventfd) is given to the kernel as it is."""
        fds: list[int] = []
        for vector, trigger in enumerate(triggers, start):
            self._stop_relaying(index, vector)
            if trigger is None:
                fds.append(-1)
            elif hasattr(trigger, "fileno"):  # an eventfd: the kernel signals it directly
                fds.append(trigger.fileno())
            else:
                fd = self._relay.add(trigger)
                self._relayed[(index, vector)] = fd
                fds.append(fd)
        self._route_to_eventfds(index, start, fds)

    def _stop_relaying(self, index: int, vector: int) -> None:
        relayed = self._relayed.pop((index, vector), None)
        if relayed is not None:
            self._relay.remove(relayed)

    def _route_to_eventfds(self, index: int, start: int, fds: Sequence[int]) -> None:
        self._set_irqs(
            IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER,
            index,
            start,
            len(fds),
            struct.pack(f"={len(fds)}i", *fds),
        )

    def fire_irqs(self, index: int, start: int, count: int) -> None:
        """``VFIO_DEVICE_SET_IRQS`` DATA_NONE|TRIGGER: the kernel signals the vectors."""
        self._set_irqs(IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER, index, start, count)

    def reset(self) -> None:
        """``VFIO_DEVICE_RESET``."""
        _ioctl(self.fd, DEVICE_RESET, 0, f"{self.name}: VFIO_DEVICE_RESET")

    # -- DMA through the IOMMU -------------------------------------------------------------

    def dma_map(
        self, iova: int, size: int, fd: int, offset: int = 0, *, readable: bool = True,
        writable: bool = True,
    ) -> DmaMapping:  # fmt: skip
        """Map client memory at ``iova`` in the server and in the container's IOMMU."""
        return self.container.map_dma(iova, size, fd, offset, readable=readable, writable=writable)

    def dma_map_remote(
        self, iova: int, size: int, remote: RemoteMemory, *, readable: bool = True,
        writable: bool = True,
    ) -> DmaMapping:  # fmt: skip
        """Refused: a real device DMAs on its own, never through messages to the server."""
        raise AccessError(
            errno.ENOTSUP,
            f"{self.name} is a real device: DMA_MAP {iova:#x}+{size:#x} without an fd cannot "
            "reach it (give the VMM's guest RAM a shared memory backend, e.g. memfd share=on)",
        )

    def dma_unmap(self, iova: int, size: int) -> None:
        """IOMMU first, then the server's view."""
        self.container.unmap_dma(iova, size)

    # -- dirty tracking (no mediator hooks, no kernel DMA logging here: type1's) --------------

    @property
    def iommu_dirty_tracking(self) -> bool:
        """Whether the container's type1 IOMMU tracks dirty pages at 4 KiB (its
        ``VFIO_IOMMU_GET_INFO`` migration capability): ``VFIO_IOMMU_DIRTY_PAGES`` then reports
        every pinned page dirty, an honest over-report. A mediator's dirty-logging hooks take
        precedence (``MediatedDevice.dma_logging_source`` decides)."""
        capability = self.container.dirty_capability
        return capability is not None and bool(capability[0] & PAGE_SIZE)

    def dirty_start(self) -> None:
        """Start the container's dirty tracking."""
        self.container.dirty_start()

    def dirty_stop(self) -> None:
        """Stop it."""
        self.container.dirty_stop()

    def dirty_report(self, iova: int, length: int) -> list[tuple[int, bytes]]:
        """``(mapping iova, bitmap)`` of every IOMMU mapping that meets ``[iova, iova+length)``
        (type1 reports whole mappings only)."""
        return [
            (start, self.container.dirty_bitmap(start, size))
            for start, size in self.container.mappings
            if start < iova + length and iova < start + size
        ]

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the device fd and, with the last device of the group, the group."""
        if self._closed:
            return
        self._closed = True
        self._relay.close()
        self._relayed.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._attached:
            self._attached = False
            self.container.release_group(self.group)
        if self._own_container:
            self.container.close()


def _check_sysfs(address: str, device_dir: Path) -> int:
    """The device's IOMMU group, after checking it is there, has one and is on vfio-pci."""
    if not device_dir.exists():
        raise VfioDeviceError(
            errno.ENODEV,
            f"no PCI device {address} (see ls /sys/bus/pci/devices or lspci -D for the addresses)",
        )
    group_link = device_dir / "iommu_group"
    if not group_link.is_symlink():
        raise VfioDeviceError(
            errno.ENODEV,
            f"no IOMMU for {address}: it has no IOMMU group; enable the IOMMU (VT-d/AMD-Vi in "
            "the firmware, intel_iommu=on or amd_iommu=on on the kernel command line)",
        )
    driver = _driver(device_dir)
    if driver != "vfio-pci":
        bound = f"is bound to {driver}" if driver else "is bound to no driver"
        raise VfioDeviceError(
            errno.EBUSY if driver else errno.ENODEV,
            f"{address} {bound}, not vfio-pci; bind it to vfio-pci (as root): "
            + (_rebind_hint(address) if driver else
               f"echo vfio-pci > {device_dir}/driver_override; "
               f"echo {address} > /sys/bus/pci/drivers_probe"),
        )  # fmt: skip
    return int(os.path.basename(os.readlink(group_link)))
