"""Fixtures of the vfio-user server tests: a server on a thread, the i40e VF, and a small DMA
device of our own with a test mediator that traps a page, migrates and logs dirty pages."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from server_testlib import TEST_DEVICE_PREFIX, DmaModel, TrapMediator, device_spec

from vfio_mediate import EmulatedPciDevice, MediatedDevice, MediatorRegistry, create_device
from vfio_mediate.server import BackgroundServer, DeviceEndpoint, ServerConfig, VfioUserClient


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A private directory with a short path (UNIX socket paths are limited to 107 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="vmu-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def mediator() -> TrapMediator:
    return TrapMediator()


@pytest.fixture
def registry(mediator: TrapMediator) -> MediatorRegistry:
    registry = MediatorRegistry()
    registry.register(mediator, "svtest-mediator")
    return registry


@pytest.fixture
def backends() -> Iterator[list[EmulatedPciDevice]]:
    """Backends the test made; closed at the end."""
    made: list[EmulatedPciDevice] = []
    yield made
    for backend in made:
        backend.close()


@pytest.fixture
def make_test_device(
    registry: MediatorRegistry, backends: list[EmulatedPciDevice]
) -> Callable[[str], MediatedDevice]:
    def make(name: str = f"{TEST_DEVICE_PREFIX}0") -> MediatedDevice:
        backend = EmulatedPciDevice(device_spec(name), DmaModel())
        backends.append(backend)
        return MediatedDevice(backend, registry)

    return make


@pytest.fixture
def i40e(backends: list[EmulatedPciDevice]) -> MediatedDevice:
    """The i40e VF, unmediated (these tests use only its PCI identity and BARs)."""
    backend = create_device("i40e-vf")
    backends.append(backend)
    return MediatedDevice(backend, MediatorRegistry())


@pytest.fixture
def server() -> Iterator[BackgroundServer]:
    with BackgroundServer(ServerConfig(dma_timeout=2.0)) as background:
        yield background


@pytest.fixture
def serve(server: BackgroundServer, socket_dir: Path) -> Callable[[MediatedDevice], DeviceEndpoint]:
    def add(device: MediatedDevice) -> DeviceEndpoint:
        return server.add(device, socket_dir / f"{device.name}.sock")

    return add


@pytest.fixture
def connect() -> Iterator[Callable[..., VfioUserClient]]:
    """Connect clients that are closed at the end of the test."""
    clients: list[VfioUserClient] = []

    def open_client(endpoint: DeviceEndpoint, **options: Any) -> VfioUserClient:
        client = VfioUserClient.connect(endpoint.path, **options)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        client.close()


@pytest.fixture
def test_endpoint(
    make_test_device: Callable[[str], MediatedDevice],
    serve: Callable[[MediatedDevice], DeviceEndpoint],
) -> DeviceEndpoint:
    return serve(make_test_device(f"{TEST_DEVICE_PREFIX}0"))
