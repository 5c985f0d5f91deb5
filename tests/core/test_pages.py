"""The page arithmetic every part of the core uses, against a byte-by-byte model."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from vfio_mediate._pages import areas_of_pages, page_count, pages_of, runs

PAGE = 4096


@given(st.integers(0, 1 << 20), st.integers(1, 1 << 16), st.sampled_from([PAGE, 2 * PAGE]))
def test_pages_of_a_byte_range_are_those_its_bytes_fall_in(
    offset: int, length: int, page_size: int
) -> None:
    touched = pages_of(offset, length, page_size)
    assert touched.start == offset // page_size
    assert touched.stop - 1 == (offset + length - 1) // page_size
    assert page_count(length, page_size) == len(pages_of(0, length, page_size))


@given(st.sets(st.integers(0, 200)))
def test_areas_cover_exactly_the_pages_in_the_fewest_pieces(pages: set[int]) -> None:
    areas = areas_of_pages(pages)
    covered = {page for offset, size in areas for page in pages_of(offset, size)}
    assert covered == pages
    assert all(offset % PAGE == 0 and size % PAGE == 0 for offset, size in areas)
    assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(areas)), "merged"
    assert len(runs(sorted(pages))) == len(areas)
