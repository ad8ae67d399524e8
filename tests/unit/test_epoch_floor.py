"""The epoch floor a primary asks its renewal task to write (engine.roles.EpochFloor)."""

from __future__ import annotations

import asyncio

from colo_agent.arbiter.base import Arbiter
from colo_agent.engine.roles import EpochFloor


class Store:
    """Records the writes; a floor write fails while `reachable` is False."""

    def __init__(self) -> None:
        self.reachable = True
        self.floors: list[int] = []
        self.renewals = 0
        self.gate: asyncio.Event | None = None

    async def raise_floor(self, epoch: int) -> bool:
        if self.gate is not None:
            await self.gate.wait()
        if not self.reachable:
            return False
        self.floors.append(epoch)
        return True

    async def renew(self) -> bool:
        self.renewals += 1
        return self.reachable


def _arbiter(store: Store) -> Arbiter:
    return store  # type: ignore[return-value]


async def test_without_a_wanted_floor_the_write_is_a_renewal() -> None:
    store, floor = Store(), EpochFloor()
    assert await floor.write_or_renew(_arbiter(store))
    assert store.renewals == 1 and store.floors == []


async def test_the_asker_waits_until_the_floor_is_written_and_a_failed_write_renews() -> None:
    store, floor = Store(), EpochFloor()
    store.reachable = False
    asked = asyncio.ensure_future(floor.ask(7))
    await asyncio.sleep(0)
    assert not await floor.write_or_renew(_arbiter(store))
    assert store.renewals == 1 and not asked.done() and floor.wanted == 7
    store.reachable = True
    assert await floor.write_or_renew(_arbiter(store))
    await asyncio.wait_for(asked, 1)
    assert store.floors == [7] and floor.wanted == 0


async def test_a_higher_floor_asked_during_a_write_is_written_too() -> None:
    store, floor = Store(), EpochFloor()
    store.gate = asyncio.Event()
    first = asyncio.ensure_future(floor.ask(5))
    await asyncio.sleep(0)
    writing = asyncio.ensure_future(floor.write_or_renew(_arbiter(store)))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(floor.ask(9))
    await asyncio.sleep(0)
    store.gate.set()
    assert await writing
    await asyncio.sleep(0)
    # Floor 5 is written, but the asker of 9 must not be told so.
    assert store.floors == [5] and floor.wanted == 9 and not second.done()
    assert await floor.write_or_renew(_arbiter(store))
    await asyncio.wait_for(asyncio.gather(first, second), 1)
    assert store.floors == [5, 9] and floor.wanted == 0
