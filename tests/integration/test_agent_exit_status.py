"""`colo-agent run` exit status: 3 only when no client ever reached the guest the agent booted.

The operator starts a new primary instead of declaring the VM Failed on that
status alone, so it must never be given by an agent a client has seen. Real
agent processes on a file arbiter (no cluster needed).
"""

from __future__ import annotations

import asyncio
import fcntl
import signal
import time
from pathlib import Path

from support.agents import AgentGroup, AgentProcess

from colo_agent.arbiter.local import FileArbiter
from colo_agent.constants import EXIT_NEVER_SERVED

LEASE_MS = 400


def stop_between_writes(agent: AgentProcess, arbiter: Path) -> None:
    """SIGSTOP the agent at a moment it does not hold the file arbiter's lock (else the
    taker could not write until it is woken)."""
    lock = arbiter.with_name(arbiter.name + ".lock")
    while True:
        agent.signal(signal.SIGSTOP)
        with lock.open("a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                agent.signal(signal.SIGCONT)
                time.sleep(0.01)
                continue
            fcntl.flock(f, fcntl.LOCK_UN)
            return


def test_a_primary_fails_with_3_only_while_no_client_reached_its_guest(tmp_path: Path) -> None:
    group = AgentGroup(tmp_path, lease_duration_ms=LEASE_MS)
    try:
        served = group.spawn("agent-a", "primary", memory="16Mi")
        served.wait_for("serving as primary", lambda s: s.role == "primary")
        # A second primary of the same VM cannot take a term while agent-a renews it:
        # it fails, having opened no client port at all.
        refused = group.spawn("agent-b", "primary", memory="16Mi")
        assert refused.proc.wait(60) == EXIT_NEVER_SERVED, refused.tail()
        assert "held by agent-a" in refused.log()

        with served.client() as client:
            assert client.call("SET", "k", "v") == b"OK"
        # Fence agent-a after a client saw its guest: stopped past its lease, its term
        # taken over, then woken. It fails, and must not say that nobody was served.
        stop_between_writes(served, group.arbiter)
        taker = FileArbiter(group.arbiter, "taker", LEASE_MS / 1000)
        assert asyncio.run(taker.wait_acquire(2, timeout=30.0))
        served.signal(signal.SIGCONT)
        assert served.proc.wait(60) == 1, served.tail()
        assert "fenced" in served.log()
        asyncio.run(taker.release())

        # The same fencing of a primary that no client reached: 3.
        unseen = group.spawn("agent-c", "primary", memory="16Mi")
        unseen.wait_for("serving as primary", lambda s: s.role == "primary" and s.term == 3)
        stop_between_writes(unseen, group.arbiter)
        assert asyncio.run(taker.wait_acquire(4, timeout=30.0))
        unseen.signal(signal.SIGCONT)
        assert unseen.proc.wait(60) == EXIT_NEVER_SERVED, unseen.tail()
    finally:
        group.close()
