"""ColoCache, IncomingDirtyBitmap and StagingBuffer."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from colo_agent.replication.cache import (
    CacheMode,
    ColoCache,
    IncomingDirtyBitmap,
    StagingBuffer,
    image_digest,
    page_view,
)
from colo_agent.replication.protocol import PAGE_SIZE, LocalProtocolError

PAGES = 64


def ram(seed: int = 0) -> bytearray:
    rng = np.random.default_rng(seed)
    return bytearray(rng.integers(0, 256, PAGES * PAGE_SIZE, dtype=np.uint8).tobytes())


def fill(cache: ColoCache, channel: int, indices: list[int], src: np.ndarray, *, sync: bool = False) -> None:
    idx = np.array(indices, dtype=np.int64)
    dest = cache.reserve(channel, idx, sync=sync)
    dest[:] = src[idx].tobytes()
    cache.land(channel)


def test_bitmap_counts_and_union() -> None:
    bm = IncomingDirtyBitmap(10)
    bm.mark(np.array([1, 3, 3, 5]))
    bm.mark(np.array([5, 7]))
    assert len(bm) == 4
    assert list(bm.indices()) == [1, 3, 5, 7]
    assert list(bm.union(np.array([0, 3]))) == [0, 1, 3, 5, 7]
    assert len(bm) == 4 and bm.any_marked(np.array([0, 7])) and not bm.any_marked(np.array([0, 2]))
    bm.clear()
    assert len(bm) == 0 and not bm.is_marked(1)


def test_checkpoint_commit_copies_exactly_the_marked_pages() -> None:
    secondary = ram(1)
    primary = page_view(ram(2))
    before = page_view(secondary).copy()
    cache = ColoCache(secondary, capacity=8)
    fill(cache, 0, [2, 5], primary)
    fill(cache, 1, [9, 40, 41], primary)
    assert np.array_equal(page_view(secondary), before), "pages reached RAM before the commit"
    committed = cache.commit(1, 7, b"dev")
    assert committed.pages == 5 and committed.epoch == (1, 7) and cache.device_state == b"dev"
    after = page_view(secondary)
    touched = [2, 5, 9, 40, 41]
    assert np.array_equal(after[touched], primary[touched])
    untouched = [i for i in range(PAGES) if i not in touched]
    assert np.array_equal(after[untouched], before[untouched])
    assert len(cache.incoming) == 0 and cache.free_slots == 8


def test_aborted_epoch_leaves_the_committed_image_intact() -> None:
    secondary = ram(1)
    primary = page_view(ram(2))
    cache = ColoCache(secondary, capacity=8)
    fill(cache, 0, [1, 2], primary)
    cache.commit(1, 1, b"one")
    image = image_digest(secondary)
    fill(cache, 0, [3, 4], page_view(ram(3)))
    cache.reserve(1, np.array([10, 11]))  # still outstanding when the epoch dies
    cache.abort()
    assert image_digest(secondary) == image and cache.device_state == b"one"
    # The next epoch starts from empty slots.
    fill(cache, 0, [6], primary)
    cache.commit(1, 2, b"two")
    assert np.array_equal(page_view(secondary)[6], primary[6])
    assert np.array_equal(page_view(secondary)[3], page_view(ram(1))[3])


def test_reserve_refuses_bad_batches() -> None:
    cache = ColoCache(ram(), capacity=4)
    for bad, why in (
        ([], "empty"),
        ([3, 2], "increasing"),
        ([1, 1], "increasing"),
        ([PAGES], "range"),
        ([-1], "range"),
        ([0, 1, 2, 3, 4], "exceeds the cache"),
    ):
        with pytest.raises(ValueError, match=why):
            cache.reserve(0, np.array(bad, dtype=np.int64))
    cache.reserve(0, np.array([1, 2]))
    with pytest.raises(LocalProtocolError, match="outstanding"):
        cache.reserve(0, np.array([5]))
    cache.land(0)
    with pytest.raises(ValueError, match="twice"):
        cache.reserve(1, np.array([2, 3]))
    cache.reserve(1, np.array([3]))
    with pytest.raises(LocalProtocolError, match="outstanding"):
        cache.commit(1, 1, b"")


def test_sync_pages_go_straight_to_ram_and_stop_after_the_first_commit() -> None:
    secondary = bytearray(PAGES * PAGE_SIZE)
    primary = page_view(ram(5))
    cache = ColoCache(secondary)
    fill(cache, 0, list(range(0, 32)), primary, sync=True)  # consecutive: direct
    fill(cache, 1, list(range(32, 64, 2)), primary, sync=True)  # scattered: via bounce
    fill(cache, 1, list(range(33, 64, 2)), primary, sync=True)
    assert image_digest(secondary) == image_digest(primary)
    cache.commit(1, 1, b"")
    with pytest.raises(LocalProtocolError, match="committed image"):
        cache.reserve(0, np.array([1]), sync=True)


def test_lockstep_commit_restores_pages_the_secondary_dirtied_itself() -> None:
    secondary = bytearray(PAGES * PAGE_SIZE)
    primary = page_view(ram(7))
    cache = ColoCache(secondary, mode=CacheMode.LOCKSTEP)
    fill(cache, 0, list(range(PAGES)), primary, sync=True)
    cache.commit(1, 1, b"")
    assert cache.mirror is not None and np.array_equal(cache.mirror, primary)
    # The secondary guest runs and writes pages 3 and 20; the primary's epoch changes 5.
    view = page_view(secondary)
    view[3] = 0xAA
    view[20] = 0xBB
    primary[5] = 0x11
    fill(cache, 0, [5], primary)
    untouched_before = view[30].copy()
    cache.commit(1, 2, b"", local_dirty=np.array([3, 20], dtype=np.int64))
    assert image_digest(secondary) == image_digest(primary)
    assert np.array_equal(view[30], untouched_before)


def test_lockstep_corrupted_batch_never_reaches_the_mirror() -> None:
    cache = ColoCache(bytearray(PAGES * PAGE_SIZE), mode=CacheMode.LOCKSTEP)
    dest = cache.reserve(0, np.array([4]))
    dest[:] = b"\xff" * PAGE_SIZE
    cache.drop(0)
    cache.abort()
    assert cache.mirror is not None and not cache.mirror[4].any()


def test_checkpoint_mode_refuses_local_dirty_pages() -> None:
    cache = ColoCache(ram())
    with pytest.raises(LocalProtocolError, match="must not run"):
        cache.commit(1, 1, b"", local_dirty=np.array([1]))


def test_staging_gathers_dirty_pages() -> None:
    src = page_view(ram(9))
    staging = StagingBuffer(8)
    idx = np.array([0, 7, 63], dtype=np.int64)
    out = staging.stage(src, idx)
    assert out.shape == (3, PAGE_SIZE) and np.array_equal(out, src[idx])
    with pytest.raises(LocalProtocolError, match="staging capacity"):
        staging.stage(src, np.arange(9, dtype=np.int64))


def test_memory_stays_near_guest_ram_in_checkpoint_mode() -> None:
    big = bytearray(40_000 * PAGE_SIZE)
    cache = ColoCache(big)
    assert cache.capacity == 4000  # 10% of RAM
    assert cache.mirror is None


page_sets = st.sets(st.integers(0, PAGES - 1), min_size=1, max_size=6)


@given(st.lists(st.tuples(page_sets, st.booleans()), max_size=8))
@settings(max_examples=100, deadline=None)
def test_epochs_either_commit_whole_or_not_at_all(epochs: list[tuple[set[int], bool]]) -> None:
    secondary = ram(1)
    cache = ColoCache(secondary, capacity=PAGES)
    model = page_view(secondary).copy()
    for n, (pages, ok) in enumerate(epochs):
        src = page_view(ram(100 + n))
        fill(cache, n % 2, sorted(pages), src)
        if ok:
            cache.commit(1, n + 1, b"")
            model[sorted(pages)] = src[sorted(pages)]
        else:
            cache.abort()
        assert np.array_equal(page_view(secondary), model)


@pytest.mark.parametrize("mode", list(CacheMode), ids=lambda m: m.value)
def test_end_pairing_releases_every_reservation_and_keeps_the_committed_image(mode: CacheMode) -> None:
    secondary = ram(1)
    primary = page_view(ram(2))
    cache = ColoCache(secondary, mode=mode, capacity=8)
    cache.reserve(0, np.array([1, 2]), sync=True)  # a first-sync batch torn by the break
    cache.end_pairing()
    assert cache.outstanding() == 0
    fill(cache, 0, [1, 2], primary, sync=True)
    fill(cache, 1, [3], primary)
    local = np.empty(0, dtype=np.int64) if mode is CacheMode.LOCKSTEP else None
    cache.commit(1, 1, b"one", local)
    image = image_digest(secondary)
    cache.reserve(0, np.array([4, 5]))
    cache.abort()  # the epoch died first: its batch became a zombie
    cache.reserve(1, np.array([6]))
    cache.end_pairing()
    assert image_digest(secondary) == image and cache.device_state == b"one"
    assert cache.committed is not None and cache.committed.epoch == (1, 1)
    # Every channel is free again, and the slots start from the beginning.
    fill(cache, 0, [4], primary)
    fill(cache, 1, [6], primary)
    assert cache.free_slots == (6 if mode is CacheMode.CHECKPOINT else PAGES)
    cache.commit(1, 2, b"two", local)
    assert np.array_equal(page_view(secondary)[[4, 6]], primary[[4, 6]])
