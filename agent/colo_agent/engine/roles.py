"""What both roles share: the agent's parts, and tasks whose failure ends the agent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from colo_agent.api.metrics import AgentMetrics
from colo_agent.api.models import (
    CheckpointFigures,
    LockstepFigures,
    PeerStatus,
    ReplicationMode,
    Role,
    StreamFiguresStatus,
)
from colo_agent.arbiter.base import Arbiter, ArbiterError
from colo_agent.guest import ClientNic, Guest, MigrationStream, MirroredNic, PageLog
from colo_agent.tls import PeerTls

log = logging.getLogger(__name__)


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
    # Mutual TLS on every replication connection (None: the explicit clear opt-out).
    tls: PeerTls | None = None

    @property
    def lockstep(self) -> bool:
        return self.mode is ReplicationMode.LOCKSTEP


@dataclass(frozen=True)
class Parts:
    """What a role works with: the guest's capabilities, the arbiter, metrics, settings."""

    settings: AgentSettings
    guest: Guest
    pages: PageLog
    clients: ClientNic
    mirror_nic: MirroredNic | None  # present whenever settings.lockstep (checked at start)
    arbiter: Arbiter
    metrics: AgentMetrics

    def lockstep_nic(self) -> MirroredNic:
        if self.mirror_nic is None:
            raise RuntimeError("lockstep without a mirrored NIC")  # refused by Agent.__init__
        return self.mirror_nic


@dataclass(frozen=True)
class StreamParts:
    """What a role works with when the backend replicates itself (`MigrationStream`)."""

    settings: AgentSettings
    guest: Guest
    stream: MigrationStream
    arbiter: Arbiter
    metrics: AgentMetrics


@dataclass(frozen=True)
class RoleView:
    """A role's part of `AgentStatus`."""

    role: Role
    peer: PeerStatus
    synced: bool  # primary: protected; secondary: holds a committed image (promotable)
    last_acked_epoch: int
    failover_possible: bool = False
    last_checkpoint: CheckpointFigures | None = None
    lockstep: LockstepFigures | None = None
    stream: StreamFiguresStatus | None = None


class AgentRole(Protocol):
    """What the agent does with whichever role it is in."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def view(self, now: float) -> RoleView: ...

    def ready(self) -> bool: ...


class ArbiterWatch:
    """A secondary's reads of the arbiter while it follows a primary.

    It reads the record every renew interval, so the clock on the primary's
    last renewal is already running when a promotion comes, and so status can
    say whether a promotion could take the arbiter at all. Store errors are
    retried: observing is advisory.
    """

    def __init__(self, arbiter: Arbiter) -> None:
        self.arbiter = arbiter
        self.read_at = -float("inf")  # monotonic time of the last successful read

    async def run(self) -> None:
        while True:
            try:
                await self.arbiter.observe()
                self.read_at = time.monotonic()
            except ArbiterError as exc:
                log.debug("arbiter: observation failed: %s", exc)
            await asyncio.sleep(self.arbiter.renew_interval)

    def answered_recently(self) -> bool:
        """The arbiter answered within the last lease duration."""
        return time.monotonic() - self.read_at < self.arbiter.lease_duration


class Tasks:
    """Background tasks of one owner; a task that fails calls `on_failure` with why."""

    def __init__(self, on_failure: Callable[[str], None]) -> None:
        self._on_failure = on_failure
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                exc = t.exception()
                log.error("%s failed: %r", name, exc, exc_info=exc)
                self._on_failure(f"{name}: {exc}")

        task.add_done_callback(done)
        return task

    def fail(self, reason: str) -> None:
        """End the agent from inside one of its tasks."""
        self._on_failure(reason)

    async def cancel(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class EpochFloor:
    """The epoch floor a primary asks its renewal task to write in place of a renewal.

    The renewal task is the one writer of the arbiter while primary; a role that lost
    its secondary asks for a floor here and waits until it is written.
    """

    def __init__(self) -> None:
        self.wanted = 0
        self._raised = asyncio.Event()

    async def ask(self, epoch: int) -> None:
        """Wait until a floor of `epoch` (or a later one) is in the arbiter."""
        self._raised.clear()
        self.wanted = epoch
        await self._raised.wait()

    async def write_or_renew(self, arbiter: Arbiter) -> bool:
        """One write of the renewal task: the floor if one is wanted, else a renewal.
        True when the write succeeded (a written floor renews the lease too)."""
        wanted = self.wanted
        if wanted and await arbiter.raise_floor(wanted):
            if self.wanted == wanted:
                self.wanted = 0
                self._raised.set()
            return True
        return await arbiter.renew()

