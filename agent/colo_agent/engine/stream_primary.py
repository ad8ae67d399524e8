"""The primary role for a backend that replicates itself (`MigrationStream`, QEMU's COLO).

The backend streams the checkpoints and holds the guest's output until the
secondary matched it or a checkpoint covers it (QEMU: colo-compare); the
agent pairs with a secondary over its own replication connection
(`StreamLink`), learns where to stream, starts the protection, heartbeats,
and decides what happens when the secondary is lost.

Epochs: a stream primary counts one epoch per completed protection (the
first full copy) and one per checkpoint after it, from 1 in each term. Its
heartbeats tell the secondary the count, so the secondary's image is
`(term, epoch)` as the arbiter compares it with the epoch floor.

Output and the Lease: while protected, output leaves through the backend's
comparison and needs no lease (docs/architecture.md, "Output and the
Lease"). A lost secondary may only be cut off and still hold its image, so
the epoch floor is written before the backend is told to go on alone
(`continue_alone` is what lets held output leave). Unprotected, the guest
runs only while the lease is valid by this agent's clock: it is paused when
a renewal is overdue and resumed by the next successful one; a fenced
primary stops the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from colo_agent.api.models import CheckpointFigures, PeerState, PeerStatus, Role, StreamFiguresStatus
from colo_agent.engine.roles import EpochFloor, RoleView, StreamParts, Tasks
from colo_agent.guest import StreamError, StreamFigures
from colo_agent.replication.handshake import AuthRefused
from colo_agent.replication.protocol import RemoteProtocolError
from colo_agent.replication.transport import Listener, PeerLostError, StreamLink

log = logging.getLogger(__name__)

# The backend's figures are read this often while protected.
FIGURES_INTERVAL = 0.25
# While the lease waits for a renewal or the floor for its write, the arbiter is tried this often.
ARBITER_RETRY = 0.05
# After a failed pairing, the next secondary is accepted after this pause.
PAIR_RETRY = 0.5
# A secondary's backend is ready before it dials: its STREAM_TARGET comes at once.
TARGET_TIMEOUT = 10.0


class StreamPrimaryRole:
    def __init__(self, parts: StreamParts, tasks: Tasks, term: int, *, boot: bool) -> None:
        self.parts = parts
        self.tasks = tasks
        self.term = term
        self.boot = boot  # start the guest (else it runs already: a promoted secondary)
        self.link: StreamLink | None = None
        self.protected = False
        self.epoch = 0  # see the module docstring
        self.last_checkpoint: CheckpointFigures | None = None
        self.figures: StreamFigures | None = None
        self._seen = 0  # the backend's checkpoint count already turned into epochs
        self._floor = EpochFloor()  # written by the renewal task
        self._held_for_lease = False  # the guest is paused until the lease is valid again
        self.stepped_down = False  # a planned switchover ended the guest here

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        p, s = self.parts, self.parts.settings
        p.metrics.set_role(Role.PRIMARY, self.term)
        p.metrics.new_term(self.term)
        if self.boot:
            p.guest.start()
        else:
            self.figures = await p.stream.figures()
            self._seen = self.figures.checkpoints
        await p.stream.serve(s.client_host, s.client_port)
        log.info("primary of term %d serving on %s:%d (the backend replicates itself)", self.term,
                 s.client_host, s.client_port)
        self.tasks.spawn(self._renew_lease(), "lease renewal")
        self.tasks.spawn(self._accept_secondaries(), "replication")

    async def close(self) -> None:
        await self.tasks.cancel()
        if self.link is not None:
            await self.link.close()

    # ------------------------------------------------------------------ the arbiter

    async def _renew_lease(self) -> None:
        """The one task that writes the arbiter while primary: renewals, the epoch floor,
        and the unprotected guest held still while the lease is not valid."""
        arbiter, metrics = self.parts.arbiter, self.parts.metrics
        while True:
            ok = await self._floor.write_or_renew(arbiter)
            metrics.set_lease_valid(arbiter.is_valid())
            if not arbiter.holding:
                log.error("lost the arbiter: another agent took over; stopping the guest")
                await asyncio.to_thread(self.parts.guest.stop)
                self.tasks.fail("fenced: the arbiter was taken by another agent")
                return
            self._hold_unless_valid()
            if not ok:
                log.warning("lease renewal failed")
            wait = ARBITER_RETRY if (self._floor.wanted or not ok) else arbiter.renew_interval
            # Wake up no later than the lease runs out, to hold an unprotected guest in time.
            until_invalid = arbiter.valid_until - time.monotonic()
            await asyncio.sleep(max(ARBITER_RETRY, min(wait, until_invalid)))
            self._hold_unless_valid()

    def _hold_unless_valid(self) -> None:
        guest, valid = self.parts.guest, self.parts.arbiter.is_valid()
        if not self.protected and not valid and not self._held_for_lease:
            log.warning("unprotected and the lease is not valid: the guest waits for a renewal")
            guest.pause()
            self._held_for_lease = True
        elif self._held_for_lease and (valid or self.protected):
            guest.resume()
            self._held_for_lease = False

    async def _raise_floor(self) -> None:
        """Have the renewal task write the epoch floor past the last epoch the secondary may hold."""
        await self._floor.ask(self.epoch + 1)

    # ------------------------------------------------------------------ pairing

    async def _accept_secondaries(self) -> None:
        s = self.parts.settings
        listener = Listener(s.listen_host, s.replication_port)
        log.info("waiting for a secondary on %s:%d", s.listen_host, listener.port)
        try:
            while True:
                try:
                    link = await StreamLink.accept(
                        listener, secret=s.secret, vm=s.vm, term=self.term, tls=s.tls,
                        heartbeat_interval=s.heartbeat_interval, heartbeat_timeout=s.heartbeat_timeout,
                        target_timeout=TARGET_TIMEOUT,
                    )
                except (OSError, AuthRefused, RemoteProtocolError, TimeoutError) as exc:
                    log.warning("a secondary failed to pair: %s", exc)
                    await asyncio.sleep(PAIR_RETRY)
                    continue
                self.link = link
                link.report(self.epoch)
                try:
                    try:
                        await self._protect(link)
                        reason = await self._follow(link)
                    except (PeerLostError, StreamError) as exc:
                        reason = str(exc)
                    await self._unprotect(link, reason)
                finally:
                    self.link = None
                    await link.close()  # also when cancelled: the secondary must not think us alive
        finally:
            listener.close()

    async def _protect(self, link: StreamLink) -> None:
        """Start the backend's replication to the secondary; the pairing may end meanwhile."""
        address = await link.target()
        self.parts.metrics.set_peer(up=True, synced=False)
        log.info("protecting the guest with the secondary at %s", address)
        started = time.monotonic()
        protecting = asyncio.ensure_future(self.parts.stream.protect(address))
        lost = asyncio.ensure_future(link.wait_lost())
        try:
            await asyncio.wait({protecting, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not protecting.done():
                protecting.cancel()
                with contextlib.suppress(BaseException):
                    await protecting
        if link.lost is not None:
            raise PeerLostError(link.lost)
        protecting.result()  # the backend's failure, if it failed
        self.protected = True
        self.epoch += 1
        self.figures = await self.parts.stream.figures()
        self._seen = self.figures.checkpoints
        link.report(self.epoch)
        self._hold_unless_valid()
        self.parts.metrics.set_peer(up=True, synced=True)
        log.info("protected (epoch %d of term %d) in %.1fs", self.epoch, self.term,
                 time.monotonic() - started)

    async def _follow(self, link: StreamLink) -> str:
        """While protected: turn the backend's checkpoints into epochs and heartbeat them.
        Returns why protection ended."""
        while link.lost is None:
            figures = await self.parts.stream.figures()
            self._account(figures)
            link.report(self.epoch)
            if not figures.protected:
                return f"the backend stopped replicating ({figures.state or 'no state'})"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(link.wait_lost(), FIGURES_INTERVAL)
        return link.lost or "closed"

    def _account(self, figures: StreamFigures) -> None:
        """New checkpoints become epochs; those the backend still has figures for go to metrics."""
        self.figures = figures
        new = figures.checkpoints - self._seen
        if new <= 0:
            return
        self._seen = figures.checkpoints
        self.epoch += new
        shown = figures.recent[-new:]
        for epoch, c in enumerate(shown, start=self.epoch - len(shown) + 1):
            cp = CheckpointFigures(epoch=epoch, pause_ms=c.pause_ms, pages=0, bytes=0, duration_ms=c.pause_ms,
                                   cause=c.cause)
            self.parts.metrics.checkpoint_acknowledged(cp)
            self.last_checkpoint = cp

    async def _unprotect(self, link: StreamLink, reason: str) -> None:
        """The secondary is gone: raise the floor, then let the backend go on alone."""
        was_protected, self.protected = self.protected, False
        self.parts.metrics.set_peer(up=False, synced=False)
        log.warning("running unprotected: %s", reason)
        await link.close(reason)
        if was_protected:
            await self._raise_floor()
        await self.parts.stream.continue_alone()  # which also lets a held guest run
        self._held_for_lease = False
        self.figures = await self.parts.stream.figures()
        self._seen = self.figures.checkpoints
        self._hold_unless_valid()

    # ------------------------------------------------------------------ control API

    def view(self, now: float) -> RoleView:
        link = self.link
        if link is None:
            peer = PeerStatus(PeerState.NONE)
        else:
            state = PeerState.CONNECTED if self.protected else PeerState.SYNCING
            peer = PeerStatus(state, last_heartbeat_age_ms=max(0.0, (now - link.last_heard) * 1e3))
        f = self.figures
        stream = StreamFiguresStatus(f.state or "none", f.channels, f.mismatches) if f is not None else None
        return RoleView(Role.PRIMARY, peer, self.protected, self.epoch, self.failover_possible(),
                        self.last_checkpoint, stream=stream)

    def ready(self) -> bool:
        return self.protected or self.parts.arbiter.is_valid()

    def failover_possible(self) -> bool:
        return self.protected and self.parts.arbiter.is_valid()

    # ------------------------------------------------------------------ planned switchover

    async def checkpoint(self, timeout: float) -> int | None:
        """The next checkpoint the backend takes (on its own schedule, or forced by a
        mismatch): its epoch, or None if the secondary was lost first. TimeoutError if none
        came within `timeout`."""
        target = self.epoch + 1
        async with asyncio.timeout(timeout):
            while self.protected and self.epoch < target:
                await asyncio.sleep(FIGURES_INTERVAL / 5)
        return self.epoch if self.epoch >= target else None

    async def step_down(self) -> None:
        """Planned switchover: the guest ends here, the lease is freed, and the secondary,
        promoted next, goes on from its own running guest.

        Nothing acknowledged is lost and no floor is raised: the backend released only
        output its secondary produced too (QEMU: colo-compare), so the secondary's guest
        is where every client saw the primary's; what was still held is dropped with the
        guest. Order: the pairing and renewals end first (no floor may be written, since the
        secondary's image must stay promotable), then the guest, then the lease."""
        self.protected = False
        self.stepped_down = True
        await self.tasks.cancel()
        await asyncio.to_thread(self.parts.guest.stop)
        self.parts.metrics.set_peer(up=False, synced=False)
        await self.parts.arbiter.release()
        log.info("stepped down after epoch %d of term %d: the guest ended, the lease is free; the "
                 "secondary goes on from its own guest", self.epoch, self.term)
