"""The vfio-pci backend's checks that need no IOMMU (run on any host), and the backend calls
the emulated backend implements the same way (DMA mapping, raw interrupt eventfds)."""

from __future__ import annotations

import errno
import os
import select
from pathlib import Path
from typing import Any

import pluggy
import pytest
from irq_observer import IrqObserver

from vfio_mediate import (
    DeviceSpecError,
    MediatedDevice,
    MediatorRegistry,
    VfioDeviceError,
    VfioPciDevice,
    anonymous_memory,
    create_device,
)
from vfio_mediate._vfio import is_pci_address
from vfio_mediate.server import BackgroundServer, VfioUserClient
from vfio_mediate.uapi import DeviceFeature, IrqIndex

hookimpl = pluggy.HookimplMarker("vfio_mediate")


@pytest.mark.parametrize("text", ["0000:01:10.0", "01:10.0", "abcd:ef:1f.7"])
def test_pci_addresses_are_recognised(text: str) -> None:
    assert is_pci_address(text)


@pytest.mark.parametrize("text", ["i40e-vf", "0000:01:10.8", "0000:1:10.0", "x.toml"])
def test_other_specs_are_not_pci_addresses(text: str) -> None:
    assert not is_pci_address(text)


def fake_device(root: Path, address: str, *, group: int | None, driver: str | None) -> Path:
    device = root / "bus" / "pci" / "devices" / address
    device.mkdir(parents=True)
    if group is not None:
        target = root / "kernel" / "iommu_groups" / str(group)
        target.mkdir(parents=True)
        (device / "iommu_group").symlink_to(target)
    if driver is not None:
        target = root / "bus" / "pci" / "drivers" / driver
        target.mkdir(parents=True)
        (device / "driver").symlink_to(target)
    return device


def test_no_such_device_says_where_to_look(tmp_path: Path) -> None:
    with pytest.raises(VfioDeviceError) as caught:
        VfioPciDevice("0000:05:00.0", sysfs=tmp_path)
    assert caught.value.errno == errno.ENODEV
    assert "no PCI device 0000:05:00.0" in str(caught.value) and "\n" not in str(caught.value)


def test_no_iommu_says_how_to_enable_it(tmp_path: Path) -> None:
    fake_device(tmp_path, "0000:03:00.0", group=None, driver="e1000e")
    with pytest.raises(VfioDeviceError, match=r"no IOMMU for 0000:03:00\.0.*intel_iommu=on"):
        VfioPciDevice("0000:03:00.0", sysfs=tmp_path)


def test_another_driver_is_named_with_the_rebind_writes(tmp_path: Path) -> None:
    fake_device(tmp_path, "0000:03:00.0", group=4, driver="igb")
    with pytest.raises(VfioDeviceError) as caught:
        VfioPciDevice("0000:03:00.0", sysfs=tmp_path)
    message = str(caught.value)
    assert "0000:03:00.0 is bound to igb, not vfio-pci" in message
    assert "echo vfio-pci > /sys/bus/pci/devices/0000:03:00.0/driver_override" in message
    assert "echo 0000:03:00.0 > /sys/bus/pci/devices/0000:03:00.0/driver/unbind" in message
    assert "echo 0000:03:00.0 > /sys/bus/pci/drivers_probe" in message


def test_a_pci_address_spec_opens_through_dev_vfio() -> None:
    """On this host (no IOMMU groups) the first PCI device gives the no-IOMMU line; a device
    that is not there gives the no-device line: either way a DeviceSpecError, one line."""
    with pytest.raises(DeviceSpecError) as caught:
        create_device("0000:ff:1f.7")
    assert "no PCI device" in str(caught.value)
    first = sorted(Path("/sys/bus/pci/devices").glob("*"))
    if first and not (first[0] / "iommu_group").exists():
        with pytest.raises(DeviceSpecError, match="no IOMMU"):
            create_device(first[0].name)


def test_the_emulated_backend_maps_dma_through_its_dma_space() -> None:
    backend = create_device("i40e-vf")
    try:
        fd, memory = anonymous_memory(1 << 16)
        try:
            backend.dma_map(0x1000_0000, 1 << 16, fd)
            backend.dma.write(0x1000_0010, b"hello")
            assert memory[0x10:0x15] == b"hello"
            with pytest.raises(OSError) as caught:
                backend.dma_map(0x1000_0000, 1 << 16, fd)
            assert caught.value.errno == errno.EEXIST
            backend.dma_unmap(0x1000_0000, 1 << 16)
            assert backend.dma.mappings == ()
        finally:
            os.close(fd)
            memory.close()
    finally:
        backend.close()


def test_the_emulated_backend_signals_raw_eventfds() -> None:
    backend = create_device("i40e-vf")
    device = MediatedDevice(backend, MediatorRegistry())
    eventfd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        with device:
            backend.set_irq_eventfds(IrqIndex.MSIX, 0, [eventfd])
            backend.fire_irqs(IrqIndex.MSIX, 0, 1)
            assert select.select([eventfd], [], [], 1)[0]
            assert os.eventfd_read(eventfd) == 1
            backend.set_irq_eventfds(IrqIndex.MSIX, 0, [-1])  # unset: the fd stays the caller's
            os.fstat(eventfd)
    finally:
        os.close(eventfd)
        backend.close()


class DirectBackend:
    """An emulated device that says it routes interrupts in the kernel (as vfio-pci does) and
    records how it was asked to."""

    direct_irqs = True

    def __init__(self) -> None:
        self._inner = create_device("i40e-vf")
        self.calls: list[tuple[str, int, int, list[Any]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def set_irq_eventfds(self, index: int, start: int, fds: Any) -> None:
        self.calls.append(("eventfds", index, start, list(fds)))

    def set_irq_triggers(self, index: int, start: int, triggers: Any) -> None:
        self.calls.append(("triggers", index, start, list(triggers)))


class Fd:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def __call__(self) -> None:
        pass


def test_client_eventfds_go_to_a_direct_backend_unless_the_mediator_observes_the_vector() -> None:
    backend = DirectBackend()
    registry = MediatorRegistry()
    observer = IrqObserver()
    registry.register(observer, "observer")
    device = MediatedDevice(backend, registry)  # type: ignore[arg-type]
    try:
        with device:
            device.set_irq_triggers(IrqIndex.MSIX, 2, [Fd(7), None])
            assert backend.calls[-1] == ("eventfds", IrqIndex.MSIX, 2, [7, -1])
            fired: list[int] = []
            device.set_irq_triggers(IrqIndex.MSIX, 0, [Fd(5), lambda: fired.append(1)])
            kind, _, _, triggers = backend.calls[-1]
            assert kind == "triggers" and isinstance(triggers[0], Fd)  # vector 0 not observed
            triggers[1]()  # the relay calls the observer, which swallows this one
            triggers[1]()
            assert [seen[:2] for seen in observer.seen] == [(IrqIndex.MSIX, 1)] * 2
            assert fired == [1]
    finally:
        backend._inner.close()


class DirtyOnly:
    """Claims the i40e VF model with dirty-logging hooks only (no migration of its own)."""

    @hookimpl
    def mediator_open(self, device: Any) -> Any:
        return self

    @hookimpl
    def mediator_dma_logging_start(self, handle: Any, log: Any) -> None:
        return None

    @hookimpl
    def mediator_dma_logging_report(self, handle: Any, log: Any, iova: int, length: int) -> None:
        log.mark(iova, 1)

    @hookimpl
    def mediator_dma_logging_stop(self, handle: Any) -> None:
        return None


@pytest.mark.parametrize(("mediator", "source"), [(DirtyOnly(), "mediator"), (None, None)])
def test_the_served_dirty_tracking_offer_is_the_devices_one_source(
    tmp_path: Path, mediator: object | None, source: str | None
) -> None:
    """VERSION's "migration" and the DMA_LOGGING probe follow ``dma_logging_source`` (the
    IOMMU source is shown on a real device, in the nested guest)."""
    registry = MediatorRegistry()
    if mediator is not None:
        registry.register(mediator, "dirty-only")
    backend = create_device("i40e-vf")
    try:
        device = MediatedDevice(backend, registry)
        with BackgroundServer() as server:
            server.add(device, tmp_path / "dev.sock")
            with VfioUserClient.connect(tmp_path / "dev.sock") as client:
                assert device.dma_logging_source == source
                offered = client.server_capabilities.migration_pgsize is not None
                assert offered is (source is not None)
                assert client.probe_feature(DeviceFeature.DMA_LOGGING_START) is offered
                assert device.migration_flags == 0  # the offer is about dirty pages only
    finally:
        backend.close()
