"""Interrupts over the socket: IRQ info, eventfds passed with SET_IRQS and fired by the device."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import struct
from collections.abc import Callable, Iterator

import pytest
from server_testlib import CMD_FILL, MSIX_VECTORS, REG_DOORBELL, REG_SRC, open_fds

from vfio_mediate import AccessError
from vfio_mediate._pci import PciConfig
from vfio_mediate.server import DeviceEndpoint, VfioUserClient
from vfio_mediate.uapi import IrqIndex, IrqInfoFlag, IrqSetFlag

MSIX = IrqIndex.MSIX
EVENTFD_MAX = 0xFFFF_FFFF_FFFF_FFFE
"""The largest eventfd counter: adding to it blocks, or fails with EAGAIN."""


@pytest.fixture
def eventfds() -> Iterator[list[int]]:
    fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(MSIX_VECTORS)]
    yield fds
    for fd in fds:
        os.close(fd)


def fired(fd: int, timeout: float = 1.0) -> int:
    """How many times ``fd`` was signalled (0 when it was not within ``timeout``)."""
    if not select.select([fd], [], [], timeout)[0]:
        return 0
    return os.eventfd_read(fd)


def test_irq_info_of_every_index(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient]
) -> None:
    client = connect(test_endpoint)
    msix = client.irq_info(MSIX)
    assert (msix.index, msix.count) == (MSIX, MSIX_VECTORS)
    assert msix.flags & IrqInfoFlag.EVENTFD
    for index in (IrqIndex.INTX, IrqIndex.MSI):
        assert client.irq_info(index).count == 0
    for index in (IrqIndex.ERR, IrqIndex.REQ):
        assert client.irq_info(index).count == 1
    with pytest.raises(AccessError) as refused:
        client.irq_info(5)
    assert refused.value.errno == errno.EINVAL


def test_msix_vectors_fire_the_clients_eventfds(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient], eventfds: list[int]
) -> None:
    client = connect(test_endpoint)
    client.set_irq_eventfds(MSIX, 0, eventfds)
    device = test_endpoint.device
    device.fire_irqs(MSIX, 2, 1)
    assert fired(eventfds[2]) == 1
    assert fired(eventfds[1], 0.05) == 0
    device.backend.raise_msix(3)  # the model's own way, as a device raises an interrupt
    assert fired(eventfds[3]) == 1
    client.trigger_irqs(MSIX, 0, 2)  # DATA_NONE|TRIGGER from the client
    assert (fired(eventfds[0]), fired(eventfds[1])) == (1, 1)
    client.set_irqs(IrqSetFlag.DATA_BOOL | IrqSetFlag.ACTION_TRIGGER, MSIX, 1, 3, b"\x00\x01\x00")
    assert (fired(eventfds[1], 0.05), fired(eventfds[2])) == (0, 1)
    # The device's own completion interrupt (vector 0), after a DMA command.
    client.dma_map_memfd(0x10000, 4096).close()
    client.write(0, REG_SRC, struct.pack("<QQI", 0, 0x10000, 16))
    client.write(0, REG_DOORBELL, struct.pack("<I", CMD_FILL))
    assert fired(eventfds[0]) == 1


def test_deassigned_and_disabled_vectors_do_not_fire(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient], eventfds: list[int]
) -> None:
    client = connect(test_endpoint)
    client.set_irq_eventfds(MSIX, 0, eventfds)
    client.clear_irq_eventfds(MSIX, 1, 1)
    device = test_endpoint.device
    device.fire_irqs(MSIX, 0, 2)
    assert (fired(eventfds[0]), fired(eventfds[1], 0.05)) == (1, 0)
    pba = device.backend.read(2, 4096, 1)[0]
    assert pba & 0b10, "a vector without a trigger is left pending"
    client.set_irq_eventfds(MSIX, 1, eventfds[1:2])
    assert fired(eventfds[1]) == 1, "the pending vector fires when its eventfd comes"
    client.disable_irqs(MSIX)
    device.fire_irqs(MSIX, 0, MSIX_VECTORS)
    assert not any(fired(fd, 0.02) for fd in eventfds)


def test_masked_msix_vector_stays_pending(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient], eventfds: list[int]
) -> None:
    client = connect(test_endpoint)
    client.set_irq_eventfds(MSIX, 0, eventfds)
    control = PciConfig.MSIX_CAP + PciConfig.MSIX_CONTROL
    client.write(
        7, control, struct.pack("<H", PciConfig.MSIX_ENABLE | PciConfig.MSIX_FUNCTION_MASK)
    )
    test_endpoint.device.fire_irqs(MSIX, 0, 1)
    assert fired(eventfds[0], 0.05) == 0


def test_bad_set_irqs_are_refused(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient], eventfds: list[int]
) -> None:
    client = connect(test_endpoint)
    trigger = IrqSetFlag.ACTION_TRIGGER
    cases = [
        (IrqSetFlag.DATA_EVENTFD | trigger, 0, 3, eventfds[:2]),  # fewer fds than vectors
        (IrqSetFlag.DATA_EVENTFD | trigger, 3, 2, eventfds[:2]),  # past the last vector
        (IrqSetFlag.DATA_NONE | IrqSetFlag.DATA_BOOL | trigger, 0, 1, []),  # two data kinds
        (IrqSetFlag.DATA_NONE, 0, 1, []),  # no action
        (IrqSetFlag.DATA_NONE | trigger, 0, 1, eventfds[:1]),  # fds without DATA_EVENTFD
        (IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_MASK, 0, 1, eventfds[:1]),
        (IrqSetFlag.DATA_BOOL | trigger, 0, 4, []),  # the booleans are missing
    ]
    before = open_fds()
    for flags, start, count, fds in cases:
        with pytest.raises(AccessError) as refused:
            client.set_irqs(flags, MSIX, start, count, fds=fds)
        assert refused.value.errno == errno.EINVAL, (flags, start, count)
    assert open_fds() == before, "refused eventfds are closed by the server"


def test_session_end_closes_its_eventfds(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient], eventfds: list[int]
) -> None:
    before = open_fds()
    client = connect(test_endpoint)
    client.set_irq_eventfds(MSIX, 0, eventfds)
    client.set_irq_eventfds(MSIX, 0, eventfds)  # re-assigning closes the replaced ones
    assert len(open_fds() - before) == MSIX_VECTORS + 2  # the server's copies, both sockets
    client.close()
    assert test_endpoint.wait_idle(2)
    assert open_fds() == before
    test_endpoint.device.fire_irqs(MSIX, 0, 1)
    assert fired(eventfds[0], 0.02) == 0


def test_an_fd_that_is_not_an_eventfd_is_refused_and_closed(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient], eventfds: list[int]
) -> None:
    # A pipe would fill up after a few thousand interrupts and block the server's write.
    client = connect(test_endpoint)
    read_end, write_end = os.pipe()
    memfd = os.memfd_create("not-an-eventfd", os.MFD_CLOEXEC)
    try:
        before = open_fds()
        for wrong in (write_end, memfd, client.sock.fileno()):
            with pytest.raises(AccessError) as refused:
                client.set_irq_eventfds(MSIX, 0, [eventfds[0], wrong])
            assert refused.value.errno == errno.EINVAL
        assert open_fds() == before, "the server closed every fd of a refused SET_IRQS"
        test_endpoint.device.fire_irqs(MSIX, 0, 1)
        assert fired(eventfds[0], 0.05) == 0, "a refused SET_IRQS assigns no vector"
        client.set_irq_eventfds(MSIX, 0, eventfds[:2])
        assert fired(eventfds[0]) == 1, "the vector left pending fires now"
        client.trigger_irqs(MSIX, 0, 2)
        assert (fired(eventfds[0]), fired(eventfds[1])) == (1, 1)
    finally:
        for fd in (read_end, write_end, memfd):
            os.close(fd)


def test_a_saturated_blocking_eventfd_does_not_block_the_server(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient]
) -> None:
    client = connect(test_endpoint, timeout=2.0)
    blocking = os.eventfd(0, os.EFD_CLOEXEC)  # no EFD_NONBLOCK: a full counter blocks writers
    try:
        client.set_irq_eventfds(MSIX, 0, [blocking])
        os.eventfd_write(blocking, EVENTFD_MAX)  # the client itself fills the counter
        client.trigger_irqs(MSIX, 0, 1)  # fired on the session's thread
        assert client.device_info().num_regions == 9
        assert os.eventfd_read(blocking) == EVENTFD_MAX, "an interrupt was pending already"
        client.trigger_irqs(MSIX, 0, 1)
        assert fired(blocking) == 1
    finally:
        # Unblocks a server write that waits on the counter, when this test fails.
        os.set_blocking(blocking, False)
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(blocking)
        os.close(blocking)
