"""A primary and a secondary agent as processes on loopback: the image they agree on, who may pair."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agents import ACCELS, AgentGroup, WriteLog, missing_writes, wait_protected, write_keys


@pytest.fixture
def group(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[AgentGroup]:
    accel = getattr(request, "param", "tcg")
    g = AgentGroup(tmp_path, accel=accel)
    try:
        yield g
    finally:
        g.close()


@pytest.mark.parametrize("group", ACCELS, indirect=True)
def test_secondary_image_equals_primary_ram_at_every_acknowledged_epoch(group: AgentGroup) -> None:
    primary, secondary = group.pair(env={"COLO_DEBUG_DIGESTS": "1"})
    writes = WriteLog()
    stop = threading.Event()
    writers = [threading.Thread(target=write_keys, args=(primary, f"w{i}", stop.is_set, writes))
               for i in range(3)]
    for t in writers:
        t.start()
    time.sleep(3.0)
    stop.set()
    for t in writers:
        t.join(60)
    # The primary logs a digest once the epoch is acknowledged, so let the last one land.
    last = primary.wait_for("past the writes", lambda s: s.last_acked_epoch > 0).last_acked_epoch
    primary.wait_for("one epoch further", lambda s: s.last_acked_epoch > last)

    assert not writes.errors
    assert len(writes.acknowledged) >= 10, "the clients got too few writes acknowledged to test anything"
    ours, theirs = primary.digests(), secondary.digests()
    common = ours.keys() & theirs.keys()
    assert len(common) >= 20, f"only {len(common)} epochs logged by both agents"
    mismatched = sorted(k for k in common if ours[k] != theirs[k])
    assert not mismatched, f"committed image differs from the primary's RAM at epochs {mismatched[:10]}"
    assert len({ours[k] for k in common}) >= 10, "the image hardly changed: the writes did not reach RAM"
    # Every epoch the primary saw acknowledged was committed (and logged) first.
    assert ours.keys() <= theirs.keys(), sorted(ours.keys() - theirs.keys())[:10]
    assert not missing_writes(primary, writes)
    assert secondary.status() is not None and secondary.proc.poll() is None
    wait_protected(primary, secondary)
