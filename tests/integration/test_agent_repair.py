"""A pairing that breaks in the middle of a frame, between real agent processes:
the secondary's cache is left as the pairing found it, so the next pairing syncs."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.agents import (
    SYNC_TIMEOUT,
    AgentGroup,
    HarnessError,
    WriteLog,
    missing_writes,
    wait_protected,
    write_keys,
)
from support.linkproxy import LinkProxy


@pytest.fixture
def group(tmp_path: Path) -> Iterator[AgentGroup]:
    g = AgentGroup(tmp_path)
    try:
        yield g
    finally:
        g.close()


def _wait_pairings(agent_log: Callable[[], str], at_least: int, timeout: float = SYNC_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while agent_log().count("pairing with a primary") < at_least:
        if time.monotonic() > deadline:
            raise HarnessError(f"fewer than {at_least} pairings within {timeout:.0f} s")
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["checkpoint", "lockstep"])
@pytest.mark.parametrize("when", ["first sync", "epoch"])
def test_a_pairing_cut_mid_frame_is_followed_by_one_that_syncs(
    group: AgentGroup, mode: str, when: str
) -> None:
    extra = ["--mode", mode]
    primary = group.spawn("agent-a", "primary", extra=extra, dirty_rate=2000)
    primary.wait_for("serving as primary", lambda s: s.role == "primary")
    with LinkProxy(primary.replication_port) as proxy:
        if when == "first sync":
            proxy.cut(1)
        secondary = group.spawn(
            "agent-b", "secondary", peer_address=proxy.address, extra=extra, dirty_rate=2000
        )
        writes = WriteLog()
        stop = threading.Event()
        writer: threading.Thread | None = None
        if when == "epoch":
            wait_protected(primary, secondary)
            writer = threading.Thread(target=write_keys, args=(primary, "w", stop.is_set, writes))
            writer.start()
            proxy.cut(1)
        deadline = time.monotonic() + SYNC_TIMEOUT
        while proxy.done["cut"] < 1:
            assert time.monotonic() < deadline, "no page frame crossed the link"
            time.sleep(0.02)
        assert proxy.done["cut"] == 1
        # The secondary saw the frame end early and pairs again; that pairing must sync.
        _wait_pairings(secondary.log, 2)
        acked_before = primary.status()
        wait_protected(primary, secondary)
        if writer is not None:
            baseline = acked_before.last_acked_epoch if acked_before is not None else 0
            primary.wait_for("acknowledging epochs again", lambda s: s.last_acked_epoch > baseline + 2)
            stop.set()
            writer.join(60)
            assert writes.acknowledged, writes.errors
            assert missing_writes(primary, writes) == []
    log = secondary.log()
    assert "in the middle of a frame" in log
    assert "already has a batch outstanding" not in log


def test_a_primary_frozen_past_its_lease_and_thawed_is_joined_again(group: AgentGroup) -> None:
    """Nobody promoted the secondary meanwhile: once the primary renews its
    lease, the secondary pairs with it again (it once waited for a promotion
    that never came, and the VM stayed unprotected for good)."""
    primary, secondary = group.pair()
    primary.signal(signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 30
        while "lease ran out" not in secondary.log():
            assert time.monotonic() < deadline, secondary.tail()
            time.sleep(0.05)
    finally:
        primary.signal(signal.SIGCONT)
    _wait_pairings(secondary.log, 2)
    wait_protected(primary, secondary)
    assert primary.status().term == secondary.status().term == 1  # type: ignore[union-attr]
