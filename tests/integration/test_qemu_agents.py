"""Two `colo-agent run --backend qemu` processes protect a Linux guest running redis.

The agents pair over their own replication connection (the secondary tells
the primary where its QEMU listens), the primary's QEMU streams COLO
checkpoints, a client writes through colo-compare, the primary agent is
killed with SIGKILL (its QEMU dies with it), the secondary is promoted over
the control API (the test plays the operator), every acknowledged write is
on the promoted guest, and a third agent protects it again. File arbiter,
TCG (these machines cannot run QEMU guests under KVM).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from pathlib import Path

import pytest
from support.agents import AgentGroup, AgentProcess
from support.qemu import QemuTools, Writer, free_port, missing, qemu_tools, wait_redis

from colo_agent.api.models import PeerState
from colo_agent.qemu.command import Endpoint

pytestmark = pytest.mark.timeout(1500)
BOOT_TIMEOUT = 600.0  # about 6 s on an idle machine, a minute or more on this shared one
PROTECT_TIMEOUT = 600.0
MEMORY = "192Mi"
LEASE_MS = 2000  # the agent's default
_QEMU_PID = re.compile(r"started qemu pid (\d+)")


def _env(tools: QemuTools, run: Path, disk: Path, ports: str) -> dict[str, str]:
    return {
        "COLO_QEMU_KERNEL": str(tools.guest / "vmlinuz"), "COLO_QEMU_INITRD": str(tools.guest / "initrd.img"),
        "COLO_QEMU_DISK": str(disk), "COLO_QEMU_RUN_DIR": str(run), "COLO_QEMU_BINARY": tools.binaries.qemu,
        "COLO_QEMU_IMG": tools.binaries.qemu_img, "COLO_QEMU_PORTS": ports, "COLO_QEMU_CHECKPOINT_MS": "200",
        "COLO_QEMU_LISTEN": "127.0.0.1", "COLO_QEMU_ADVERTISE": "127.0.0.1",
    }


def _qemu_pids(agent: AgentProcess) -> list[int]:
    return [int(p) for p in _QEMU_PID.findall(agent.log())]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: its parent (the killed agent) never reaped it.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _client(agent: AgentProcess) -> Endpoint:
    return Endpoint("127.0.0.1", agent.client_port)


async def _wait(agent: AgentProcess, what: str, predicate: object, timeout: float) -> None:
    await asyncio.to_thread(agent.wait_for, what, predicate, timeout)  # type: ignore[arg-type]


async def test_agents_fail_over_keep_every_acknowledged_write_and_reprotect(tmp_path: Path) -> None:
    tools = qemu_tools()
    disk = tools.disk_copy(tmp_path / "disk.qcow2")
    ports = ",".join(str(free_port()) for _ in range(4))
    group = AgentGroup(tmp_path, accel="tcg", lease_duration_ms=LEASE_MS)
    qemu = ["--backend", "qemu"]

    def spawn(name: str, role: str, peer: AgentProcess | None = None) -> AgentProcess:
        return group.spawn(name, role, peer=peer, memory=MEMORY, extra=qemu,
                           env=_env(tools, tmp_path / name, disk, ports))

    try:
        primary = spawn("qemu-a", "primary")
        await _wait(primary, "primary", lambda s: s.role == "primary", 60)
        boot = await wait_redis(_client(primary), BOOT_TIMEOUT)
        print(f"guest booted, redis answered after {boot:.1f}s (load {os.getloadavg()[0]:.1f})")
        before = Writer(_client(primary), "before")
        await before.run(asyncio.Event(), 30)
        assert len(before.acked) == 30

        secondary = spawn("qemu-b", "secondary", peer=primary)
        started = time.monotonic()
        await _wait(primary, "protected", lambda s: s.synced, PROTECT_TIMEOUT)
        await _wait(secondary, "promotable", lambda s: s.synced and s.peer.state is PeerState.CONNECTED, 60)
        print(f"protected after {time.monotonic() - started:.1f}s")

        during = Writer(_client(primary), "during")
        await during.run(asyncio.Event(), 100, pause=0.005)
        assert len(during.acked) == 100 and during.errors == 0
        status = primary.status()
        assert status is not None and status.totals.checkpoints >= 1, status
        assert status.last_checkpoint is not None and status.last_checkpoint.cause in ("interval", "mismatch")
        assert status.last_acked_epoch > 1  # the protection's epoch, then one per checkpoint
        assert status.stream is not None and status.stream.state == "colo" and status.stream.channels == 1
        print(f"{status.totals.checkpoints} checkpoints, last pause {status.last_checkpoint.pause_ms:.0f} ms")

        # Writes still going when the primary's agent dies, its QEMU with it.
        stop = asyncio.Event()
        late = Writer(_client(primary), "late")
        writing = asyncio.create_task(late.run(stop, 100_000, pause=0.01))
        await asyncio.sleep(2.0)
        old_qemu = _qemu_pids(primary)
        term = status.term
        primary.kill()
        killed = time.monotonic()
        # The test plays the operator: promote as soon as the secondary reports its primary lost.
        await _wait(secondary, "aware of the lost primary", lambda s: s.peer.state is PeerState.LOST, 30)
        lost = time.monotonic() - killed
        reply = await asyncio.to_thread(secondary.promote, term + 1, group.secret, 60.0)
        assert reply.status_code == 200, reply.text
        promoted_at = time.monotonic() - killed
        await wait_redis(_client(secondary), 60.0)
        answered = time.monotonic() - killed
        print(f"failover: lost after {lost:.2f}s, promoted after {promoted_at:.2f}s (lease {LEASE_MS} ms), "
              f"first answer {answered:.2f}s after the kill")
        assert not any(_alive(pid) for pid in old_qemu), "the killed agent's QEMU lives on"
        assert old_qemu
        await asyncio.wait_for(writing, 60.0)
        assert late.acked, "no write was acknowledged before the kill"
        for w in (before, during, late):
            assert await missing(_client(secondary), w.prefix, w.acked) == [], w.prefix
        promoted = secondary.status()
        assert promoted is not None and promoted.role == "primary" and promoted.term == term + 1

        # Unprotected, the promoted primary serves; then a new secondary protects it again.
        alone = Writer(_client(secondary), "alone")
        await alone.run(asyncio.Event(), 20)
        assert len(alone.acked) == 20
        third = spawn("qemu-c", "secondary", peer=secondary)
        await _wait(secondary, "protected again", lambda s: s.synced, PROTECT_TIMEOUT)
        await _wait(third, "promotable", lambda s: s.synced, 60)
        after = Writer(_client(secondary), "after")
        await after.run(asyncio.Event(), 50, pause=0.005)
        assert len(after.acked) == 50 and after.errors == 0
        for w in (before, during, late, alone, after):
            assert await missing(_client(secondary), w.prefix, w.acked) == [], w.prefix
        final = secondary.status()
        assert final is not None and final.totals.checkpoints >= 1 and final.totals.failovers == 1, final

        # The new secondary dies: the primary raises the epoch floor, QEMU goes on alone, writes go on.
        third.kill()
        await _wait(secondary, "unprotected", lambda s: not s.synced and s.peer.state is PeerState.NONE, 60)
        record = json.loads(group.arbiter.read_text())
        assert record["epochFloor"] > final.last_acked_epoch, record
        lone = Writer(_client(secondary), "lone")
        await lone.run(asyncio.Event(), 20)
        assert len(lone.acked) == 20
        for w in (before, during, late, alone, after, lone):
            assert await missing(_client(secondary), w.prefix, w.acked) == [], w.prefix
        status = secondary.status()
        assert status is not None and status.stream is not None and status.stream.state != "colo", status
    finally:
        pids = [pid for agent in group.agents for pid in _qemu_pids(agent)]
        group.close()
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    assert not [pid for pid in pids if _alive(pid)], "a QEMU outlived its agent"
