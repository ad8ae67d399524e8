"""The stream roles of the engine, over real sockets and a file arbiter, with a small
self-replicating backend in place of QEMU (the QEMU run is `test_qemu_agents.py`).

What the engine owes such a backend: pairing and the secondary's address,
epochs from the backend's checkpoints, promotion with the Lease and the
image, the epoch floor before a primary goes on alone, fencing.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from colo_agent.api.models import ArbiterConflict, NotReady, PeerState, ReplicationMode, Role
from colo_agent.arbiter.local import FileArbiter
from colo_agent.engine.agent import Agent, AgentSettings
from colo_agent.guest import ClientNic, MigrationStream, MirroredNic, PageLog, StreamCheckpoint, StreamFigures

SECRET = b"stream-roles-secret-0123456789"
LEASE = 0.6


class SelfReplicating:
    """A guest that 'replicates itself': each figures() call while protected is one checkpoint."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = False
        self.paused = False
        self.serving: tuple[str, int] | None = None
        self.protecting: str | None = None
        self.alone_calls = 0
        self.took_over = False
        self.count = 0

    accelerator = "fake"
    ram_size = 1 << 20

    @property
    def running(self) -> bool:
        return (self.started or self.took_over) and not self.paused

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.started = False

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def page_log(self) -> PageLog | None:
        return None

    def migration_stream(self) -> MigrationStream | None:
        return self

    def client_nic(self) -> ClientNic | None:
        return None

    def mirrored_nic(self) -> MirroredNic | None:
        return None

    async def listen(self) -> str:
        return f"{self.name}:1:2"

    async def serve(self, host: str, port: int) -> None:
        self.serving = (host, port)

    async def protect(self, secondary: str) -> None:
        await asyncio.sleep(0.05)
        self.protecting = secondary

    async def continue_alone(self) -> None:
        self.protecting = None
        self.alone_calls += 1

    async def take_over(self) -> None:
        self.took_over = True

    async def figures(self) -> StreamFigures:
        if self.protecting is not None:
            self.count += 1
        recent = (StreamCheckpoint(12.5, "interval"),) if self.count else ()
        return StreamFigures(protected=self.protecting is not None, checkpoints=self.count, recent=recent)

    @property
    def checkpoints(self) -> int:
        return self.count


class SlowToReturn(FileArbiter):
    """Takes the arbiter, then answers late (a slow store): the record already says the new term."""

    async def wait_acquire(self, term: int, timeout: float, image: tuple[int, int] | None = None) -> bool:
        taken = await super().wait_acquire(term, timeout, image=image)
        await asyncio.sleep(3 * LEASE)
        return taken


def _agent(tmp: Path, name: str, role: Role, port: int, peer: int | None,
           arbiter: type[FileArbiter] = FileArbiter) -> tuple[Agent, SelfReplicating]:
    settings = AgentSettings(
        vm="tests/stream", identity=name, role=role, mode=ReplicationMode.CHECKPOINT, interval=0.1,
        channels=1,
        listen_host="127.0.0.1", replication_port=port, peer=None if peer is None else ("127.0.0.1", peer),
        secret=SECRET, heartbeat_interval=0.05, heartbeat_timeout=0.4, client_host="127.0.0.1", client_port=0,
    )
    guest = SelfReplicating(name)
    return Agent(settings, guest, arbiter(tmp / "arbiter.json", name, LEASE), CollectorRegistry()), guest


async def _until(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not {what} within {timeout}s")
        await asyncio.sleep(0.02)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _pair(
    tmp: Path, secondary_arbiter: type[FileArbiter] = FileArbiter,
) -> tuple[Agent, SelfReplicating, Agent, SelfReplicating, list[asyncio.Task[None]]]:
    port = _free_port()
    primary, pg = _agent(tmp, "a", Role.PRIMARY, port, None)
    tasks = [asyncio.create_task(primary.run())]
    await _until("primary", lambda: primary.status().role is Role.PRIMARY and pg.serving is not None)
    secondary, sg = _agent(tmp, "b", Role.SECONDARY, _free_port(), port, secondary_arbiter)
    tasks.append(asyncio.create_task(secondary.run()))
    await _until("protected", lambda: primary.status().synced and secondary.status().synced)
    return primary, pg, secondary, sg, tasks


async def _end(agents: list[Agent], tasks: list[asyncio.Task[None]]) -> None:
    for a in agents:
        a.stop()
    for t in tasks:
        t.cancel()
    for a in agents:
        await a.close()


async def test_the_secondary_says_where_to_stream_and_follows_the_epochs(tmp_path: Path) -> None:
    primary, pg, secondary, sg, tasks = await _pair(tmp_path)
    try:
        assert pg.started and pg.serving == ("127.0.0.1", 0)
        assert pg.protecting == "b:1:2"  # the STREAM_TARGET, passed on unread
        await _until("some epochs", lambda: secondary.status().last_acked_epoch >= 3)
        st = primary.status()
        assert st.peer.state is PeerState.CONNECTED and st.failover_possible
        assert st.totals.checkpoints >= 2 and st.last_checkpoint is not None
        assert st.last_checkpoint.cause == "interval" and st.last_checkpoint.pause_ms == 12.5
        assert st.stream is not None and st.stream.channels == 1  # single-stream, and says so
        # The protection is epoch 1, every checkpoint after it one more; the secondary hears them.
        assert st.last_acked_epoch >= secondary.status().last_acked_epoch >= 3
        assert st.totals.checkpoints == st.last_acked_epoch - 1
        assert secondary.status().role is Role.SECONDARY and not sg.started
    finally:
        await _end([primary, secondary], tasks)


async def test_a_dead_primary_is_replaced_by_its_promoted_secondary(tmp_path: Path) -> None:
    primary, _, secondary, sg, tasks = await _pair(tmp_path)
    try:
        await _until("an epoch past the first", lambda: secondary.status().last_acked_epoch >= 2)
        term = primary.status().term
        # Death: no goodbye, no renewals.
        await primary.role.close()  # type: ignore[attr-defined]
        await _until("aware of the loss", lambda: secondary.status().peer.state is PeerState.LOST)
        epoch = secondary.status().last_acked_epoch
        result = await secondary.promote(term + 1)
        assert result.role is Role.PRIMARY and result.term == term + 1 and result.resumed_from_epoch == epoch
        assert sg.took_over and sg.serving == ("127.0.0.1", 0) and not sg.started  # not booted again
        st = secondary.status()
        assert st.role is Role.PRIMARY and st.term == term + 1 and st.totals.failovers == 1
    finally:
        await _end([primary, secondary], tasks)


async def test_a_lost_secondary_raises_the_floor_before_the_primary_goes_on_alone(tmp_path: Path) -> None:
    primary, pg, secondary, sg, tasks = await _pair(tmp_path)
    try:
        await _until("an epoch past the first", lambda: secondary.status().last_acked_epoch >= 2)
        term = primary.status().term
        # The secondary is cut off (its agent stops answering), the primary lives on.
        await secondary.role.close()  # type: ignore[attr-defined]
        await _until("alone", lambda: pg.alone_calls == 1 and not primary.status().synced)
        record = json.loads((tmp_path / "arbiter.json").read_text())
        floor = record.get("epochFloor", 0)
        assert floor > secondary.status().last_acked_epoch, record
        assert primary.status().role is Role.PRIMARY and pg.running
        # The cut-off secondary's image is older than the floor: its promotion is refused.
        with pytest.raises(ArbiterConflict):
            await asyncio.wait_for(secondary.promote(term + 1), 10)
        assert not sg.took_over
    finally:
        await _end([primary, secondary], tasks)


async def test_an_unprotected_primary_runs_only_while_its_lease_is_valid(tmp_path: Path) -> None:
    primary, pg, secondary, _, tasks = await _pair(tmp_path)
    try:
        await secondary.role.close()  # type: ignore[attr-defined]
        await _until("alone", lambda: pg.alone_calls == 1 and pg.running)
        # The store stops answering (its lock held elsewhere): renewals fail, the lease runs out.
        with (tmp_path / "arbiter.json.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            await _until("held while the lease is not valid", lambda: pg.paused, timeout=LEASE * 6)
            assert not primary.parts.arbiter.is_valid()
            assert primary.status().role is Role.PRIMARY  # not fenced: nobody took the term
        await _until("running again after a renewal", lambda: not pg.paused, timeout=LEASE * 6)
        assert primary.parts.arbiter.is_valid()
    finally:
        await _end([primary, secondary], tasks)


async def test_a_slow_promotion_is_not_taken_for_a_primary_that_went_on(tmp_path: Path) -> None:
    primary, _, secondary, sg, tasks = await _pair(tmp_path, SlowToReturn)
    try:
        await _until("an epoch past the first", lambda: secondary.status().last_acked_epoch >= 2)
        term = primary.status().term
        await primary.role.close()  # type: ignore[attr-defined]
        await _until("aware of the loss", lambda: secondary.status().peer.state is PeerState.LOST)
        await asyncio.sleep(2 * LEASE)  # the secondary watches the record a while before the promotion
        result = await secondary.promote(term + 1)
        assert result.role is Role.PRIMARY and sg.took_over
        assert secondary.failed is None, secondary.failed
        assert not secondary.stopping.is_set()
    finally:
        await _end([primary, secondary], tasks)


async def test_a_secondary_whose_primary_went_on_alone_ends(tmp_path: Path) -> None:
    primary, pg, secondary, _, tasks = await _pair(tmp_path)
    try:
        await _until("an epoch past the first", lambda: secondary.status().last_acked_epoch >= 2)
        link = primary.role.link  # type: ignore[attr-defined]
        link._pairing.yank("cut")  # the link breaks; both agents live on
        await _until("alone", lambda: pg.alone_calls == 1)
        await _until("the stale secondary ended", lambda: secondary.failed is not None, timeout=10 * LEASE)
        assert "went on without this secondary" in (secondary.failed or "")
        assert primary.failed is None and primary.status().role is Role.PRIMARY
    finally:
        await _end([primary, secondary], tasks)


async def test_a_switchover_ends_the_primary_guest_frees_the_lease_and_promotes_without_a_floor(
    tmp_path: Path,
) -> None:
    primary, pg, secondary, sg, tasks = await _pair(tmp_path)
    try:
        await _until("an epoch past the first", lambda: secondary.status().last_acked_epoch >= 2)
        term = primary.status().term
        before = primary.status().last_acked_epoch
        done = await primary.checkpoint()  # the backend's next checkpoint, as the operator asks first
        assert done.term == term and done.epoch > before
        result = await primary.demote()
        assert result.term == term and not result.releasing
        assert not pg.started and not pg.running  # the guest ended with the step-down
        # The operator retries a step whose answer it missed: the same answers again.
        assert await primary.checkpoint() == done
        assert await primary.demote() == result
        assert pg.alone_calls == 0  # never went on alone: nothing left without the secondary
        assert not primary.ready() and not primary.parts.arbiter.holding
        record = json.loads((tmp_path / "arbiter.json").read_text())
        assert record.get("epochFloor", 0) <= secondary.status().last_acked_epoch, record
        assert not record.get("holder"), record  # freed: the promotion need not wait out the lease
        started = asyncio.get_running_loop().time()
        promoted = await secondary.promote(term + 1)
        assert asyncio.get_running_loop().time() - started < LEASE
        assert promoted.role is Role.PRIMARY and promoted.term == term + 1
        assert promoted.resumed_from_epoch >= done.epoch
        assert sg.took_over and secondary.status().role is Role.PRIMARY
        assert primary.failed is None  # it waits, stepped down, for the operator to retire it
    finally:
        await _end([primary, secondary], tasks)


async def test_an_unprotected_stream_primary_refuses_to_step_down(tmp_path: Path) -> None:
    primary, pg, secondary, _, tasks = await _pair(tmp_path)
    try:
        await secondary.role.close()  # type: ignore[attr-defined]
        await _until("alone", lambda: pg.alone_calls == 1 and not primary.status().synced)
        with pytest.raises(NotReady):
            await primary.demote()
        assert pg.running and primary.parts.arbiter.holding
    finally:
        await _end([primary, secondary], tasks)
