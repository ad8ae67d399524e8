"""The epoch floor: a primary that goes on without its secondary disqualifies the secondary's image."""

from __future__ import annotations

from pathlib import Path

import pytest

from colo_agent.arbiter.base import StaleImage
from colo_agent.arbiter.local import FileArbiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_an_image_below_the_floor_cannot_be_promoted_one_at_it_can(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "vm.arbiter"
    primary = FileArbiter(path, "pod-a", 1.0, clock=clock)
    secondary = FileArbiter(path, "pod-b", 1.0, clock=clock)
    assert await primary.acquire(1)
    await secondary.observe()
    # The secondary acknowledged epoch 7; then it was lost and the primary went on alone.
    assert await primary.raise_floor(8)
    assert await primary.renew()  # renewals keep the floor
    clock.now += 5.0  # the primary is gone; its lease ran out long ago
    await secondary.observe()
    clock.now += 5.0
    with pytest.raises(StaleImage, match="epoch 8"):
        await secondary.acquire(2, image=(1, 7))
    # A secondary that saw epoch 8 committed is not stale; the new term starts a fresh floor.
    assert await secondary.acquire(2, image=(1, 8))
    assert (await secondary.observe()).floor == 0  # type: ignore[union-attr]


async def test_an_image_of_an_older_term_is_stale(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "vm.arbiter"
    a = FileArbiter(path, "pod-a", 1.0, clock=clock)
    assert await a.acquire(1)
    await a.release()
    b = FileArbiter(path, "pod-b", 1.0, clock=clock)
    assert await b.acquire(2)
    await b.release()
    c = FileArbiter(path, "pod-c", 1.0, clock=clock)
    with pytest.raises(StaleImage):
        await c.acquire(3, image=(1, 50))


async def test_release_keeps_the_floor_for_the_taker_to_check(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "vm.arbiter"
    a = FileArbiter(path, "pod-a", 1.0, clock=clock)
    assert await a.acquire(1)
    assert await a.raise_floor(3)
    assert await a.raise_floor(2)  # never lowered
    await a.release()
    b = FileArbiter(path, "pod-b", 1.0, clock=clock)
    with pytest.raises(StaleImage):
        await b.acquire(2, image=(1, 2))
    assert await b.acquire(2, image=(1, 3))
