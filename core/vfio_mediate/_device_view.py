"""``DeviceView``: the view of a device that its mediators receive."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast, final

from ._backend import DeviceBackend, RegionMapping
from ._dma_view import DmaView
from ._hook_types import RegionInfoData

__all__ = ["DeviceView"]


@final
class DeviceView:
    """What a mediator's ``mediator_open`` receives: the device's identity and its own
    (default) handlers, which a mediator calls to pass an access through."""

    __slots__ = (
        "_backend",
        "class_code",
        "device_id",
        "dma",
        "mmap",
        "model",
        "name",
        "read",
        "revision",
        "subsystem_id",
        "subsystem_vendor_id",
        "vendor_id",
        "write",
    )

    def __init__(self, backend: DeviceBackend) -> None:
        identity = backend.identity
        self.name: str = backend.name
        self.vendor_id = identity.vendor_id
        self.device_id = identity.device_id
        self.subsystem_vendor_id = identity.subsystem_vendor_id
        self.subsystem_id = identity.subsystem_id
        self.class_code = identity.class_code
        self.revision = identity.revision
        self.read: Callable[[int, int, int], bytes] = backend.read
        self.write: Callable[[int, int, bytes], int] = backend.write
        self.mmap: Callable[[int, int, int], RegionMapping] = backend.mmap
        self.dma: DmaView | None = None if backend.dma is None else DmaView(backend.dma)
        self.model: Any = backend.model
        self._backend = backend

    def region_info(self, index: int) -> RegionInfoData:
        """The device's own info of region ``index``, as plain data."""
        return cast(RegionInfoData, self._backend.region_info(index).to_plain())

    def __repr__(self) -> str:
        return f"<DeviceView {self.name} {self.vendor_id:04x}:{self.device_id:04x}>"
