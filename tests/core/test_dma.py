"""DmaSpace and DirtyLog: the memory a device writes and the log of what it wrote."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfio_mediate import AccessError, DirtyLog, DmaSpace, _dirty, anonymous_memory
from vfio_mediate._dirty import bitmap_pages
from vfio_mediate._dma_memory import MAX_OPEN_FILES


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


@settings(max_examples=300, deadline=None)
@given(
    log_shift=st.integers(12, 14),
    report_shift=st.integers(9, 17),
    writes=st.lists(
        st.tuples(st.integers(0, 0x7FFFF), st.integers(1, 0x9000)), min_size=0, max_size=30
    ),
    start=st.integers(0, 0x7FFFF),
    length=st.integers(1, 0x80000),
    mapped=st.booleans(),
    piece=st.sampled_from([1, 3, 8, 1 << 20]),
)
def test_reports_at_any_page_size_match_a_page_set_model(
    log_shift: int,
    report_shift: int,
    writes: list[tuple[int, int]],
    start: int,
    length: int,
    mapped: bool,
    piece: int,
) -> None:
    """Coarser and finer report pages, ranges across two logged ranges and partly covered
    logged pages (reported, kept), bitmaps in a bytearray or an anonymous mapping (the large
    ones), reports converted in pieces of any size: bulk conversions agree with a set of
    logged pages."""
    log_page, page = 1 << log_shift, 1 << report_shift
    size = 0x80000
    split = 0x3C000  # not aligned to every report page: a range starts inside one
    threshold = _dirty._MAPPED_BITMAP
    _dirty._MAPPED_BITMAP = 0 if mapped else threshold
    try:
        log = DirtyLog(log_page, [(0, split), (split, size - split)])
    finally:
        _dirty._MAPPED_BITMAP = threshold
    model: set[int] = set()
    for iova, count in writes:
        log.mark(iova, count)
        model.update(
            n
            for n in range(iova // log_page, (iova + count - 1) // log_page + 1)
            if n * log_page < size
        )
    iova = start - start % page
    length = min(length, size - iova)
    end = iova + length
    pieces = _dirty._PIECE_PAGES
    _dirty._PIECE_PAGES = piece
    try:
        bitmap = log.report(iova, length, page)
    finally:
        _dirty._PIECE_PAGES = pieces
    pages = -(-length // page)
    assert len(bitmap) == -(-pages // 64) * 8
    reported = int.from_bytes(bitmap, "little")
    for n in range(pages):
        low, high = iova + n * page, min(iova + (n + 1) * page, end)
        dirty = any(p * log_page < high and low < (p + 1) * log_page for p in model)
        assert bool(reported >> n & 1) == dirty, f"report page {n}"
    assert reported >> pages == 0
    kept = {p for p in model if not (iova <= p * log_page and (p + 1) * log_page <= end)}
    rest = int.from_bytes(log.report(0, size, log_page), "little")
    assert {n for n in range(size // log_page) if rest >> n & 1} == kept


def test_a_report_costs_its_range_not_the_whole_log() -> None:
    """After logging 2 TiB, a one-page report must not convert the 64 MiB bitmap (which held
    the server's loop for 0.1-0.4 s per report): it allocates a few bytes, not megabytes. Nor
    does starting the log zero 64 MiB (0.2 s of the loop, at every start)."""
    tracemalloc.start()
    try:
        log = DirtyLog(4096, [(0, 2 << 40)])
        _, started = tracemalloc.get_traced_memory()
        log.mark((1 << 40) + 5, 1)
        log.mark((2 << 40) - 1, 1)
        tracemalloc.reset_peak()
        bitmap = log.report(1 << 40, 4096, 4096)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert bitmap == (1).to_bytes(8, "little")
    assert peak < 1 << 16, f"a one-page report allocated {peak} bytes"
    assert started < 1 << 16, f"starting to log 2 TiB allocated {started} bytes"
    last = log.report((2 << 40) - (2 << 20), 2 << 20, 2 << 20)  # the last page, coarser
    assert last == (1).to_bytes(8, "little")
    assert log.report(0, 2 << 40, 1 << 40) == bytes(8), "reported pages are cleared"


def _dirty_lines(call: Callable[[], bytes | None]) -> tuple[bytes | None, int]:
    """``call()`` and how many lines of the dirty log's module it ran."""
    lines = 0

    def tracer(frame: FrameType, event: str, arg: object) -> object:
        nonlocal lines
        if frame.f_code.co_filename.endswith("_dirty.py"):
            lines += event == "line"
            return tracer
        return None

    sys.settrace(tracer)
    try:
        result = call()
    finally:
        sys.settrace(None)
    return result, lines


def test_marks_and_reports_cost_the_same_among_many_logged_ranges() -> None:
    """A client that logs 20,000 ranges must not make every DMA mark of the device (and every
    report) walk them all."""
    few = DirtyLog(4096, [(n * 0x10000, 0x1000) for n in range(2)])
    many = DirtyLog(4096, [(n * 0x10000, 0x1000) for n in range(20_000)])
    costs = []
    for log in (few, many):
        _, marked = _dirty_lines(lambda log=log: log.mark(0x10000, 8))
        bitmap, reported = _dirty_lines(lambda log=log: log.report(0x10000, 0x1000, 4096))
        assert bitmap == (1).to_bytes(8, "little")
        costs.append((marked, reported))
    assert costs[1] == costs[0], f"lines run with 2 and with 20,000 ranges: {costs}"


@pytest.mark.parametrize("page", [2 << 20, 1024])
def test_other_page_size_reports_do_no_work_per_dirty_page(page: int) -> None:
    """A report at another page size than the logging one ran a loop per dirty logged page
    (quadratic: 64 GiB took hours): now a fixed number of bulk steps, however many are dirty."""
    size = 64 << 20
    runs = []
    for dirty in (1, size // 4096):
        log = DirtyLog(4096, [(0, size)])
        for n in range(dirty):
            log.mark(n * 4096, 1)
        bitmap, lines = _dirty_lines(lambda log=log: log.report(0, size, page))
        assert bitmap is not None
        runs.append(lines)
        everything = (1 << (size // page)) - 1
        first_page = (1 << max(1, 4096 // page)) - 1
        assert int.from_bytes(bitmap, "little") == (everything if dirty > 1 else first_page)
    assert runs[1] <= runs[0] + 10, f"lines run for 1 and for every page dirty: {runs}"


@given(bitmap=st.binary(max_size=300))
def test_bitmap_pages_lists_the_set_bits_in_order(bitmap: bytes) -> None:
    value = int.from_bytes(bitmap, "little")
    assert bitmap_pages(bitmap) == [n for n in range(len(bitmap) * 8) if value >> n & 1]


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


def test_a_sealable_memfd_is_sealed_and_mapped_an_unsealable_one_goes_through_the_fd() -> None:
    space = DmaSpace()
    sealable = os.memfd_create("guest", os.MFD_ALLOW_SEALING)
    unsealable = os.memfd_create("guest")  # memory-backend-memfd,seal=off
    try:
        for fd in (sealable, unsealable):
            os.ftruncate(fd, 0x1000)
        mapped = space.map_fd(0, 0x1000, sealable)
        with pytest.raises(PermissionError):
            os.ftruncate(sealable, 0)  # the DMA space sealed it when it mapped it
        assert mapped.memory is not None and mapped.file is None
        by_fd = space.map_fd(0x1000, 0x1000, unsealable)
        assert by_fd.memory is None and by_fd.file is not None
        space.write(0xFF0, b"0123456789abcdefghij")
        assert os.pread(sealable, 16, 0xFF0) == b"0123456789abcdef"
        assert os.pread(unsealable, 4, 0) == b"ghij"
        os.pwrite(unsealable, b"guest", 8)
        assert space.read(0x1008, 5) == b"guest"
    finally:
        space.unmap_all()
        os.close(sealable)
        os.close(unsealable)


SURVIVOR = """
import errno, json, os, sys
from vfio_mediate import AccessError, DmaSpace
kind, where = sys.argv[1], sys.argv[2]
if kind == "memfd":
    fd = os.memfd_create("guest")
else:
    fd = os.open(os.path.join(where, "guest-ram"), os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(fd, 0x4000)
space = DmaSpace()
mapping = space.map_fd(0x10000, 0x4000, fd)
space.write(0x12000, b"device data")
seen = {"before": os.pread(fd, 11, 0x2000).decode()}
os.ftruncate(fd, 0x1000)  # a peer takes the memory back while the device still has it mapped
for what, access in (("read", lambda: space.read(0x12000, 8)),
                     ("write", lambda: space.write(0x13ff0, b"x" * 0x20))):
    try:
        access()
        seen[what] = "no error"
    except AccessError as exc:
        seen[what] = errno.errorcode[exc.errno]
seen["size_after"] = os.fstat(fd).st_size
seen["still_mapped_below"] = space.read(0x10000, 4) == bytes(4)
seen["by_fd"] = mapping.file is not None
print(json.dumps(seen))
"""


@pytest.mark.parametrize("kind", ["disk", "tmpfs", "memfd"])
def test_truncating_mapped_memory_is_an_error_not_sigbus(kind: str, tmp_path: Path) -> None:
    """The SIGBUS of a shared mapping past a file's end would kill every device of the
    process: the child that does it must live and see EFAULT."""
    where = str(tmp_path)
    if kind == "tmpfs":
        mounts = Path("/proc/mounts").read_text().splitlines()
        if not any(line.split()[1:3] == ["/dev/shm", "tmpfs"] for line in mounts):
            pytest.skip("no tmpfs at /dev/shm")
        where = tempfile.mkdtemp(dir="/dev/shm")
    try:
        child = subprocess.run(
            [sys.executable, "-c", SURVIVOR, kind, where],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        if kind == "tmpfs":
            shutil.rmtree(where, ignore_errors=True)
    assert child.returncode == 0, f"the child died ({child.returncode}): {child.stderr}"
    assert json.loads(child.stdout) == {
        "before": "device data",
        "by_fd": True,
        "read": "EFAULT",
        "write": "EFAULT",
        "size_after": 0x1000,  # the refused write did not grow the file back
        "still_mapped_below": True,
    }


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_mapped_memory_holds_no_fd_and_files_one_each(tmp_path: Path) -> None:
    """A DMA space holds no fd for mapped memory and one per file reached through its fd,
    however many mappings there are (so ``max_dma_maps`` maps cannot exhaust RLIMIT_NOFILE)."""
    space = DmaSpace()
    name = f"guest-{uuid.uuid4().hex}"
    fd, memory = anonymous_memory(0x1000 * 300, name)
    file_fd = os.open(tmp_path / "guest-ram", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(file_fd, 0x1000 * 300)
    opened = _open_fds()
    try:
        for page in range(300):
            space.map_fd(page * 0x1000, 0x1000, fd, page * 0x1000)
            space.map_fd((1 << 32) + page * 0x1000, 0x1000, file_fd, page * 0x1000)
        os.close(fd)
        os.close(file_fd)
        assert _open_fds() == opened - 2 + 1  # the caller's two are closed; the file's one
        assert space.open_files == 1
        assert _mapped_bytes(name) == 2 * 300 * 0x1000  # the test's mapping and the space's
        space.write(299 * 0x1000, b"sealed")
        space.write((1 << 32) + 299 * 0x1000, b"file")
        assert bytes(memory[299 * 0x1000 : 299 * 0x1000 + 6]) == b"sealed"
        assert (tmp_path / "guest-ram").read_bytes()[299 * 0x1000 :][:4] == b"file"
        view = space.mappings[0].memory
        assert view is not None
        kept = view[:6]
        space.unmap_all()
        assert _open_fds() == opened - 2
        assert space.open_files == 0
        memory[:6] = b"alive!"
        assert bytes(kept) == b"alive!", "a view outlives the mapping: unmapped with the last"
        assert _mapped_bytes(name) == (300 + 1) * 0x1000
        kept.release()
        view.release()
        assert _mapped_bytes(name) == 300 * 0x1000, "all of the space's memory is unmapped"
    finally:
        memory.close()


def _mapped_bytes(name: str) -> int:
    """Bytes of this process's address space that map memfd ``name``."""
    total = 0
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(f"/memfd:{name}") or line.endswith(f"/memfd:{name} (deleted)"):
            low, high = line.split()[0].split("-")
            total += int(high, 16) - int(low, 16)
    return total


def test_the_files_a_space_keeps_open_are_bounded() -> None:
    """A client handing a new unsealed memfd with every DMA_MAP cannot run the process out of
    fds: past MAX_OPEN_FILES distinct files, ENOSPC; sealed memory is not counted."""
    space = DmaSpace()
    files = [os.memfd_create(f"guest-{n}") for n in range(MAX_OPEN_FILES + 1)]
    sealed, memory = anonymous_memory(0x1000)
    try:
        for n, fd in enumerate(files):
            os.ftruncate(fd, 0x1000)
            if n < MAX_OPEN_FILES:
                space.map_fd(n * 0x1000, 0x1000, fd)
        with pytest.raises(AccessError, match="sealed memfd") as refused:
            space.map_fd(1 << 32, 0x1000, files[-1])
        assert refused.value.errno == errno.ENOSPC
        space.map_fd((1 << 32) + 0x1000, 0x1000, files[0], writable=False)  # a file it has
        space.map_fd(1 << 33, 0x1000, sealed)
        space.unmap(0x1000, 0x1000)
        space.map_fd(1 << 32, 0x1000, files[-1])
        assert space.open_files == MAX_OPEN_FILES
    finally:
        space.unmap_all()
        memory.close()
        for fd in (*files, sealed):
            os.close(fd)


def test_memory_that_can_shrink_and_cannot_be_written_is_refused(tmp_path: Path) -> None:
    """hugetlbfs has no write(): a writable mapping of such a file would have to be mmap, and
    could SIGBUS; refused with the reason. Read-only mappings go through pread."""
    try:
        huge = os.memfd_create("guest", os.MFD_HUGETLB)  # no seals: it can shrink
    except OSError as exc:
        pytest.skip(f"no hugetlbfs memfd here: {exc}")
    space = DmaSpace()
    try:
        os.ftruncate(huge, 2 << 20)
        with pytest.raises(AccessError, match="cannot be written with pwrite") as refused:
            space.map_fd(0, 2 << 20, huge)
        assert refused.value.errno == errno.EINVAL
        assert "seal=on" in str(refused.value)
        space.map_fd(0, 2 << 20, huge, writable=False)
        assert space.read(0x1000, 8) == bytes(8)
    finally:
        space.unmap_all()
        os.close(huge)
    read_only = tmp_path / "read-only"
    read_only.write_bytes(b"r" * 0x1000)
    fd = os.open(read_only, os.O_RDONLY)
    try:
        with pytest.raises(AccessError, match="cannot be written"):
            space.map_fd(0, 0x1000, fd)
        space.map_fd(0, 0x1000, fd, writable=False)
        assert space.read(0, 2) == b"rr"
    finally:
        space.unmap_all()
        os.close(fd)


def test_fds_that_are_neither_memory_nor_files_are_refused_or_read_through() -> None:
    space = DmaSpace()
    reader, writer = os.pipe()
    zero = os.open("/dev/zero", os.O_RDWR)
    try:
        with pytest.raises(AccessError, match="cannot be read with pread") as refused:
            space.map_fd(0, 0x1000, reader)
        assert refused.value.errno == errno.EINVAL and space.mappings == ()
        # a character device that reads and writes is reached through its fd, never mapped
        mapping = space.map_fd(0, 0x1000, zero)
        assert mapping.file is not None and mapping.memory is None
        space.write(0, b"gone")
        assert space.read(0, 4) == bytes(4)
    finally:
        space.unmap_all()
        for fd in (reader, writer, zero):
            os.close(fd)


def test_offsets_beyond_off_t_are_refused_with_einval() -> None:
    space = DmaSpace()
    zero = os.open("/dev/zero", os.O_RDWR)
    try:
        for size, offset in ((0x1000, 1 << 63), (1 << 63, 0x1000), (0x2000, (1 << 63) - 0x1000)):
            with pytest.raises(AccessError) as refused:
                space.map_fd(0, size, zero, offset)
            assert refused.value.errno == errno.EINVAL
    finally:
        os.close(zero)
