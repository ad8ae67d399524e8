"""The secondary role for a backend that replicates itself (`MigrationStream`, QEMU's COLO).

The backend is made ready to receive first (`listen`); then the agent dials
the primary's replication port, says where to stream (STREAM_TARGET) and
follows the primary's heartbeats, which carry its epoch count. Once one
epoch is counted the backend holds a complete image: the secondary is
promotable, from image `(term, epoch)` as last heard.

When the pairing ends the backend's image stays for a promotion. The
backend cannot join a later replication with it (QEMU's secondary belongs
to the stream it received), so: a promotion takes over from it; a primary
that renews its lease again went on without this secondary, which then
ends, for a fresh one to replace it; a secondary that never held an image
just dials again.
"""

from __future__ import annotations

import asyncio
import logging

from colo_agent.api.models import PeerState, PeerStatus, Role
from colo_agent.arbiter.base import ArbiterError
from colo_agent.engine.roles import ArbiterWatch, RoleView, StreamParts, Tasks
from colo_agent.engine.secondary import Handover
from colo_agent.replication.handshake import AuthRefused
from colo_agent.replication.protocol import RemoteProtocolError
from colo_agent.replication.transport import StreamLink

log = logging.getLogger(__name__)

# A failed or lost pairing is tried again after this pause.
PAIR_RETRY = 0.5


class StreamSecondaryRole:
    def __init__(self, parts: StreamParts, tasks: Tasks, peer: tuple[str, int]) -> None:
        self.parts = parts
        self.tasks = tasks
        self.peer = peer
        self.link: StreamLink | None = None
        self.address: str | None = None
        self.term = 0  # of the image (the primary's term)
        self.epoch = 0  # of the image; 0: none yet
        self.peer_lost: str | None = None
        self._promoted = False
        self._arbiter = ArbiterWatch(parts.arbiter)

    async def start(self) -> None:
        self.parts.metrics.set_role(Role.SECONDARY, 0)
        self.tasks.spawn(self._arbiter.run(), "arbiter observation")
        self.tasks.spawn(self._follow(), "replication")

    async def close(self) -> None:
        await self.tasks.cancel()
        if self.link is not None:
            await self.link.close("secondary closing")

    @property
    def promotable(self) -> bool:
        return self.epoch > 0

    def image(self) -> tuple[int, int] | None:
        return (self.term, self.epoch) if self.promotable else None

    def failover_possible(self) -> bool:
        return self.promotable and self._arbiter.answered_recently()

    # ------------------------------------------------------------------ following the primary

    async def _follow(self) -> None:
        s = self.parts.settings
        self.address = await self.parts.stream.listen()
        log.info("the backend receives at %s", self.address)
        host, port = self.peer
        while not self._promoted:
            try:
                link = await StreamLink.dial(
                    host, port, address=self.address, secret=s.secret, vm=s.vm,
                    term=self.parts.arbiter.term, heartbeat_interval=s.heartbeat_interval,
                    heartbeat_timeout=s.heartbeat_timeout, tls=s.tls,
                )
            except (OSError, AuthRefused, RemoteProtocolError, TimeoutError) as exc:
                log.warning("cannot pair with the primary at %s:%d: %s", host, port, exc)
                await asyncio.sleep(PAIR_RETRY)
                continue
            self.link, self.peer_lost, self.term = link, None, link.term
            self.parts.metrics.set_peer(up=True, synced=False)
            watching = asyncio.ensure_future(self._watch_epochs(link))
            try:
                reason = await link.wait_lost()
            finally:
                watching.cancel()
            self._note_epoch(link)
            if self._promoted:
                return
            self.peer_lost = reason
            self.parts.metrics.set_peer(up=False, synced=self.promotable)
            log.warning("pairing with the primary ended: %s", reason)
            if self.promotable:
                await self._wait_for_promotion()
                return
            await asyncio.sleep(PAIR_RETRY)

    async def _watch_epochs(self, link: StreamLink) -> None:
        while True:
            self._note_epoch(link)
            await asyncio.sleep(self.parts.settings.heartbeat_interval)

    def _note_epoch(self, link: StreamLink) -> None:
        if link.checkpoints > self.epoch:
            if self.epoch == 0:
                log.info("holding a complete image: promotable")
                self.parts.metrics.set_peer(up=link.lost is None, synced=True)
            self.epoch = link.checkpoints

    async def _wait_for_promotion(self) -> None:
        """The image stays for a promotion. A primary that writes the Lease record again
        after the loss (twice, in the image's term) is alive and went on without us,
        with the epoch floor raised past our image: this secondary is of no more use,
        and ends. The record is read here, after the loss: whatever a dead primary
        wrote is already in the first read, so a later version is a live one. A record
        of a later term is a promotion (ours, or another's): the promote rules decide."""
        arbiter, identity = self.parts.arbiter, self.parts.settings.identity
        versions: set[str] = set()
        while not self._promoted:
            try:
                record = await arbiter.observe()
            except ArbiterError as exc:
                log.debug("arbiter: observation failed: %s", exc)
                record = None
            if record is not None and record.term == self.term and record.holder != identity:
                versions.add(record.version)
                if len(versions) >= 3 and not self._promoted:
                    self.tasks.fail("the primary went on without this secondary, whose backend cannot "
                                    "join a new replication; a fresh secondary protects it again")
                    return
            await asyncio.sleep(PAIR_RETRY)

    # ------------------------------------------------------------------ promotion

    async def hand_over(self) -> Handover:
        """The arbiter is ours: the backend's secondary becomes the running guest."""
        self._promoted = True
        await self.close()
        await self.parts.stream.take_over()
        return Handover(self.term, self.epoch, boot=False)

    # ------------------------------------------------------------------ control API

    def ready(self) -> bool:
        return self.promotable

    def view(self, now: float) -> RoleView:
        link = self.link
        age = None if link is None else max(0.0, (now - link.last_heard) * 1e3)
        if self.peer_lost is not None:
            state = PeerState.LOST
        elif link is None:
            state = PeerState.NONE
        else:
            state = PeerState.CONNECTED if self.promotable else PeerState.SYNCING
        peer = PeerStatus(state, address=f"{self.peer[0]}:{self.peer[1]}", last_heartbeat_age_ms=age)
        return RoleView(Role.SECONDARY, peer, self.promotable, self.epoch, self.failover_possible())
