"""DmaSpace and DirtyLog: the memory a device writes and the log of what it wrote."""

from __future__ import annotations

import errno
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfio_mediate import AccessError, DirtyLog, DmaSpace, anonymous_memory


def test_read_write_across_adjacent_mappings_and_watch() -> None:
    space = DmaSpace()
    low, high = bytearray(0x1000), bytearray(0x1000)
    space.map_memory(0x10000, low)
    space.map_memory(0x11000, high)
    seen: list[tuple[int, int]] = []
    stop = space.watch(lambda iova, length: seen.append((iova, length)))
    space.write(0x10FFE, b"abcd")
    assert bytes(low[-2:]) == b"ab" and bytes(high[:2]) == b"cd"
    assert space.read(0x10FFE, 4) == b"abcd"
    stop()
    space.write(0x10000, b"x")
    assert seen == [(0x10FFE, 4)]


def test_errors_carry_errnos() -> None:
    space = DmaSpace()
    space.map_memory(0x1000, bytearray(0x1000), writable=False)
    with pytest.raises(AccessError) as fault:
        space.read(0x3000, 4)
    assert fault.value.errno == errno.EFAULT
    with pytest.raises(AccessError) as perm:
        space.write(0x1000, b"x")
    assert perm.value.errno == errno.EPERM
    with pytest.raises(AccessError) as exists:
        space.map_memory(0x1800, bytearray(0x1000))
    assert exists.value.errno == errno.EEXIST
    with pytest.raises(AccessError) as inval:
        space.unmap(0x1000, 0x800)
    assert inval.value.errno == errno.EINVAL
    with pytest.raises(AccessError):
        space.read(0x1F00, 0x200)  # runs off the end of the mapping


def test_fd_mapping_is_shared_with_the_owner_of_the_fd() -> None:
    fd, memory = anonymous_memory(0x2000)
    try:
        space = DmaSpace()
        space.map_fd(0x40000, 0x2000, fd)
        space.write(0x41000, b"device wrote this")
        assert memory[0x1000:0x1011] == b"device wrote this"
        memory[0:4] = b"cpu!"
        assert space.read(0x40000, 4) == b"cpu!"
        space.unmap(0x40000, 0x2000)
        assert space.mappings == ()
    finally:
        memory.close()
        os.close(fd)


def test_dirty_log_reports_and_clears() -> None:
    log = DirtyLog(4096, [(0x100000, 0x40000), (0x200000, 0x1000)])
    log.mark(0x100FFF, 2)  # spans pages 0 and 1
    log.mark(0x13F000, 1)  # last page of the first range
    log.mark(0x900000, 0x1000)  # outside: ignored
    log.mark(0x200000, 8)
    bitmap = log.report(0x100000, 0x40000, 4096)
    assert len(bitmap) == 8  # 64 pages in one u64
    assert int.from_bytes(bitmap, "little") == (1 << 0) | (1 << 1) | (1 << 63)
    assert int.from_bytes(log.report(0x100000, 0x40000, 4096), "little") == 0
    assert log.report(0x200000, 0x1000, 4096)[0] == 1


def test_dirty_log_refuses_bad_requests() -> None:
    with pytest.raises(AccessError, match="power of two"):
        DirtyLog(3000, [(0, 0x1000)])
    with pytest.raises(AccessError, match="overlapping"):
        DirtyLog(4096, [(0, 0x2000), (0x1000, 0x1000)])
    log = DirtyLog(4096, [(0, 0x2000)])
    with pytest.raises(AccessError, match="not all logged"):
        log.report(0, 0x3000, 4096)
    with pytest.raises(AccessError, match="not a power of two"):
        log.report(0, 0x2000, 3000)


def test_reports_at_other_page_sizes() -> None:
    log = DirtyLog(4096, [(0, 0x10000)])
    log.mark(0x3000, 1)
    log.mark(0x8000, 0x1000)
    # 16 KiB report pages: page 0 holds 0x3000, page 2 holds 0x8000
    assert int.from_bytes(log.report(0, 0x10000, 0x4000), "little") == 0b101
    assert int.from_bytes(log.report(0, 0x10000, 4096), "little") == 0
    # 2 KiB report pages: one logged page is two report pages
    log.mark(0x1000, 1)
    assert int.from_bytes(log.report(0, 0x4000, 2048), "little") == 0b1100
    # a range covering half a logged page reports it and keeps it for the other half
    log.mark(0x2000, 1)
    assert int.from_bytes(log.report(0x2000, 0x800, 2048), "little") == 1
    assert int.from_bytes(log.report(0x2800, 0x800, 2048), "little") == 1
    assert int.from_bytes(log.report(0, 0x10000, 4096), "little") == 1 << 2


@settings(max_examples=200, deadline=None)
@given(
    writes=st.lists(
        st.tuples(st.integers(0, 0x80000), st.integers(1, 0x5000)), min_size=0, max_size=30
    ),
    window=st.tuples(st.integers(0, 0x40), st.integers(1, 0x40)),
)
def test_dirty_log_matches_a_page_set_model(
    writes: list[tuple[int, int]], window: tuple[int, int]
) -> None:
    """Bulk bit operations agree with a plain set of page numbers, window by window."""
    page = 4096
    ranges = [(0, 0x40000), (0x50000, 0x30000)]
    log = DirtyLog(page, ranges)
    model: set[int] = set()
    for iova, length in writes:
        log.mark(iova, length)
        for number in range(iova // page, (iova + length - 1) // page + 1):
            if any(start <= number * page < start + size for start, size in ranges):
                model.add(number)
    first, count = window
    first, count = min(first, 0x3F), min(count, 0x40 - min(first, 0x3F))
    bitmap = int.from_bytes(log.report(first * page, count * page, page), "little")
    reported = {first + bit for bit in range(count) if bitmap >> bit & 1}
    assert reported == {p for p in model if first <= p < first + count}
    rest = int.from_bytes(log.report(0, 0x40000, page), "little")
    assert {bit for bit in range(0x40) if rest >> bit & 1} == {
        p for p in model if p < 0x40 and not first <= p < first + count
    }


def test_memory_handed_out_cannot_shrink() -> None:
    fd, memory = anonymous_memory(0x2000)
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)  # a peer holding the fd cannot pull the pages from under us
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0x4000)
    finally:
        memory.close()
        os.close(fd)


def test_a_mapped_memfd_is_sealed_or_refused() -> None:
    space = DmaSpace()
    sealable = os.memfd_create("guest", os.MFD_ALLOW_SEALING)
    unsealable = os.memfd_create("guest")
    try:
        for fd in (sealable, unsealable):
            os.ftruncate(fd, 0x1000)
        space.map_fd(0, 0x1000, sealable)
        with pytest.raises(PermissionError):
            os.ftruncate(sealable, 0)  # the DMA space sealed it when it mapped it
        with pytest.raises(AccessError, match="may shrink") as error:
            space.map_fd(0x1000, 0x1000, unsealable)
        assert error.value.errno == errno.EINVAL
    finally:
        space.unmap_all()
        os.close(sealable)
        os.close(unsealable)
