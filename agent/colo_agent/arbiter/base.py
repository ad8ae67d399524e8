"""Fencing: at most one agent releases output in a term, and only while it holds the arbiter.

The arbiter is a small shared record (a Kubernetes Lease, or a file for runs
without a cluster): `term`, `holder`, and a `version` that changes at every
write. Its rules, whatever stores it:

- **Terms only go up.** `acquire(term)` succeeds only with a term strictly
  above the recorded one; a release keeps the term.
- **The holder renews; it may release output only while `now < valid_until`**,
  where `valid_until` = start of its last successful write + lease duration -
  safety margin, on its own monotonic clock. A holder that cannot renew
  therefore stops on its own, without hearing from anyone.
- **A taker waits for the lease to run out by its own clock**: a full lease
  duration since it last *saw the record change*. It learned of each change
  after the holder started writing it, so its wait ends after the holder's
  `valid_until`, without the two clocks ever being compared; only their
  rates must agree to within the safety margin. A record whose holder
  released it (holder empty) can be taken at once.
- **Every write is a compare-and-swap** on the version the writer last read,
  so of two takers one wins, and a holder that lost a race learns it on its
  next renewal.

Known limit, shared by every lease-based fence: an agent paused between its
`valid_until` check and a write to a client socket (a stopped process, a long
GC) may still write once after its lease ran out. The safety margin is there
for clock-rate drift and scheduling delay, not for unbounded stalls.

This module holds that logic once: `Arbiter` implements acquire, renew and
release over two storage primitives, `_read()` and `_swap()`, that the
backends (`local.FileArbiter`, `lease.KubeLeaseArbiter`) provide. The
decisions themselves are pure functions of a record, an observation and
`now` (`LeaseObservation`, `decide_acquire`) and are tested without I/O.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

Clock = Callable[[], float]

# Fraction of the lease duration a holder gives up at the end of each lease,
# to absorb clock-rate differences and the delay between checking validity and
# writing to a socket. Kubernetes' leader election keeps 1/3 (renewDeadline 10 s
# of leaseDuration 15 s); a fifth keeps failover quick at sub-second leases.
DEFAULT_SAFETY_FRACTION = 0.2


class ArbiterError(Exception):
    """The arbiter's store cannot be used (unreachable, malformed, permission denied)."""


class ArbiterUnavailable(ArbiterError):
    """The store did not answer in time, or answered that it is busy or failing (a loaded
    API server): asking again later may succeed. A write that ends so has an unknown
    outcome; the next read shows which way it went."""


class TermTooLow(ArbiterError):
    """`acquire(term)` with a term not above the recorded one: never succeeds, retrying is pointless."""

    def __init__(self, asked: int, recorded: int, holder: str | None) -> None:
        self.asked = asked
        self.recorded = recorded
        self.holder = holder
        super().__init__(
            f"term {asked} is not above the arbiter's term {recorded} (held by {holder or 'nobody'})"
        )


class StaleImage(ArbiterError):
    """A promotion from an image older than the record's epoch floor: the primary released
    output the image does not explain (it ran on without this secondary), so resuming from
    it would lose what clients saw."""

    def __init__(self, image: tuple[int, int], record: LeaseRecord) -> None:
        self.image = image
        self.record = record
        super().__init__(
            f"this secondary's image (term {image[0]}, epoch {image[1]}) is stale: the primary of "
            f"term {record.term} released output from epoch {record.floor} on without it"
        )


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """What the store holds. `version` is opaque and changes at every write."""

    term: int
    holder: str | None
    version: str
    # The lease duration the holder advertises, in seconds. A taker waits the
    # longer of this and its own: a holder configured with a longer lease still
    # believes itself valid for that long.
    duration: float | None = None
    # Epoch floor: a holder that goes on without its secondary raises it above
    # the last epoch it sent the secondary (acknowledged or not), before
    # releasing anything more.
    # A taker whose image is older may not take over. Reset with every new term.
    floor: int = 0


@dataclass(frozen=True, slots=True)
class LeaseObservation:
    """When we, by our own clock, last saw the record change.

    `seen_at` is taken after the read that returned the new version, so it is
    never earlier than the start of the write that produced it.
    """

    version: str | None
    seen_at: float
    holder: str | None
    duration: float

    @classmethod
    def first(cls, record: LeaseRecord | None, now: float, own_duration: float) -> LeaseObservation:
        return cls(
            version=None if record is None else record.version,
            seen_at=now,
            holder=None if record is None else record.holder,
            duration=_wait_for(record, own_duration),
        )

    def update(self, record: LeaseRecord | None, now: float, own_duration: float) -> LeaseObservation:
        version = None if record is None else record.version
        if version == self.version:
            return self
        return LeaseObservation.first(record, now, own_duration)

    @property
    def expires_at(self) -> float:
        """Our monotonic time from which the holder can no longer believe itself valid."""
        if self.holder is None:
            return -math.inf
        return self.seen_at + self.duration

    def expired(self, now: float) -> bool:
        return now >= self.expires_at


def _wait_for(record: LeaseRecord | None, own_duration: float) -> float:
    if record is None or record.duration is None:
        return own_duration
    return max(own_duration, record.duration)


class AcquireVerdict(enum.Enum):
    TAKE = "take"  # free or expired: compare-and-swap now
    HELD = "held"  # someone holds it and may still be valid: wait until expires_at
    TERM_TOO_LOW = "term-too-low"  # never: the recorded term is not below ours


def decide_acquire(
    record: LeaseRecord | None, observation: LeaseObservation, term: int, now: float
) -> AcquireVerdict:
    """Whether a taker that wants `term` may write now. Pure: the whole fencing decision."""
    recorded = 0 if record is None else record.term
    if term <= recorded:
        return AcquireVerdict.TERM_TOO_LOW
    if record is None or record.holder is None:
        return AcquireVerdict.TAKE
    if observation.version != record.version:
        # Not an observation of this record: its clock has not started.
        return AcquireVerdict.HELD
    return AcquireVerdict.TAKE if observation.expired(now) else AcquireVerdict.HELD


def lease_valid_until(write_started: float, duration: float, margin: float) -> float:
    """Holder side: the deadline for releasing output after a write that started at `write_started`."""
    return write_started + duration - margin


class Arbiter(abc.ABC):
    """The fencing lock of one VM. Not safe for concurrent use from several tasks at once:
    the agent renews from one task and acquires only while not renewing."""

    def __init__(
        self,
        identity: str,
        lease_duration: float,
        *,
        safety_margin: float | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if not identity:
            raise ValueError("the arbiter needs a non-empty identity (the pod name)")
        if not lease_duration > 0 or not math.isfinite(lease_duration):
            raise ValueError(f"lease duration must be a positive number of seconds, got {lease_duration!r}")
        margin = DEFAULT_SAFETY_FRACTION * lease_duration if safety_margin is None else safety_margin
        if not 0 <= margin < lease_duration:
            raise ValueError(
                f"safety margin must be at least 0 and below the lease duration ({lease_duration} s), "
                f"got {margin!r}"
            )
        self.identity = identity
        self.lease_duration = lease_duration
        self.safety_margin = margin
        self._clock = clock
        self._valid_until = -math.inf
        self._term = 0
        self._holder: str | None = None
        self._held: LeaseRecord | None = None  # our own last successful write, while we hold
        self._observation: LeaseObservation | None = None

    # ------------------------------------------------------------------ storage primitives

    @abc.abstractmethod
    async def _read(self) -> LeaseRecord | None:
        """The current record, or None if there is none yet. Raises ArbiterError."""

    @abc.abstractmethod
    async def _swap(
        self, expected: LeaseRecord | None, term: int, holder: str | None, floor: int = 0
    ) -> LeaseRecord | None:
        """Write (term, holder) if the stored record is still `expected` (same version; None:
        there is no record). Return the new record, or None if the version had moved on.
        Raises ArbiterError when the store cannot be reached: the outcome is then unknown."""

    # ------------------------------------------------------------------ state

    @property
    def valid_until(self) -> float:
        """Monotonic deadline before which this agent may release output (-inf: not holding)."""
        return self._valid_until

    def is_valid(self, now: float | None = None) -> bool:
        return (self._clock() if now is None else now) < self._valid_until

    @property
    def term(self) -> int:
        """The term we hold, or the highest we have seen recorded."""
        return self._term

    @property
    def holder(self) -> str | None:
        """The holder as last read or written."""
        return self._holder

    @property
    def holding(self) -> bool:
        """We believe we hold the arbiter (it may still have run out: see `valid_until`)."""
        return self._held is not None

    @property
    def renew_interval(self) -> float:
        """How often a holder should renew: three tries fit in each validity window."""
        return (self.lease_duration - self.safety_margin) / 3

    def _note(self, record: LeaseRecord | None) -> None:
        if record is not None:
            self._term = max(self._term, record.term)
            self._holder = record.holder

    def _lose(self, why: str) -> None:
        if self._held is not None:
            log.warning("arbiter: lost term %d: %s", self._held.term, why)
        self._held = None
        self._valid_until = -math.inf

    # ------------------------------------------------------------------ operations

    async def observe(self) -> LeaseRecord | None:
        """Read the record and start or keep our clock on it. A secondary calls this
        regularly, so that a promotion has already waited out most of the lease."""
        record = await self._read()
        now = self._clock()
        if self._observation is None:
            self._observation = LeaseObservation.first(record, now, self.lease_duration)
        else:
            self._observation = self._observation.update(record, now, self.lease_duration)
        self._note(record)
        return record

    def acquirable_at(self) -> float:
        """Our monotonic time from which the last observed holder's lease has run out."""
        if self._observation is None:
            return math.inf
        return self._observation.expires_at

    async def acquire(self, term: int, image: tuple[int, int] | None = None) -> bool:
        """One attempt to take the arbiter with `term`. False: held by someone still
        possibly valid, or another taker won the race; try again later (see
        `acquirable_at`). Raises TermTooLow if `term` can never be taken."""
        if term < 1:
            raise ValueError(f"terms start at 1, got {term}")
        if self._held is not None and self._held.term == term:
            return self.is_valid()
        record = await self.observe()
        assert self._observation is not None
        if record is not None and record.term == term and record.holder == self.identity:
            # Our own earlier attempt landed although its reply was lost (a timeout).
            # Nobody else can have written this term, so a fresh write adopts it.
            return await self._adopt(record)
        if image is not None and record is not None and (
            record.term > image[0] or (record.term == image[0] and record.floor > image[1])
        ):
            raise StaleImage(image, record)
        verdict = decide_acquire(record, self._observation, term, self._clock())
        if verdict is AcquireVerdict.TERM_TOO_LOW:
            raise TermTooLow(term, record.term if record else 0, record.holder if record else None)
        if verdict is AcquireVerdict.HELD:
            return False
        started = self._clock()
        written = await self._swap(record, term, self.identity)
        if written is None:
            log.info("arbiter: another writer changed the record while taking term %d", term)
            return False
        self._held = written
        self._note(written)
        self._valid_until = lease_valid_until(started, self.lease_duration, self.safety_margin)
        log.info("arbiter: took term %d (previous holder %s)", term, record.holder if record else None)
        return True

    async def _adopt(self, record: LeaseRecord) -> bool:
        started = self._clock()
        written = await self._swap(record, record.term, self.identity, record.floor)
        if written is None:
            return False
        self._held = written
        self._note(written)
        self._valid_until = lease_valid_until(started, self.lease_duration, self.safety_margin)
        log.info("arbiter: term %d was already recorded as ours; adopted it", record.term)
        return True

    async def wait_acquire(
        self, term: int, timeout: float, *, poll: float | None = None, image: tuple[int, int] | None = None
    ) -> bool:
        """Take the arbiter with `term`, waiting up to `timeout` seconds for the previous
        holder's lease to run out. Sleeps until the observed expiry rather than polling
        blindly, but rereads at least every `poll` seconds (a release frees it at once).

        A store error is retried until the deadline and raised if it was the last outcome,
        so a caller can tell "still held" (False) from "could not ask" (ArbiterError).
        TermTooLow is raised at once."""
        poll = self.renew_interval if poll is None else poll
        deadline = self._clock() + timeout
        while True:
            failure: ArbiterError | None = None
            try:
                if await self.acquire(term, image):
                    return True
            except TermTooLow:
                raise
            except ArbiterError as exc:
                failure = exc
            now = self._clock()
            if now >= deadline:
                if failure is not None:
                    raise failure
                return False
            wake = min(self.acquirable_at(), now + poll, deadline)
            await asyncio.sleep(max(0.0, wake - now))

    async def take_next_term(self, patience: float, retry: float = 0.5, refusals: float = 30.0) -> int:
        """A fresh primary: take the term after the highest recorded one and return it.

        A store that is slow or busy (ArbiterUnavailable) costs time, never the caller:
        reads and writes are retried for as long as it stays so. A write whose outcome
        was unknown is read back by the next attempt, which adopts it if it landed, so
        the term is chosen once. Other store errors (a permission the API server has
        not caught up with yet, say) are retried for `refusals` seconds, then raised.
        A record still held by someone else after `patience` seconds raises ArbiterError."""
        term: int | None = None
        refused_until = self._clock() + refusals
        while True:
            try:
                if term is None:
                    await self.observe()
                    term = self._term + 1
                if await self.wait_acquire(term, patience):
                    return term
            except (TermTooLow, StaleImage):
                raise
            except ArbiterError as exc:
                if not isinstance(exc, ArbiterUnavailable) and self._clock() >= refused_until:
                    raise
                log.warning("arbiter: the store does not answer yet (%s); asking again", exc)
                await asyncio.sleep(retry)
                continue
            raise ArbiterError(
                f"could not take the arbiter with term {term} within {patience:.1f} s "
                f"(held by {self._holder})"
            )

    async def renew(self) -> bool:
        """Extend our lease. False: not extended (store unreachable: `valid_until` keeps
        running out; or the term was lost: `holding` turns False for good)."""
        held = self._held
        if held is None:
            return False
        started = self._clock()
        try:
            written = await self._swap(held, held.term, self.identity, held.floor)
            if written is None:
                # Something else wrote. Only a record still ours (someone edited
                # another field, or our own earlier write landed after a timeout)
                # lets us retry; anything else means the term is gone.
                current = await self._read()
                self._note(current)
                if current is None or current.term != held.term or current.holder != self.identity:
                    if current is None:
                        self._lose("the record is gone")
                    else:
                        self._lose(f"the record now says term {current.term} held by {current.holder}")
                    return False
                started = self._clock()
                written = await self._swap(current, held.term, self.identity, max(held.floor, current.floor))
                if written is None:
                    return False
        except ArbiterError as exc:
            log.warning("arbiter: renewal of term %d failed: %s", held.term, exc)
            return False
        if self._held is not held:
            return False  # released or lost while the write was in flight
        self._held = written
        extended = lease_valid_until(started, self.lease_duration, self.safety_margin)
        self._valid_until = max(self._valid_until, extended)
        return True

    async def raise_floor(self, floor: int) -> bool:
        """Holder: record that output from epoch `floor` on leaves without the current
        secondary, so its image can no longer be promoted. True once written (it also
        renews); False if the store cannot be written now or the term was lost."""
        held = self._held
        if held is None:
            return False
        if held.floor >= floor:
            return True
        started = self._clock()
        try:
            written = await self._swap(held, held.term, self.identity, floor)
        except ArbiterError as exc:
            log.warning("arbiter: raising the epoch floor to %d failed: %s", floor, exc)
            return False
        if written is None or self._held is not held:
            return False  # another write came first; the caller retries after a renewal
        self._held = written
        self._valid_until = max(self._valid_until,
                                lease_valid_until(started, self.lease_duration, self.safety_margin))
        log.info("arbiter: epoch floor of term %d raised to %d", held.term, floor)
        return True

    async def release(self) -> None:
        """Stop being valid at once, then hand the record back (holder empty, term kept) so a
        taker need not wait out the lease. Best effort: if the write fails, the lease runs out."""
        held = self._held
        self._lose("released")
        if held is None:
            return
        try:
            written = await self._swap(held, held.term, None, held.floor)
        except ArbiterError as exc:
            log.warning("arbiter: release of term %d not recorded (%s); it will run out", held.term, exc)
            return
        if written is None:
            log.info("arbiter: term %d changed before release; nothing to hand back", held.term)
        else:
            self._note(written)

    async def keep_observing(self, interval: float | None = None) -> None:
        """Secondary: read the record every `interval` (default `renew_interval`) until
        cancelled, so the clock on the primary's last renewal is already running when a
        promotion comes. Store errors are logged and retried: observing is advisory."""
        interval = self.renew_interval if interval is None else interval
        while True:
            try:
                await self.observe()
            except ArbiterError as exc:
                log.debug("arbiter: observation failed: %s", exc)
            await asyncio.sleep(interval)

    @abc.abstractmethod
    async def close(self) -> None:
        """Release resources (connections); does not release the lease."""
