"""Primary and secondary replication state machines, sans-IO.

Each session is an explicit `(state, event) -> handler` table; a pair not in
the table raises (`RemoteProtocolError` when the peer caused it,
`LocalProtocolError` when we did). Inputs are decoded events, local calls and
`now` (float seconds of a monotonic clock the caller reads); outputs are
actions the caller carries out in order. Nothing here sleeps, reads a clock
or touches a socket: `next_deadline()` says when to call `handle_timer(now)`.

Connections: `CONTROL` carries begin/device state/end/ack/nack, `DATA(i)`
carries PAGES striped in batches, `HEARTBEAT` carries heartbeats only, so a
long page transfer never delays liveness.

Epochs and attempts: the primary keeps one epoch in flight. A NACK makes it
re-send the same staged pages as attempt + 1; the secondary discards frames
of older attempts still in flight on other channels, so an epoch is never
assembled from two attempts. Pages may arrive on a data channel before the
CHECKPOINT_BEGIN on the control channel: any frame of a newer attempt starts
it.

Invariants (tests check them): the secondary acknowledges an epoch only after
every channel delivered its count, the device state arrived, the digest held
and the engine reported the commit; the primary releases output of an epoch
only on its ACK.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, TypeAlias

import numpy as np
import numpy.typing as npt
import xxhash

from colo_agent.constants import HEARTBEAT_INTERVAL_MS, HEARTBEAT_TIMEOUT_MS
from colo_agent.replication.cache import ColoCache, PageArray
from colo_agent.replication.protocol import (
    PAGE_SIZE,
    Ack,
    ChannelKind,
    CheckpointBegin,
    CheckpointEnd,
    DeviceState,
    Event,
    Goodbye,
    GoodbyeReason,
    Heartbeat,
    LocalProtocolError,
    Message,
    MessageType,
    Nack,
    NackReason,
    Pages,
    PagesComplete,
    PagesHeader,
    RemoteProtocolError,
    SyncBegin,
    SyncEnd,
    pages_payload_hash,
)

DEFAULT_BATCH_PAGES: Final = 256
SYNC_STRIPE_PAGES: Final = 256
_MASK64: Final = (1 << 64) - 1


@dataclass(frozen=True)
class Channel:
    kind: ChannelKind
    index: int = 0

    def __str__(self) -> str:
        return self.kind.name.lower() if self.kind is not ChannelKind.DATA else f"data{self.index}"


CONTROL: Final = Channel(ChannelKind.CONTROL)
HEARTBEAT: Final = Channel(ChannelKind.HEARTBEAT)


def data_channel(index: int) -> Channel:
    return Channel(ChannelKind.DATA, index)


def epoch_digest(payload_hashes_sum: int, device_state: bytes) -> int:
    """What CHECKPOINT_END carries: the sum of the epoch's PAGES payload hashes
    plus the hash of its device state, mod 2**64 (independent of the order in
    which channels deliver)."""
    return (payload_hashes_sum + xxhash.xxh3_64_intdigest(device_state)) & _MASK64


# -- actions ------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """Send `message` on `channel` (after every earlier Send on that channel)."""

    channel: Channel
    message: Message


@dataclass(frozen=True, eq=False)
class SendLivePages:
    """First sync: copy pages `indices` of live guest RAM (`source`) into a
    buffer of the transport, then send them as one SYNC_PAGES frame. The copy
    is what makes the checksum match the bytes sent while the guest writes."""

    channel: Channel
    term: int
    sync_round: int
    indices: npt.NDArray[np.int64]
    source: PageArray


@dataclass(frozen=True)
class ReleaseOutput:
    """Primary: the secondary acknowledged `epoch`; output produced up to the
    pause that closed it may go to clients (if the lease allows)."""

    term: int
    epoch: int


@dataclass(frozen=True)
class EpochRejected:
    """Primary: the secondary NACKed; the epoch is being re-sent."""

    term: int
    epoch: int
    attempt: int
    reason: NackReason
    text: str


@dataclass(frozen=True)
class CommitEpoch:
    """Secondary: every part of the epoch arrived intact. The engine commits it
    (`ColoCache.commit`, in lockstep mode after pausing the guest and adding
    its dirty pages) and then calls `SecondarySession.commit_done`."""

    term: int
    epoch: int
    device_state: bytes


@dataclass(frozen=True)
class SyncComplete:
    """Secondary: RAM holds every page of the first sync."""

    term: int


@dataclass(frozen=True)
class Yank:
    """Shut down every socket to the peer now, so no task stays blocked on it."""

    reason: str


@dataclass(frozen=True)
class PeerLost:
    """The peer is gone (heartbeat timeout, connection lost, gave up)."""

    reason: str


@dataclass(frozen=True)
class Closed:
    """The session ended in an orderly way (GOODBYE sent or received)."""

    reason: str


@dataclass(frozen=True)
class Promoted:
    """Secondary: promotion. Resume from the committed image (RAM) and this
    device state, which belong to `epoch` of `term`."""

    term: int
    epoch: int
    device_state: bytes


Action: TypeAlias = (
    Send
    | SendLivePages
    | ReleaseOutput
    | EpochRejected
    | CommitEpoch
    | SyncComplete
    | Yank
    | PeerLost
    | Closed
    | Promoted
)


class _Liveness:
    """Heartbeat schedule and loss detection shared by both sessions."""

    def __init__(self, interval: float, timeout: float, now: float) -> None:
        if not 0 < interval < timeout:
            raise ValueError(f"need 0 < heartbeat interval ({interval}) < timeout ({timeout})")
        self.interval = interval
        self.timeout = timeout
        self.last_heard = now
        self.next_send = now
        self.seq = 0

    def heard(self, now: float) -> None:
        self.last_heard = max(self.last_heard, now)

    def deadline(self) -> float:
        return min(self.next_send, self.last_heard + self.timeout)

    def lost(self, now: float) -> bool:
        return now >= self.last_heard + self.timeout

    def due(self, now: float) -> bool:
        if now < self.next_send:
            return False
        self.seq += 1
        # Scheduled from now, not from the missed slot: a late timer must not
        # burst heartbeats.
        self.next_send = now + self.interval
        return True


# -- primary --------------------------------------------------------------------


class PrimaryState(enum.Enum):
    NEW = "new"  # connected and authenticated, nothing sent
    SYNCING = "syncing"  # first sync rounds going out
    READY = "ready"  # no epoch in flight
    CHECKPOINTING = "checkpointing"  # one epoch sent, waiting for ACK
    FAILED = "failed"  # peer lost; the transport is being torn down
    CLOSED = "closed"


_P_ALIVE: Final = (PrimaryState.NEW, PrimaryState.SYNCING, PrimaryState.READY, PrimaryState.CHECKPOINTING)


class _P(enum.Enum):
    START_SYNC = "start_sync"
    SYNC_ROUND = "sync_round"
    END_SYNC = "end_sync"
    BEGIN_EPOCH = "begin_epoch"
    ACK = "ack"
    NACK = "nack"
    HEARTBEAT = "heartbeat"
    GOODBYE = "goodbye"
    TIMER = "timer"
    CHANNEL_LOST = "channel_lost"
    CLOSE = "close"


@dataclass(eq=False)
class _OutgoingEpoch:
    term: int
    epoch: int
    attempt: int
    indices: npt.NDArray[np.int64]
    pages: PageArray
    device_state: bytes
    started: float


class PrimarySession:
    """The primary's side of one pairing with a secondary."""

    def __init__(
        self,
        *,
        term: int,
        channels: int,
        page_count: int,
        cache_pages: int,
        now: float,
        heartbeat_interval: float = HEARTBEAT_INTERVAL_MS / 1000,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT_MS / 1000,
        ack_timeout: float | None = 5.0,
        batch_pages: int = DEFAULT_BATCH_PAGES,
        max_attempts: int = 3,
        first_epoch: int = 1,
        cover_page_data: bool = True,
    ) -> None:
        if channels < 1:
            raise ValueError("at least one data channel")
        if not 1 <= batch_pages <= 1024:
            raise ValueError("batch_pages must be 1..1024")
        if first_epoch < 1:
            raise ValueError("epochs are numbered from 1")
        self.term = term
        self.channels = channels
        self.page_count = page_count
        self.cache_pages = cache_pages
        self.batch_pages = batch_pages
        # False over TLS: page data out of the payload hashes (`protocol`).
        self.cover_page_data = cover_page_data
        self.max_attempts = max_attempts
        self.ack_timeout = ack_timeout
        self.state = PrimaryState.NEW
        self.next_epoch = first_epoch
        self.acked_epoch = 0
        self.failure: str | None = None
        self._live = _Liveness(heartbeat_interval, heartbeat_timeout, now)
        self._inflight: _OutgoingEpoch | None = None
        self._sync_round = 0
        self._sync_counts = [0] * channels
        self._stripe = 0

    # The table. A handler returns the new state.
    _TABLE: Final[dict[tuple[PrimaryState, _P], str]] = {
        (PrimaryState.NEW, _P.START_SYNC): "_on_start_sync",
        (PrimaryState.SYNCING, _P.SYNC_ROUND): "_on_sync_round",
        (PrimaryState.SYNCING, _P.END_SYNC): "_on_end_sync",
        (PrimaryState.READY, _P.BEGIN_EPOCH): "_on_begin_epoch",
        (PrimaryState.CHECKPOINTING, _P.ACK): "_on_ack",
        (PrimaryState.CHECKPOINTING, _P.NACK): "_on_nack",
        **{(s, _P.HEARTBEAT): "_on_heartbeat" for s in _P_ALIVE},
        **{(s, _P.GOODBYE): "_on_goodbye" for s in _P_ALIVE},
        **{(s, _P.CLOSE): "_on_close" for s in _P_ALIVE},
        **{(s, _P.TIMER): "_on_timer" for s in PrimaryState},
        **{(s, _P.CHANNEL_LOST): "_on_channel_lost" for s in PrimaryState},
        # A peer we already gave up on may still have an ACK or NACK on the
        # wire; nothing is released for it.
        **{
            (s, e): "_ignore"
            for s in (PrimaryState.FAILED, PrimaryState.CLOSED)
            for e in (_P.ACK, _P.NACK, _P.HEARTBEAT, _P.GOODBYE)
        },
    }

    def _dispatch(self, event: _P, remote: bool, *args: object) -> list[Action]:
        name = self._TABLE.get((self.state, event))
        if name is None:
            err = RemoteProtocolError if remote else LocalProtocolError
            raise err(f"primary: {event.value} is not valid in state {self.state.value}")
        actions: list[Action] = []
        handler: Callable[..., PrimaryState] = getattr(self, name)
        self.state = handler(actions, *args)
        return actions

    # -- inputs ---------------------------------------------------------------

    @property
    def last_heard(self) -> float:
        """When the secondary last said anything (the caller's clock)."""
        return self._live.last_heard

    @property
    def protected(self) -> bool:
        """An epoch of this pairing has been acknowledged and the peer is alive."""
        return self.acked_epoch > 0 and self.state in (PrimaryState.READY, PrimaryState.CHECKPOINTING)

    @property
    def epoch_in_flight(self) -> int | None:
        return self._inflight.epoch if self._inflight else None

    def start_sync(self, now: float) -> list[Action]:
        return self._dispatch(_P.START_SYNC, False, now)

    def sync_round(self, now: float, indices: npt.NDArray[np.int64], source: PageArray) -> list[Action]:
        """One pre-copy round: send pages `indices` of live RAM `source` (page_count x PAGE_SIZE)."""
        return self._dispatch(_P.SYNC_ROUND, False, now, indices, source)

    def end_sync(self, now: float) -> list[Action]:
        """Rounds are over; the next `begin_epoch` is the final, paused one."""
        return self._dispatch(_P.END_SYNC, False, now)

    def begin_epoch(
        self, now: float, indices: npt.NDArray[np.int64], pages: PageArray, device_state: bytes
    ) -> list[Action]:
        """Stream one epoch: `pages[i]` is page `indices[i]` as staged at the pause.

        `indices` must be sorted and unique (what `Guest.collect_dirty`
        returns). The caller keeps `pages` unchanged until the epoch is
        acknowledged (or the session failed): a NACK re-sends from it.
        """
        return self._dispatch(_P.BEGIN_EPOCH, False, now, indices, pages, device_state)

    def receive(self, channel: Channel, message: Event, now: float) -> list[Action]:
        """A message from the secondary."""
        self._live.heard(now)
        if isinstance(message, Ack | Nack) and channel != CONTROL:
            # Only the control connection orders acks after what they answer.
            raise RemoteProtocolError(f"{type(message).__name__} on the {channel} connection")
        if isinstance(message, Ack):
            return self._dispatch(_P.ACK, True, message)
        if isinstance(message, Nack):
            return self._dispatch(_P.NACK, True, message, now)
        if isinstance(message, Heartbeat):
            return self._dispatch(_P.HEARTBEAT, True, message)
        if isinstance(message, Goodbye):
            return self._dispatch(_P.GOODBYE, True, message)
        raise RemoteProtocolError(f"primary: unexpected {type(message).__name__} on {channel}")

    def channel_lost(self, channel: Channel, reason: str, now: float) -> list[Action]:
        return self._dispatch(_P.CHANNEL_LOST, False, channel, reason)

    def close(self, now: float, reason: str = "shutting down") -> list[Action]:
        return self._dispatch(_P.CLOSE, False, reason)

    def next_deadline(self) -> float | None:
        if self.state in (PrimaryState.FAILED, PrimaryState.CLOSED):
            return None
        deadline = self._live.deadline()
        if self._inflight is not None and self.ack_timeout is not None:
            deadline = min(deadline, self._inflight.started + self.ack_timeout)
        return deadline

    def handle_timer(self, now: float) -> list[Action]:
        return self._dispatch(_P.TIMER, False, now)

    # -- handlers ----------------------------------------------------------------

    def _on_start_sync(self, out: list[Action], now: float) -> PrimaryState:
        out.append(Send(CONTROL, SyncBegin(self.term, self.page_count)))
        return PrimaryState.SYNCING

    def _on_sync_round(
        self, out: list[Action], now: float, indices: npt.NDArray[np.int64], source: PageArray
    ) -> PrimaryState:
        indices = np.asarray(indices, dtype=np.int64)
        if source.ndim != 2 or source.shape[1] != PAGE_SIZE or len(source) != self.page_count:
            raise LocalProtocolError(
                f"sync source must be guest RAM as ({self.page_count}, {PAGE_SIZE}) pages"
            )
        _check_sorted(indices, self.page_count)
        self._sync_round += 1
        # Sync pages land straight in RAM, so a page re-sent in a later round
        # must travel the channel that carried it before or it could overtake
        # the older copy: channels own fixed stripes of RAM during sync.
        owner = (indices // SYNC_STRIPE_PAGES) % self.channels
        for ch in range(self.channels):
            mine = indices[owner == ch]
            for batch in _batches(len(mine), self.batch_pages):
                self._sync_counts[ch] += batch.stop - batch.start
                out.append(SendLivePages(data_channel(ch), self.term, self._sync_round, mine[batch], source))
        return PrimaryState.SYNCING

    def _on_end_sync(self, out: list[Action], now: float) -> PrimaryState:
        out.append(Send(CONTROL, SyncEnd(self.term, self._sync_round, tuple(self._sync_counts))))
        return PrimaryState.READY

    def _on_begin_epoch(
        self,
        out: list[Action],
        now: float,
        indices: npt.NDArray[np.int64],
        pages: PageArray,
        device_state: bytes,
    ) -> PrimaryState:
        indices = np.asarray(indices, dtype=np.int64)
        n = len(indices)
        if pages.ndim != 2 or pages.shape != (n, PAGE_SIZE):
            raise LocalProtocolError(f"{n} indices need ({n}, {PAGE_SIZE}) staged pages, got {pages.shape}")
        if n > self.cache_pages:
            raise LocalProtocolError(
                f"epoch of {n} pages exceeds the secondary's cache of {self.cache_pages}: "
                "checkpoint before the dirty set reaches it"
            )
        _check_sorted(indices, self.page_count)
        self._inflight = _OutgoingEpoch(
            self.term, self.next_epoch, 0, indices, pages, bytes(device_state), now
        )
        self.next_epoch += 1
        self._send_epoch(out)
        return PrimaryState.CHECKPOINTING

    def _send_epoch(self, out: list[Action]) -> None:
        e = self._inflight
        assert e is not None
        out.append(Send(CONTROL, CheckpointBegin(e.term, e.epoch, e.attempt, self.channels, len(e.indices))))
        counts = [0] * self.channels
        total = 0
        for batch in _batches(len(e.indices), self.batch_pages):
            ch = self._next_channel()
            idx = e.indices[batch]
            data = e.pages[batch]
            h = pages_payload_hash(e.term, e.epoch, e.attempt, ch, idx, data,
                                   cover_page_data=self.cover_page_data)  # fmt: skip
            total += h
            counts[ch] += len(idx)
            out.append(
                Send(data_channel(ch), Pages(MessageType.PAGES, e.term, e.epoch, e.attempt, ch, idx, data, h))
            )
        out.append(Send(CONTROL, DeviceState(e.term, e.epoch, e.attempt, e.device_state)))
        digest = epoch_digest(total, e.device_state)
        out.append(Send(CONTROL, CheckpointEnd(e.term, e.epoch, e.attempt, digest, tuple(counts))))

    def _on_ack(self, out: list[Action], ack: Ack) -> PrimaryState:
        e = self._inflight
        assert e is not None
        if (ack.term, ack.epoch) != (e.term, e.epoch):
            raise RemoteProtocolError(
                f"ACK for term {ack.term} epoch {ack.epoch}, but term {e.term} epoch {e.epoch} is in flight"
            )
        self._inflight = None
        self.acked_epoch = e.epoch
        out.append(ReleaseOutput(e.term, e.epoch))
        return PrimaryState.READY

    def _on_nack(self, out: list[Action], nack: Nack, now: float) -> PrimaryState:
        e = self._inflight
        assert e is not None
        if (nack.term, nack.epoch) != (e.term, e.epoch) or nack.attempt > e.attempt:
            raise RemoteProtocolError(
                f"NACK for term {nack.term} epoch {nack.epoch} attempt {nack.attempt}, but "
                f"term {e.term} epoch {e.epoch} attempt {e.attempt} is in flight"
            )
        if nack.attempt < e.attempt:
            return PrimaryState.CHECKPOINTING  # about an attempt already superseded
        out.append(EpochRejected(e.term, e.epoch, e.attempt, nack.reason, nack.text))
        if e.attempt + 1 >= self.max_attempts:
            return self._fail(out, f"epoch {e.epoch} rejected {self.max_attempts} times, last: {nack.text}")
        e.attempt += 1
        e.started = now
        self._send_epoch(out)
        return PrimaryState.CHECKPOINTING

    def _on_heartbeat(self, out: list[Action], hb: Heartbeat) -> PrimaryState:
        if hb.term != self.term:
            raise RemoteProtocolError(f"heartbeat of term {hb.term} in a session of term {self.term}")
        return self.state

    def _on_goodbye(self, out: list[Action], bye: Goodbye) -> PrimaryState:
        self._inflight = None
        out.append(Closed(f"secondary said goodbye ({bye.reason.name.lower()}): {bye.text}"))
        return PrimaryState.CLOSED

    def _on_timer(self, out: list[Action], now: float) -> PrimaryState:
        if self.state in (PrimaryState.FAILED, PrimaryState.CLOSED):
            return self.state
        if self._live.lost(now):
            return self._fail(out, f"no word from the secondary for {now - self._live.last_heard:.3f}s")
        e = self._inflight
        if e is not None and self.ack_timeout is not None and now >= e.started + self.ack_timeout:
            return self._fail(out, f"epoch {e.epoch} not acknowledged within {self.ack_timeout}s")
        if self._live.due(now):
            out.append(Send(HEARTBEAT, Heartbeat(self.term, self._live.seq, self.acked_epoch)))
        return self.state

    def _on_channel_lost(self, out: list[Action], channel: Channel, reason: str) -> PrimaryState:
        if self.state in (PrimaryState.FAILED, PrimaryState.CLOSED):
            return self.state
        return self._fail(out, f"{channel} connection lost: {reason}")

    def _on_close(self, out: list[Action], reason: str) -> PrimaryState:
        self._inflight = None
        out.append(Send(CONTROL, Goodbye(GoodbyeReason.SHUTDOWN, reason)))
        out.append(Closed(reason))
        return PrimaryState.CLOSED

    def _ignore(self, out: list[Action], *args: object) -> PrimaryState:
        return self.state

    def _fail(self, out: list[Action], reason: str) -> PrimaryState:
        self.failure = reason
        self._inflight = None
        out.append(Yank(reason))
        out.append(PeerLost(reason))
        return PrimaryState.FAILED

    def _next_channel(self) -> int:
        ch = self._stripe
        self._stripe = (self._stripe + 1) % self.channels
        return ch


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _check_sorted(indices: npt.NDArray[np.int64], page_count: int) -> None:
    if len(indices) and (indices[0] < 0 or indices[-1] >= page_count):
        raise LocalProtocolError(f"page index out of range 0..{page_count - 1}")
    if len(indices) > 1 and not bool(np.all(indices[1:] > indices[:-1])):
        raise LocalProtocolError("page indices must be sorted and unique")


# -- secondary ---------------------------------------------------------------------


class SecondaryState(enum.Enum):
    # Sync pages (and the first epoch's) may overtake SYNC_BEGIN on another
    # connection, so a session starts out syncing.
    SYNCING = "syncing"  # until every sync page announced by SYNC_END landed
    READY = "ready"  # synced, no epoch in flight
    RECEIVING = "receiving"  # an epoch is arriving
    COMMITTING = "committing"  # CommitEpoch issued, waiting for commit_done
    FAILED = "failed"
    CLOSED = "closed"
    PROMOTED = "promoted"


class _S(enum.Enum):
    SYNC_BEGIN = "sync_begin"
    SYNC_PAGES = "sync_pages"  # header or complete
    SYNC_END = "sync_end"
    EPOCH = "epoch"  # CHECKPOINT_BEGIN, PAGES header/complete, DEVICE_STATE, CHECKPOINT_END
    CORRUPT = "corrupt"
    HEARTBEAT = "heartbeat"
    GOODBYE = "goodbye"
    COMMIT_DONE = "commit_done"
    TIMER = "timer"
    CHANNEL_LOST = "channel_lost"
    PROMOTE = "promote"
    CLOSE = "close"


@dataclass(eq=False)
class _IncomingEpoch:
    term: int
    epoch: int
    attempt: int
    channels: int
    received: list[int]
    hash_sum: int = 0
    begin: CheckpointBegin | None = None
    device_state: bytes | None = None
    end: CheckpointEnd | None = None
    failed: bool = False  # NACKed: later frames of this attempt are discarded
    # channel -> header of the batch whose data is arriving
    pending: dict[int, PagesHeader] = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, int]:
        return (self.epoch, self.attempt)


_ALIVE: Final = (
    SecondaryState.SYNCING,
    SecondaryState.READY,
    SecondaryState.RECEIVING,
    SecondaryState.COMMITTING,
)


class SecondarySession:
    """The secondary's side of one pairing; it owns the cache's epoch in flight."""

    def __init__(
        self,
        *,
        term: int,
        channels: int,
        cache: ColoCache,
        now: float,
        heartbeat_interval: float = HEARTBEAT_INTERVAL_MS / 1000,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT_MS / 1000,
    ) -> None:
        if channels < 1:
            raise ValueError("at least one data channel")
        self.term = term
        self.channels = channels
        self.cache = cache
        self.state = SecondaryState.SYNCING
        self.committed_epoch = 0
        self.failure: str | None = None
        self._live = _Liveness(heartbeat_interval, heartbeat_timeout, now)
        self._epoch: _IncomingEpoch | None = None
        self._sync_expected: tuple[int, ...] | None = None
        self._sync_received = [0] * channels
        self._sync_pending: dict[int, PagesHeader] = {}
        self._synced = False
        self._sync_begun = False
        self._dest: memoryview | None = None

    _TABLE: Final[dict[tuple[SecondaryState, _S], str]] = {
        (SecondaryState.SYNCING, _S.SYNC_BEGIN): "_on_sync_begin",
        (SecondaryState.SYNCING, _S.SYNC_PAGES): "_on_sync_pages",
        (SecondaryState.SYNCING, _S.SYNC_END): "_on_sync_end",
        (SecondaryState.SYNCING, _S.EPOCH): "_on_epoch",
        (SecondaryState.READY, _S.EPOCH): "_on_epoch",
        (SecondaryState.RECEIVING, _S.EPOCH): "_on_epoch",
        (SecondaryState.COMMITTING, _S.EPOCH): "_on_epoch",  # only stale frames pass
        (SecondaryState.SYNCING, _S.CORRUPT): "_on_corrupt",
        (SecondaryState.RECEIVING, _S.CORRUPT): "_on_corrupt",
        (SecondaryState.READY, _S.CORRUPT): "_on_corrupt",
        (SecondaryState.COMMITTING, _S.CORRUPT): "_on_corrupt",
        (SecondaryState.COMMITTING, _S.COMMIT_DONE): "_on_commit_done",
        **{(s, _S.HEARTBEAT): "_on_heartbeat" for s in _ALIVE},
        **{(s, _S.GOODBYE): "_on_goodbye" for s in _ALIVE},
        **{(s, _S.CLOSE): "_on_close" for s in _ALIVE},
        **{(s, _S.TIMER): "_on_timer" for s in SecondaryState},
        **{(s, _S.CHANNEL_LOST): "_on_channel_lost" for s in SecondaryState},
        **{(s, _S.PROMOTE): "_on_promote" for s in (*_ALIVE, SecondaryState.FAILED, SecondaryState.CLOSED)},
        # Once the session is over, frames still buffered on other connections
        # are dropped (a GOODBYE on the control connection can overtake them).
        **{
            (s, e): "_ignore"
            for s in (SecondaryState.FAILED, SecondaryState.CLOSED, SecondaryState.PROMOTED)
            for e in (
                _S.SYNC_BEGIN,
                _S.SYNC_PAGES,
                _S.SYNC_END,
                _S.EPOCH,
                _S.CORRUPT,
                _S.HEARTBEAT,
                _S.GOODBYE,
            )
        },
    }

    def _dispatch(self, event: _S, remote: bool, *args: object) -> list[Action]:
        name = self._TABLE.get((self.state, event))
        if name is None:
            err = RemoteProtocolError if remote else LocalProtocolError
            raise err(f"secondary: {event.value} is not valid in state {self.state.value}")
        actions: list[Action] = []
        handler: Callable[..., SecondaryState] = getattr(self, name)
        self.state = handler(actions, *args)
        return actions

    # -- inputs ----------------------------------------------------------------

    @property
    def last_heard(self) -> float:
        """When the primary last said anything (the caller's clock)."""
        return self._live.last_heard

    @property
    def synced(self) -> bool:
        return self._synced

    def pages_destination(
        self, channel: Channel, header: PagesHeader, now: float
    ) -> tuple[memoryview | None, list[Action]]:
        """Where the page data of `header` goes (None: read and discard it, the
        batch is stale or its epoch was rejected), and actions such as a NACK."""
        self._live.heard(now)
        _check_data_channel(channel, header.channel, self.channels)
        self._dest = None
        kind = _S.SYNC_PAGES if header.kind is MessageType.SYNC_PAGES else _S.EPOCH
        actions = self._dispatch(kind, True, header)
        dest, self._dest = self._dest, None
        return dest, actions

    def receive(self, channel: Channel, event: Event, now: float) -> list[Action]:
        """A decoded event from the primary (anything but a PagesHeader)."""
        self._live.heard(now)
        if isinstance(event, PagesComplete):
            _check_data_channel(channel, event.channel, self.channels)
            kind = _S.SYNC_PAGES if event.kind is MessageType.SYNC_PAGES else _S.EPOCH
            return self._dispatch(kind, True, event)
        if isinstance(event, PagesHeader):
            raise LocalProtocolError("page headers go through pages_destination")
        if channel.kind is ChannelKind.DATA:
            raise RemoteProtocolError(f"{type(event).__name__} on a data channel")
        if isinstance(event, SyncBegin | SyncEnd | CheckpointBegin | DeviceState | CheckpointEnd) and (
            channel != CONTROL
        ):
            # Their order matters, and only one connection keeps it.
            raise RemoteProtocolError(f"{type(event).__name__} on the {channel} connection")
        if isinstance(event, SyncBegin):
            return self._dispatch(_S.SYNC_BEGIN, True, event)
        if isinstance(event, SyncEnd):
            return self._dispatch(_S.SYNC_END, True, event)
        if isinstance(event, CheckpointBegin | DeviceState | CheckpointEnd):
            return self._dispatch(_S.EPOCH, True, event)
        if isinstance(event, Heartbeat):
            return self._dispatch(_S.HEARTBEAT, True, event)
        if isinstance(event, Goodbye):
            return self._dispatch(_S.GOODBYE, True, event)
        raise RemoteProtocolError(f"secondary: unexpected {type(event).__name__} on {channel}")

    def frame_corrupted(self, channel: Channel, error: RemoteProtocolError, now: float) -> list[Action]:
        """A resumable decoder error on `channel` (page data failed its checksum)."""
        if not error.resumable:
            raise LocalProtocolError("only resumable errors can be reported; close the connection otherwise")
        return self._dispatch(_S.CORRUPT, True, channel, error.reason)

    def heard(self, now: float) -> None:
        """The primary said something outside the session (a handshake of this pairing)."""
        self._live.heard(now)

    def commit_done(self, term: int, epoch: int, now: float) -> list[Action]:
        """The engine committed the epoch of the last CommitEpoch action."""
        return self._dispatch(_S.COMMIT_DONE, False, term, epoch)

    def channel_lost(self, channel: Channel, reason: str, now: float) -> list[Action]:
        return self._dispatch(_S.CHANNEL_LOST, False, channel, reason)

    def promote(self, now: float) -> list[Action]:
        """Stop following: drop any incomplete epoch, hand over the committed state."""
        return self._dispatch(_S.PROMOTE, False)

    def close(self, now: float, reason: str = "shutting down") -> list[Action]:
        return self._dispatch(_S.CLOSE, False, reason)

    def next_deadline(self) -> float | None:
        if self.state not in _ALIVE:
            return None
        return self._live.deadline()

    def handle_timer(self, now: float) -> list[Action]:
        return self._dispatch(_S.TIMER, False, now)

    # -- sync ---------------------------------------------------------------------

    def _on_sync_begin(self, out: list[Action], msg: SyncBegin) -> SecondaryState:
        self._check_term(msg.term)
        if self._sync_begun:
            raise RemoteProtocolError("second SYNC_BEGIN")
        self._sync_begun = True
        if msg.page_count != self.cache.page_count:
            raise RemoteProtocolError(
                f"primary has {msg.page_count} pages of RAM, this secondary {self.cache.page_count}"
            )
        return SecondaryState.SYNCING

    def _on_sync_pages(self, out: list[Action], ev: PagesHeader | PagesComplete) -> SecondaryState:
        self._check_term(ev.term)
        if isinstance(ev, PagesHeader):
            if ev.channel in self._sync_pending:
                raise LocalProtocolError(f"data{ev.channel}: page header before the previous batch completed")
            try:
                self._dest = self.cache.reserve(ev.channel, ev.indices, sync=True)
            except ValueError as exc:
                # The indices are covered by the checksum that is only checked
                # once the data is in: they may be corrupt, not wrong.
                return self._sync_failed(out, f"bad sync batch on data{ev.channel}: {exc}")
            self._sync_pending[ev.channel] = ev
            return SecondaryState.SYNCING
        if self._sync_pending.pop(ev.channel, None) is None:
            if ev.discarded:
                return SecondaryState.SYNCING
            raise LocalProtocolError(f"data{ev.channel}: sync pages completed without a header")
        self.cache.land(ev.channel)
        self._sync_received[ev.channel] += ev.count
        return self._check_sync(out)

    def _on_sync_end(self, out: list[Action], msg: SyncEnd) -> SecondaryState:
        self._check_term(msg.term)
        if len(msg.counts) != self.channels:
            raise RemoteProtocolError(
                f"SYNC_END has counts for {len(msg.counts)} channels, not {self.channels}"
            )
        if not self._sync_begun or self._sync_expected is not None:
            raise RemoteProtocolError("SYNC_END without SYNC_BEGIN, or twice")
        self._sync_expected = msg.counts
        return self._check_sync(out)

    def _check_sync(self, out: list[Action]) -> SecondaryState:
        expected = self._sync_expected
        if expected is None:
            return SecondaryState.SYNCING
        if any(r > e for r, e in zip(self._sync_received, expected, strict=True)):
            return self._sync_failed(
                out, f"more sync pages than announced: {self._sync_received} > {expected}"
            )
        if tuple(self._sync_received) != expected:
            return SecondaryState.SYNCING
        self._synced = True
        out.append(SyncComplete(self.term))
        if self._epoch is None:
            return SecondaryState.READY
        return self._check_complete(out)

    def _sync_failed(self, out: list[Action], reason: str) -> SecondaryState:
        # RAM holds a torn sync; only a new sync can repair it.
        self.failure = reason
        self.cache.end_pairing()
        self._epoch = None
        out.append(Send(CONTROL, Goodbye(GoodbyeReason.RESYNC, reason)))
        out.append(Yank(reason))
        out.append(PeerLost(reason))
        return SecondaryState.FAILED

    # -- epochs -----------------------------------------------------------------------

    def _on_epoch(
        self,
        out: list[Action],
        ev: CheckpointBegin | PagesHeader | PagesComplete | DeviceState | CheckpointEnd,
    ) -> SecondaryState:
        if ev.term < self.term:
            return self._discard(ev)  # an old primary's leftovers
        self._check_term(ev.term)
        e = self._current_for(ev)
        if e is None or e.failed:
            return self._discard(ev)
        if self.state is SecondaryState.COMMITTING:
            raise RemoteProtocolError(f"{type(ev).__name__} for epoch {e.epoch} after it was complete")
        if isinstance(ev, PagesHeader):
            if ev.channel in e.pending:
                raise LocalProtocolError(f"data{ev.channel}: page header before the previous batch completed")
            try:
                self._dest = self.cache.reserve(ev.channel, ev.indices)
            except ValueError as exc:
                self._dest = None
                return self._reject(out, e, NackReason.CORRUPT_FRAME, f"bad batch on data{ev.channel}: {exc}")
            e.pending[ev.channel] = ev
        elif isinstance(ev, PagesComplete):
            if e.pending.pop(ev.channel, None) is None:
                if ev.discarded:
                    return self._state_with_epoch()
                raise LocalProtocolError(f"data{ev.channel}: pages completed without a header")
            self.cache.land(ev.channel)
            e.received[ev.channel] += ev.count
            e.hash_sum += ev.payload_hash
        elif isinstance(ev, CheckpointBegin):
            if e.begin is not None:
                raise RemoteProtocolError(f"second CHECKPOINT_BEGIN for epoch {e.epoch} attempt {e.attempt}")
            if ev.channels != self.channels:
                raise RemoteProtocolError(
                    f"epoch over {ev.channels} channels, this pairing has {self.channels}"
                )
            if ev.pages > self.cache.capacity:
                raise RemoteProtocolError(
                    f"epoch of {ev.pages} pages exceeds the cache of {self.cache.capacity} announced in HELLO"
                )
            e.begin = ev
        elif isinstance(ev, DeviceState):
            if e.begin is None or e.device_state is not None:
                raise RemoteProtocolError(f"DEVICE_STATE out of order in epoch {e.epoch}")
            e.device_state = ev.data
        else:
            if e.begin is None or e.device_state is None or e.end is not None:
                raise RemoteProtocolError(f"CHECKPOINT_END out of order in epoch {e.epoch}")
            if len(ev.counts) != self.channels or sum(ev.counts) != e.begin.pages:
                raise RemoteProtocolError(
                    f"CHECKPOINT_END counts {ev.counts} do not add up to the {e.begin.pages} pages announced"
                )
            e.end = ev
        return self._check_complete(out)

    def _current_for(
        self, ev: CheckpointBegin | PagesHeader | PagesComplete | DeviceState | CheckpointEnd
    ) -> _IncomingEpoch | None:
        """The epoch `ev` belongs to (starting it if newer), or None when stale."""
        if self.committed_epoch and ev.epoch <= self.committed_epoch:
            return None
        e = self._epoch
        if e is not None:
            if (ev.epoch, ev.attempt) < e.key:
                return None
            if (ev.epoch, ev.attempt) == e.key:
                if isinstance(ev, PagesComplete) and ev.channel not in e.pending and ev.discarded:
                    return None
                return e
            if ev.epoch != e.epoch and not e.failed:
                raise RemoteProtocolError(f"epoch {ev.epoch} started while epoch {e.epoch} is unfinished")
        if self.state is SecondaryState.COMMITTING:
            raise RemoteProtocolError(
                f"epoch {ev.epoch} before epoch {self.committed_epoch + 1} was acknowledged"
            )
        if self.committed_epoch and ev.epoch != self.committed_epoch + 1:
            raise RemoteProtocolError(f"epoch {ev.epoch} follows committed epoch {self.committed_epoch}")
        if isinstance(ev, PagesComplete):
            return None  # data of a batch whose header belonged to an older attempt
        # A newer attempt (or the next epoch): whatever was in flight is void.
        self.cache.abort()
        self._epoch = _IncomingEpoch(self.term, ev.epoch, ev.attempt, self.channels, [0] * self.channels)
        return self._epoch

    def _check_complete(self, out: list[Action]) -> SecondaryState:
        e = self._epoch
        if e is None:
            return self._state_with_epoch()
        if e.end is not None:
            over = [c for c in range(self.channels) if e.received[c] > e.end.counts[c]]
            if over:
                return self._reject(out, e, NackReason.CORRUPT_FRAME, f"more pages than announced on {over}")
        if (
            e.end is None
            or e.device_state is None
            or e.pending
            or not self._synced
            or tuple(e.received) != e.end.counts
        ):
            return self._state_with_epoch()
        if epoch_digest(e.hash_sum, e.device_state) != e.end.digest:
            return self._reject(out, e, NackReason.DIGEST_MISMATCH, f"epoch {e.epoch} digest mismatch")
        out.append(CommitEpoch(e.term, e.epoch, e.device_state))
        return SecondaryState.COMMITTING

    def _state_with_epoch(self) -> SecondaryState:
        if not self._synced:
            return SecondaryState.SYNCING
        if self.state is SecondaryState.COMMITTING:
            return SecondaryState.COMMITTING
        e = self._epoch
        return SecondaryState.RECEIVING if e is not None and not e.failed else SecondaryState.READY

    def _reject(self, out: list[Action], e: _IncomingEpoch, reason: NackReason, text: str) -> SecondaryState:
        e.failed = True
        e.pending.clear()
        self.cache.abort()
        out.append(Send(CONTROL, Nack(e.term, e.epoch, e.attempt, reason, text)))
        return self._state_with_epoch()

    def _discard(self, ev: object) -> SecondaryState:
        self._dest = None
        if isinstance(ev, PagesComplete):
            # Its header may have been reserved before the epoch was voided.
            self.cache.drop(ev.channel)
        return self._state_with_epoch()

    def _on_corrupt(self, out: list[Action], channel: Channel, reason: str) -> SecondaryState:
        # The decoder consumed the frame; whichever batch was pending on this
        # channel is garbage.
        self.cache.drop(channel.index)
        if channel.index in self._sync_pending:
            self._sync_pending.pop(channel.index)
            return self._sync_failed(out, f"data{channel.index}: {reason}")
        e = self._epoch
        if e is None or e.failed or channel.index not in e.pending:
            return self._state_with_epoch()  # a discarded (stale) batch: nothing lost
        return self._reject(out, e, NackReason.CORRUPT_FRAME, f"data{channel.index}: {reason}")

    def _on_commit_done(self, out: list[Action], term: int, epoch: int) -> SecondaryState:
        e = self._epoch
        assert e is not None
        if (term, epoch) != (e.term, e.epoch):
            raise LocalProtocolError(
                f"commit_done({term}, {epoch}) but epoch {e.epoch} of term {e.term} is due"
            )
        if self.cache.committed is None or self.cache.committed.epoch != (term, epoch):
            raise LocalProtocolError(f"commit_done({term}, {epoch}) but the cache did not commit it")
        self.committed_epoch = epoch
        self._epoch = None
        out.append(Send(CONTROL, Ack(term, epoch)))
        return SecondaryState.READY

    # -- liveness and endings -------------------------------------------------------------

    def _on_heartbeat(self, out: list[Action], hb: Heartbeat) -> SecondaryState:
        if self.state is not SecondaryState.FAILED:
            self._check_term(hb.term)
        return self.state

    def _on_goodbye(self, out: list[Action], bye: Goodbye) -> SecondaryState:
        self.cache.end_pairing()
        self._epoch = None
        out.append(Closed(f"primary said goodbye ({bye.reason.name.lower()}): {bye.text}"))
        return SecondaryState.CLOSED

    def _on_close(self, out: list[Action], reason: str) -> SecondaryState:
        self.cache.end_pairing()
        self._epoch = None
        out.append(Send(CONTROL, Goodbye(GoodbyeReason.SHUTDOWN, reason)))
        out.append(Closed(reason))
        return SecondaryState.CLOSED

    def _on_timer(self, out: list[Action], now: float) -> SecondaryState:
        if self.state not in _ALIVE:
            return self.state
        if self._live.lost(now):
            return self._fail(out, f"no word from the primary for {now - self._live.last_heard:.3f}s")
        if self._live.due(now):
            out.append(Send(HEARTBEAT, Heartbeat(self.term, self._live.seq, self.committed_epoch)))
        return self.state

    def _on_channel_lost(self, out: list[Action], channel: Channel, reason: str) -> SecondaryState:
        if self.state not in _ALIVE:
            return self.state
        return self._fail(out, f"{channel} connection lost: {reason}")

    def _on_promote(self, out: list[Action]) -> SecondaryState:
        committed = self.cache.committed
        if committed is None or self.cache.device_state is None:
            raise LocalProtocolError("cannot promote: no epoch was ever committed")
        # An epoch in flight never reaches RAM: dropping the slots is enough.
        self.cache.end_pairing()
        self._epoch = None
        term, epoch = committed.epoch
        out.append(Yank("promoted"))
        out.append(Promoted(term, epoch, self.cache.device_state))
        return SecondaryState.PROMOTED

    def _ignore(self, out: list[Action], *args: object) -> SecondaryState:
        self._dest = None
        return self.state

    def _fail(self, out: list[Action], reason: str) -> SecondaryState:
        self.failure = reason
        self.cache.end_pairing()
        self._epoch = None
        self._sync_pending.clear()
        out.append(Yank(reason))
        out.append(PeerLost(reason))
        return SecondaryState.FAILED

    def _check_term(self, term: int) -> None:
        if term != self.term:
            raise RemoteProtocolError(f"term {term} in a session of term {self.term}")


def _check_data_channel(channel: Channel, claimed: int, channels: int) -> None:
    if channel.kind is not ChannelKind.DATA:
        raise RemoteProtocolError(f"page data on the {channel} connection")
    if claimed != channel.index or not 0 <= claimed < channels:
        raise RemoteProtocolError(f"frame for data{claimed} arrived on {channel}")
