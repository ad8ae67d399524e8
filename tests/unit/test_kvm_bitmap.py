"""Decoding KVM's dirty bitmap into page indices; pure numpy, needs no /dev/kvm."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from colo_agent.microvm.kvm import pages_from_dirty_bitmap


def _bitmap(pages: set[int], page_count: int) -> np.ndarray:
    words = np.zeros((page_count + 63) // 64, dtype=np.uint64)
    for page in pages:
        words[page // 64] |= np.uint64(1) << np.uint64(page % 64)
    return words


@given(st.integers(1, 5000).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1)))))
def test_decodes_exactly_the_set_bits(case: tuple[int, set[int]]) -> None:
    page_count, pages = case
    result = pages_from_dirty_bitmap(_bitmap(pages, page_count), page_count)
    assert result.dtype == np.int64
    assert result.tolist() == sorted(pages)


def test_empty_and_full() -> None:
    assert pages_from_dirty_bitmap(np.zeros(4, dtype=np.uint64), 256).size == 0
    full = np.full(4, np.iinfo(np.uint64).max, dtype=np.uint64)
    np.testing.assert_array_equal(pages_from_dirty_bitmap(full, 256), np.arange(256))


def test_padding_bits_past_the_last_page_are_ignored() -> None:
    full = np.full(2, np.iinfo(np.uint64).max, dtype=np.uint64)
    np.testing.assert_array_equal(pages_from_dirty_bitmap(full, 70), np.arange(70))
