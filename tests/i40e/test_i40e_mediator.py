"""The i40e mediator: what it claims, the BAR0 it presents, its trapped pages."""

from __future__ import annotations

import errno
import subprocess
import sys
from collections.abc import Callable

import pytest
from i40e_mediator import mediator, state
from i40e_mediator import registers as r
from i40e_mediator.guest import Guest
from i40e_support import GUEST_IOVA, MEMORY_SIZE, Vf, WriteRecorder, report

from vfio_mediate import (
    AccessError,
    DeviceSpec,
    DeviceView,
    EmulatedPciDevice,
    MediatedDevice,
    MediatorRegistry,
)
from vfio_mediate._entry_points import discover_device_models
from vfio_mediate.uapi import PAGE_SIZE, RegionFlag


def other_device(vendor_id: int, device_id: int) -> EmulatedPciDevice:
    return EmulatedPciDevice(
        DeviceSpec.model_validate(
            {
                "name": f"{vendor_id:04x}-{device_id:04x}",
                "vendor_id": vendor_id,
                "device_id": device_id,
                "class_code": 0x020000,
                "bars": [{"index": 0, "size": 0x10000, "kind": "mem64"}],
            }
        )
    )


def test_the_i40e_mediator_claims_the_vf(vf: Vf) -> None:
    winner = vf.device.mediator
    assert winner is not None and winner.name == "i40e"
    assert winner.distribution == "i40e-mediator"
    assert vf.device.mediated_regions == {r.BAR0, mediator.STATE_REGION}


@pytest.mark.parametrize(
    ("vendor_id", "device_id"),
    [(0x8086, 0x1889), (0x8086, 0x1571), (0x8086, 0x37CD), (0x1AF4, 0x154C), (0x1AF4, 0x1041)],
)
def test_every_other_device_is_declined(
    registry: MediatorRegistry, vendor_id: int, device_id: int
) -> None:
    backend = other_device(vendor_id, device_id)
    try:
        assert mediator.mediator_open(DeviceView(backend)) is None
        with MediatedDevice(backend, registry) as device:
            assert device.mediator is not None and device.mediator.name == "null"
    finally:
        backend.close()


def test_targets_name_an_installed_model() -> None:
    assert mediator.mediator_targets() == ["i40e-vf"]
    assert "i40e-vf" in {record.name for record in discover_device_models()}


def test_bar0_leaves_out_the_tail_pages(vf: Vf) -> None:
    info = vf.device.region_info(r.BAR0)
    assert info.flags & RegionFlag.MMAP and info.sparse_mmap is not None
    mapped = {page for a in info.mmap_areas() for page in range(a.offset, a.end, PAGE_SIZE)}
    assert r.RX_TAIL_PAGE not in mapped and r.ARQ_TAIL_PAGE not in mapped
    assert mapped == {0x1000, *range(0x9000, 0x10000, PAGE_SIZE)}
    for page in (r.RX_TAIL_PAGE, r.ARQ_TAIL_PAGE):
        with pytest.raises(AccessError) as caught:
            vf.device.mmap(r.BAR0, page, PAGE_SIZE)
        assert caught.value.errno == errno.EINVAL
    assert vf.device.mmap(r.BAR0, 0x9000, 0x7000).fd >= 0
    assert vf.device.region_info(3).flags & RegionFlag.MMAP  # BAR3 as the device has it


def test_the_traps_hold_from_attach_and_while_logging(vf: Vf) -> None:
    before = vf.device.region_info(r.BAR0)
    vf.device.dma_logging_start(PAGE_SIZE, [(GUEST_IOVA, MEMORY_SIZE)])
    assert vf.device.region_info(r.BAR0) == before
    vf.device.dma_logging_stop()
    assert vf.device.region_info(r.BAR0) == before


def post_one(guest: Guest, queue: int, write: Callable[[int, int, bytes], int]) -> int:
    """Post one free RX buffer on ``queue``, writing the tail with ``write``; its IOVA."""
    pair = guest.pairs[queue]
    slot, buffer = pair.rx_next_to_use, pair.rx_free.popleft()
    pair.rx_slot_buffer[slot] = buffer
    guest.memory.write(pair.rx_ring + slot * r.RX_DESC.size, r.RX_DESC.pack(buffer, 0, 0, 0))
    pair.rx_next_to_use = (slot + 1) % pair.ring_len
    write(r.BAR0, r.qrx_tail(queue), pair.rx_next_to_use.to_bytes(4, "little"))
    return buffer


def test_a_trapped_rx_tail_write_reaches_the_mediator(vf: Vf, recorder: WriteRecorder) -> None:
    """A buffer posted through the trap is reported once the device fills it; the same post
    made where the mediator cannot see it (as a write into a mapped page would be) is lost."""
    guest = vf.guest(ring_len=16, buf_size=PAGE_SIZE)  # one buffer per page
    vf.device.dma_logging_start(PAGE_SIZE, [(GUEST_IOVA, MEMORY_SIZE)])
    recorder.take()  # the bring-up's writes
    posted = {}
    for name, write in (("trapped", vf.device.write), ("bypassed", vf.backend.write)):
        assert guest.send(1, 64)  # makes room for one more buffer
        guest.clean(1)
        guest.clean(0)
        before = guest.pairs[0].rx_posted
        posted[name] = post_one(guest, 0, write) // PAGE_SIZE
        for _ in range(before + 1):  # the last one fills the new buffer
            assert guest.send(1, 64)
            guest.clean(1)  # TX completions only: everything arrives on RX queue 0
    written, reported = recorder.take(), report(vf)
    assert set(posted.values()) <= written
    assert written - reported == {posted["bypassed"]}
    assert guest.clean(0) > 0 and guest.stats()["corrupt"] == 0


def test_a_vf_without_its_model_is_claimed_but_not_migrated(registry: MediatorRegistry) -> None:
    backend = other_device(0x8086, 0x154C)
    try:
        with MediatedDevice(backend, registry) as device:
            assert device.mediator is not None and device.mediator.name == "i40e"
            assert device.migration_flags == 0
            with pytest.raises(OSError) as caught:
                device.dma_logging_start(PAGE_SIZE, [(0, PAGE_SIZE)])
            assert caught.value.errno == errno.ENOTTY
    finally:
        backend.close()


def test_the_plugin_does_not_import_the_core() -> None:
    code = (
        "import sys, i40e_mediator.mediator, i40e_mediator.model, i40e_mediator.guest;"
        "assert not [m for m in sys.modules if m.startswith('vfio_mediate')], 'core imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_state_region_shows_the_saved_state(vf: Vf) -> None:
    guest = vf.guest()
    guest.run()
    info = vf.device.region_info(mediator.STATE_REGION)
    assert info.type is not None
    assert (info.type.type, info.type.subtype) == (0x8000_8086, 1)
    assert info.flags == RegionFlag.READ and 9 in vf.device.mediated_regions
    head = vf.device.read(mediator.STATE_REGION, 0, 64)
    rest = vf.device.read(mediator.STATE_REGION, 64, info.size - 64)
    view = head + rest
    length = 26 + int.from_bytes(view[18:22], "little")  # header, model id, body
    assert state.decode(view[:length]) == vf.model.snapshot()
    assert not view[length:].strip(b"\0")
    with pytest.raises(OSError) as caught:
        vf.device.write(mediator.STATE_REGION, 0, b"x")
    assert caught.value.errno == errno.EINVAL
