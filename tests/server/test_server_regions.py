"""Device info, region info (caps, truncation, the fd), region access and mapped areas."""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Callable

import pytest
from server_testlib import (
    PAGE,
    REG_DONE,
    REG_DST,
    REG_LEN,
    REG_SRC,
    TRAPPED_BY_MEDIATOR,
    TrapMediator,
)

from vfio_mediate import AccessError, MediatedDevice
from vfio_mediate.server import DeviceEndpoint, VfioUserClient
from vfio_mediate.uapi import DeviceFlag, RegionFlag, RegionIndex

CONFIG = RegionIndex.CONFIG


def test_i40e_device_info_and_identity(
    i40e: MediatedDevice,
    serve: Callable[[MediatedDevice], DeviceEndpoint],
    connect: Callable[..., VfioUserClient],
) -> None:
    client = connect(serve(i40e))
    info = client.device_info()
    assert info.flags & DeviceFlag.PCI and info.flags & DeviceFlag.RESET
    assert (info.num_regions, info.num_irqs) == (9, 5)
    vendor, device = struct.unpack("<HH", client.read(CONFIG, 0, 4))
    assert (vendor, device) == (0x8086, 0x154C)
    assert client.read(CONFIG, 0x0E, 1) == b"\x00", "header type 0"


def test_every_region_info_is_what_the_device_presents(
    i40e: MediatedDevice,
    serve: Callable[[MediatedDevice], DeviceEndpoint],
    connect: Callable[..., VfioUserClient],
) -> None:
    endpoint = serve(i40e)
    client = connect(endpoint)
    for index in range(client.device_info().num_regions):
        remote = client.region_info(index)
        local = i40e.region_info(index)
        assert (remote.index, remote.flags, remote.size) == (index, local.flags, local.size)
        assert remote.mmap_areas() == local.mmap_areas()
        assert (client.region_fd(index) is not None) == bool(local.mmap_areas())
    assert client.region_info(CONFIG).size == 4096
    assert client.region_info(RegionIndex.BAR0).size == 64 * 1024
    with pytest.raises(AccessError) as refused:
        client.region_info(9)
    assert refused.value.errno == errno.EINVAL


def test_region_info_too_big_for_argsz_is_cut_to_the_struct_without_fd(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient]
) -> None:
    client = connect(test_endpoint)
    payload, fd = client.region_info_raw(0, 32)
    assert fd is None and len(payload) == 32
    argsz, flags, index, cap_offset, size, _ = struct.unpack("<IIIIQQ", payload)
    assert argsz > 32 and index == 0 and size == 4 * PAGE
    assert not flags & RegionFlag.CAPS and cap_offset == 0
    payload, fd = client.region_info_raw(0, argsz)
    assert fd is not None
    try:
        assert len(payload) == argsz
        _, flags, _, cap_offset, _, _ = struct.unpack_from("<IIIIQQ", payload)
        assert flags & RegionFlag.CAPS and flags & RegionFlag.MMAP and cap_offset == 32
        assert stat.S_ISREG(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


def test_regions_without_mmap_bring_no_fd(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient]
) -> None:
    client = connect(test_endpoint)
    for index in (CONFIG, RegionIndex.BAR1, RegionIndex.ROM):
        payload, fd = client.region_info_raw(index, 4096)
        assert fd is None
        assert not struct.unpack_from("<I", payload, 4)[0] & RegionFlag.MMAP


def test_i40e_bar0_area_mapped_in_the_client_is_the_devices_memory(
    i40e: MediatedDevice,
    serve: Callable[[MediatedDevice], DeviceEndpoint],
    connect: Callable[..., VfioUserClient],
) -> None:
    endpoint = serve(i40e)
    client = connect(endpoint)
    area = client.region_info(0).mmap_areas()[0]
    mapping = client.map_area(0, area.offset, PAGE)
    try:
        mapping[16:24] = b"mappedok"
        assert bytes(i40e.backend.bar_memory(0)[area.offset + 16 : area.offset + 24]) == b"mappedok"
    finally:
        mapping.close()
    assert (area.offset, area.size) in endpoint.mapped_areas[0]


def test_write_through_the_mapping_is_read_back_by_region_read(
    test_endpoint: DeviceEndpoint,
    connect: Callable[..., VfioUserClient],
    mediator: TrapMediator,
) -> None:
    client = connect(test_endpoint)
    mapping = client.map_area(0, 2 * PAGE, PAGE)
    try:
        mapping[100:108] = b"ABCDEFGH"
        assert client.read(0, 2 * PAGE + 100, 8) == b"ABCDEFGH"
        client.write(0, 2 * PAGE + 200, b"written!")
        assert mapping[200:208] == b"written!"
    finally:
        mapping.close()
    assert mediator.handles[0].reads == [(2 * PAGE + 100, 8)]


def test_the_mediators_trapped_page_is_never_handed_out_and_its_writes_reach_it(
    test_endpoint: DeviceEndpoint,
    connect: Callable[..., VfioUserClient],
    mediator: TrapMediator,
) -> None:
    client = connect(test_endpoint)
    info = client.region_info(0)
    trapped = TRAPPED_BY_MEDIATOR * PAGE
    assert all(not area.offset <= trapped < area.end for area in info.mmap_areas())
    with pytest.raises(AccessError):
        client.map_area(0, trapped, PAGE)
    client.write(0, trapped + 8, b"\x11\x22\x33\x44")
    handle = mediator.handles[0]
    assert handle.writes == [(trapped + 8, b"\x11\x22\x33\x44")]
    assert client.read(0, trapped + 8, 4) == b"\x11\x22\x33\x44"
    handed = test_endpoint.mapped_areas[0]
    assert handed == {(area.offset, area.size) for area in info.mmap_areas()}
    assert all(not offset <= trapped < offset + size for offset, size in handed)
    assert all(not offset < PAGE for offset, _ in handed), "the device's register page"


def test_posted_writes_and_write_multiple_land_in_order(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient]
) -> None:
    client = connect(test_endpoint)
    for value in range(5):
        client.write(0, REG_SRC, value.to_bytes(8, "little"), posted=True)
    assert client.read(0, REG_SRC, 8) == (4).to_bytes(8, "little")
    client.write_multiple([(0, REG_DST, b"\x01\x02"), (0, REG_LEN, b"\x05\x00\x00\x00")])
    assert client.read(0, REG_DST, 2) == b"\x01\x02"
    writes = [(0, REG_DST + 2, b"\x03"), (0, REG_LEN, b"\x06\x00\x00\x00")]
    assert client.write_multiple(writes, posted=False) == 2
    assert client.read(0, REG_DST, 3) == b"\x01\x02\x03"
    assert client.read(0, REG_LEN, 4) == b"\x06\x00\x00\x00"


def test_large_transfers_up_to_the_limit(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient]
) -> None:
    client = connect(test_endpoint)
    pattern = bytes(range(256)) * (3 * PAGE // 256)
    assert client.write(0, PAGE, pattern) == len(pattern)
    assert client.read(0, PAGE, len(pattern)) == pattern


def test_reset_clears_the_device(
    test_endpoint: DeviceEndpoint, connect: Callable[..., VfioUserClient]
) -> None:
    client = connect(test_endpoint)
    client.write(CONFIG, 4, b"\x06\x00")
    client.write(0, REG_DONE, b"\x09\x00\x00\x00")
    assert client.read(CONFIG, 4, 2) == b"\x06\x00"
    client.reset()
    assert client.read(CONFIG, 4, 2) == b"\x00\x00"
    assert client.read(0, REG_DONE, 4) == bytes(4)
