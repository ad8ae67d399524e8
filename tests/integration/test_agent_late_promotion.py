"""An operator may take seconds to decide: the secondary must keep its image until then."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.agents import AgentGroup, WriteLog, missing_writes, write_keys

from colo_agent.api.models import PeerState


@pytest.fixture
def group(tmp_path: Path) -> Iterator[AgentGroup]:
    g = AgentGroup(tmp_path, accel="tcg")
    try:
        yield g
    finally:
        g.close()


def test_a_late_promotion_still_finds_the_committed_image(group: AgentGroup) -> None:
    primary, secondary = group.pair()
    log = WriteLog()
    stop = threading.Event()
    writer = threading.Thread(target=write_keys, args=(primary, "w", stop.is_set, log))
    writer.start()
    time.sleep(1.5)
    st = primary.status()
    assert st is not None
    primary.kill()
    stop.set()
    writer.join(60)
    # Long enough for the secondary to notice, try to re-join the dead primary, and give up.
    lost = secondary.wait_for("reporting the primary lost", lambda s: s.peer.state is PeerState.LOST)
    assert lost.synced, "the secondary must stay promotable while it waits"
    time.sleep(3.0)
    still = secondary.status()
    assert still is not None and still.synced and still.peer.state is PeerState.LOST
    # The operator's signal that the primary went quiet: its silence keeps growing.
    assert still.peer.last_heartbeat_age_ms is not None and still.peer.last_heartbeat_age_ms >= 2500
    r = secondary.promote(st.term + 1, group.secret)
    assert r.status_code == 200, r.text
    secondary.wait_for("serving as primary", lambda s: s.role == "primary")
    assert len(log.acknowledged) >= 5
    assert not missing_writes(secondary, log)
