"""The uAPI types refuse what Linux would refuse."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from vfio_mediate.uapi import (
    DeviceInfo,
    IrqInfo,
    RegionFlag,
    RegionInfo,
)

RW_MMAP = RegionFlag.READ | RegionFlag.WRITE | RegionFlag.MMAP


def info(**fields: object) -> RegionInfo:
    return RegionInfo.from_plain({"index": 0, "flags": int(RW_MMAP), "size": 0x10000, **fields})


def test_file_offset_defaults_to_index_shift() -> None:
    assert RegionInfo(index=3).file_offset == 3 << 40


def test_plain_round_trip_keeps_every_field() -> None:
    original = info(sparse_mmap=[[0, 0x2000], [0x3000, 0x1000]], msix_mappable=True)
    assert RegionInfo.from_plain(original.to_plain()) == original
    assert original.wire_flags & RegionFlag.CAPS


@pytest.mark.parametrize(
    ("areas", "message"),
    [
        ([[0x10000, 0x1000]], "outside the region"),
        ([[0xF000, 0x2000]], "outside the region"),
        ([[0, 0x2000], [0x1000, 0x1000]], "overlaps"),
        ([[0x800, 0x1000]], "not page-aligned"),
        ([[0, 0x1800]], "not page-aligned"),
    ],
)
def test_bad_sparse_areas_are_refused(areas: list[list[int]], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        info(sparse_mmap=areas)


def test_sparse_areas_need_the_mmap_flag() -> None:
    with pytest.raises(ValidationError, match="needs the MMAP flag"):
        info(flags=int(RegionFlag.READ), sparse_mmap=[[0, 0x1000]])


def test_unknown_and_caps_flags_are_refused() -> None:
    with pytest.raises(ValidationError, match="unknown region flag bits 0x10"):
        info(flags=0x10 | RegionFlag.READ)
    with pytest.raises(ValidationError, match="unknown region flag bits 0x8"):
        info(flags=int(RegionFlag.CAPS | RegionFlag.READ))
    with pytest.raises(ValidationError, match="unknown device flag"):
        DeviceInfo(flags=1 << 8, num_regions=9, num_irqs=5)
    with pytest.raises(ValidationError, match="unknown irq info flag"):
        IrqInfo(index=2, flags=1 << 4, count=1)


def test_device_specific_region_needs_a_type() -> None:
    with pytest.raises(ValidationError, match="needs a TYPE capability"):
        RegionInfo(index=9, flags=RegionFlag.READ, size=0x1000)
    region = RegionInfo.from_plain(
        {"index": 9, "flags": 1, "size": 0x1000, "type": [(1 << 31) | 0x8086, 1]}
    )
    assert region.type is not None and region.type.subtype == 1


def test_mmap_areas() -> None:
    assert info().mmap_areas()[0].size == 0x10000
    assert info(flags=int(RegionFlag.READ)).mmap_areas() == ()
    assert [a.offset for a in info(sparse_mmap=[[0x2000, 0x1000]]).mmap_areas()] == [0x2000]


def test_empty_region_has_no_flags() -> None:
    with pytest.raises(ValidationError, match="size 0"):
        RegionInfo(index=5, flags=RegionFlag.READ)


def test_plain_data_shape_errors() -> None:
    with pytest.raises(ValueError, match="must be a dict"):
        RegionInfo.from_plain([0, 1])
    with pytest.raises(ValueError, match=r"expected \[offset, size\]"):
        info(sparse_mmap=[[0, 0x1000, 5]])
