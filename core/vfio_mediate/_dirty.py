"""Dirty page logging: the bitmap behind ``VFIO_DEVICE_FEATURE_DMA_LOGGING_*``."""

from __future__ import annotations

import bisect
import errno
import mmap
import re
import threading
from collections.abc import Iterable
from typing import final

from ._errors import AccessError
from ._pages import page_count
from .uapi import PAGE_SIZE

__all__ = ["DirtyBitmap", "DirtyLog", "bitmap_pages"]


_MAPPED_BITMAP = 1 << 20
"""Bitmaps of this many bytes or more are anonymous mappings rather than bytearrays."""


@final
class DirtyBitmap:
    """One bit per page of ``[iova, iova + length)``: bit ``n`` is byte ``n // 8``, bit ``n % 8``,
    which is the layout of Linux's array of little-endian u64s. Every operation costs what the
    pages it touches take, never the whole bitmap."""

    def __init__(self, iova: int, length: int, page_size: int) -> None:
        self.iova = iova
        self.length = length
        self.page_size = page_size
        self.pages = page_count(length, page_size)
        size = -(-self.pages // 8)
        # A large bitmap is an anonymous mapping: zero pages that cost no time and no memory
        # until marked (a bytearray would zero, say, 64 MiB for 2 TiB of IOVA at every start).
        self.bits: bytearray | mmap.mmap = (
            mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
            if size >= _MAPPED_BITMAP
            else bytearray(size)
        )

    def set_pages(self, first: int, last: int) -> None:
        """Set the bits of pages ``first`` to ``last`` inclusive (bulk, not per bit)."""
        bits = self.bits
        first_byte, last_byte = first >> 3, last >> 3
        if first_byte == last_byte:
            bits[first_byte] |= (0xFF << (first & 7)) & (0xFF >> (7 - (last & 7)))
            return
        bits[first_byte] |= (0xFF << (first & 7)) & 0xFF
        bits[first_byte + 1 : last_byte] = b"\xff" * (last_byte - first_byte - 1)
        bits[last_byte] |= 0xFF >> (7 - (last & 7))

    def clear_pages(self, first: int, last: int) -> None:
        """Clear the bits of pages ``first`` to ``last`` inclusive."""
        bits = self.bits
        first_byte, last_byte = first >> 3, last >> 3
        below, above = (1 << (first & 7)) - 1, (0xFF << ((last & 7) + 1)) & 0xFF
        if first_byte == last_byte:
            bits[first_byte] &= below | above
            return
        bits[first_byte] &= below
        bits[first_byte + 1 : last_byte] = bytes(last_byte - first_byte - 1)
        bits[last_byte] &= above

    def window(self, first: int, count: int) -> int:
        """The bits of pages ``first`` to ``first + count - 1`` (bit 0: page ``first``)."""
        low = first >> 3
        data = self.bits[low : (first + count + 7) >> 3]
        if data.count(0) == len(data):  # a clean stretch: a scan, no integer
            return 0
        return (int.from_bytes(data, "little") >> (first & 7)) & ((1 << count) - 1)


def bitmap_pages(bitmap: bytes) -> list[int]:
    """The numbers of the set bits of a dirty bitmap (bit ``n``: byte ``n // 8``, bit
    ``n % 8``), in order; a scan for non-zero bytes, then work per set bit."""
    pages: list[int] = []
    for match in _NONZERO.finditer(bitmap):
        at = match.start()
        pages += [at * 8 + n for n in _SET_BITS[bitmap[at]]]
    return pages


_NONZERO = re.compile(rb"[^\x00]")
_SET_BITS = [tuple(n for n in range(8) if x >> n & 1) for x in range(256)]


@final
class DirtyLog:
    """The log a mediator marks while DMA logging runs; the core reports and clears it.

    ``mark`` is thread-safe and cheap; writes outside the logged ranges are ignored.
    """

    def __init__(self, page_size: int, ranges: Iterable[tuple[int, int]]) -> None:
        if page_size <= 0 or page_size & (page_size - 1) or page_size < PAGE_SIZE:
            raise AccessError(
                errno.EINVAL, f"page size {page_size} is not a power of two >= {PAGE_SIZE}"
            )
        spans = sorted((int(iova), int(length)) for iova, length in ranges)
        if not spans:
            raise AccessError(errno.EINVAL, "dirty logging needs at least one IOVA range")
        end = -1
        for iova, length in spans:
            if length <= 0 or iova < 0 or iova % page_size or iova < end:
                raise AccessError(
                    errno.EINVAL, f"bad or overlapping logging range {iova:#x}+{length:#x}"
                )
            end = iova + length
        self.page_size = page_size
        self.ranges = spans
        self._shift = page_size.bit_length() - 1
        self._bitmaps = [DirtyBitmap(iova, length, page_size) for iova, length in spans]
        self._starts = [iova for iova, _ in spans]
        self._lock = threading.Lock()

    def mark(self, iova: int, length: int) -> None:
        """Record that the device wrote (or may write) ``[iova, iova + length)``."""
        if length <= 0:
            return
        end = iova + length
        with self._lock:
            for bitmap, low, high in self._overlapping(iova, end):
                bitmap.set_pages(
                    (low - bitmap.iova) >> self._shift, (high - 1 - bitmap.iova) >> self._shift
                )

    def _overlapping(self, iova: int, end: int) -> list[tuple[DirtyBitmap, int, int]]:
        """The logged ranges that ``[iova, end)`` touches and the part of it in each; found by
        bisection, so a log of many ranges costs no more per call than one of a few."""
        bitmaps = self._bitmaps
        at = max(bisect.bisect_right(self._starts, iova) - 1, 0)
        found = []
        while at < len(bitmaps) and bitmaps[at].iova < end:
            bitmap = bitmaps[at]
            low, high = max(iova, bitmap.iova), min(end, bitmap.iova + bitmap.length)
            if low < high:
                found.append((bitmap, low, high))
            at += 1
        return found

    def report(self, iova: int, length: int, page_size: int) -> bytes:
        """Read and clear the log for ``[iova, iova + length)``: a bitmap of 64-bit words,
        bit ``n`` for the page at ``iova + n * page_size``.

        ``page_size`` may differ from the logging's: a report page is dirty when any logged page
        in it is. A logged page that the range covers only in part is reported, not cleared.
        The cost is that of the range's bits (bulk byte and integer operations), whatever the
        size of the log and of either page size.
        """
        if page_size <= 0 or page_size & (page_size - 1):
            raise AccessError(errno.EINVAL, f"report page size {page_size} is not a power of two")
        if length <= 0 or iova % page_size or iova < 0:
            raise AccessError(errno.EINVAL, f"bad report range {iova:#x}+{length:#x}")
        pages = page_count(length, page_size)
        out = bytearray(-(-pages // 64) * 8)
        end = iova + length
        with self._lock:
            windows = self._overlapping(iova, end)
            if sum(high - low for _, low, high in windows) < length:
                raise AccessError(errno.EINVAL, f"range {iova:#x}+{length:#x} is not all logged")
            # In pieces of about _PIECE_PAGES logged pages, cut at multiples of ``step`` (whole
            # logged pages, so none is split): each piece's integers stay small, and a clean
            # piece costs a scan of its bytes, not a conversion.
            step = max(page_size, self.page_size * _PIECE_PAGES)
            for bitmap, low, high in windows:
                while low < high:
                    cut = min(high, (low // step + 1) * step)
                    self._report_piece(bitmap, low, cut, iova, end, page_size, out, pages)
                    low = cut
        return bytes(out)

    def _report_piece(
        self,
        bitmap: DirtyBitmap,
        low: int,
        high: int,
        iova: int,
        end: int,
        page_size: int,
        out: bytearray,
        pages: int,
    ) -> None:
        """Report and clear ``[low, high)`` of ``bitmap`` into ``out``, the report of
        ``[iova, end)`` at ``page_size``."""
        shift = self._shift
        first = (low - bitmap.iova) >> shift
        last = (high - 1 - bitmap.iova) >> shift
        count = last - first + 1
        window = bitmap.window(first, count)
        if not window:
            return
        base = bitmap.iova + (first << shift)
        clear_first = first + (base < iova)
        clear_last = last - (bitmap.iova + ((last + 1) << shift) > end)
        if clear_first <= clear_last:
            bitmap.clear_pages(clear_first, clear_last)
        at, bits, many = _in_report_pages(window, count, base - iova, shift, page_size)
        _or_bits(out, at, bits, min(many, pages - at))


_PIECE_PAGES = 1 << 20
"""Logged pages a report converts at a time (128 KiB of bitmap)."""


def _in_report_pages(
    window: int, count: int, offset: int, shift: int, page_size: int
) -> tuple[int, int, int]:
    """``count`` logged pages of ``1 << shift`` bytes (``window``'s bits), the first at
    ``offset`` bytes from the report's start (negative: before it), as report pages:
    ``(first report page, bits, how many)``."""
    scale = page_size.bit_length() - 1 - shift  # log2 of the ratio: > 0 coarser, < 0 finer
    if scale == 0:
        return offset >> shift, window, count
    if scale > 0:  # offset >= 0 here: both the report and the logged range are page-aligned
        lead = (offset % page_size) >> shift
        return offset // page_size, _coarsen(window << lead, scale), -(-(lead + count) >> scale)
    expanded, bits = _expand(window, count, -scale), count << -scale
    if offset >= 0:
        return offset // page_size, expanded, bits
    skip = -offset // page_size  # report pages of the first logged page before the report
    return 0, expanded >> skip, bits - skip


def _or_bits(out: bytearray, at: int, value: int, count: int) -> None:
    """OR the low ``count`` bits of ``value`` into ``out`` from bit ``at`` (the others, of a
    logged page running past the report, are dropped)."""
    value &= (1 << count) - 1
    low = at >> 3
    size = ((at & 7) + count + 7) >> 3
    current = int.from_bytes(out[low : low + size], "little")
    out[low : low + size] = (current | value << (at & 7)).to_bytes(size, "little")


def _or_bytes(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(len(a), "little")


def _pad(data: bytes, multiple: int) -> bytes:
    return data + bytes(-len(data) % multiple)


def _any_of_groups(byte: int, scale: int) -> int:
    """The bits of ``byte`` ORed in groups of ``2**scale`` (scale 1-3), packed."""
    size = 1 << scale
    mask = (1 << size) - 1
    return sum(1 << n for n in range(8 >> scale) if byte >> (n * size) & mask)


def _spread(byte: int, factor: int) -> int:
    """Each bit of ``byte`` repeated ``factor`` times (bit ``n`` -> bits ``n*factor``...)."""
    run = (1 << factor) - 1
    return sum(run << (n * factor) for n in range(8) if byte >> n & 1)


# _COARSE[scale][i]: byte i of each run of 2**scale bytes -> its packed group bits, in place.
_COARSE = {
    scale: [
        bytes(_any_of_groups(x, scale) << (i * (8 >> scale)) for x in range(256))
        for i in range(1 << scale)
    ]
    for scale in (1, 2, 3)
}
# _FINE[factor][i]: output byte i of an input byte whose bits are repeated ``factor`` times.
_FINE = {
    factor: [bytes(_spread(x, factor) >> (8 * i) & 0xFF for x in range(256)) for i in range(factor)]
    for factor in (2, 4, 8)
}


def _coarsen(value: int, scale: int) -> int:
    """Bit ``n`` of the result: any of bits ``n * 2**scale`` ... of ``value`` (``scale`` > 0)."""
    data = value.to_bytes(-(-value.bit_length() // 8), "little")
    while scale > 3:  # bytes pairwise ORed until each group of bits is one byte
        data = _pad(data, 2)
        data = _or_bytes(data[0::2], data[1::2])
        scale -= 1
    runs = 1 << scale
    data = _pad(data, runs)
    packed = 0
    for i, table in enumerate(_COARSE[scale]):
        packed |= int.from_bytes(data[i::runs].translate(table), "little")
    return packed


def _expand(value: int, count: int, scale: int) -> int:
    """Each of the ``count`` bits of ``value`` repeated ``2**scale`` times (``scale`` > 0)."""
    data = value.to_bytes(-(-count // 8), "little")
    factor = min(1 << scale, 8)
    out = bytearray(len(data) * factor)
    for i, table in enumerate(_FINE[factor]):
        out[i::factor] = data.translate(table)
    if scale > 3:  # each bit is a byte now: repeat each byte
        repeat = 1 << (scale - 3)
        data, out = bytes(out), bytearray(len(out) * repeat)
        for i in range(repeat):
            out[i::repeat] = data
    return int.from_bytes(out, "little")
