"""The agent: one guest, one role at a time, and the control API.

A backend that replicates itself (QEMU) gets the stream roles instead
(`engine.stream_primary`, `engine.stream_secondary`): the same arbiter,
terms, epoch floor, heartbeat and control API around the backend's own
replication. A primary (`engine.primary.PrimaryRole`) runs its guest, serves clients
through the bridge, holds the arbiter and streams checkpoints to whichever
secondary joins. A secondary (`engine.secondary.SecondaryRole`) keeps the
committed image and follows the primary; promotion takes the arbiter with a
higher term, hands the guest over from that image and swaps the secondary
role for a primary one that waits for a new secondary. The promote rules
are in `engine.promotion`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from prometheus_client import CollectorRegistry

from colo_agent.api.metrics import AgentMetrics
from colo_agent.api.models import (
    AgentStatus,
    ArbiterConflict,
    CheckpointResult,
    DemoteResult,
    GuestState,
    GuestStatus,
    NotReady,
    PeerState,
    PeerStatus,
    PromoteResult,
    Role,
    Unavailable,
    WrongRole,
)
from colo_agent.arbiter.base import Arbiter
from colo_agent.engine.primary import PrimaryRole
from colo_agent.engine.promotion import RoleChanges
from colo_agent.engine.roles import AgentRole, AgentSettings, Parts, RoleView, StreamParts, Tasks
from colo_agent.engine.secondary import SecondaryRole
from colo_agent.engine.stream_primary import StreamPrimaryRole
from colo_agent.engine.stream_secondary import StreamSecondaryRole
from colo_agent.guest import Capabilities, Guest

__all__ = ["Agent", "AgentSettings"]

log = logging.getLogger(__name__)

# How long a promotion may wait for the old primary's lease to run out.
PROMOTE_TIMEOUT_LEASES = 3.0
# A starting primary asks a store that did not answer again after this long.
STARTUP_ARBITER_RETRY = 0.5
# How long POST /v1/checkpoint waits for the acknowledgement.
CHECKPOINT_TIMEOUT = 10.0


class Agent:
    """Implements `colo_agent.api.server.AgentController`."""

    def __init__(self, settings: AgentSettings, guest: Guest, arbiter: Arbiter,
                 registry: CollectorRegistry) -> None:
        caps = Capabilities.of(guest)
        metrics = AgentMetrics(registry)
        self.parts: Parts | StreamParts
        if caps.stream is not None:
            if settings.lockstep:
                raise ValueError("the backend replicates itself and compares output itself (QEMU's "
                                 "colo-compare): --mode lockstep is for page-log backends")
            self.parts = StreamParts(settings, guest, caps.stream, arbiter, metrics)
        else:
            if caps.pages is None or caps.clients is None:
                raise ValueError("a page-log backend needs a client NIC")  # refused by Capabilities.of
            if settings.lockstep and caps.mirror is None:
                raise ValueError("lockstep mode needs a backend with a mirrored NIC")
            self.parts = Parts(settings, guest, caps.pages, caps.clients, caps.mirror, arbiter, metrics)
        metrics.describe(vm=settings.vm, identity=settings.identity, mode=settings.mode.value,
                         accel=guest.accelerator)
        self.settings = settings
        self.arbiter = arbiter
        self.metrics = metrics
        self.stopping = asyncio.Event()
        self.failed: str | None = None
        self.role: AgentRole = _Starting(settings.role)
        metrics.failover_possible.set_function(lambda: self.role.view(time.monotonic()).failover_possible)
        self._role_changes = RoleChanges()

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Serve in the configured role until `stop()`; failures end it with `failed` set."""
        peer = self.settings.peer
        if self.settings.role is Role.PRIMARY:
            term = await self._first_term()
            await self._swap(self._primary_role(term, boot=True))
        elif peer is None:
            raise ValueError("a secondary needs the primary's replication address")
        elif isinstance(self.parts, StreamParts):
            await self._swap(StreamSecondaryRole(self.parts, self._tasks(), peer))
        else:
            await self._swap(SecondaryRole(self.parts, self._tasks(), peer))
        await self.stopping.wait()

    def _primary_role(self, term: int, *, boot: bool) -> AgentRole:
        if isinstance(self.parts, StreamParts):
            return StreamPrimaryRole(self.parts, self._tasks(), term, boot=boot)
        return PrimaryRole(self.parts, self._tasks(), term, boot=boot)

    def stop(self) -> None:
        self.stopping.set()

    def never_served(self) -> bool:
        """No client ever reached the guest this agent runs, and the guest was booted here
        (a fresh primary, not a promoted secondary carrying a served VM's state): ending
        now loses nothing anyone saw. False whenever that cannot be told for sure."""
        if self.settings.role is not Role.PRIMARY or self.metrics.totals().failovers:
            return False
        role = self.role
        if isinstance(role, _Starting):
            return True  # the term was never taken: no client port was ever open
        return isinstance(role, PrimaryRole) and role.boot and role.bridge.accepted == 0

    async def close(self) -> None:
        await self.role.close()
        await asyncio.to_thread(self.parts.guest.stop)
        with contextlib.suppress(Exception):
            await self.arbiter.close()

    def _tasks(self) -> Tasks:
        return Tasks(self._fail)

    def _fail(self, reason: str) -> None:
        self.failed = reason
        self.stopping.set()

    async def _swap(self, role: AgentRole) -> None:
        self.role = role
        await role.start()

    async def _first_term(self) -> int:
        """A fresh primary takes the term after the highest recorded one. A slow or busy
        store (an API server under load) costs start-up time, never the pod."""
        return await self.arbiter.take_next_term(
            PROMOTE_TIMEOUT_LEASES * self.arbiter.lease_duration, STARTUP_ARBITER_RETRY
        )

    # ------------------------------------------------------------------ control API

    def status(self) -> AgentStatus:
        view = self.role.view(time.monotonic())
        guest = self.parts.guest
        return AgentStatus(
            role=view.role,
            term=self.arbiter.term,
            last_acked_epoch=view.last_acked_epoch,
            mode=self.settings.mode,
            peer=view.peer,
            guest=GuestStatus(state=GuestState.RUNNING if guest.running else GuestState.PAUSED,
                              accel=guest.accelerator, memory_bytes=guest.ram_size),
            totals=self.metrics.totals(),
            last_checkpoint=view.last_checkpoint,
            synced=view.synced,
            lockstep=view.lockstep,
            ack_age_ms=self.metrics.ack_age_ms(),
            failover_possible=view.failover_possible,
            stream=view.stream,
        )

    def ready(self) -> bool:
        return self.role.ready()

    async def promote(self, term: int) -> PromoteResult:
        return await self._role_changes.promote(self._role_and_term, term, lambda: self._promote(term))

    def _role_and_term(self) -> tuple[Role, int]:
        return self.role.view(time.monotonic()).role, self.arbiter.term

    async def _promote(self, term: int) -> PromoteResult:
        role = self.role
        if not isinstance(role, SecondaryRole | StreamSecondaryRole):
            raise WrongRole("this agent is already the primary")
        image = role.image()
        if image is None:
            raise NotReady("no epoch committed yet: this secondary has nothing to resume from")
        timeout = PROMOTE_TIMEOUT_LEASES * self.arbiter.lease_duration
        if not await self.arbiter.wait_acquire(term, timeout, image=image):
            raise ArbiterConflict(f"the arbiter is still held by {self.arbiter.holder}; "
                                  f"its lease did not run out within {timeout:.1f} s")
        handover = await role.hand_over()
        self.metrics.failed_over()
        log.info("promoted with term %d from epoch %d of term %d (%s)", term, handover.epoch, handover.term,
                 "guest boots from the image" if handover.boot else "the running guest continues")
        await self._swap(self._primary_role(term, boot=handover.boot))
        return PromoteResult(role=Role.PRIMARY, term=term, resumed_from_epoch=handover.epoch)

    def _primary(self) -> PrimaryRole | StreamPrimaryRole:
        role = self.role
        if not isinstance(role, PrimaryRole | StreamPrimaryRole):
            raise WrongRole("only a primary takes checkpoints or steps down")
        return role

    async def checkpoint(self) -> CheckpointResult:
        role = self._primary()
        if isinstance(role, StreamPrimaryRole) and role.stepped_down:
            # A retried switchover step: the last epoch stands, nothing comes after it.
            return CheckpointResult(term=self.arbiter.term, epoch=role.epoch)
        if not role.protected:
            raise NotReady("no synced secondary: there is nothing to checkpoint to")
        try:
            epoch = await role.checkpoint(CHECKPOINT_TIMEOUT)
        except TimeoutError:
            raise Unavailable(f"no checkpoint was acknowledged within {CHECKPOINT_TIMEOUT:.0f} s") from None
        if epoch is None:
            raise Unavailable("the secondary was lost before the checkpoint was acknowledged")
        return CheckpointResult(term=self.arbiter.term, epoch=epoch)

    async def demote(self) -> DemoteResult:
        return await self._role_changes.run(self._demote)

    async def _demote(self) -> DemoteResult:
        role = self._primary()
        if isinstance(role, StreamPrimaryRole) and role.stepped_down:
            return DemoteResult(role=Role.PRIMARY, term=self.arbiter.term, releasing=False)  # a retry
        if not role.protected:
            raise NotReady("no synced secondary: stepping down now would lose the guest")
        if isinstance(role, StreamPrimaryRole):
            # The backend's secondary already matched every output released (colo-compare):
            # its guest goes on from where it is, so the primary's guest just ends.
            await role.step_down()
            return DemoteResult(role=Role.PRIMARY, term=self.arbiter.term, releasing=False)
        role.begin_demotion()
        result = await self.checkpoint()
        return DemoteResult(role=Role.PRIMARY, term=result.term, releasing=False)


class _Starting:
    """The role before `run` started the configured one (a primary takes its term first)."""

    def __init__(self, role: Role) -> None:
        self._role = role

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def view(self, now: float) -> RoleView:
        return RoleView(self._role, PeerStatus(PeerState.NONE), synced=False, last_acked_epoch=0)

    def ready(self) -> bool:
        return False
