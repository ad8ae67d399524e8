"""The secondary role: keep the committed image for a promotion, follow the primary.

The committed image is the paused guest's RAM plus the device state of the
last committed epoch (checkpoint mode); in lockstep the guest runs on the
primary's input and every commit resets it to the primary's state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import numpy as np

from colo_agent.api.models import PeerState, PeerStatus, Role
from colo_agent.engine.lockstep import SecondaryMirror, unpack_state
from colo_agent.engine.roles import ArbiterWatch, Parts, RoleView, Tasks
from colo_agent.replication.cache import CacheMode, ColoCache, default_capacity, image_digest
from colo_agent.replication.handshake import AuthRefused
from colo_agent.replication.protocol import RemoteProtocolError
from colo_agent.replication.session import CommitEpoch
from colo_agent.replication.transport import CheckpointReceiver

log = logging.getLogger(__name__)

# A new pairing is retried this often after a failed or lost one.
PAIR_RETRY = 0.5


@dataclass(frozen=True)
class Handover:
    """What a promoted secondary resumes from."""

    term: int  # of the image
    epoch: int
    boot: bool  # start the guest from the image (checkpoint mode) or let it go on (lockstep)


class SecondaryRole:
    def __init__(self, parts: Parts, tasks: Tasks, peer: tuple[str, int]) -> None:
        self.parts = parts
        self.tasks = tasks
        self.peer = peer
        self.lockstep = parts.settings.lockstep
        mode = CacheMode.LOCKSTEP if self.lockstep else CacheMode.CHECKPOINT
        self.cache = ColoCache(parts.pages.ram, mode=mode, capacity=default_capacity(parts.pages.page_count))
        s = parts.settings
        self.receiver = CheckpointReceiver(
            self.cache, secret=s.secret, vm=s.vm, term=parts.arbiter.term,
            heartbeat_interval=s.heartbeat_interval, heartbeat_timeout=s.heartbeat_timeout,
            on_commit=self._on_commit, tls=s.tls,
        )
        self.mirror: SecondaryMirror | None = None  # lockstep, while paired
        self.last_acked_epoch = 0
        self.peer_lost: str | None = None
        self.guest_started = False
        self._promoted = False
        self._arbiter = ArbiterWatch(parts.arbiter)

    async def start(self) -> None:
        self.parts.metrics.set_role(Role.SECONDARY, 0)
        self.tasks.spawn(self._arbiter.run(), "arbiter observation")
        self.tasks.spawn(self._follow(), "replication")

    async def close(self) -> None:
        await self.tasks.cancel()
        if self.mirror is not None:
            await self.mirror.close()
            self.mirror = None
        await self.receiver.close()

    @property
    def promotable(self) -> bool:
        """A committed image exists (a re-sync in progress has none)."""
        return self.cache.committed is not None

    def image(self) -> tuple[int, int] | None:
        """(term, epoch) of the committed image a promotion would resume from."""
        committed = self.cache.committed
        return None if committed is None else committed.epoch

    def failover_possible(self) -> bool:
        """A committed image exists and the arbiter answered within the last lease duration."""
        return self.promotable and self._arbiter.answered_recently()

    # ------------------------------------------------------------------ following the primary

    async def _follow(self) -> None:
        """Dial the primary and follow it; after a lost pairing, dial again while its lease lives.

        A pairing that ends leaves the committed image in place for a
        promotion. Dialling again starts a new first sync, which writes
        straight into RAM: the old image is then gone until the new sync
        commits, so a secondary only re-joins a primary that still renews
        its lease (if it stopped, a promotion is coming instead).
        """
        host, port = self.peer
        first = True
        while not self._promoted:
            if not first:
                if not await self._primary_renews():
                    return
                if self.guest_started:
                    # Lockstep: a new first sync rewrites RAM under the guest; hold it still.
                    self.parts.guest.pause()
            # The same receiver dials again: its cache (the committed image) is
            # only reset once a new pairing is authenticated, so a dead primary
            # that cannot be reached never costs the image a promotion needs.
            if not await self._pair(host, port):
                await asyncio.sleep(PAIR_RETRY)
                continue
            first = False
            self.peer_lost = None
            reason = await self.receiver.wait_lost()
            if self._promoted:
                return
            if self.mirror is not None:
                await self.mirror.close()
                self.mirror = None
            log.warning("pairing with the primary ended: %s", reason)
            self.peer_lost = reason
            self.parts.metrics.set_peer(up=False, synced=self.promotable)
            await asyncio.sleep(PAIR_RETRY)

    async def _primary_renews(self) -> bool:
        """Not re-joining a primary that looks dead; but one that was only slow renews its
        lease again, and is joined again. False: promoted meanwhile."""
        arbiter = self.parts.arbiter
        if arbiter.acquirable_at() > time.monotonic():
            return True
        log.info("the primary's lease ran out: not re-joining until it renews, or promotion")
        while not self._promoted and arbiter.acquirable_at() <= time.monotonic():
            await asyncio.sleep(PAIR_RETRY)
        if self._promoted:
            return False
        log.info("the primary renewed its lease: joining it again")
        return True

    async def _pair(self, host: str, port: int) -> bool:
        try:
            await self.receiver.dial(host, port, mirror=self.lockstep)
        except (OSError, AuthRefused, RemoteProtocolError, TimeoutError) as exc:
            log.warning("cannot pair with the primary at %s:%d: %s", host, port, exc)
            return False
        if self.lockstep:
            if self.receiver.mirror is None:
                log.warning("the primary at %s:%d opened no mirror connection", host, port)
                return False
            self.mirror = SecondaryMirror(self.parts.lockstep_nic(), self.parts.clients, self.receiver.mirror)
        return True

    def _on_commit(self, commit: CommitEpoch) -> None:
        if self.lockstep:
            self._commit_lockstep(commit)
        else:
            self.cache.commit(commit.term, commit.epoch, commit.device_state)
        self.last_acked_epoch = commit.epoch
        if self.parts.settings.debug_digests:
            log.info("epoch-digest term=%d epoch=%d ram=%s", commit.term, commit.epoch,
                     image_digest(self.cache.ram))
        self.parts.metrics.set_peer(up=True, synced=True)

    def _commit_lockstep(self, commit: CommitEpoch) -> None:
        """Pause our running guest, overwrite what either side changed with the primary's pages,
        take its device state, and let the guest go on from exactly the primary's pause."""
        machine_state, offsets = unpack_state(commit.device_state)
        guest, pages = self.parts.guest, self.parts.pages
        local = np.empty(0, dtype=np.int64)
        if self.guest_started:
            guest.pause()
            local = pages.collect_dirty()
        self.cache.commit(commit.term, commit.epoch, commit.device_state, local)
        pages.load_device_state(machine_state, keep_connections=True)
        if self.mirror is not None:
            self.mirror.committed(commit.epoch, offsets)
        if self.guest_started:
            guest.resume()
        else:
            guest.start()
            self.guest_started = True

    # ------------------------------------------------------------------ promotion

    async def hand_over(self) -> Handover:
        """Stop following (the arbiter is already ours) and ready the guest to run as primary.

        Checkpoint mode: the epoch in flight is dropped and the guest will
        boot from the committed image. Lockstep: the guest goes on from where
        it is; it executed every input whose output was released on match,
        so rolling it back would lose writes.
        """
        self._promoted = True
        promoted = self.receiver.promote()
        await self.close()
        p = self.parts
        if not self.lockstep:
            p.pages.load_device_state(promoted.device_state)
            return Handover(promoted.term, promoted.epoch, boot=True)
        nic = p.lockstep_nic()
        nic.disable_rx_mirror()
        for conn in nic.open_connections:
            p.clients.close_connection(conn)  # the old primary's clients are gone
        p.guest.resume()
        return Handover(promoted.term, promoted.epoch, boot=False)

    # ------------------------------------------------------------------ control API

    def ready(self) -> bool:
        return self.promotable

    def view(self, now: float) -> RoleView:
        return RoleView(Role.SECONDARY, self._peer_status(now), self.promotable, self.last_acked_epoch,
                        self.failover_possible())

    def _peer_status(self, now: float) -> PeerStatus:
        session = self.receiver.session
        age = None if session is None else max(0.0, (now - session.last_heard) * 1e3)
        if self.peer_lost is not None:
            state = PeerState.LOST
        elif session is None:
            state = PeerState.NONE
        else:
            state = PeerState.CONNECTED if self.promotable else PeerState.SYNCING
        return PeerStatus(state, address=f"{self.peer[0]}:{self.peer[1]}", last_heartbeat_age_ms=age)
