"""Fixtures of the i40e tests: VFs built from the installed ``i40e-vf`` model, opened under the
installed mediators (real entry-point discovery), each with its own guest memory."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from i40e_support import GUEST_IOVA, MEMORY_SIZE, Vf, WriteRecorder

from vfio_mediate import MediatedDevice, MediatorRegistry, create_device


@pytest.fixture
def registry() -> MediatorRegistry:
    """Every installed mediator (the i40e one and the null one among them)."""
    return MediatorRegistry.from_entry_points()


@pytest.fixture
def make_vf(registry: MediatorRegistry) -> Iterator[Callable[..., Vf]]:
    """Build opened VFs with their own memory; all closed after the test."""
    made: list[Vf] = []

    def make(name: str = "vf", *, size: int = MEMORY_SIZE, fill: bool = False) -> Vf:
        backend = create_device("i40e-vf", name=name)
        memory = memoryview(bytearray(os.urandom(size) if fill else bytes(size)))
        backend.dma.map_memory(GUEST_IOVA, memory)
        device = MediatedDevice(backend, registry)
        device.open()
        vf = Vf(backend, device, memory)
        made.append(vf)
        return vf

    yield make
    for vf in made:
        if vf.device.is_open:
            vf.device.close()
        vf.backend.close()


@pytest.fixture
def vf(make_vf: Callable[..., Vf]) -> Vf:
    """One opened VF."""
    return make_vf()


@pytest.fixture
def recorder(vf: Vf) -> Iterator[WriteRecorder]:
    """Records the pages ``vf`` writes."""
    recorder = WriteRecorder()
    stop = vf.backend.dma.watch(recorder)
    yield recorder
    stop()
