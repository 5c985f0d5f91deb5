"""DEVICE_FEATURE (migration v2 state, DMA dirty logging) and MIG_DATA_READ/WRITE of a session.

The device state a client writes in RESUMING is bounded (``ServerConfig.max_migration_data``:
beyond it EFBIG). A session that ends with its device out of RUNNING (the client stopped it, or
left in the middle of a migration) resumes it, or resets it when it cannot be resumed, and logs
which: the next session finds the device in the state it is told.

Errors follow Linux's ``VFIO_DEVICE_FEATURE``: a feature the device does not have is ENOTTY
(what QEMU's VFIO code reports as "not supported"), an operation the feature lacks or a wrong
size is EINVAL. Every refusal is an ``AccessError`` whose errno goes on the wire.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import final

from .._errors import AccessError, ContractViolation
from .._pages import page_count
from ..uapi import FEATURE_MASK, PAGE_SIZE, DeviceFeature, FeatureFlag, MigrationState
from ._codec import (
    DMA_LOGGING_CONTROL,
    DMA_LOGGING_RANGE,
    DMA_LOGGING_REPORT,
    FEATURE,
    FEATURE_MIG_DATA_SIZE,
    FEATURE_MIG_STATE,
    FEATURE_MIGRATION,
    MIG_DATA,
    Command,
)
from ._command import CommandGroup, Handler, Send
from ._config import ServerConfig
from ._log import logger
from ._served import ServedDevice

__all__ = ["DeviceFeatures"]

_GET, _SET, _PROBE = int(FeatureFlag.GET), int(FeatureFlag.SET), int(FeatureFlag.PROBE)
_MIGRATION_FEATURES = frozenset(
    {DeviceFeature.MIGRATION, DeviceFeature.MIG_DEVICE_STATE, DeviceFeature.MIG_DATA_SIZE}
)
_LOGGING_FEATURES = frozenset(
    {
        DeviceFeature.DMA_LOGGING_START,
        DeviceFeature.DMA_LOGGING_STOP,
        DeviceFeature.DMA_LOGGING_REPORT,
    }
)
_DATA_FD_UNUSED = 0xFFFF_FFFF
"""MIG_DEVICE_STATE's data_fd: vfio-user moves the data with MIG_DATA_READ/WRITE instead."""
_MAX_LOG_BITMAP = 64 << 20
"""The largest dirty bitmap (bytes) one DMA_LOGGING_START may make the device keep."""


@final
class DeviceFeatures(CommandGroup):
    """Answers a session's feature and migration data commands from its device.

    ``mapped_ranges`` gives the client's DMA mappings, which a DMA_LOGGING_START without
    ranges ("log every write") logs.
    """

    def __init__(
        self,
        device: ServedDevice,
        config: ServerConfig,
        label: str,
        send: Send,
        mapped_ranges: Callable[[], list[tuple[int, int]]],
    ) -> None:
        super().__init__(device, config, label, send)
        self._mapped_ranges = mapped_ranges
        self._loaded = 0
        """Bytes of device state written since the device entered RESUMING."""

    def handlers(self) -> dict[int, Handler]:
        return {
            Command.DEVICE_FEATURE: self._feature,
            Command.MIG_DATA_READ: self._mig_data_read,
            Command.MIG_DATA_WRITE: self._mig_data_write,
        }

    def _feature(self, msg_id: int, flags: int, payload: memoryview, fds: list[int]) -> None:
        answer = self.device_feature(payload)
        self._respond(msg_id, Command.DEVICE_FEATURE, flags, answer)

    def _mig_data_read(self, msg_id: int, flags: int, payload: memoryview, fds: list[int]) -> None:
        answer = self.read_migration_data(payload)
        self._respond(msg_id, Command.MIG_DATA_READ, flags, answer)

    def _mig_data_write(self, msg_id: int, flags: int, payload: memoryview, fds: list[int]) -> None:
        self.write_migration_data(payload)
        self._respond(msg_id, Command.MIG_DATA_WRITE, flags)

    def teardown(self) -> None:
        device = self.device
        state = device.migration_state
        if state is MigrationState.RUNNING:
            return
        try:
            device.set_migration_state(MigrationState.RUNNING)
        except (OSError, ContractViolation) as exc:
            logger.warning(
                "%s: the client left the device in %s and it cannot resume (%s): reset",
                self.label,
                state.name,
                exc,
            )
            device.reset()
            return
        logger.warning("%s: the client left the device in %s: resumed", self.label, state.name)

    def supported_operations(self, feature: int) -> int:
        """The GET/SET operations ``feature`` has on this device (0: it has not the feature)."""
        device = self.device
        if feature in _MIGRATION_FEATURES:
            if not device.migration_flags:
                return 0
            return _GET | _SET if feature == DeviceFeature.MIG_DEVICE_STATE else _GET
        if feature in _LOGGING_FEATURES:
            if not device.dma_logging_supported:
                return 0
            return _GET if feature == DeviceFeature.DMA_LOGGING_REPORT else _SET
        return 0

    def device_feature(self, payload: memoryview) -> bytes:
        """The reply payload of a DEVICE_FEATURE request."""
        if len(payload) < FEATURE.size:
            raise AccessError(errno.EINVAL, f"DEVICE_FEATURE payload of {len(payload)} bytes")
        argsz, flags = FEATURE.unpack_from(payload)
        feature, operations = flags & FEATURE_MASK, flags & ~FEATURE_MASK
        get, set_, probe = operations & _GET, operations & _SET, operations & _PROBE
        if operations & ~(_GET | _SET | _PROBE):
            raise AccessError(errno.EINVAL, f"DEVICE_FEATURE flags {flags:#x}")
        if not probe and bool(get) == bool(set_):
            raise AccessError(errno.EINVAL, "DEVICE_FEATURE needs exactly one of GET and SET")
        supported = self.supported_operations(feature)
        if not supported:
            raise AccessError(errno.ENOTTY, f"{self.label} has no feature {feature}")
        if (get | set_) & ~supported:
            raise AccessError(errno.EINVAL, f"feature {feature} lacks operation {operations:#x}")
        data = payload[FEATURE.size :]
        if get and not probe:
            body = self._get(feature, data, argsz - FEATURE.size)
            return FEATURE.pack(FEATURE.size + len(body), flags) + body
        # A SET or PROBE reply echoes the request: the client must take that much.
        if argsz < len(payload):
            raise AccessError(errno.EINVAL, f"argsz {argsz} < {len(payload)}")
        if probe:
            return bytes(payload)
        return FEATURE.pack(argsz, flags) + self._set(feature, data)

    def _get(self, feature: int, data: memoryview, room: int) -> bytes:
        """The data of a GET; ``room`` (what the client takes after the feature header) is
        checked before anything happens, since a report clears what it reads."""
        device = self.device
        if feature == DeviceFeature.DMA_LOGGING_REPORT:
            return self._logging_report(data, room)
        if room < FEATURE_MIGRATION.size:
            raise AccessError(errno.EINVAL, f"argsz leaves {room} bytes for 8 bytes of data")
        if feature == DeviceFeature.MIGRATION:
            return FEATURE_MIGRATION.pack(device.migration_flags)
        if feature == DeviceFeature.MIG_DEVICE_STATE:
            return FEATURE_MIG_STATE.pack(device.migration_state, _DATA_FD_UNUSED)
        return FEATURE_MIG_DATA_SIZE.pack(device.migration_pending)

    def _set(self, feature: int, data: memoryview) -> bytes:
        device = self.device
        if feature == DeviceFeature.MIG_DEVICE_STATE:
            if len(data) < FEATURE_MIG_STATE.size:
                raise AccessError(errno.EINVAL, "MIG_DEVICE_STATE lacks the state")
            state, _ = FEATURE_MIG_STATE.unpack_from(data)
            was = device.migration_state
            device.set_migration_state(state)
            if was is not MigrationState.RESUMING:
                self._loaded = 0
            logger.debug("%s: migration state %s", self.label, device.migration_state.name)
            return bytes(data)
        if feature == DeviceFeature.DMA_LOGGING_STOP:
            device.dma_logging_stop()
            return bytes(data)
        return self._logging_start(data)

    def _logging_start(self, data: memoryview) -> bytes:
        if len(data) < DMA_LOGGING_CONTROL.size:
            raise AccessError(errno.EINVAL, "DMA_LOGGING_START lacks page_size and num_ranges")
        page_size, count, _ = DMA_LOGGING_CONTROL.unpack_from(data)
        end = DMA_LOGGING_CONTROL.size + count * DMA_LOGGING_RANGE.size
        if end > len(data):
            raise AccessError(errno.EINVAL, f"{count} logging ranges do not fit {len(data)} bytes")
        ranges = list(DMA_LOGGING_RANGE.iter_unpack(data[DMA_LOGGING_CONTROL.size : end]))
        if not ranges:
            ranges = self._mapped_ranges()
        # The page size is a hint: the device takes the nearest it supports and says so.
        if page_size < PAGE_SIZE or page_size & (page_size - 1):
            page_size = PAGE_SIZE
        pages = sum(page_count(length, page_size) for _, length in ranges)
        if pages // 8 > _MAX_LOG_BITMAP:
            raise AccessError(errno.E2BIG, f"logging {pages} pages")
        self.device.dma_logging_start(page_size, ranges)
        logger.debug(
            "%s: dirty logging of %d range(s), %d-byte pages", self.label, len(ranges), page_size
        )
        rest = bytes(data[DMA_LOGGING_CONTROL.size :])
        return DMA_LOGGING_CONTROL.pack(page_size, count, 0) + rest

    def _logging_report(self, data: memoryview, room: int) -> bytes:
        # The bitmap's size is checked before anything is allocated or cleared.
        if len(data) < DMA_LOGGING_REPORT.size:
            raise AccessError(errno.EINVAL, "DMA_LOGGING_REPORT lacks iova, length, page_size")
        iova, length, page_size = DMA_LOGGING_REPORT.unpack_from(data)
        if page_size < PAGE_SIZE or page_size & (page_size - 1) or not length:
            raise AccessError(errno.EINVAL, f"report page size {page_size}, length {length}")
        pages = page_count(length, page_size)
        words = -(-pages // 64)  # u64 words, one bit per page
        if words * 8 > self.config.max_data_xfer_size:
            raise AccessError(errno.E2BIG, f"a dirty bitmap of {words * 8} bytes")
        if room < DMA_LOGGING_REPORT.size + words * 8:
            raise AccessError(errno.EINVAL, f"argsz leaves {room} bytes for {words * 8} bytes")
        bitmap = self.device.dma_logging_report(iova, length, page_size)
        return bytes(data[: DMA_LOGGING_REPORT.size]) + bitmap

    def read_migration_data(self, payload: memoryview) -> bytes:
        """The reply payload of a MIG_DATA_READ request."""
        if len(payload) < MIG_DATA.size:
            raise AccessError(errno.EINVAL, f"MIG_DATA_READ payload of {len(payload)} bytes")
        argsz, size = MIG_DATA.unpack_from(payload)
        if size > self.config.max_data_xfer_size:
            raise AccessError(errno.E2BIG, f"migration read of {size} bytes")
        if argsz < MIG_DATA.size + size:
            # Fewer bytes than asked would mean "the end of the data": refuse instead.
            raise AccessError(errno.EINVAL, f"argsz {argsz} cannot take {size} bytes")
        data = self.device.read_migration_data(size)
        return MIG_DATA.pack(MIG_DATA.size + len(data), len(data)) + data

    def write_migration_data(self, payload: memoryview) -> None:
        """Carry out a MIG_DATA_WRITE request."""
        if len(payload) < MIG_DATA.size:
            raise AccessError(errno.EINVAL, f"MIG_DATA_WRITE payload of {len(payload)} bytes")
        _, size = MIG_DATA.unpack_from(payload)
        if size > self.config.max_data_xfer_size:
            raise AccessError(errno.E2BIG, f"migration write of {size} bytes")
        if size != len(payload) - MIG_DATA.size:
            raise AccessError(
                errno.EINVAL, f"{size} bytes announced, {len(payload) - MIG_DATA.size} carried"
            )
        limit = self.config.max_migration_data
        if self._loaded + size > limit:
            raise AccessError(
                errno.EFBIG, f"device state over {limit} bytes (the server's max_migration_data)"
            )
        self.device.write_migration_data(payload[MIG_DATA.size :].tobytes())
        self._loaded += size
