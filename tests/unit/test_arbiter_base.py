"""Fencing decisions and the generic arbiter logic, on a fake clock and an in-memory store."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from colo_agent.arbiter.base import (
    AcquireVerdict,
    Arbiter,
    ArbiterError,
    ArbiterUnavailable,
    LeaseObservation,
    LeaseRecord,
    TermTooLow,
    decide_acquire,
    lease_valid_until,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Store:
    """A shared record with compare-and-swap, as a Lease or the file would provide."""

    def __init__(self) -> None:
        self.record: LeaseRecord | None = None
        self.writes = 0
        self.down = False
        # Called between a writer's read and its swap, to stage races.
        self.before_swap: list[object] = []


class MemoryArbiter(Arbiter):
    def __init__(
        self, store: Store, identity: str, clock: Callable[[], float], duration: float = 1.0
    ) -> None:
        super().__init__(identity, duration, safety_margin=0.2, clock=clock)
        self.store = store

    async def _read(self) -> LeaseRecord | None:
        if self.store.down:
            raise ArbiterError("store unreachable")
        return self.store.record

    async def _swap(
        self, expected: LeaseRecord | None, term: int, holder: str | None, floor: int = 0
    ) -> LeaseRecord | None:
        if self.store.down:
            raise ArbiterError("store unreachable")
        while self.store.before_swap:
            action = self.store.before_swap.pop(0)
            assert callable(action)
            await action()
        current = self.store.record
        if (current and current.version) != (expected and expected.version):
            return None
        self.store.writes += 1
        self.store.record = LeaseRecord(term, holder, str(self.store.writes), self.lease_duration, floor)
        return self.store.record

    async def close(self) -> None:
        pass


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store() -> Store:
    return Store()


# ---------------------------------------------------------------- pure decisions


def test_holder_validity_is_duration_minus_margin_from_the_write_start() -> None:
    assert lease_valid_until(10.0, 1.0, 0.2) == pytest.approx(10.8)


def test_observation_clock_starts_at_each_change_only() -> None:
    held = LeaseRecord(1, "a", "7", None)
    obs = LeaseObservation.first(held, 5.0, 1.0)
    assert obs.expires_at == 6.0
    assert obs.update(held, 5.9, 1.0) is obs  # same version: the clock keeps running
    renewed = LeaseRecord(1, "a", "8", None)
    assert obs.update(renewed, 5.9, 1.0).expires_at == pytest.approx(6.9)


def test_observation_waits_for_the_longer_of_both_durations() -> None:
    assert LeaseObservation.first(LeaseRecord(1, "a", "1", 3.0), 0.0, 1.0).expires_at == 3.0
    assert LeaseObservation.first(LeaseRecord(1, "a", "1", 0.5), 0.0, 1.0).expires_at == 1.0


def test_a_released_or_missing_record_is_free_at_once() -> None:
    released = LeaseRecord(4, None, "9")
    assert LeaseObservation.first(released, 0.0, 1.0).expires_at == -math.inf
    obs = LeaseObservation.first(released, 0.0, 1.0)
    assert decide_acquire(released, obs, 5, 0.0) is AcquireVerdict.TAKE
    assert decide_acquire(None, LeaseObservation.first(None, 0.0, 1.0), 1, 0.0) is AcquireVerdict.TAKE


def test_decide_acquire_table() -> None:
    held = LeaseRecord(3, "a", "v1")
    obs = LeaseObservation.first(held, 100.0, 1.0)
    assert decide_acquire(held, obs, 3, 200.0) is AcquireVerdict.TERM_TOO_LOW
    assert decide_acquire(held, obs, 2, 200.0) is AcquireVerdict.TERM_TOO_LOW
    assert decide_acquire(held, obs, 4, 100.999) is AcquireVerdict.HELD
    assert decide_acquire(held, obs, 4, 101.0) is AcquireVerdict.TAKE
    # An observation of another version never counts, however old.
    stale = LeaseObservation.first(LeaseRecord(3, "a", "v0"), 0.0, 1.0)
    assert decide_acquire(held, stale, 4, 200.0) is AcquireVerdict.HELD


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    renew_start=st.floats(0, 1e6),
    write_latency=st.floats(0, 5),
    read_delay=st.floats(0, 5),
    duration=st.floats(0.01, 60),
    margin_fraction=st.floats(0, 0.99),
    rate=st.floats(0.999, 1.001),
)
def test_fencing_order_holds_whatever_the_delays(
    renew_start: float,
    write_latency: float,
    read_delay: float,
    duration: float,
    margin_fraction: float,
    rate: float,
) -> None:
    """The holder's validity ends before a taker may write, for any write latency and any
    delay before the taker sees the write, as long as clock rates differ by less than the
    margin allows (here 0.1%, with the margin at least that share of the lease)."""
    margin = max(margin_fraction * duration, 0.002 * duration)
    valid_until = lease_valid_until(renew_start, duration, margin)
    # The taker sees the write no earlier than it landed, and times it with its own
    # clock, which may run at `rate` relative to the holder's.
    seen = renew_start + write_latency + read_delay
    record = LeaseRecord(1, "holder", "v")
    obs = LeaseObservation.first(record, seen * rate, duration)
    earliest_take = obs.expires_at / rate  # back on the holder's clock
    assert decide_acquire(record, obs, 2, obs.expires_at) is AcquireVerdict.TAKE
    assert earliest_take >= valid_until


# ---------------------------------------------------------------- the generic arbiter


async def test_first_acquire_of_a_fresh_store(store: Store, clock: FakeClock) -> None:
    a = MemoryArbiter(store, "a", clock)
    assert not a.is_valid()
    assert a.valid_until == -math.inf
    assert await a.acquire(1)
    assert (a.term, a.holder, a.holding) == (1, "a", True)
    assert a.valid_until == pytest.approx(clock.now + 0.8)
    clock.now += 0.79
    assert a.is_valid()
    clock.now += 0.02
    assert not a.is_valid()  # not renewed: the holder stops by itself


async def test_a_taker_waits_a_full_lease_from_the_last_renewal_it_saw(
    store: Store, clock: FakeClock
) -> None:
    a, b = MemoryArbiter(store, "a", clock), MemoryArbiter(store, "b", clock)
    assert await a.acquire(1)
    await b.observe()
    for _ in range(5):
        clock.now += 0.25
        assert await a.renew()
        assert not await b.acquire(2)  # b sees every renewal: its clock restarts
    last_renewal = clock.now
    # a stops renewing (crashed or partitioned).
    clock.now = last_renewal + 0.999
    assert not await b.acquire(2)
    assert not a.is_valid()  # a stopped before b may start
    clock.now = last_renewal + 1.0
    assert b.acquirable_at() == pytest.approx(last_renewal + 1.0)
    assert await b.acquire(2)
    assert (b.term, b.holding) == (2, True)
    # a comes back: its renewal fails for good, and it knows the new term.
    assert not await a.renew()
    assert not a.holding and not a.is_valid()
    assert a.term == 2 and a.holder == "b"
    assert not await a.renew()


async def test_a_taker_that_just_arrived_waits_a_full_lease(store: Store, clock: FakeClock) -> None:
    a = MemoryArbiter(store, "a", clock)
    assert await a.acquire(1)
    clock.now += 100  # a has long stopped renewing, but b never saw anything yet
    b = MemoryArbiter(store, "b", clock)
    assert not await b.acquire(2)
    clock.now += 0.999
    assert not await b.acquire(2)
    clock.now += 0.001
    assert await b.acquire(2)


async def test_terms_only_go_up(store: Store, clock: FakeClock) -> None:
    a, b = MemoryArbiter(store, "a", clock), MemoryArbiter(store, "b", clock)
    assert await a.acquire(3)
    await a.release()
    with pytest.raises(TermTooLow) as info:
        await b.acquire(3)
    assert (info.value.asked, info.value.recorded) == (3, 3)
    with pytest.raises(TermTooLow):
        await b.acquire(2)
    with pytest.raises(ValueError):
        await b.acquire(0)
    assert await b.acquire(4)
    assert store.record is not None and store.record.term == 4


async def test_release_frees_the_record_at_once_and_stops_the_holder_first(
    store: Store, clock: FakeClock
) -> None:
    a, b = MemoryArbiter(store, "a", clock), MemoryArbiter(store, "b", clock)
    assert await a.acquire(1)
    validity_at_release: list[bool] = []

    async def check() -> None:
        validity_at_release.append(a.is_valid())

    store.before_swap.append(check)
    await a.release()
    assert validity_at_release == [False]  # invalid before the record said "free"
    assert store.record == LeaseRecord(1, None, "2", 1.0)
    assert await b.acquire(2)  # no wait


async def test_of_two_racing_takers_one_wins(store: Store, clock: FakeClock) -> None:
    a, b = MemoryArbiter(store, "a", clock), MemoryArbiter(store, "b", clock)

    async def b_takes_first() -> None:
        assert await b.acquire(2)

    store.before_swap.append(b_takes_first)
    assert not await a.acquire(2)  # lost the compare-and-swap
    assert b.holding and not a.holding
    with pytest.raises(TermTooLow):
        await a.acquire(2)


async def test_renewal_survives_an_unrelated_write(store: Store, clock: FakeClock) -> None:
    a = MemoryArbiter(store, "a", clock)
    assert await a.acquire(1)
    store.writes += 1  # e.g. someone edited a label: same term and holder, new version
    assert store.record is not None
    store.record = LeaseRecord(1, "a", str(store.writes), 1.0)
    clock.now += 0.3
    assert await a.renew()
    assert a.valid_until == pytest.approx(clock.now + 0.8)


async def test_an_unreachable_store_lets_the_lease_run_out(store: Store, clock: FakeClock) -> None:
    a = MemoryArbiter(store, "a", clock)
    assert await a.acquire(1)
    deadline = a.valid_until
    store.down = True
    clock.now += 0.3
    assert not await a.renew()
    assert a.holding and a.valid_until == deadline  # not extended, not lost
    clock.now += 0.6
    assert not a.is_valid()
    store.down = False
    assert await a.renew()  # nobody took it meanwhile: it may carry on
    assert a.is_valid()
    with pytest.raises(ArbiterError):
        store.down = True
        await MemoryArbiter(store, "b", clock).acquire(2)


async def test_reacquiring_the_term_we_hold_is_idempotent(store: Store, clock: FakeClock) -> None:
    a = MemoryArbiter(store, "a", clock)
    assert await a.acquire(1)
    writes = store.writes
    assert await a.acquire(1)
    assert store.writes == writes


def test_configuration_is_checked(store: Store, clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="identity"):
        MemoryArbiter(store, "", clock)
    with pytest.raises(ValueError, match="lease duration"):
        MemoryArbiter(store, "a", clock, duration=0)
    with pytest.raises(ValueError, match="lease duration"):
        MemoryArbiter(store, "a", clock, duration=math.nan)
    with pytest.raises(ValueError, match="safety margin"):
        MemoryArbiter(store, "a", clock, duration=0.2)  # margin 0.2 is not below 0.2


async def test_a_take_whose_reply_was_lost_is_adopted_on_retry(store: Store, clock: FakeClock) -> None:
    a, b = MemoryArbiter(store, "a", clock), MemoryArbiter(store, "b", clock)
    assert await b.acquire(1)
    await a.observe()
    clock.now += 1.0

    real_swap = MemoryArbiter._swap

    async def landed_but_unanswered(expected: LeaseRecord | None, term: int, holder: str | None) -> None:
        await real_swap(a, expected, term, holder)
        raise ArbiterError("timed out")

    a._swap = landed_but_unanswered  # type: ignore[method-assign]
    with pytest.raises(ArbiterError):
        await a.acquire(2)
    del a._swap
    assert not a.holding and store.record is not None and store.record.holder == "a"
    clock.now += 0.1
    assert await a.acquire(2)  # not TermTooLow: the term is ours
    assert a.holding and a.valid_until == pytest.approx(clock.now + 0.8)
    assert not await b.renew()


async def test_a_secondary_that_keeps_observing_is_ready_sooner(store: Store, clock: FakeClock) -> None:
    a, b = MemoryArbiter(store, "a", clock), MemoryArbiter(store, "b", clock)
    assert await a.acquire(1)
    watcher = asyncio.create_task(b.keep_observing(interval=0.001))
    try:
        await asyncio.sleep(0.01)
        clock.now += 0.25
        assert await a.renew()
        last_renewal = clock.now
        store.down = True  # observation errors do not stop the watcher
        await asyncio.sleep(0.01)
        store.down = False
        await asyncio.sleep(0.01)
    finally:
        watcher.cancel()
    # The clock started at the renewal b saw, not at the promotion.
    assert b.acquirable_at() == pytest.approx(last_renewal + 1.0)


async def test_wait_acquire_rides_out_store_errors_until_its_deadline(store: Store) -> None:
    # Real time: wait_acquire sleeps.
    a = MemoryArbiter(store, "a", time.monotonic)
    store.down = True

    async def recover() -> None:
        await asyncio.sleep(0.05)
        store.down = False

    healer = asyncio.create_task(recover())
    assert await a.wait_acquire(1, timeout=5.0, poll=0.01)
    await healer
    store.down = True
    b = MemoryArbiter(store, "b", time.monotonic)
    with pytest.raises(ArbiterError, match="unreachable"):
        await b.wait_acquire(2, timeout=0.05, poll=0.01)
    store.down = False
    assert not await b.wait_acquire(2, timeout=0.05, poll=0.01)  # held, not an error
    with pytest.raises(TermTooLow):
        await b.wait_acquire(1, timeout=5.0)


class SlowStore(Store):
    """A store behind a loaded API server: the next `unanswered` requests time out,
    writes among them having landed all the same; reads among them never did."""

    def __init__(self, unanswered: int) -> None:
        super().__init__()
        self.unanswered = unanswered


class SlowArbiter(MemoryArbiter):
    """Each request that goes unanswered also costs the caller a second of its clock."""

    def __init__(self, store: SlowStore, identity: str, clock: FakeClock) -> None:
        super().__init__(store, identity, clock)
        self.slow = store
        self.fake_clock = clock

    def _timed_out(self) -> bool:
        if self.slow.unanswered <= 0:
            return False
        self.slow.unanswered -= 1
        self.fake_clock.now += 1.0
        return True

    async def _read(self) -> LeaseRecord | None:
        if self._timed_out():
            raise ArbiterUnavailable("reading: read timed out")
        return await super()._read()

    async def _swap(
        self, expected: LeaseRecord | None, term: int, holder: str | None, floor: int = 0
    ) -> LeaseRecord | None:
        written = await super()._swap(expected, term, holder, floor)
        if self._timed_out():
            raise ArbiterUnavailable("updating: outcome unknown: read timed out")
        return written


@pytest.mark.parametrize("unanswered", [1, 2, 5, 12])
async def test_a_fresh_primary_outlasts_a_slow_store_and_takes_one_term(
    clock: FakeClock, unanswered: int
) -> None:
    # The agent's start: before, a store that stayed slow past three leases ended the agent
    # ("outcome unknown" raised out of wait_acquire), although nothing was wrong but time.
    store = SlowStore(unanswered)
    store.record = LeaseRecord(0, None, "0")  # the operator's fresh Lease
    a = SlowArbiter(store, "vm-0", clock)
    started = clock.now
    assert await a.take_next_term(patience=3.0, retry=0.0) == 1
    assert clock.now - started >= min(unanswered, 4)  # it did wait out the slow requests
    assert store.record is not None and (store.record.term, store.record.holder) == (1, "vm-0")
    assert a.holding and a.term == 1  # a landed write with a lost reply is adopted, not skipped past


async def test_a_fresh_primary_still_gives_up_on_a_record_held_by_another(clock: FakeClock) -> None:
    store = Store()
    other = MemoryArbiter(store, "vm-0", time.monotonic)
    assert await other.acquire(1)
    a = MemoryArbiter(store, "vm-1", time.monotonic)  # real time: wait_acquire sleeps
    with pytest.raises(ArbiterError, match="held by vm-0"):
        await a.take_next_term(patience=0.05, retry=0.0)
    store.down = True
    b = MemoryArbiter(store, "vm-2", time.monotonic)
    with pytest.raises(ArbiterError, match="unreachable"):  # not ArbiterUnavailable: retried a while
        await b.take_next_term(patience=0.05, retry=0.01, refusals=0.1)


async def test_a_fresh_primary_rides_out_a_refusal_for_a_while(store: Store) -> None:
    # The Role that lets the agent at its Lease may reach the API server's authorizer a
    # little after the pod starts: a 403 at start is retried, not the end of the agent.
    a = MemoryArbiter(store, "vm-0", time.monotonic)
    store.down = True

    async def granted() -> None:
        await asyncio.sleep(0.1)
        store.down = False

    grant = asyncio.create_task(granted())
    assert await a.take_next_term(patience=1.0, retry=0.01, refusals=30.0) == 1
    await grant
