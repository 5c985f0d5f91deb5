"""What the suite does to a device: accesses of every size and place, mmaps, migration, dirty
logging, reset; and the checks that hold whatever the mediator does with them.

Devices come in two kinds (``Target.is_plain``). A plain device is only its spec: its regions
are memory, so the suite writes patterns everywhere and compares every byte around an access.
A device model's registers have side effects the suite cannot know, so it writes each register
only with the value it just read from it, and compares nothing outside the access.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

from .._device import MediatedDevice
from .._dirty import bitmap_pages
from .._dma import anonymous_memory
from .._errors import MigrationError
from .._pages import page_count, pages_of
from .._rules import Rule
from ..uapi import PAGE_SIZE, PCI_NUM_REGIONS, MigrationState, RegionFlag, RegionInfo
from ._targets import Target
from ._verdict import describe, fail

__all__ = [
    "ACCESS_SIZES",
    "GUEST_IOVA",
    "GUEST_SIZE",
    "Refusal",
    "access_plan",
    "differences",
    "drain",
    "fill",
    "guest_memory",
    "guest_pages",
    "logged_writes",
    "mmap_workload",
    "observe",
    "pattern",
    "register_plan",
    "rw_workload",
    "save_state",
    "shown",
    "trapped_pages",
    "workout",
]

GUEST_IOVA = 0
GUEST_SIZE = 1 << 20
"""Guest memory the suite maps into a device's DMA space for dirty logging: 1 MiB at IOVA 0."""

_CHUNK = 1 << 16


@dataclass(frozen=True)
class Refusal:
    """An access the mediator refused: where, and the error it raised."""

    what: str
    error: OSError


def pattern(count: int, seed: int) -> bytes:
    """``count`` non-zero bytes that differ for each ``seed`` (1..255 cycled, rotated)."""
    cycle = bytes(range(1, 256))
    shift = seed % len(cycle)
    cycle = cycle[shift:] + cycle[:shift]
    return (cycle * (count // len(cycle) + 1))[:count]


def access_plan(size: int) -> list[tuple[int, int]]:
    """``(offset, count)`` accesses for a region of ``size`` bytes: small aligned and unaligned
    ones at the start, across and at a page boundary, in the middle and at the end."""
    wanted = [(0, 1), (1, 1), (2, 2), (4, 4), (8, 8), (5, 3), (size // 2, 4), (size - 8, 8)]
    wanted.append((size - 1, 1))
    if size >= 2 * PAGE_SIZE:
        wanted += [(PAGE_SIZE - 4, 8), (PAGE_SIZE, PAGE_SIZE)]
    plan: list[tuple[int, int]] = []
    for offset, count in wanted:
        if offset >= 0 and offset + count <= size and (offset, count) not in plan:
            plan.append((offset, count))
    return plan


ACCESS_SIZES = (1, 2, 4, 8)
"""The sizes of register accesses: each at every offset it is aligned to, on trapped pages."""
UNALIGNED_STRIDE = 64
"""On trapped pages, an access of each size > 1 that straddles its alignment every this many
bytes (at offset 3 of each stretch)."""


def trapped_pages(info: RegionInfo) -> list[int]:
    """The pages of a region that no mmap-able area covers: every access to them reaches the
    mediator (a region smaller than a page is one trapped page)."""
    pages = page_count(info.size)
    mapped: set[int] = set()
    for area in info.mmap_areas():
        mapped.update(pages_of(area.offset, area.size))
    return [page for page in range(pages) if page not in mapped]


def register_plan(info: RegionInfo) -> list[tuple[int, int]]:
    """``(offset, count)`` accesses of a region: on each trapped page every offset with each
    access size aligned to it, and some that straddle; on mapped pages, the few places of
    ``access_plan``. A mediator's own region (index >= 9) is its data, not device registers
    (it may be large: a saved state): its first and last pages are exercised so."""
    plan: dict[tuple[int, int], None] = {}
    pages = trapped_pages(info)
    if info.index >= PCI_NUM_REGIONS:
        pages = sorted({pages[0], pages[-1]}) if pages else []
    for page in pages:
        start, end = page * PAGE_SIZE, min((page + 1) * PAGE_SIZE, info.size)
        for count in ACCESS_SIZES:
            for offset in range(start, end - count + 1, count):
                plan[offset, count] = None
            if count > 1:
                for offset in range(start + 3, end - count + 1, UNALIGNED_STRIDE):
                    plan[offset, count] = None
    plan.update(dict.fromkeys(access_plan(info.size)))
    return list(plan)


def _where(index: int, offset: int, count: int) -> str:
    return f"region {index} at {offset:#x}+{count:#x}"


def _check_untouched(
    index: int, before: bytes, after: bytes, offset: int, count: int, what: str
) -> None:
    end = offset + count
    if before[:offset] == after[:offset] and before[end:] == after[end:]:
        return
    for first, last in ((0, offset), (end, len(before))):
        if before[first:last] != after[first:last]:
            changed = next(i for i in range(first, last) if before[i] != after[i])
            fail(
                Rule.RW_RESULT,
                f"a {what} of {_where(index, offset, count)} changed byte {changed:#x}, "
                f"outside the access ({before[changed]:#04x} -> {after[changed]:#04x})",
            )


def fill(device: MediatedDevice, target: Target, index: int, seed: int) -> None:
    """Give a plain device's region ``index`` a pattern (through the device, not the mediator)."""
    if not target.is_plain or index >= PCI_NUM_REGIONS:
        return
    info = device.backend.region_info(index)
    if info.size and info.flags & RegionFlag.WRITE:
        device.backend.write(index, 0, pattern(info.size, seed))


def rw_workload(
    device: MediatedDevice, target: Target, index: int, seed: int, *, dense: bool = True
) -> list[Refusal]:
    """Read and write region ``index`` at every place of ``register_plan`` (``dense``) or of
    ``access_plan``; check each result's length and, on a plain device, that no byte outside
    the access changed. Returns what the mediator refused."""
    info = device.region_info(index)
    if not info.size:
        return []
    readable, writable = info.flags & RegionFlag.READ, info.flags & RegionFlag.WRITE
    plain = target.is_plain and index < PCI_NUM_REGIONS
    fill(device, target, index, seed)

    def contents() -> bytes:
        return device.backend.read(index, 0, info.size) if plain else b""

    refusals: list[Refusal] = []
    before = contents()
    for offset, count in register_plan(info) if dense else access_plan(info.size):
        value: bytes | None = None
        if readable:
            try:
                value = device.read(index, offset, count)
            except OSError as exc:
                refusals.append(Refusal(f"read of {_where(index, offset, count)}", exc))
            else:
                if len(value) != count:
                    fail(Rule.RW_RESULT, f"read of {_where(index, offset, count)} gave {value!r}")
            if plain:
                after = contents()
                _check_untouched(index, before, after, offset, count, "read")
                before = after
        data = pattern(count, seed + offset + 1) if plain else value
        if not writable or data is None:
            continue
        try:
            written = device.write(index, offset, data)
        except OSError as exc:
            refusals.append(Refusal(f"write of {_where(index, offset, count)}", exc))
        else:
            if written != count:
                fail(Rule.RW_RESULT, f"write of {_where(index, offset, count)} wrote {written}")
        if plain:
            after = contents()
            _check_untouched(index, before, after, offset, count, "write")
            before = after
    return refusals


def mmap_workload(
    device: MediatedDevice,
    target: Target,
    *,
    verify: bool,
    regions: Collection[int] | None = None,
) -> list[Refusal]:
    """Ask for a mapping of every mmap-able area (whole, and its first page) of ``regions``
    (default: all); with ``verify``, map each and check that it shows the region's bytes (and,
    on a plain device, that a write through it is the region's too). Returns what the mediator
    refused."""
    refusals: list[Refusal] = []
    for info in device.regions:
        if regions is not None and info.index not in regions:
            continue
        for area in info.mmap_areas():
            for offset, length in dict.fromkeys(
                [(area.offset, area.size), (area.offset, PAGE_SIZE)]
            ):
                try:
                    mapping = device.mmap(info.index, offset, length)
                except OSError as exc:
                    refusals.append(Refusal(f"mmap of {_where(info.index, offset, length)}", exc))
                    continue
                if verify:
                    _check_mapping(device, target, info, offset, length, *mapping)
    return refusals


def _check_mapping(
    device: MediatedDevice,
    target: Target,
    info: RegionInfo,
    offset: int,
    length: int,
    fd: int,
    file_offset: int,
) -> None:
    where = _where(info.index, offset, length)
    try:
        status = os.fstat(fd)
    except OSError:
        fail(Rule.MMAP_RESULT, f"the mapping of {where} names fd {fd}, which is not open")
    if file_offset % mmap.ALLOCATIONGRANULARITY:
        fail(Rule.MMAP_RESULT, f"the mapping of {where} starts at file offset {file_offset:#x}")
    if stat.S_ISREG(status.st_mode) and status.st_size < file_offset + length:
        fail(
            Rule.MMAP_RESULT,
            f"the mapping of {where} needs {file_offset + length:#x} bytes of fd {fd}, "
            f"which has {status.st_size:#x}",
        )
    protection = mmap.PROT_READ | (mmap.PROT_WRITE if info.flags & RegionFlag.WRITE else 0)
    try:
        mapped = mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=protection, offset=file_offset)
    except (OSError, ValueError) as exc:
        fail(Rule.MMAP_RESULT, f"the mapping of {where} (fd {fd}) cannot be mapped: {exc}")
    with mapped:
        try:
            shown = device.read(info.index, offset, length)
        except OSError:
            return  # the mediator traps reads of a mapped area: nothing to compare with
        if mapped[:] != shown:
            at = next(i for i in range(length) if mapped[i] != shown[i])
            fail(
                Rule.MMAP_RESULT,
                f"the mapping of {where} does not show the region: byte {offset + at:#x} is "
                f"{mapped[at]:#04x} mapped but {shown[at]:#04x} read",
            )
        if target.is_plain and info.index < PCI_NUM_REGIONS and info.flags & RegionFlag.WRITE:
            mark = pattern(8, offset + 77)
            mapped[:8] = mark
            if device.backend.read(info.index, offset, 8) != mark:
                fail(
                    Rule.MMAP_RESULT,
                    f"the mapping of {where} is not the region's memory: a write through it "
                    "does not reach the device",
                )


def drain(device: MediatedDevice) -> bytes:
    """Read all saved migration data there is now."""
    chunks = []
    while chunk := device.read_migration_data(_CHUNK):
        chunks.append(chunk)
    return b"".join(chunks)


def save_state(device: MediatedDevice) -> bytes:
    """Save a running device's state (to STOP_COPY and back to RUNNING); the whole stream."""
    try:
        device.set_migration_state(MigrationState.STOP_COPY)
        stream = drain(device)
        device.set_migration_state(MigrationState.RUNNING)
    except MigrationError as exc:
        fail(Rule.MIGRATION, f"{device.name}: saving its state failed: {exc}")
    return stream


def load_state(device: MediatedDevice, stream: bytes) -> None:
    """Load ``stream`` into a running device (through RESUMING) and run it again."""
    try:
        device.set_migration_state(MigrationState.RESUMING)
        device.write_migration_data(stream)
        device.set_migration_state(MigrationState.RUNNING)
    except MigrationError as exc:
        fail(
            Rule.MIGRATION,
            f"{device.name}: loading a state that a device of the same kind saved failed: {exc}",
        )


@contextlib.contextmanager
def guest_memory(device: MediatedDevice, size: int = GUEST_SIZE) -> Iterator[memoryview]:
    """``size`` bytes of shared memory (a memfd) mapped at ``GUEST_IOVA`` in the device's DMA
    space for the ``with`` block."""
    space = device.dma
    if space is None:
        raise OSError(errno.ENODEV, f"{device.name} has no DMA space")
    fd, memory = anonymous_memory(size, "conformance-guest")
    try:
        space.map_memory(GUEST_IOVA, memory)
        try:
            yield memoryview(memory)
        finally:
            space.unmap(GUEST_IOVA, size)
    finally:
        os.close(fd)
        # A view of the memory may outlive the block (a guest workload keeps one, and the
        # device's interrupt triggers keep the guest): the mapping then goes with the last view.
        with contextlib.suppress(BufferError):
            memory.close()


def guest_pages(iova: int, length: int, size: int = GUEST_SIZE) -> range:
    """The pages of guest memory (``size`` bytes at ``GUEST_IOVA``, counted from it) that a DMA
    write of ``[iova, iova + length)`` touches."""
    first, end = max(iova, GUEST_IOVA), min(iova + length, GUEST_IOVA + size)
    return pages_of(first - GUEST_IOVA, end - first)


def logged_writes(
    device: MediatedDevice, target: Target, seed: int
) -> tuple[set[int], set[int], list[Refusal]]:
    """Log dirty pages of the guest memory while every region is read and written at the
    places of ``access_plan`` (a mediator may do much per access while logging).

    Returns the pages the device really wrote by DMA (``DmaSpace.watch``, which no real device
    offers), the pages the log reported, and the refused accesses.
    """
    written: set[int] = set()
    refusals: list[Refusal] = []
    space = device.dma
    assert space is not None
    with guest_memory(device):
        unwatch = space.watch(lambda iova, length: written.update(guest_pages(iova, length)))
        try:
            device.dma_logging_start(PAGE_SIZE, [(GUEST_IOVA, GUEST_SIZE)])
            try:
                for info in device.regions:
                    refusals += rw_workload(device, target, info.index, seed, dense=False)
                bitmap = device.dma_logging_report(GUEST_IOVA, GUEST_SIZE, PAGE_SIZE)
            finally:
                device.dma_logging_stop()
        finally:
            unwatch()
    return written, set(bitmap_pages(bitmap)), refusals


def workout(
    device: MediatedDevice, target: Target, seed: int, *, dense: bool = False
) -> list[Refusal]:
    """Drive every hook once on an open device: region info, accesses of every mediated
    region (at every register with ``dense``, else at a few places), mmaps, a save and a load
    of its state, dirty logging, reset.

    Refused accesses are returned; a migration of its own state that fails fails the test.
    """
    refusals: list[Refusal] = []
    for index in range(device.device_info().num_regions):
        device.region_info(index)
    for index in sorted(device.mediated_regions):
        refusals += rw_workload(device, target, index, seed, dense=dense)
    refusals += mmap_workload(device, target, verify=False)
    if device.migration_flags:
        load_state(device, save_state(device))
    try:
        refusals += logged_writes(device, target, seed)[2]
    except OSError as exc:
        if exc.errno != errno.ENOTTY:  # ENOTTY: the mediator does not log dirty pages
            refusals.append(Refusal("dirty logging", exc))
    try:
        device.reset()
    except OSError as exc:
        refusals.append(Refusal("reset", exc))
    return refusals


def observe(device: MediatedDevice, *, contents: bool, own_regions: bool = True) -> dict[str, Any]:
    """What a client sees of an open device: its mediator, mediated regions, region info,
    migration flags and, with ``contents``, what each mediated region shows: every 4-byte
    register of its trapped pages and the places of ``access_plan`` (``own_regions``: of the
    mediator's own regions too)."""
    seen: dict[str, Any] = {
        "mediator": device.mediator.name if device.mediator else None,
        "mediated regions": sorted(device.mediated_regions),
        "migration flags": device.migration_flags,
    }
    for index in range(device.device_info().num_regions):
        seen[f"region {index} info"] = device.region_info(index).to_plain()
    if contents:
        for index in sorted(device.mediated_regions):
            if own_regions or index < PCI_NUM_REGIONS:
                seen.update(shown(device, index))
    return seen


def shown(device: MediatedDevice, index: int) -> dict[str, Any]:
    """What region ``index`` shows through the mediator: per trapped page, each 4-byte
    register's ``(offset, bytes or refusal)``; each other place of ``access_plan`` alone."""
    info = device.region_info(index)
    if not info.flags & RegionFlag.READ or not info.size:
        return {}

    def value(offset: int, count: int) -> Any:
        try:
            return device.read(index, offset, count)
        except OSError as exc:
            return f"refused ({exc.errno})"

    seen: dict[str, Any] = {}
    trapped = trapped_pages(info)
    width = min(4, info.size)
    for page in trapped:
        start, end = page * PAGE_SIZE, min((page + 1) * PAGE_SIZE, info.size)
        seen[f"region {index} page {page:#x} contents"] = tuple(
            (offset, value(offset, width)) for offset in range(start, end - width + 1, width)
        )
    for offset, count in access_plan(info.size):
        if offset // PAGE_SIZE not in trapped:
            seen[f"{_where(index, offset, count)} contents"] = value(offset, count)
    return seen


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What changed from one ``observe`` to another: each key, and for a page the first
    register that changed (``offset: before -> after``)."""
    changed = []
    for key, was in before.items():
        now = after.get(key)
        if now == was:
            continue
        if isinstance(was, tuple) and isinstance(now, tuple) and len(was) == len(now):
            offset, old, new = next(
                (a[0], a[1], b[1]) for a, b in zip(was, now, strict=True) if a != b
            )
            changed.append(f"{key} at {offset:#x} ({describe(old)} -> {describe(new)})")
        else:
            changed.append(f"{key} ({describe(was)} -> {describe(now)})")
    return changed
