"""The devices of one test: real emulated devices behind real ``MediatedDevice`` objects."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import final

from .._device import MediatedDevice
from .._pci import EmulatedPciDevice
from ._mediator import HookRecorder, MediatorUnderTest
from ._targets import Target

__all__ = ["DeviceRig"]

# Every device of a run gets a name no other had, so that a mediator keyed on names (a bug the
# suite looks for) cannot confuse one test's devices with another's.
_serial = itertools.count()


@final
class DeviceRig:
    """Builds devices for one test, each an ``EmulatedPciDevice`` behind a ``MediatedDevice``
    whose registry holds the mediator under test alone; ``recorder`` sees every hook call.
    ``close`` closes every device (releasing the mediator) and frees every backend."""

    def __init__(self, mediator: MediatorUnderTest) -> None:
        self.mediator = mediator
        self.recorder = HookRecorder()
        self.registry = mediator.registry(self.recorder)
        self._devices: list[MediatedDevice] = []
        self._backends: list[EmulatedPciDevice] = []

    def device(self, target: Target, role: str) -> MediatedDevice:
        """A new device of ``target``'s kind, not opened yet; ``role`` goes into its name."""
        backend = target.build(f"{role}-{next(_serial)}")
        self._backends.append(backend)
        device = MediatedDevice(backend, self.registry)
        self._devices.append(device)
        return device

    @contextlib.contextmanager
    def opened(self, target: Target, role: str) -> Iterator[MediatedDevice]:
        """A new device of ``target``'s kind, open for the ``with`` block."""
        device = self.device(target, role)
        device.open()
        try:
            yield device
        finally:
            while device.is_open:
                device.close()

    def discard(self, device: MediatedDevice) -> None:
        """Close ``device`` and free its backend now (for tests that make many devices)."""
        while device.is_open:
            device.close()
        self._devices.remove(device)
        for backend in self._backends:
            if backend is device.backend:
                self._backends.remove(backend)
                backend.close()
                break

    @property
    def calls(self) -> int:
        """How many hook calls were recorded so far (a mark for ``recorder.of(hook, since)``)."""
        return len(self.recorder.calls)

    def close(self) -> None:
        """Close every device still open, then free every backend."""
        for device in self._devices:
            while device.is_open:
                device.close()
        for backend in self._backends:
            backend.close()
        self._devices.clear()
        self._backends.clear()
