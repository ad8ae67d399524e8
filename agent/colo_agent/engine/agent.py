"""The agent: one guest, one role at a time, and the control API.

A primary runs its guest, serves clients through the bridge, holds the
arbiter and streams checkpoints to whichever secondary joins. A secondary
keeps the committed image (its paused guest's RAM) and the device state of
the last committed epoch; promotion takes the arbiter with a higher term,
drops the epoch in flight, resumes the guest from that image and turns the
agent into a primary that waits for a new secondary.

Output rules (checkpoint mode): while a secondary is paired, output the
guest produced before a pause is released only once the epoch closed by
that pause is acknowledged. Without a secondary the guest runs unprotected
and output leaves at once. Either way nothing leaves unless the arbiter's
lease is valid by this agent's own clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from colo_agent.api.metrics import AgentMetrics
from colo_agent.api.models import (
    AgentStatus,
    ArbiterConflict,
    CheckpointCause,
    CheckpointFigures,
    CheckpointResult,
    DemoteResult,
    GuestStatus,
    LockstepFigures,
    NotReady,
    PeerState,
    PeerStatus,
    PromoteResult,
    ReplicationMode,
    Role,
    StaleTerm,
    Unavailable,
    WrongRole,
)
from colo_agent.api.server import arbiter_refusals
from colo_agent.arbiter.base import Arbiter, ArbiterError
from colo_agent.bridge import ClientBridge
from colo_agent.engine.compare import Cause, Mark, OutputComparator, Release
from colo_agent.engine.lockstep import OutputOffsets, PrimaryMirror, SecondaryMirror
from colo_agent.engine.output import OutputChunk, OutputGate
from colo_agent.engine.pacing import CheckpointPacer
from colo_agent.guest import Capabilities, Guest, MirroredNic
from colo_agent.replication.cache import (
    CacheMode,
    ColoCache,
    StagingBuffer,
    default_capacity,
    image_digest,
    page_view,
)
from colo_agent.replication.handshake import AuthRefused
from colo_agent.replication.mirror import pack_state, unpack_state
from colo_agent.replication.protocol import RemoteProtocolError
from colo_agent.replication.session import CommitEpoch
from colo_agent.replication.transport import CheckpointReceiver, CheckpointSender, PeerLostError

log = logging.getLogger(__name__)

# How long a promotion may wait for the old primary's lease to run out.
PROMOTE_TIMEOUT_LEASES = 3.0
# A starting primary retries reading the arbiter this long, this often.
STARTUP_ARBITER_TIMEOUT = 30.0
STARTUP_ARBITER_RETRY = 0.5
# While the epoch floor waits to be written, the renewal task retries this often.
FLOOR_RETRY = 0.05
# How long POST /v1/checkpoint waits for the acknowledgement.
CHECKPOINT_TIMEOUT = 10.0
# A new secondary is retried this often after a failed pairing.
PAIR_RETRY = 0.5


@dataclass(frozen=True)
class AgentSettings:
    vm: str
    identity: str
    role: Role
    mode: ReplicationMode
    interval: float
    channels: int
    listen_host: str
    replication_port: int
    peer: tuple[str, int] | None
    secret: bytes
    heartbeat_interval: float
    heartbeat_timeout: float
    client_host: str
    client_port: int
    # Log a digest of the whole image at every pause (primary) and commit
    # (secondary), for tests that check the two are equal. Costs a hash of
    # all of RAM inside the pause.
    debug_digests: bool = False
    # Lockstep: unmatched output older than this, or more of it than
    # max_queue bytes, forces a checkpoint.
    compare_timeout: float = 0.1
    max_queue: int = 1 << 20

    @property
    def lockstep(self) -> bool:
        return self.mode is ReplicationMode.LOCKSTEP


class Agent:
    """Implements `colo_agent.api.server.AgentController`."""

    def __init__(self, settings: AgentSettings, guest: Guest, arbiter: Arbiter,
                 registry: CollectorRegistry) -> None:
        caps = Capabilities.of(guest)
        if caps.pages is None or caps.clients is None:
            raise ValueError("the backend replicates itself (a migration stream); "
                             "this engine replicates page-log backends only")
        if settings.lockstep and caps.mirror is None:
            raise ValueError("lockstep mode needs a backend with a mirrored NIC")
        self.settings = settings
        self.guest = guest
        self.pages = caps.pages
        self.clients = caps.clients
        self._mirror_nic = caps.mirror
        self.arbiter = arbiter
        self.metrics = AgentMetrics(registry)
        self.metrics.describe(vm=settings.vm, identity=settings.identity, mode=settings.mode.value,
                              accel=guest.accelerator)
        self.role = settings.role
        self.ram_pages = page_view(self.pages.ram)
        self.gate = OutputGate()
        self.bridge: ClientBridge | None = None
        self.stopping = asyncio.Event()
        self.failed: str | None = None
        # Primary
        self.sender: CheckpointSender | None = None
        self.protected = False
        self.last_acked_epoch = 0
        self.last_checkpoint: CheckpointFigures | None = None
        self._checkpoint_now = asyncio.Event()
        self._checkpoint_cause: CheckpointCause | None = None
        self._demoting = False
        # Lockstep: output offsets per connection (vCPU thread), the mirror of
        # the current pairing, and whether output goes through the comparator.
        self.offsets = OutputOffsets()
        self.mirror: PrimaryMirror | None = None
        self._lockstep_active = False
        # Epoch floor (see `_unprotect`): wanted value for the renewal task, and
        # whether output may leave while no secondary is paired.
        self._floor_wanted = 0
        self._floor_ok = True
        self._floor_raised = asyncio.Event()
        self._checkpoint_done = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        # Secondary
        self.cache: ColoCache | None = None
        self.receiver: CheckpointReceiver | None = None
        self.sec_mirror: SecondaryMirror | None = None
        self._peer_lost: str | None = None
        self._guest_started = False
        self._releasing = True

    @property
    def mirrored_nic(self) -> MirroredNic:
        if self._mirror_nic is None:  # refused at start in lockstep mode
            raise RuntimeError("the backend has no mirrored NIC")
        return self._mirror_nic

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Serve in the configured role until `stop()`; failures end it with `failed` set."""
        self._loop = asyncio.get_running_loop()
        self._release_event = asyncio.Event()
        if self.role is Role.PRIMARY:
            term = await self._first_term()
            await self._become_primary(term, boot=True)
        else:
            await self._become_secondary()
        await self.stopping.wait()

    def stop(self) -> None:
        self.stopping.set()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.sender is not None:
            await self.sender.close()
        if self.receiver is not None:
            await self.receiver.close()
        if self.bridge is not None:
            await self.bridge.close()
        await asyncio.to_thread(self.guest.stop)
        with contextlib.suppress(Exception):
            await self.arbiter.close()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                exc = t.exception()
                log.error("%s failed: %r", name, exc, exc_info=exc)
                self.failed = f"{name}: {exc}"
                self.stopping.set()

        task.add_done_callback(done)

    # ------------------------------------------------------------------ primary

    async def _first_term(self) -> int:
        """A fresh primary takes the term after the highest recorded one.

        The store may be slow or briefly unreachable (an API server under
        load): reading it is retried for a while rather than failing the pod."""
        deadline = time.monotonic() + STARTUP_ARBITER_TIMEOUT
        while True:
            try:
                await self.arbiter.observe()
                break
            except ArbiterError as exc:
                if time.monotonic() >= deadline:
                    raise
                log.warning("cannot read the arbiter yet (%s); retrying", exc)
                await asyncio.sleep(STARTUP_ARBITER_RETRY)
        term = self.arbiter.term + 1
        timeout = PROMOTE_TIMEOUT_LEASES * self.arbiter.lease_duration
        if not await self.arbiter.wait_acquire(term, timeout):
            raise RuntimeError(f"could not take the arbiter with term {term} within {timeout:.1f} s "
                               f"(held by {self.arbiter.holder})")
        return term

    async def _become_primary(self, term: int, *, boot: bool) -> None:
        self.role = Role.PRIMARY
        self.metrics.set_role(Role.PRIMARY, term)
        self.metrics.new_term(term)
        self._releasing = True
        self.protected = False
        self.clients.set_output_callback(self._on_output)
        self.bridge = ClientBridge(self.clients, output_sink=self._on_output)
        if boot:
            self.guest.start()
            self._guest_started = True
        await self.bridge.start(self.settings.client_host, self.settings.client_port)
        log.info("primary of term %d serving clients on %s:%d", term, self.settings.client_host,
                 self.bridge.port)
        self._spawn(self._renew_lease(), "lease renewal")
        self._spawn(self._release_loop(), "output release")
        self._spawn(self._accept_secondaries(term), "replication")

    def _on_output(self, conn_id: int, data: bytes, closed: bool) -> None:
        """Guest output, in the vCPU thread."""
        if self.settings.lockstep:
            self.offsets.advance(conn_id, len(data), closed)
            if self._lockstep_active:
                # Flipped only while the guest is paused, so no chunk changes path mid-stream.
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(self._lockstep_output, conn_id, data, closed)
                return
        self.gate.hold(conn_id, data, closed)
        if not self.protected:
            self._wake_release()

    def _wake_release(self) -> None:
        loop = self._loop
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._release_event.set)

    async def _release_loop(self) -> None:
        """Unprotected output leaves as soon as it exists (lease permitting)."""
        while True:
            await self._release_event.wait()
            self._release_event.clear()
            if not self.protected and self._floor_ok:
                self._release(self.gate.release_all())

    def _lockstep_output(self, conn_id: int, data: bytes, closed: bool) -> None:
        mirror = self.mirror
        if mirror is not None:
            mirror.primary_output(conn_id, data, closed)
        else:
            # No secondary: through the gate, which the release loop empties
            # once the epoch floor allows (`_unprotect`).
            self.gate.hold(conn_id, data, closed)
            self._release_event.set()

    def _deliver_releases(self, releases: list[Release]) -> None:
        if not releases:
            return
        if not (self._releasing and self.arbiter.is_valid()):
            log.warning("lease not valid: dropping %d chunks of output", len(releases))
            return
        bridge = self.bridge
        assert bridge is not None
        for r in releases:
            bridge.deliver(r.conn, r.data, r.closed)
            self.metrics.lockstep_released(len(r.data), on_match=r.on_match)

    def _request_checkpoint(self, cause: Cause) -> None:
        if self._checkpoint_cause is None:
            self._checkpoint_cause = CheckpointCause(cause.value)
        self._checkpoint_now.set()

    def _release(self, chunks: list[OutputChunk]) -> None:
        if not chunks:
            return
        if not (self._releasing and self.arbiter.is_valid()):
            # Fenced: what the guest said is never shown, by this agent at least.
            log.warning("lease not valid: dropping %d chunks of output", len(chunks))
            self.metrics.set_lease_valid(False)
            return
        bridge = self.bridge
        assert bridge is not None
        for c in chunks:
            bridge.deliver(c.conn_id, c.data, c.closed)
        self.metrics.set_output_held(self.gate.held_bytes)

    async def _renew_lease(self) -> None:
        """The one task that writes the arbiter while primary: renewals, and the epoch
        floor when the secondary is lost (`_unprotect` asks for it)."""
        while True:
            wanted = self._floor_wanted
            if wanted and await self.arbiter.raise_floor(wanted):
                self._floor_wanted = 0
                self._floor_raised.set()
                ok = True
            else:
                ok = await self.arbiter.renew()
            self.metrics.set_lease_valid(self.arbiter.is_valid())
            if not self.arbiter.holding and not self._demoting:
                log.error("lost the arbiter: another agent took over; stopping the guest")
                self._releasing = False
                self.failed = "fenced: the arbiter was taken by another agent"
                self.stopping.set()
                return
            if not ok:
                log.warning("lease renewal failed; output stops if it stays so")
            if self._floor_wanted:
                await asyncio.sleep(min(FLOOR_RETRY, self.arbiter.renew_interval))
            else:
                await asyncio.sleep(self.arbiter.renew_interval)

    async def _accept_secondaries(self, term: int) -> None:
        """Listen on the replication port; protect the guest with whichever secondary dials in.

        One secondary at a time: while one is paired, others wait in the
        listen backlog. When a pairing ends the guest runs unprotected until
        the next secondary has synced.
        """
        s = self.settings
        listener = socket.create_server((s.listen_host, s.replication_port), backlog=64, reuse_port=False)
        listener.setblocking(False)
        log.info("waiting for a secondary on %s:%d", s.listen_host, listener.getsockname()[1])
        try:
            while True:
                try:
                    sender = await CheckpointSender.accept(
                        listener, secret=s.secret, vm=s.vm, term=term, page_count=self.pages.page_count,
                        channels=s.channels, heartbeat_interval=s.heartbeat_interval,
                        heartbeat_timeout=s.heartbeat_timeout,
                        first_epoch=self.last_acked_epoch + 1, mirror=s.lockstep,
                    )
                except (OSError, AuthRefused, RemoteProtocolError, TimeoutError) as exc:
                    log.warning("a secondary failed to pair: %s", exc)
                    await asyncio.sleep(PAIR_RETRY)
                    continue
                try:
                    await self._protect(sender)
                except PeerLostError as exc:
                    await self._unprotect(str(exc))
                finally:
                    await sender.close()
                    await self._drop_mirror()
                    self.sender = None
        finally:
            listener.close()

    async def _protect(self, sender: CheckpointSender) -> None:
        """First sync of a joined secondary, then epochs until the pairing ends."""
        self.sender = sender
        self.metrics.set_peer(up=True, synced=False)
        m = self.guest
        if self.settings.lockstep:
            if sender.mirror is None:
                raise PeerLostError("lockstep mode, but the secondary opened no mirror connection")
            comparator = OutputComparator(self.settings.compare_timeout, self.settings.max_queue)
            self.mirror = PrimaryMirror(self.mirrored_nic, sender.mirror, sender.term, comparator,
                                        self._deliver_releases, self._request_checkpoint)
        rounds = await sender.sync(self.ram_pages, self.pages.collect_dirty)
        log.info("first sync: %d pre-copy rounds", rounds)
        staging = StagingBuffer(sender.cache_pages)
        pacer = CheckpointPacer(self.settings.interval, sender.cache_pages)
        carry = sender.take_sync_remainder()
        last_resume = time.monotonic()
        last_stream = 0.0
        cause = CheckpointCause.INITIAL_SYNC
        while True:
            # ---- the pause: bounded by a memory copy of the dirty set
            t0 = time.monotonic()
            keep_paused = self._demoting
            hold = not keep_paused and pacer.hold_during_stream(last_stream)
            # Inline, not in a thread: the pause is bounded by a vCPU kick, and a
            # thread hop would add its own latency to the pause.
            m.pause()
            try:
                dirty = self.pages.collect_dirty()
                if len(carry):
                    dirty = np.union1d(dirty, carry)
                    carry = carry[:0]
                if not pacer.fits(len(dirty)):
                    raise PeerLostError(
                        f"{len(dirty)} dirty pages exceed the secondary's cache of {sender.cache_pages}; "
                        "re-syncing")
                staged = staging.stage(self.ram_pages, dirty)
                device_state = self.pages.save_device_state()
                offsets: dict[int, tuple[int, bool]] = {}
                if self.settings.lockstep:
                    offsets = self.offsets.snapshot()
                    device_state = pack_state(device_state, offsets)
                    self._lockstep_active = True
                digest = image_digest(self.ram_pages) if self.settings.debug_digests else None
                sealed = self.gate.seal()
                # From the first epoch on, output waits for acknowledgements.
                self.protected = True
            except BaseException:
                if not keep_paused:
                    m.resume()
                raise
            if not (keep_paused or hold):
                m.resume()
            t1 = time.monotonic()
            pacer.observe(len(dirty), t0 - last_resume)
            # ---- the stream
            try:
                result = await sender.send_epoch(dirty, staged, device_state)
            finally:
                if hold:
                    m.resume()
                    log.debug("guest held during the epoch stream (%.0f pages/s; auto-converge)", pacer.rate)
            last_resume = time.monotonic() if hold else t1
            last_stream = time.monotonic() - t1
            if digest is not None:
                log.info("epoch-digest term=%d epoch=%d ram=%s", result.term, result.epoch, digest)
            self._release(self.gate.release_through(sealed))
            if self.mirror is not None:
                self.mirror.acknowledged(Mark(result.epoch, offsets))
                if self.mirror.failed:
                    raise PeerLostError(self.mirror.failed)
                self.metrics.set_output_held(self.mirror.comparator.pending_bytes)
            self.last_acked_epoch = result.epoch
            figures = CheckpointFigures(
                epoch=result.epoch, pause_ms=(t1 - t0) * 1e3, pages=result.pages, bytes=result.nbytes,
                duration_ms=(time.monotonic() - t0) * 1e3, cause=cause.value,
            )
            self.last_checkpoint = figures
            self.metrics.checkpoint_acknowledged(figures)
            self.metrics.set_peer(up=True, synced=True)
            if keep_paused:
                await self._step_down()
            async with self._checkpoint_done:
                self._checkpoint_done.notify_all()
            if keep_paused:
                return
            # ---- wait for the next trigger
            pace = pacer.next_wait()
            cause = CheckpointCause.DIRTY_THRESHOLD if pace < pacer.interval else CheckpointCause.INTERVAL
            wait = pace - (time.monotonic() - t0)
            if not self._checkpoint_now.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._checkpoint_now.wait(), max(0.0, wait))
            if self._checkpoint_now.is_set():
                cause = self._checkpoint_cause or CheckpointCause.REQUESTED
            self._checkpoint_now.clear()
            self._checkpoint_cause = None

    async def _step_down(self) -> None:
        """Planned switchover: the guest stays paused at the final acknowledged epoch, this agent
        never releases output again, and the lease is freed so the secondary can take it at once."""
        self._releasing = False
        for task in list(self._tasks):
            if task.get_name() == "lease renewal":
                task.cancel()
        await self.arbiter.release()
        log.info("stepped down after epoch %d; the secondary may take over", self.last_acked_epoch)

    async def _unprotect(self, reason: str) -> None:
        """The secondary is gone; the guest goes on unprotected.

        The secondary may be alive, only cut off, and still hold its image: if
        this primary then lost the lease too, a promotion would resume from
        that image and lose whatever was released meanwhile. So before any
        output leaves without the secondary, the epoch floor is written into
        the arbiter: an image older than it can no longer be promoted. Until
        the floor is written (a primary cut off from the store too), output is
        held, and dropped if the lease runs out first.
        """
        log.warning("running unprotected: %s", reason)
        was_protected = self.protected
        self.protected = False
        self.sender = None
        self.metrics.set_peer(up=False, synced=False)
        mirror, self.mirror = self.mirror, None
        held = mirror.comparator.release_all() if mirror is not None else []
        if was_protected:
            self._floor_ok = False
            self._floor_raised.clear()
            self._floor_wanted = self.last_acked_epoch + 1
            await self._floor_raised.wait()
            self._floor_ok = True
        # Oldest first: what the comparator held, then the gate.
        self._deliver_releases(held)
        self._release(self.gate.release_all())
        if mirror is not None:
            await mirror.close()

    async def _drop_mirror(self) -> None:
        mirror, self.mirror = self.mirror, None
        if mirror is None:
            return
        # Synchronously, before any newer output can be delivered directly.
        self._deliver_releases(mirror.comparator.release_all())
        await mirror.close()

    # ------------------------------------------------------------------ secondary

    async def _become_secondary(self) -> None:
        self.role = Role.SECONDARY
        self.metrics.set_role(Role.SECONDARY, 0)
        self._new_receiver()
        self._spawn(self.arbiter.keep_observing(), "arbiter observation")
        await self._join_primary()

    def _new_receiver(self) -> None:
        mode = CacheMode.LOCKSTEP if self.settings.lockstep else CacheMode.CHECKPOINT
        cache = ColoCache(self.pages.ram, mode=mode, capacity=default_capacity(self.pages.page_count))
        self.cache = cache
        self.last_acked_epoch = 0
        self.receiver = CheckpointReceiver(
            cache, secret=self.settings.secret, vm=self.settings.vm, term=self.arbiter.term,
            heartbeat_interval=self.settings.heartbeat_interval,
            heartbeat_timeout=self.settings.heartbeat_timeout,
            on_commit=self._on_commit,
        )

    async def _join_primary(self) -> None:
        """Dial the primary and follow it; after a lost pairing, dial again while its lease lives.

        A pairing that ends leaves the committed image in place for a
        promotion. Dialling again starts a new first sync, which writes
        straight into RAM: the old image is then gone until the new sync
        commits, so a secondary only re-joins a primary that still renews
        its lease (if it stopped, a promotion is coming instead).
        """
        assert self.settings.peer is not None
        host, port = self.settings.peer
        self._spawn(self._follow(host, port), "replication")

    async def _follow(self, host: str, port: int) -> None:
        first = True
        while self.role is Role.SECONDARY:
            receiver = self.receiver
            assert receiver is not None
            if not first:
                if self.arbiter.acquirable_at() <= time.monotonic():
                    # Not re-joining while it looks dead; but a primary that was
                    # only slow renews again, and then it is joined again.
                    log.info("the primary's lease ran out: not re-joining until it renews, "
                             "or promotion")  # fmt: skip
                    while self.role is Role.SECONDARY and self.arbiter.acquirable_at() <= time.monotonic():
                        await asyncio.sleep(PAIR_RETRY)
                    if self.role is not Role.SECONDARY or self.receiver is not receiver:
                        return
                    log.info("the primary renewed its lease: joining it again")
                if self._guest_started:
                    # Lockstep: a new first sync rewrites RAM under the guest; hold it still.
                    self.guest.pause()
            # The same receiver dials again: its cache (the committed image) is
            # only reset once a new pairing is authenticated, so a dead primary
            # that cannot be reached never costs the image a promotion needs.
            try:
                await receiver.dial(host, port, mirror=self.settings.lockstep)
                if self.settings.lockstep:
                    assert receiver.mirror is not None
                    self.sec_mirror = SecondaryMirror(self.mirrored_nic, self.clients, receiver.mirror)
            except (OSError, AuthRefused, RemoteProtocolError, TimeoutError) as exc:
                log.warning("cannot pair with the primary at %s:%d: %s", host, port, exc)
                await asyncio.sleep(PAIR_RETRY)
                continue
            first = False
            self._peer_lost = None
            reason = await receiver.wait_lost()
            if self.role is not Role.SECONDARY or self.receiver is not receiver:
                return  # promoted meanwhile
            if self.sec_mirror is not None:
                await self.sec_mirror.close()
                self.sec_mirror = None
            log.warning("pairing with the primary ended: %s", reason)
            self._peer_lost = reason
            promotable = self.cache is not None and self.cache.committed is not None
            self.metrics.set_peer(up=False, synced=promotable)
            await asyncio.sleep(PAIR_RETRY)

    def _on_commit(self, commit: CommitEpoch) -> None:
        assert self.cache is not None
        if self.settings.lockstep:
            self._commit_lockstep(commit)
        else:
            self.cache.commit(commit.term, commit.epoch, commit.device_state)
        self.last_acked_epoch = commit.epoch
        if self.settings.debug_digests:
            log.info("epoch-digest term=%d epoch=%d ram=%s", commit.term, commit.epoch,
                     image_digest(self.cache.ram))
        self.metrics.set_peer(up=True, synced=True)

    def _commit_lockstep(self, commit: CommitEpoch) -> None:
        """Pause our running guest, overwrite what either side changed with the primary's pages,
        take its device state, and let the guest go on from exactly the primary's pause."""
        assert self.cache is not None and self.sec_mirror is not None
        machine_state, offsets = unpack_state(commit.device_state)
        m = self.guest
        local = np.empty(0, dtype=np.int64)
        if self._guest_started:
            m.pause()
            local = self.pages.collect_dirty()
        self.cache.commit(commit.term, commit.epoch, commit.device_state, local)
        self.pages.load_device_state(machine_state, keep_connections=True)
        self.sec_mirror.committed(commit.epoch, offsets)
        if self._guest_started:
            m.resume()
        else:
            m.start()
            self._guest_started = True

    # ------------------------------------------------------------------ control API

    def status(self) -> AgentStatus:
        now = time.monotonic()
        if self.role is Role.PRIMARY:
            sender = self.sender
            if sender is None:
                peer = PeerStatus(PeerState.NONE)
            else:
                state = PeerState.CONNECTED if self.protected else PeerState.SYNCING
                heard_ms = max(0.0, (now - sender.session.last_heard) * 1e3)
                peer = PeerStatus(state, last_heartbeat_age_ms=heard_ms)
            synced = self.protected
        else:
            # Promotable: a committed image exists (a re-sync in progress has none).
            synced = self.cache is not None and self.cache.committed is not None
            session = self.receiver.session if self.receiver is not None else None
            age: float | None = None if session is None else max(0.0, (now - session.last_heard) * 1e3)
            if self._peer_lost is not None or session is None:
                state = PeerState.LOST if self._peer_lost is not None else PeerState.NONE
            else:
                state = PeerState.CONNECTED if synced else PeerState.SYNCING
            peer = PeerStatus(state, address=self._peer_address(), last_heartbeat_age_ms=age)
        m = self.guest
        lockstep = None
        if self.settings.lockstep and self.role is Role.PRIMARY:
            on_match, on_ack = self.metrics.released_bytes
            queue = self.mirror.comparator.pending_bytes if self.mirror is not None else 0
            lockstep = LockstepFigures(on_match, on_ack, queue)
        return AgentStatus(
            role=self.role,
            term=self.arbiter.term,
            last_acked_epoch=self.last_acked_epoch,
            mode=self.settings.mode,
            peer=peer,
            guest=GuestStatus(state="running" if m.running else "paused", accel=m.accelerator,
                              memory_bytes=m.ram_size),
            totals=self.metrics.totals(),
            last_checkpoint=self.last_checkpoint,
            synced=synced,
            lockstep=lockstep,
            ack_age_ms=self.metrics.ack_age_ms(),
        )

    def _peer_address(self) -> str | None:
        peer = self.settings.peer
        return None if peer is None else f"{peer[0]}:{peer[1]}"

    def ready(self) -> bool:
        if self.role is Role.PRIMARY:
            return self.bridge is not None and self.arbiter.is_valid()
        return self.status().synced

    async def promote(self, term: int) -> PromoteResult:
        if self.role is Role.PRIMARY:
            if term == self.arbiter.term:
                return PromoteResult(role=Role.PRIMARY, term=term, resumed_from_epoch=self.last_acked_epoch)
            raise WrongRole("this agent is already the primary")
        if term <= self.arbiter.term:
            raise StaleTerm(f"term {term} is not above the recorded term {self.arbiter.term}")
        receiver = self.receiver
        if receiver is None or self.cache is None or self.cache.committed is None:
            raise NotReady("no epoch committed yet: this secondary has nothing to resume from")
        timeout = PROMOTE_TIMEOUT_LEASES * self.arbiter.lease_duration
        image = self.cache.committed.epoch  # (term, epoch) this secondary would resume from
        with arbiter_refusals():
            taken = await self.arbiter.wait_acquire(term, timeout, image=image)
        if not taken:
            raise ArbiterConflict(f"the arbiter is still held by {self.arbiter.holder}; "
                                  f"its lease did not run out within {timeout:.1f} s")
        promoted = receiver.promote()
        await receiver.close()
        self.receiver = None
        self.last_acked_epoch = 0
        self.metrics.failed_over()
        if self.settings.lockstep:
            # The guest goes on from where it is: it executed every input whose
            # output was released on match, so rolling it back would lose writes.
            log.info("promoted with term %d; lockstep guest continues (last commit: epoch %d of term %d)",
                     term, promoted.epoch, promoted.term)
            if self.sec_mirror is not None:
                await self.sec_mirror.close()
                self.sec_mirror = None
            nic = self.mirrored_nic
            nic.disable_rx_mirror()
            for conn in nic.open_connections:
                self.clients.close_connection(conn)  # the old primary's clients are gone
            self.offsets.reset({})
            self.guest.resume()
            await self._become_primary(term, boot=False)
        else:
            log.info("promoted with term %d from epoch %d of term %d", term, promoted.epoch, promoted.term)
            self.pages.load_device_state(promoted.device_state)
            await self._become_primary(term, boot=True)
        return PromoteResult(role=Role.PRIMARY, term=term, resumed_from_epoch=promoted.epoch)

    async def checkpoint(self) -> CheckpointResult:
        if self.role is not Role.PRIMARY:
            raise WrongRole("only a primary takes checkpoints")
        if not self.protected:
            raise NotReady("no synced secondary: there is nothing to checkpoint to")
        target = self.last_acked_epoch + 1
        self._checkpoint_now.set()
        try:
            async with self._checkpoint_done:
                await asyncio.wait_for(
                    self._checkpoint_done.wait_for(
                        lambda: self.last_acked_epoch >= target or not self.protected),
                    timeout=CHECKPOINT_TIMEOUT)
        except TimeoutError:
            raise Unavailable(f"no checkpoint was acknowledged within {CHECKPOINT_TIMEOUT:.0f} s") from None
        if self.last_acked_epoch < target:
            raise Unavailable("the secondary was lost before the checkpoint was acknowledged")
        return CheckpointResult(term=self.arbiter.term, epoch=self.last_acked_epoch)

    async def demote(self) -> DemoteResult:
        if self.role is not Role.PRIMARY:
            raise WrongRole("only a primary can be demoted")
        if not self.protected:
            raise NotReady("no synced secondary: stepping down now would lose the guest")
        self._demoting = True
        result = await self.checkpoint()
        return DemoteResult(role=Role.PRIMARY, term=result.term, releasing=False)
