"""Agents that are not scheduled for a while (a loaded machine, simulated with
SIGSTOP/SIGCONT): a slow peer, or a slow primary, costs latency, never progress."""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.agents import AgentGroup, WriteLog, missing_writes, write_keys

MODES = {
    "checkpoint": ("--mode", "checkpoint"),
    "lockstep": ("--mode", "lockstep", "--interval-ms", "2000"),
}


@pytest.fixture
def group(tmp_path: Path) -> Iterator[AgentGroup]:
    g = AgentGroup(tmp_path)
    try:
        yield g
    finally:
        g.close()


@pytest.mark.parametrize("mode", list(MODES))
def test_stalls_of_either_agent_longer_than_the_lease_cost_no_reply(group: AgentGroup, mode: str) -> None:
    """Stalls of up to 0.7 s, longer than the 0.4 s lease: output that waited
    through one leaves after the next renewal. (Output was once dropped when
    the lease had lapsed by the primary's clock, and every client waiting
    for a reply hung until its timeout.)"""
    primary, secondary = group.pair(extra=MODES[mode])
    rng = random.Random(7)
    writes = WriteLog()
    stop = threading.Event()
    writers = [threading.Thread(target=write_keys, args=(primary, f"w{i}", stop.is_set, writes, 20.0))
               for i in range(3)]
    for t in writers:
        t.start()
    try:
        end = time.monotonic() + 8.0
        while time.monotonic() < end:
            agent = rng.choice([primary, primary, secondary])
            agent.signal(signal.SIGSTOP)
            time.sleep(rng.uniform(0.1, 0.7))
            agent.signal(signal.SIGCONT)
            time.sleep(rng.uniform(0.1, 0.4))
    finally:
        primary.signal(signal.SIGCONT)
        secondary.signal(signal.SIGCONT)
        stop.set()
        for t in writers:
            t.join(60)
    assert not writes.errors, f"{writes.errors}\n{primary.tail()}"
    assert len(writes.acknowledged) >= 30
    assert "dropping" not in primary.log()
    assert missing_writes(primary, writes) == []
