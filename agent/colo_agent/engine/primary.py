"""The primary role: run the guest, serve its clients, protect it with whichever secondary joins.

Output rules (checkpoint mode): while a secondary is paired, output the
guest produced before a pause is released only once the epoch closed by
that pause is acknowledged. Lockstep: output also leaves once the
secondary's guest produced the same bytes. Such output leaves whether or
not the lease is valid: the secondary that acknowledged (or matched) it is
the only agent that can be promoted, and it holds the state that produced
it (docs/architecture.md, "Output and the Lease"). Without a secondary the
guest runs unprotected and output leaves at once, but only under a valid
lease and once the epoch floor is written (`_unprotect`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from colo_agent.api.models import (
    CheckpointCause,
    CheckpointFigures,
    LockstepFigures,
    PeerState,
    PeerStatus,
    Role,
)
from colo_agent.bridge import ClientBridge
from colo_agent.engine.compare import Cause, Mark, OutputComparator, Release
from colo_agent.engine.lockstep import OutputOffsets, PrimaryMirror, pack_state
from colo_agent.engine.output import OutputGate
from colo_agent.engine.pacing import CheckpointPacer
from colo_agent.engine.roles import EpochFloor, Parts, RoleView, Tasks
from colo_agent.replication.cache import StagingBuffer, image_digest, page_view
from colo_agent.replication.handshake import AuthRefused
from colo_agent.replication.protocol import RemoteProtocolError
from colo_agent.replication.transport import CheckpointSender, EpochResult, Listener, PeerLostError

log = logging.getLogger(__name__)

# While the epoch floor waits to be written, the renewal task retries this often.
FLOOR_RETRY = 0.05
# A new secondary is retried this often after a failed pairing.
PAIR_RETRY = 0.5


class _Output(Protocol):
    """A piece of guest output ready to leave (`OutputChunk` or a comparator `Release`)."""

    @property
    def conn(self) -> int: ...

    @property
    def data(self) -> bytes: ...

    @property
    def closed(self) -> bool: ...


@dataclass
class _Pairing:
    """One secondary, from its first sync until the pairing ends."""

    sender: CheckpointSender
    staging: StagingBuffer
    pacer: CheckpointPacer
    carry: npt.NDArray[np.int64]  # pages the first sync left for the first epoch
    last_resume: float = field(default_factory=time.monotonic)
    last_stream: float = 0.0


@dataclass
class _Capture:
    """What one pause took from the guest, ready to stream."""

    started: float
    dirty: npt.NDArray[np.int64]
    staged: npt.NDArray[np.uint8]
    device_state: bytes
    offsets: dict[int, tuple[int, bool]]
    sealed: int  # the output epoch this pause closed
    digest: str | None
    resumed: float = 0.0


class PrimaryRole:
    def __init__(self, parts: Parts, tasks: Tasks, term: int, *, boot: bool) -> None:
        self.parts = parts
        self.boot = boot  # start the guest (else it is already running: a promoted lockstep secondary)
        self.tasks = tasks
        self.term = term
        s = parts.settings
        self.lockstep = s.lockstep
        self.ram_pages = page_view(parts.pages.ram)
        self.gate = OutputGate()
        self.bridge = ClientBridge(parts.clients, output_sink=self._on_output)
        self.sender: CheckpointSender | None = None  # the paired secondary, if any
        self.mirror: PrimaryMirror | None = None  # lockstep, while paired
        self.protected = False
        self.last_acked_epoch = 0
        # The highest epoch whose stream began, acknowledged or not: a secondary may
        # have committed it although its ACK never arrived. Epoch numbers are never
        # reused within a term, across pairings too (`_accept_secondaries`).
        self.last_sent_epoch = 0
        self.last_checkpoint: CheckpointFigures | None = None
        self.offsets = OutputOffsets()  # lockstep: output offsets per connection (vCPU thread)
        self._lockstep_active = False  # output goes through `_lockstep_output`
        self._checkpoint_now = asyncio.Event()
        self._output_waiting = False  # checkpoint mode: output of the open epoch is held
        self._trigger = asyncio.Event()  # a checkpoint request or waiting output
        self._checkpoint_cause: CheckpointCause | None = None
        self._checkpoint_done = asyncio.Condition()
        self._demoting = False
        self._releasing = True
        # Output that may leave, in order; what left alone waits for a renewal (`_release`).
        self._lease_wait: deque[tuple[_Output, bool]] = deque()
        # Epoch floor (see `_unprotect`): written by the renewal task, and
        # whether output may leave while no secondary is paired.
        self._floor = EpochFloor()
        self._floor_ok = True
        self._release_event = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._renewal: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        p, s = self.parts, self.parts.settings
        p.metrics.set_role(Role.PRIMARY, self.term)
        p.metrics.new_term(self.term)
        p.clients.set_output_callback(self._on_output)
        if self.boot:
            p.guest.start()
        await self.bridge.start(s.client_host, s.client_port)
        log.info("primary of term %d serving clients on %s:%d", self.term, s.client_host, self.bridge.port)
        self._renewal = self.tasks.spawn(self._renew_lease(), "lease renewal")
        self.tasks.spawn(self._release_loop(), "output release")
        self.tasks.spawn(self._accept_secondaries(), "replication")

    async def close(self) -> None:
        await self.tasks.cancel()
        if self.sender is not None:
            await self.sender.close()
        await self.bridge.close()

    # ------------------------------------------------------------------ output

    def _on_output(self, conn_id: int, data: bytes, closed: bool) -> None:
        """Guest output, in the vCPU thread."""
        if self.lockstep:
            offset = self.offsets.advance(conn_id, len(data), closed)
            if self._lockstep_active:
                # Flipped only while the guest is paused, so no chunk changes path mid-stream.
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(self._lockstep_output, conn_id, offset, data, closed)
                return
        first = self.gate.hold(conn_id, data, closed)
        if not self.protected:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._release_event.set)
        elif first and not self.lockstep:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._output_arrived)

    def _output_arrived(self) -> None:
        self._output_waiting = True
        self._trigger.set()

    def _lockstep_output(self, conn_id: int, offset: int, data: bytes, closed: bool) -> None:
        if self.mirror is not None and self.protected:
            self.mirror.primary_output(conn_id, offset, data, closed)
        else:
            # No secondary, or one still in its first sync: its guest runs no
            # input of ours before the first commit, so nothing could match, and
            # a checkpoint the comparator asks for waits for the sync. Through
            # the gate, as unprotected output, which the release loop empties
            # once the epoch floor allows (`_unprotect`); the comparator takes
            # over at the first epoch's pause (`protected`), and what the guest
            # produced before it and reaches us after it waits for that epoch.
            self.gate.hold(conn_id, data, closed)
            self._release_event.set()

    async def _release_loop(self) -> None:
        """Unprotected output leaves as soon as it exists (lease permitting)."""
        while True:
            await self._release_event.wait()
            self._release_event.clear()
            if not self.protected and self._floor_ok:
                self._release(self.gate.release_all(), alone=True)

    def _release(self, out: Sequence[_Output], *, alone: bool) -> None:
        """Hand output to its clients, oldest first.

        `alone`: released without a secondary that acknowledged or matched it.
        Such output needs a valid lease; acknowledged output does not (the
        module docstring says why). While the lease is not valid by our clock
        (a renewal that is late on a loaded machine or a slow store) output
        released alone waits for the next successful renewal instead of being
        dropped: a dropped reply hangs its client for good, and a renewal that
        succeeds proves nobody took the term meanwhile. Whatever follows it
        waits behind it, so no connection's output is reordered. Only a fenced
        agent drops output, never to show it.
        """
        if not self._releasing:
            if out:
                log.warning("fenced: dropping %d chunks of output", len(out))
            return
        self._lease_wait.extend((o, alone) for o in out)
        self._deliver_waiting()

    def _deliver_waiting(self) -> None:
        waiting = self._lease_wait
        lease_valid: bool | None = None
        while waiting:
            o, alone = waiting[0]
            if alone:
                if lease_valid is None:
                    lease_valid = self.parts.arbiter.is_valid()
                if not lease_valid:
                    self.parts.metrics.set_lease_valid(False)
                    break
            waiting.popleft()
            self.bridge.deliver(o.conn, o.data, o.closed)
            if isinstance(o, Release):
                self.parts.metrics.lockstep_released(len(o.data), on_match=o.on_match)
        self.parts.metrics.set_output_held(self.gate.held_bytes)

    def _release_mirrored(self, releases: list[Release], *, alone: bool = False) -> None:
        """The comparator's verdicts: matched by the secondary, or of an acknowledged epoch
        (or, `alone`, everything it held when the pairing ended)."""
        self._release(releases, alone=alone)

    # ------------------------------------------------------------------ the arbiter

    async def _renew_lease(self) -> None:
        """The one task that writes the arbiter while primary: renewals, and the epoch
        floor when the secondary is lost (`_unprotect` asks for it)."""
        arbiter, metrics = self.parts.arbiter, self.parts.metrics
        while True:
            ok = await self._floor.write_or_renew(arbiter)
            metrics.set_lease_valid(arbiter.is_valid())
            if not arbiter.holding and not self._demoting:
                log.error("lost the arbiter: another agent took over; stopping the guest")
                self._releasing = False
                if self._lease_wait:
                    log.warning("fenced: dropping %d chunks of output", len(self._lease_wait))
                    self._lease_wait.clear()
                self.tasks.fail("fenced: the arbiter was taken by another agent")
                return
            if not ok:
                log.warning("lease renewal failed; output waits while it stays so")
            elif self._lease_wait:
                self._deliver_waiting()  # what waited for this renewal
            await asyncio.sleep(min(FLOOR_RETRY, arbiter.renew_interval) if self._floor.wanted
                                else arbiter.renew_interval)

    async def _raise_floor(self) -> None:
        """Have the renewal task write the epoch floor past every epoch the lost secondary
        may hold: the last one sent, whose ACK may be all that went missing."""
        self._floor_ok = False
        await self._floor.ask(max(self.last_acked_epoch, self.last_sent_epoch) + 1)
        self._floor_ok = True

    # ------------------------------------------------------------------ pairing

    async def _accept_secondaries(self) -> None:
        """Listen on the replication port; protect the guest with whichever secondary dials in.

        One secondary at a time: while one is paired, others wait in the
        listen backlog. When a pairing ends the guest runs unprotected until
        the next secondary has synced.
        """
        s = self.parts.settings
        listener = Listener(s.listen_host, s.replication_port)
        log.info("waiting for a secondary on %s:%d", s.listen_host, listener.port)
        try:
            while True:
                try:
                    sender = await CheckpointSender.accept(
                        listener, secret=s.secret, vm=s.vm, term=self.term,
                        page_count=self.parts.pages.page_count, channels=s.channels,
                        heartbeat_interval=s.heartbeat_interval, heartbeat_timeout=s.heartbeat_timeout,
                        first_epoch=max(self.last_acked_epoch, self.last_sent_epoch) + 1,
                        mirror=s.lockstep, tls=s.tls,
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
        pairing = await self._first_sync(sender)
        cause = CheckpointCause.INITIAL_SYNC
        while True:
            keep_paused = self._demoting  # a planned switchover: this is the last epoch
            hold = not keep_paused and pairing.pacer.hold_during_stream(pairing.last_stream)
            capture = self._pause_and_capture(pairing, keep_paused=keep_paused, hold=hold)
            result = await self._stream(pairing, capture, hold=hold)
            self._acknowledged(capture, result, cause)
            if keep_paused:
                await self._step_down()
            async with self._checkpoint_done:
                self._checkpoint_done.notify_all()
            if keep_paused:
                return
            cause = await self._wait_for_trigger(pairing, capture.started)

    async def _first_sync(self, sender: CheckpointSender) -> _Pairing:
        self.sender = sender
        p = self.parts
        p.metrics.set_peer(up=True, synced=False)
        if self.lockstep:
            if sender.mirror is None:
                raise PeerLostError("lockstep mode, but the secondary opened no mirror connection")
            comparator = OutputComparator(p.settings.compare_timeout, p.settings.max_queue)
            self.mirror = PrimaryMirror(p.lockstep_nic(), sender.mirror, sender.term, comparator,
                                        self._release_mirrored, self._request_checkpoint)
        rounds = await sender.sync(self.ram_pages, p.pages.collect_dirty)
        log.info("first sync: %d pre-copy rounds", rounds)
        pacer = CheckpointPacer(p.settings.interval, sender.cache_pages)
        return _Pairing(sender, StagingBuffer(sender.cache_pages), pacer, sender.take_sync_remainder())

    def _pause_and_capture(self, pairing: _Pairing, *, keep_paused: bool, hold: bool) -> _Capture:
        """The pause: bounded by a memory copy of the dirty set.

        Inline, not in a thread: the pause is bounded by a vCPU kick, and a
        thread hop would add its own latency to the pause."""
        guest, pages = self.parts.guest, self.parts.pages
        started = time.monotonic()
        guest.pause()
        try:
            dirty = pages.collect_dirty()
            if len(pairing.carry):
                dirty = np.union1d(dirty, pairing.carry)
                pairing.carry = pairing.carry[:0]
            if not pairing.pacer.fits(len(dirty)):
                raise PeerLostError(f"{len(dirty)} dirty pages exceed the secondary's cache of "
                                    f"{pairing.sender.cache_pages}; re-syncing")
            staged = pairing.staging.stage(self.ram_pages, dirty)
            device_state = pages.save_device_state()
            offsets: dict[int, tuple[int, bool]] = {}
            if self.lockstep:
                offsets = self.offsets.snapshot()
                device_state = pack_state(device_state, offsets)
                self._lockstep_active = True
            digest = image_digest(self.ram_pages) if self.parts.settings.debug_digests else None
            sealed = self.gate.seal()
            self._output_waiting = False  # paused: nothing of the new epoch can be waiting yet
            # From the first epoch on, output waits for acknowledgements.
            self.protected = True
        except BaseException:
            if not keep_paused:
                guest.resume()
            raise
        if not (keep_paused or hold):
            guest.resume()
        capture = _Capture(started, dirty, staged, device_state, offsets, sealed, digest)
        capture.resumed = time.monotonic()
        pairing.pacer.observe(len(dirty), started - pairing.last_resume)
        return capture

    async def _stream(self, pairing: _Pairing, capture: _Capture, *, hold: bool) -> EpochResult:
        # Before the first byte leaves: from here on the secondary may commit this epoch.
        self.last_sent_epoch = max(self.last_sent_epoch, pairing.sender.next_epoch)
        try:
            result = await pairing.sender.send_epoch(capture.dirty, capture.staged, capture.device_state)
        finally:
            if hold:
                self.parts.guest.resume()
                log.debug("guest held during the epoch stream (%.0f pages/s; auto-converge)",
                          pairing.pacer.rate)
        now = time.monotonic()
        pairing.last_resume = now if hold else capture.resumed
        pairing.last_stream = now - capture.resumed
        if capture.digest is not None:
            log.info("epoch-digest term=%d epoch=%d ram=%s", result.term, result.epoch, capture.digest)
        return result

    def _acknowledged(self, capture: _Capture, result: EpochResult, cause: CheckpointCause) -> None:
        """The secondary holds the epoch: release its output, record the figures."""
        self._release(self.gate.release_through(capture.sealed), alone=False)
        metrics = self.parts.metrics
        if self.mirror is not None:
            self.mirror.acknowledged(Mark(result.epoch, capture.offsets))
            if self.mirror.failed:
                raise PeerLostError(self.mirror.failed)
            metrics.set_output_held(self.mirror.comparator.pending_bytes)
        self.last_acked_epoch = result.epoch
        figures = CheckpointFigures(
            epoch=result.epoch, pause_ms=(capture.resumed - capture.started) * 1e3, pages=result.pages,
            bytes=result.nbytes, duration_ms=(time.monotonic() - capture.started) * 1e3, cause=cause.value,
        )
        self.last_checkpoint = figures
        metrics.checkpoint_acknowledged(figures)
        metrics.set_peer(up=True, synced=True)

    async def _wait_for_trigger(self, pairing: _Pairing, started: float) -> CheckpointCause:
        """Until the next checkpoint is due; returns why it is.

        Due: on request, when the pace (interval or dirty rate) says so, or,
        checkpoint mode, once output waits (none is in flight: the last one
        was acknowledged) and the guest has run since its resume as long as
        the pause held it (`CheckpointPacer.output_wait`)."""
        pace = pairing.pacer.next_wait()
        cause = CheckpointCause.DIRTY_THRESHOLD if pace < pairing.pacer.interval else CheckpointCause.INTERVAL
        due = started + pace
        now = time.monotonic()
        resumed = pairing.last_resume
        output_at = now + pairing.pacer.output_wait(resumed - started, now - resumed)
        while True:
            now = time.monotonic()
            if self._checkpoint_now.is_set():
                cause = self._checkpoint_cause or CheckpointCause.REQUESTED
                break
            if now >= due:
                break
            if self._output_waiting and now >= output_at:
                cause = CheckpointCause.OUTPUT
                break
            # Every setter runs in this thread, so nothing is lost between the checks and the clear.
            self._trigger.clear()
            until = min(due, output_at) if self._output_waiting else due
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._trigger.wait(), until - now)
        self._checkpoint_now.clear()
        self._checkpoint_cause = None
        return cause

    def _request_checkpoint(self, cause: Cause) -> None:
        if self._checkpoint_cause is None:
            self._checkpoint_cause = CheckpointCause(cause.value)
        self._checkpoint_now.set()
        self._trigger.set()

    async def _step_down(self) -> None:
        """Planned switchover: the guest stays paused at the final acknowledged epoch, this agent
        never releases output again, and the lease is freed so the secondary can take it at once."""
        self._releasing = False
        if self._renewal is not None:
            self._renewal.cancel()
        await self.parts.arbiter.release()
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
        self.parts.metrics.set_peer(up=False, synced=False)
        mirror, self.mirror = self.mirror, None
        held = mirror.comparator.release_all() if mirror is not None else []
        if was_protected:
            await self._raise_floor()
        # Oldest first: what the gate held from before the last pause (lockstep: the
        # first epoch's, unacknowledged), then what the comparator held, then the gate.
        self._release(self.gate.release_through(self.gate.open_epoch - 1), alone=True)
        self._release_mirrored(held, alone=True)
        self._release(self.gate.release_all(), alone=True)
        if mirror is not None:
            await mirror.close()

    async def _drop_mirror(self) -> None:
        """A pairing that ended other than by losing the peer (a step-down, or an error that
        ends the agent): what the comparator still holds was neither matched nor acknowledged,
        and no epoch floor covers it, so it is dropped, never released alone. A lost peer goes
        through `_unprotect`, which writes the floor first and then releases."""
        mirror, self.mirror = self.mirror, None
        if mirror is None:
            return
        held = mirror.comparator.release_all()
        if held:
            log.warning("pairing ended: dropping %d chunks of output no secondary matched", len(held))
        await mirror.close()

    # ------------------------------------------------------------------ control API

    def view(self, now: float) -> RoleView:
        if self.sender is None:
            peer = PeerStatus(PeerState.NONE)
        else:
            state = PeerState.CONNECTED if self.protected else PeerState.SYNCING
            heard_ms = max(0.0, (now - self.sender.session.last_heard) * 1e3)
            peer = PeerStatus(state, last_heartbeat_age_ms=heard_ms)
        lockstep = None
        if self.lockstep:
            on_match, on_ack = self.parts.metrics.released_bytes
            queue = self.mirror.comparator.pending_bytes if self.mirror is not None else 0
            lockstep = LockstepFigures(on_match, on_ack, queue)
        return RoleView(Role.PRIMARY, peer, self.protected, self.last_acked_epoch, self.failover_possible(),
                        self.last_checkpoint, lockstep)

    def ready(self) -> bool:
        """Serving: protected (acknowledged output leaves without the lease) or under the lease."""
        return self.protected or self.parts.arbiter.is_valid()

    def failover_possible(self) -> bool:
        """A synced secondary exists and the arbiter answers (a renewal within the lease),
        so the secondary could take the lease if this primary died now."""
        return self.protected and self.parts.arbiter.is_valid()

    async def checkpoint(self, timeout: float) -> int | None:
        """Take a checkpoint now; the acknowledged epoch, or None if the secondary was lost first.
        TimeoutError if nothing was acknowledged within `timeout`."""
        target = self.last_acked_epoch + 1
        self._checkpoint_now.set()
        self._trigger.set()
        async with self._checkpoint_done:
            await asyncio.wait_for(
                self._checkpoint_done.wait_for(lambda: self.last_acked_epoch >= target or not self.protected),
                timeout=timeout)
        return self.last_acked_epoch if self.last_acked_epoch >= target else None

    def begin_demotion(self) -> None:
        """The next checkpoint is the last: the guest stays paused and the lease is freed."""
        self._demoting = True
