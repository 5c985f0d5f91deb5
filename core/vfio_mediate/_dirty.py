"""Dirty page logging: the bitmap behind ``VFIO_DEVICE_FEATURE_DMA_LOGGING_*``."""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterable
from typing import final

from ._errors import AccessError
from .uapi import PAGE_SIZE

__all__ = ["DirtyBitmap", "DirtyLog", "bitmap_pages"]


@final
class DirtyBitmap:
    """One bit per page of ``[iova, iova + length)``: bit ``n`` is byte ``n // 8``, bit ``n % 8``,
    which is the layout of Linux's array of little-endian u64s."""

    def __init__(self, iova: int, length: int, page_size: int) -> None:
        self.iova = iova
        self.length = length
        self.page_size = page_size
        self.pages = -(-length // page_size)
        self.bits = bytearray(-(-self.pages // 8))

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


def bitmap_pages(bitmap: bytes) -> list[int]:
    """The numbers of the set bits of a dirty bitmap (bit ``n``: byte ``n // 8``, bit
    ``n % 8``), in order; work per set bit, not per page."""
    value = int.from_bytes(bitmap, "little")
    pages = []
    while value:
        lowest = value & -value
        pages.append(lowest.bit_length() - 1)
        value ^= lowest
    return pages


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
        self._lock = threading.Lock()

    def mark(self, iova: int, length: int) -> None:
        """Record that the device wrote (or may write) ``[iova, iova + length)``."""
        if length <= 0:
            return
        end = iova + length
        with self._lock:
            for bitmap in self._bitmaps:
                low = max(iova, bitmap.iova)
                high = min(end, bitmap.iova + bitmap.length)
                if low < high:
                    bitmap.set_pages(
                        (low - bitmap.iova) >> self._shift, (high - 1 - bitmap.iova) >> self._shift
                    )

    def report(self, iova: int, length: int, page_size: int) -> bytes:
        """Read and clear the log for ``[iova, iova + length)``: a bitmap of 64-bit words,
        bit ``n`` for the page at ``iova + n * page_size``.

        ``page_size`` may differ from the logging's: a report page is dirty when any logged page
        in it is. A logged page that the range covers only in part is reported, not cleared.
        """
        if page_size <= 0 or page_size & (page_size - 1):
            raise AccessError(errno.EINVAL, f"report page size {page_size} is not a power of two")
        if length <= 0 or iova % page_size or iova < 0:
            raise AccessError(errno.EINVAL, f"bad report range {iova:#x}+{length:#x}")
        pages = -(-length // page_size)
        end = iova + length
        shift = self._shift
        target = 0
        with self._lock:
            windows = [
                (bitmap, max(iova, bitmap.iova), min(end, bitmap.iova + bitmap.length))
                for bitmap in self._bitmaps
                if max(iova, bitmap.iova) < min(end, bitmap.iova + bitmap.length)
            ]
            if sum(high - low for _, low, high in windows) < length:
                raise AccessError(errno.EINVAL, f"range {iova:#x}+{length:#x} is not all logged")
            for bitmap, low, high in windows:
                first = (low - bitmap.iova) >> shift
                last = (high - 1 - bitmap.iova) >> shift
                mask = (1 << (last - first + 1)) - 1
                source = int.from_bytes(bitmap.bits, "little")
                window = (source >> first) & mask
                base = bitmap.iova + (first << shift)
                clear = mask
                if base < iova:
                    clear &= ~1
                if bitmap.iova + ((last + 1) << shift) > end:
                    clear &= ~(1 << (last - first))
                bitmap.bits[:] = (source & ~(clear << first)).to_bytes(len(bitmap.bits), "little")
                if page_size == self.page_size:
                    target |= window << ((base - iova) >> shift)
                    continue
                while window:  # other granularity: one step per dirty logged page
                    lowest = window & -window
                    window ^= lowest
                    start = max(base + ((lowest.bit_length() - 1) << shift), iova)
                    stop = min(start - start % self.page_size + self.page_size, end)
                    first_page = (start - iova) // page_size
                    last_page = (stop - 1 - iova) // page_size
                    target |= ((1 << (last_page - first_page + 1)) - 1) << first_page
        out = target.to_bytes(-(-pages // 8), "little")
        words = -(-pages // 64)
        return out + bytes(words * 8 - len(out))
