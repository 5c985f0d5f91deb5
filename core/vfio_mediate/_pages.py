"""Page arithmetic, once: the pages a byte range touches and the areas a set of pages makes."""

from __future__ import annotations

from collections.abc import Iterable

from .uapi import PAGE_SIZE

__all__ = ["areas_of_pages", "page_count", "pages_of", "runs"]


def page_count(length: int, page_size: int = PAGE_SIZE) -> int:
    """How many pages of ``page_size`` it takes to hold ``length`` bytes."""
    return -(-length // page_size)


def pages_of(offset: int, length: int, page_size: int = PAGE_SIZE) -> range:
    """The numbers of the pages that ``[offset, offset + length)`` touches, even in part."""
    return range(offset // page_size, page_count(offset + length, page_size))


def runs(pages: Iterable[int]) -> list[tuple[int, int]]:
    """Consecutive runs ``(first, last)`` (inclusive) of ascending page numbers."""
    found: list[tuple[int, int]] = []
    for page in pages:
        if found and found[-1][1] + 1 == page:
            found[-1] = (found[-1][0], page)
        else:
            found.append((page, page))
    return found


def areas_of_pages(pages: Iterable[int], page_size: int = PAGE_SIZE) -> list[tuple[int, int]]:
    """The fewest ``(offset, size)`` areas that cover exactly ``pages``."""
    return [
        (first * page_size, (last - first + 1) * page_size) for first, last in runs(sorted(pages))
    ]
