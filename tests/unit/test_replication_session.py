"""Primary and secondary sessions joined by an in-memory link (h11's
ConnectionPair idea): whole syncs and epochs, corruption, stale attempts,
heartbeats, promotion, and random delivery orders under Hypothesis."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from colo_agent.replication import protocol as p
from colo_agent.replication.cache import CacheMode, ColoCache, image_digest, page_view
from colo_agent.replication.session import (
    CONTROL,
    HEARTBEAT,
    Action,
    Channel,
    Closed,
    CommitEpoch,
    EpochRejected,
    PeerLost,
    PrimarySession,
    PrimaryState,
    Promoted,
    ReleaseOutput,
    SecondarySession,
    SecondaryState,
    Send,
    SendLivePages,
    SyncComplete,
    Yank,
    data_channel,
)

PAGE = p.PAGE_SIZE
N_PAGES = 96


class Pair:
    """Both sessions and the bytes between them, one buffer per connection and direction."""

    def __init__(
        self,
        channels: int = 2,
        capacity: int = 48,
        batch: int = 8,
        seed: int = 0,
        *,
        after: Pair | None = None,
        mode: CacheMode = CacheMode.CHECKPOINT,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.channels = channels
        self.p_ram = page_view(bytearray(rng.integers(0, 256, N_PAGES * PAGE, dtype=np.uint8).tobytes()))
        if after is None:
            self.s_mem = bytearray(N_PAGES * PAGE)
            self.cache = ColoCache(self.s_mem, mode=mode, capacity=capacity)
        else:
            # A new pairing on the secondary of an earlier one, as the transport
            # starts it: the cache is reset and synced from scratch.
            self.s_mem, self.cache = after.s_mem, after.cache
            self.cache.reset()
        self.now = 0.0
        self.primary = PrimarySession(
            term=3, channels=channels, page_count=N_PAGES, cache_pages=capacity, now=0.0, batch_pages=batch
        )
        self.secondary = SecondarySession(term=3, channels=channels, cache=self.cache, now=0.0)
        self.conns = [CONTROL, HEARTBEAT, *(data_channel(i) for i in range(channels))]
        self.enc = {(d, c): p.FrameEncoder() for d in "ps" for c in self.conns}
        self.dec = {(d, c): p.FrameDecoder() for d in "ps" for c in self.conns}
        self.wire: dict[tuple[str, Channel], bytearray] = {
            (d, c): bytearray() for d in "ps" for c in self.conns
        }
        self.released: list[int] = []
        self.acks_sent: list[int] = []
        self.commits: list[int] = []
        self.rejected: list[EpochRejected] = []
        self.events: list[Action] = []
        self.snapshots: dict[int, str] = {}  # epoch -> digest of primary RAM at its pause
        self.auto_commit = True
        self.pending_commit: CommitEpoch | None = None
        self.tamper: Callable[[p.Message], p.Message] = lambda m: m

    # -- carrying out actions --------------------------------------------------------

    def run_primary(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Send):
                msg = self.tamper(a.message)
                self.wire["p", a.channel] += p.encode_all(self.enc["p", a.channel], [msg])
            elif isinstance(a, SendLivePages):
                data = np.take(a.source, a.indices, axis=0)
                msg = p.Pages(
                    p.MessageType.SYNC_PAGES, a.term, a.sync_round, 0, a.channel.index, a.indices, data
                )
                self.wire["p", a.channel] += p.encode_all(self.enc["p", a.channel], [msg])
            elif isinstance(a, ReleaseOutput):
                assert a.epoch in self.acks_sent, "output released for an epoch the secondary never acked"
                self.released.append(a.epoch)
            elif isinstance(a, EpochRejected):
                self.rejected.append(a)
            else:
                self.events.append(a)

    def run_secondary(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Send):
                if isinstance(a.message, p.Ack):
                    assert a.message.epoch in self.commits, "ACK before the commit"
                    self.acks_sent.append(a.message.epoch)
                self.wire["s", a.channel] += p.encode_all(self.enc["s", a.channel], [a.message])
            elif isinstance(a, CommitEpoch):
                if self.auto_commit:
                    self.commit(a)
                else:
                    self.pending_commit = a
            else:
                self.events.append(a)

    def commit(self, a: CommitEpoch) -> None:
        local = np.empty(0, dtype=np.int64) if self.cache.mode is CacheMode.LOCKSTEP else None
        self.cache.commit(a.term, a.epoch, a.device_state, local)
        self.commits.append(a.epoch)
        # The committed image is exactly the primary's RAM at that pause.
        assert image_digest(self.s_mem) == self.snapshots[a.epoch]
        assert a.device_state == f"dev{a.epoch}".encode()
        self.run_secondary(self.secondary.commit_done(a.term, a.epoch, self.now))

    # -- moving bytes ---------------------------------------------------------------------

    def deliver(self, src: str, ch: Channel, nbytes: int | None = None) -> None:
        buf = self.wire[src, ch]
        n = len(buf) if nbytes is None else min(nbytes, len(buf))
        chunk = bytes(buf[:n])
        del buf[:n]
        dec = self.dec[src, ch]
        dec.receive(chunk)
        while True:
            try:
                ev = dec.next_event()
            except p.RemoteProtocolError as err:
                assert err.resumable and src == "p"
                self.run_secondary(self.secondary.frame_corrupted(ch, err, self.now))
                continue
            if ev is p.NEED_DATA:
                return
            if src == "p":
                if isinstance(ev, p.PagesHeader):
                    dest, actions = self.secondary.pages_destination(ch, ev, self.now)
                    dec.begin_payload(dest)
                    self.run_secondary(actions)
                else:
                    assert not isinstance(ev, p.NeedData)
                    self.run_secondary(self.secondary.receive(ch, ev, self.now))
            else:
                assert not isinstance(ev, p.NeedData)
                self.run_primary(self.primary.receive(ch, ev, self.now))

    def flush(self) -> None:
        while any(self.wire.values()):
            for (src, ch), buf in self.wire.items():
                if buf:
                    self.deliver(src, ch)

    # -- the primary's engine ----------------------------------------------------------

    def sync(self, rounds: int = 2) -> None:
        self.run_primary(self.primary.start_sync(self.now))
        self.run_primary(self.primary.sync_round(self.now, np.arange(N_PAGES, dtype=np.int64), self.p_ram))
        for _ in range(rounds - 1):
            dirty = self.dirty_some()
            self.run_primary(self.primary.sync_round(self.now, dirty, self.p_ram))
        self.run_primary(self.primary.end_sync(self.now))

    def dirty_some(self, k: int = 10) -> np.ndarray:
        idx = np.unique(self.rng.integers(0, N_PAGES, size=k)).astype(np.int64)
        self.p_ram[idx] = self.rng.integers(0, 256, size=(len(idx), PAGE), dtype=np.uint8)
        return idx

    def epoch(self, dirty: np.ndarray | None = None) -> int:
        """Pause, stage, send; returns the epoch number."""
        if dirty is None:
            dirty = self.dirty_some()
        epoch = self.primary.next_epoch
        self.snapshots[epoch] = image_digest(self.p_ram)
        staged = np.take(self.p_ram, dirty, axis=0)
        self.run_primary(self.primary.begin_epoch(self.now, dirty, staged, f"dev{epoch}".encode()))
        return epoch


def corrupt_first_batch(pair: Pair, skip: int = 0) -> Channel:
    """Flip a bit in the page data of the first batch waiting on a data channel
    (the `skip`-th such channel); returns that channel."""
    busy = [c for c in pair.conns if c.kind is p.ChannelKind.DATA and pair.wire["p", c]]
    ch = busy[skip]
    wire = pair.wire["p", ch]
    length = p.HEADER.unpack_from(wire)[4]
    count = (length - p.PAGES_META.size) // (8 + PAGE)
    wire[p.HEADER_SIZE + p.PAGES_META.size + 8 * count + 100] ^= 0x10
    return ch


def full_first_epoch(pair: Pair) -> np.ndarray:
    """After a sync, the final paused epoch carries every page sent in later rounds."""
    return np.arange(N_PAGES, dtype=np.int64)[:40]


def test_sync_then_epochs_make_the_secondary_equal_the_primary() -> None:
    pair = Pair()
    pair.sync()
    e1 = pair.epoch(full_first_epoch(pair))
    pair.flush()
    assert pair.released == [e1] and pair.acks_sent == [e1]
    assert any(isinstance(a, SyncComplete) for a in pair.events)
    for _ in range(5):
        e = pair.epoch()
        pair.flush()
        assert pair.released[-1] == e
    assert pair.primary.protected and pair.secondary.state is SecondaryState.READY
    assert image_digest(pair.s_mem) == image_digest(pair.p_ram)


def test_epoch_pages_arriving_before_begin_and_before_sync_end_are_kept() -> None:
    pair = Pair(channels=3)
    pair.sync()
    e1 = pair.epoch(np.arange(0, 30, dtype=np.int64))
    # Data channels first (in reverse), control last: the epoch still commits once complete.
    for i in reversed(range(3)):
        pair.deliver("p", data_channel(i))
    assert pair.commits == []
    pair.deliver("p", CONTROL)
    pair.flush()
    assert pair.released == [e1]


def test_corrupted_data_frame_is_nacked_resent_and_never_half_applied() -> None:
    pair = Pair()
    pair.sync()
    pair.epoch(np.arange(40, dtype=np.int64))
    pair.flush()
    committed = image_digest(pair.s_mem)
    e2 = pair.epoch(np.arange(0, 32, dtype=np.int64))
    bad = corrupt_first_batch(pair)
    pair.deliver("p", bad)
    pair.deliver("p", CONTROL)
    for i in range(pair.channels):
        pair.deliver("p", data_channel(i))
    assert pair.commits == [1] and image_digest(pair.s_mem) == committed
    pair.flush()
    assert [r.attempt for r in pair.rejected] == [0]
    assert pair.rejected[0].reason is p.NackReason.CORRUPT_FRAME
    assert pair.released == [1, e2] and pair.commits == [1, e2]


def test_stale_frames_of_a_rejected_attempt_are_discarded() -> None:
    pair = Pair()
    pair.sync()
    pair.epoch(np.arange(40, dtype=np.int64))
    pair.flush()
    e2 = pair.epoch(np.arange(0, 32, dtype=np.int64))
    bad = corrupt_first_batch(pair)
    other = data_channel(1 - bad.index)
    # Half of the other channel's first attempt is in flight when the corruption is found.
    pair.deliver("p", other, p.HEADER_SIZE + p.PAGES_META.size + 64 + 3000)
    pair.deliver("p", bad)
    pair.deliver("p", CONTROL)
    pair.deliver("s", CONTROL)  # the NACK reaches the primary, which re-sends attempt 1
    assert pair.primary.state is PrimaryState.CHECKPOINTING
    pair.flush()  # the other channel now carries the rest of attempt 0, then attempt 1
    assert pair.released[-1] == e2 and len(pair.rejected) == 1


def test_digest_mismatch_is_rejected() -> None:
    pair = Pair()
    pair.sync()
    pair.epoch(np.arange(40, dtype=np.int64))
    pair.flush()

    def wrong_digest(msg: p.Message) -> p.Message:
        if isinstance(msg, p.CheckpointEnd) and msg.attempt == 0:
            return dataclasses.replace(msg, digest=msg.digest ^ 1)
        return msg

    pair.tamper = wrong_digest
    e2 = pair.epoch(np.arange(0, 8, dtype=np.int64))
    pair.flush()
    assert [r.reason for r in pair.rejected] == [p.NackReason.DIGEST_MISMATCH]
    assert pair.released[-1] == e2


def test_giving_up_after_max_attempts_yanks_the_peer() -> None:
    pair = Pair()
    pair.sync()
    pair.epoch(np.arange(40, dtype=np.int64))
    pair.flush()

    def corrupt(msg: p.Message) -> p.Message:
        if isinstance(msg, p.Pages):  # new data, old hash: fails the checksum
            return dataclasses.replace(msg, data=np.zeros_like(msg.data))
        return msg

    pair.tamper = corrupt
    pair.epoch(np.arange(8, dtype=np.int64))
    pair.flush()
    assert len(pair.rejected) == 3
    assert pair.primary.state is PrimaryState.FAILED
    assert any(isinstance(a, Yank) for a in pair.events) and any(isinstance(a, PeerLost) for a in pair.events)
    assert pair.released == [1]


def test_heartbeats_flow_and_loss_is_detected_from_time_alone() -> None:
    pair = Pair()
    prim = pair.primary
    assert prim.next_deadline() == 0.0
    sent = [a for a in prim.handle_timer(0.0) if isinstance(a, Send)]
    assert isinstance(sent[0].message, p.Heartbeat) and sent[0].channel == HEARTBEAT
    assert prim.handle_timer(0.05) == []  # not due yet
    assert prim.next_deadline() == pytest.approx(0.1)
    # The secondary answers until t=0.3 and then goes silent.
    prim.receive(HEARTBEAT, p.Heartbeat(3, 1, 0), 0.3)
    acts = prim.handle_timer(0.79)
    assert not any(isinstance(a, PeerLost) for a in acts)
    acts = prim.handle_timer(0.8)
    assert [type(a) for a in acts] == [Yank, PeerLost] and prim.state is PrimaryState.FAILED
    assert prim.next_deadline() is None
    sec = pair.secondary
    assert any(isinstance(a, PeerLost) for a in sec.handle_timer(0.5))


def test_unacknowledged_epoch_times_out() -> None:
    pair = Pair()
    pair.primary.ack_timeout = 2.0
    pair.sync()
    pair.epoch(np.arange(4, dtype=np.int64))
    pair.primary.receive(HEARTBEAT, p.Heartbeat(3, 1, 0), 1.95)
    pair.primary.handle_timer(1.95)  # sends a heartbeat, next one due at 2.05
    assert pair.primary.next_deadline() == pytest.approx(2.0)
    acts = pair.primary.handle_timer(2.0)
    assert any(isinstance(a, PeerLost) and "not acknowledged" in a.reason for a in acts)


def test_promotion_drops_the_incomplete_epoch() -> None:
    pair = Pair()
    pair.sync()
    pair.epoch(np.arange(40, dtype=np.int64))
    pair.flush()
    image = image_digest(pair.s_mem)
    pair.epoch(np.arange(0, 24, dtype=np.int64))
    pair.deliver("p", data_channel(0))  # part of epoch 2 arrived, the primary dies
    acts = pair.secondary.promote(1.0)
    promoted = [a for a in acts if isinstance(a, Promoted)]
    assert promoted == [Promoted(3, 1, b"dev1")]
    assert image_digest(pair.s_mem) == image and pair.secondary.state is SecondaryState.PROMOTED
    with pytest.raises(p.LocalProtocolError):
        pair.secondary.promote(1.0)


def test_cannot_promote_without_a_committed_epoch() -> None:
    pair = Pair()
    pair.sync()
    with pytest.raises(p.LocalProtocolError, match="no epoch was ever committed"):
        pair.secondary.promote(0.0)


def test_goodbye_closes_both_sides() -> None:
    pair = Pair()
    pair.sync()
    pair.run_primary(pair.primary.close(0.0, "maintenance"))
    pair.flush()
    assert pair.secondary.state is SecondaryState.CLOSED
    assert any(isinstance(a, Closed) and "maintenance" in a.reason for a in pair.events)


def test_local_misuse_raises_local_errors() -> None:
    pair = Pair()
    with pytest.raises(p.LocalProtocolError, match="begin_epoch is not valid in state new"):
        pair.primary.begin_epoch(0.0, np.array([1]), np.zeros((1, PAGE), np.uint8), b"")
    pair.sync()
    with pytest.raises(p.LocalProtocolError, match="exceeds the secondary's cache"):
        pair.primary.begin_epoch(0.0, np.arange(49), np.zeros((49, PAGE), np.uint8), b"")
    with pytest.raises(p.LocalProtocolError, match="sorted and unique"):
        pair.primary.begin_epoch(0.0, np.array([2, 1]), np.zeros((2, PAGE), np.uint8), b"")
    assert pair.primary.state is PrimaryState.READY
    with pytest.raises(p.LocalProtocolError, match="commit_done is not valid"):
        pair.secondary.commit_done(3, 1, 0.0)


def test_peer_misbehaviour_raises_remote_errors() -> None:
    pair = Pair()
    with pytest.raises(p.RemoteProtocolError, match="ack is not valid in state new"):
        pair.primary.receive(CONTROL, p.Ack(3, 1), 0.0)
    pair.sync()
    pair.flush()
    pair.epoch(np.arange(4, dtype=np.int64))
    with pytest.raises(p.RemoteProtocolError, match="ACK for term 3 epoch 9"):
        pair.primary.receive(CONTROL, p.Ack(3, 9), 0.0)
    assert pair.primary.state is PrimaryState.CHECKPOINTING
    with pytest.raises(p.RemoteProtocolError, match="term 4"):
        pair.secondary.receive(CONTROL, p.CheckpointBegin(4, 1, 0, 2, 1), 0.0)
    with pytest.raises(p.RemoteProtocolError, match="sync_begin is not valid in state ready"):
        pair.secondary.receive(CONTROL, p.SyncBegin(3, N_PAGES), 0.0)
    with pytest.raises(p.RemoteProtocolError, match="data channel"):
        pair.secondary.receive(data_channel(0), p.Heartbeat(3, 1, 0), 0.0)
    with pytest.raises(p.RemoteProtocolError, match="CheckpointEnd on the heartbeat connection"):
        pair.secondary.receive(HEARTBEAT, p.CheckpointEnd(3, 2, 0, 0, (0, 0)), 0.0)
    with pytest.raises(p.RemoteProtocolError, match="Ack on the heartbeat connection"):
        pair.primary.receive(HEARTBEAT, p.Ack(3, 2), 0.0)


def test_frames_of_an_older_term_are_ignored() -> None:
    pair = Pair()
    pair.sync()
    assert pair.secondary.receive(CONTROL, p.CheckpointBegin(2, 7, 0, 2, 1), 0.0) == []
    assert pair.secondary.state is SecondaryState.SYNCING


# -- Hypothesis: random delivery orders and chunkings ----------------------------------------------


@given(st.data(), st.integers(1, 4), st.integers(1, 16))
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example],
)
def test_any_delivery_order_gives_the_same_committed_images(
    data: st.DataObject, channels: int, batch: int
) -> None:
    pair = Pair(channels=channels, batch=batch, seed=data.draw(st.integers(0, 1000)))
    pair.sync(rounds=data.draw(st.integers(1, 3)))
    epochs = data.draw(st.integers(1, 4))
    corrupt_next = data.draw(st.lists(st.booleans(), min_size=epochs, max_size=epochs))
    dirty_first = np.arange(N_PAGES, dtype=np.int64)[: data.draw(st.integers(0, 48))]
    for k in range(epochs):
        dirty = dirty_first if k == 0 else pair.dirty_some(data.draw(st.integers(0, 30)))
        committed_before = list(pair.commits)
        image_before = image_digest(pair.s_mem)
        e = pair.epoch(dirty)
        if corrupt_next[k] and k > 0 and len(dirty):  # a torn sync is fatal, tested elsewhere
            corrupt_first_batch(pair)
        while any(pair.wire.values()):
            live = [key for key, buf in pair.wire.items() if buf]
            src, ch = data.draw(st.sampled_from(live))
            pair.deliver(src, ch, data.draw(st.sampled_from([1 << 20, 40_000, 5000, 4096, 100, 7])))
            # Invariant: until this epoch commits, the committed image is the previous one.
            if pair.commits == committed_before and committed_before:
                assert image_digest(pair.s_mem) == image_before
        assert pair.commits[-1] == e and pair.released[-1] == e
    assert image_digest(pair.s_mem) == image_digest(pair.p_ram)


# -- Hypothesis: random event sequences straight into the secondary ------------------------------


def _events(channels: int) -> st.SearchStrategy[Callable[[SecondarySession, float], list[Action]]]:
    term = st.sampled_from([2, 3, 4])
    epoch = st.integers(0, 4)
    attempt = st.integers(0, 2)
    ch = st.integers(0, channels)
    idx = st.lists(st.integers(-1, N_PAGES), min_size=1, max_size=4).map(
        lambda v: np.array(v, dtype=np.int64)
    )

    def msg(
        m: st.SearchStrategy[p.Event],
    ) -> st.SearchStrategy[Callable[[SecondarySession, float], list[Action]]]:
        return m.map(lambda ev: lambda s, now: s.receive(CONTROL, ev, now))

    def header(kind: p.MessageType) -> st.SearchStrategy[Callable[[SecondarySession, float], list[Action]]]:
        def make(t: int, e: int, a: int, c: int, i: np.ndarray, fill: int) -> Callable[..., list[Action]]:
            def run(s: SecondarySession, now: float) -> list[Action]:
                h = p.PagesHeader(kind, t, e, a, c, i)
                dest, actions = s.pages_destination(data_channel(c), h, now)
                if dest is not None:
                    dest[:] = bytes([fill]) * len(dest)
                    return actions + s.receive(
                        data_channel(c), p.PagesComplete(kind, t, e, a, c, len(i), fill, False), now
                    )
                return actions + s.receive(
                    data_channel(c), p.PagesComplete(kind, t, e, a, c, len(i), 0, True), now
                )

            return run

        return st.builds(make, term, epoch, attempt, ch, idx, st.integers(0, 255))

    return st.one_of(
        msg(st.builds(p.SyncBegin, term, st.sampled_from([N_PAGES, 5]))),
        msg(
            st.builds(p.SyncEnd, term, st.integers(0, 3), st.lists(st.integers(0, 8), max_size=3).map(tuple))
        ),
        msg(st.builds(p.CheckpointBegin, term, epoch, attempt, st.integers(1, 3), st.integers(0, 60))),
        msg(st.builds(p.DeviceState, term, epoch, attempt, st.binary(max_size=4))),
        msg(
            st.builds(
                p.CheckpointEnd,
                term,
                epoch,
                attempt,
                st.integers(0, 2**64 - 1),
                st.lists(st.integers(0, 8), max_size=3).map(tuple),
            )
        ),
        msg(st.builds(p.Heartbeat, term, st.integers(0, 9), st.integers(0, 9))),
        header(p.MessageType.PAGES),
        header(p.MessageType.SYNC_PAGES),
        st.just(lambda s, now: s.handle_timer(now)),
        st.just(lambda s, now: s.commit_done(3, 1, now)),
    )


@given(st.lists(_events(2), max_size=40))
@settings(
    max_examples=int(os.environ.get("COLO_HYPOTHESIS_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
def test_random_event_sequences_only_raise_typed_errors(steps: list[Callable[..., list[Action]]]) -> None:
    mem = bytearray(N_PAGES * PAGE)
    cache = ColoCache(mem, capacity=16)
    sec = SecondarySession(term=3, channels=2, cache=cache, now=0.0, heartbeat_timeout=100.0)
    synced_image: str | None = None
    now = 0.0
    for step in steps:
        now += 0.01
        state_before = sec.state
        try:
            actions = step(sec, now)
        except p.ProtocolError:
            continue
        for a in actions:
            if isinstance(a, Send) and isinstance(a.message, p.Ack):
                raise AssertionError("ACK without a commit")
            if isinstance(a, CommitEpoch):
                assert state_before is not SecondaryState.COMMITTING
        # Once synced, RAM changes only through a commit, which this test
        # never performs: no page of any epoch may reach it.
        if sec.synced:
            if synced_image is None:
                synced_image = image_digest(mem)
            assert image_digest(mem) == synced_image
        assert cache.committed is None


def test_a_torn_first_sync_fails_the_session_and_asks_for_a_new_one() -> None:
    pair = Pair()
    pair.sync()
    corrupt_first_batch(pair)
    pair.flush()
    assert pair.secondary.state is SecondaryState.FAILED
    assert pair.primary.state is PrimaryState.CLOSED
    assert any(isinstance(a, Closed) and "resync" in a.reason for a in pair.events)


def test_zombie_batches_never_share_memory_with_a_resent_epoch() -> None:
    mem = bytearray(N_PAGES * PAGE)
    cache = ColoCache(mem, capacity=8)
    old = cache.reserve(0, np.array([1, 2], dtype=np.int64))  # attempt 0, still arriving
    cache.abort()  # attempt 0 rejected because of another channel
    new = cache.reserve(1, np.array([5, 6], dtype=np.int64))  # attempt 1
    new[:] = b"\x01" * len(new)
    old[:] = b"\xee" * len(old)  # the rest of attempt 0 lands in its own memory
    cache.drop(0)
    cache.land(1)
    cache.commit(3, 2, b"")
    view = page_view(mem)
    assert (view[[5, 6]] == 1).all() and not view[[1, 2]].any()


def _primary_steps() -> st.SearchStrategy[tuple[str, object]]:
    term = st.sampled_from([2, 3, 4])
    epoch = st.integers(0, 5)
    return st.one_of(
        st.tuples(st.just("ack"), st.builds(p.Ack, term, epoch)),
        st.tuples(
            st.just("nack"),
            st.builds(p.Nack, term, epoch, st.integers(0, 3), st.sampled_from(p.NackReason), st.just("x")),
        ),
        st.tuples(st.just("heartbeat"), st.builds(p.Heartbeat, term, st.integers(0, 9), epoch)),
        st.tuples(st.just("goodbye"), st.builds(p.Goodbye, st.sampled_from(p.GoodbyeReason), st.just("x"))),
        st.tuples(st.just("begin"), st.integers(0, 12)),
        st.tuples(st.just("sync"), st.integers(0, 3)),
        st.tuples(st.just("timer"), st.floats(0, 0.3)),
        st.tuples(st.just("lost"), st.just(None)),
    )


@given(st.lists(_primary_steps(), max_size=40))
@settings(max_examples=int(os.environ.get("COLO_HYPOTHESIS_EXAMPLES", "300")), deadline=None)
def test_primary_releases_output_only_for_the_acknowledged_epoch(steps: list[tuple[str, object]]) -> None:
    prim = PrimarySession(term=3, channels=2, page_count=N_PAGES, cache_pages=8, now=0.0, batch_pages=4)
    ram = np.zeros((N_PAGES, PAGE), dtype=np.uint8)
    now = 0.0
    released: list[int] = []
    for kind, arg in steps:
        inflight = prim.epoch_in_flight
        try:
            if kind == "begin":
                n = int(arg)  # type: ignore[call-overload]
                actions = prim.begin_epoch(now, np.arange(n, dtype=np.int64), ram[:n], b"d")
            elif kind == "sync":
                actions = [
                    *prim.start_sync(now),
                    *prim.sync_round(now, np.arange(int(arg), dtype=np.int64), ram),  # type: ignore[call-overload]
                    *prim.end_sync(now),
                ]
            elif kind == "timer":
                now += float(arg)  # type: ignore[arg-type]
                actions = prim.handle_timer(now)
            elif kind == "lost":
                actions = prim.channel_lost(data_channel(0), "reset", now)
            else:
                actions = prim.receive(CONTROL, arg, now)  # type: ignore[arg-type]
        except p.ProtocolError:
            continue
        for a in actions:
            if isinstance(a, ReleaseOutput):
                assert kind == "ack" and isinstance(arg, p.Ack)
                assert (arg.term, arg.epoch) == (3, inflight) == (a.term, a.epoch)
                released.append(a.epoch)
            if isinstance(a, Send) and isinstance(a.message, p.CheckpointBegin):
                assert a.message.pages <= 8  # never more than the secondary's cache
    assert released == sorted(set(released))  # each epoch once, in order


def _mid_frame(pair: Pair, ch: Channel) -> None:
    """Deliver the header and part of the page data of the first frame waiting on `ch`."""
    pair.deliver("p", ch, p.HEADER_SIZE + p.PAGES_META.size + 8 * pair.primary.batch_pages + 1000)


@pytest.mark.parametrize("mode", list(CacheMode), ids=lambda m: m.value)
@pytest.mark.parametrize(
    "ending",
    ["connection lost", "heartbeat timeout", "goodbye", "promotion"],
)
def test_a_pairing_broken_mid_frame_leaves_the_cache_as_it_found_it(mode: CacheMode, ending: str) -> None:
    """A batch reserved by a pairing that ends mid-frame is released: the next
    pairing syncs (once it could not, forever: "channel 0 already has a batch
    outstanding")."""
    pair = Pair(mode=mode, capacity=N_PAGES if mode is CacheMode.LOCKSTEP else 48)
    pair.sync()
    pair.epoch(full_first_epoch(pair))
    pair.flush()
    image, device_state = image_digest(pair.s_mem), pair.cache.device_state
    pair.epoch(np.arange(0, 32, dtype=np.int64))
    for i in range(pair.channels):
        _mid_frame(pair, data_channel(i))
    assert pair.cache.outstanding() == pair.channels
    sec = pair.secondary
    if ending == "connection lost":
        sec.channel_lost(data_channel(0), "connection closed in the middle of a frame", pair.now)
    elif ending == "heartbeat timeout":
        sec.handle_timer(pair.now + 10.0)
    elif ending == "goodbye":
        pair.deliver("p", CONTROL)
        sec.receive(CONTROL, p.Goodbye(p.GoodbyeReason.SHUTDOWN, "bye"), pair.now)
    else:
        sec.promote(pair.now)
    assert sec.state in (SecondaryState.FAILED, SecondaryState.CLOSED, SecondaryState.PROMOTED)
    # The last acknowledged image is intact and nothing stays reserved.
    assert image_digest(pair.s_mem) == image and pair.cache.device_state == device_state
    assert pair.cache.committed is not None and pair.cache.committed.epoch == (3, 1)
    assert pair.cache.outstanding() == 0
    for i in range(pair.channels):
        pair.cache.reserve(i, np.array([7 + i], dtype=np.int64))
        pair.cache.drop(i)
    pair.cache.abort()

    # A new pairing on the same cache syncs and commits.
    again = Pair(mode=mode, seed=1, after=pair)
    again.sync()
    e1 = again.epoch(full_first_epoch(again))
    again.flush()
    assert again.released == [e1] and again.secondary.state is SecondaryState.READY
    assert image_digest(again.s_mem) == image_digest(again.p_ram)


@pytest.mark.parametrize("mode", list(CacheMode), ids=lambda m: m.value)
def test_a_pairing_broken_mid_sync_frame_lets_the_next_pairing_sync(mode: CacheMode) -> None:
    pair = Pair(mode=mode, capacity=N_PAGES if mode is CacheMode.LOCKSTEP else 48)
    pair.sync()
    pair.deliver("p", CONTROL)
    _mid_frame(pair, data_channel(0))
    assert pair.cache.outstanding() == 1
    pair.secondary.channel_lost(data_channel(0), "connection closed in the middle of a frame", pair.now)
    assert pair.secondary.state is SecondaryState.FAILED
    assert pair.cache.outstanding() == 0

    again = Pair(mode=mode, seed=2, after=pair)
    again.sync()
    e1 = again.epoch(full_first_epoch(again))
    again.flush()
    assert again.released == [e1]
    assert image_digest(again.s_mem) == image_digest(again.p_ram)
