"""A primary and a secondary agent as processes on loopback: the image they agree on, who may pair."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.agents import ACCELS, AgentGroup, WriteLog, missing_writes, wait_protected, write_keys


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
    # Enough epochs with writes in them, however slow the machine.
    deadline = time.monotonic() + 120
    while len(primary.digests()) < 30 and time.monotonic() < deadline:
        time.sleep(0.2)
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


def test_a_new_secondary_protects_the_primary_after_the_first_one_died(group: AgentGroup) -> None:
    primary, first = group.pair()
    writes = WriteLog()
    write_keys(primary, "before", lambda: len(writes.acknowledged) >= 10, writes)
    first.kill()
    st = primary.wait_for("unprotected", lambda s: not s.synced)
    # Alone, it goes on serving, unprotected.
    write_keys(primary, "alone", lambda: len(writes.acknowledged) >= 20, writes)
    assert not writes.errors

    second = group.spawn("agent-c", "secondary", peer=primary)
    term = wait_protected(primary, second)
    assert term == st.term, "a new secondary must not change the term"
    write_keys(primary, "protected", lambda: len(writes.acknowledged) >= 30, writes)
    # Protected for real: the new secondary holds everything, including what was written alone.
    primary.kill()
    r = second.promote(term + 1, group.secret)
    assert r.status_code == 200, r.text
    assert not missing_writes(second, writes)


def test_a_secondary_with_another_secret_is_refused_and_the_primary_keeps_serving(group: AgentGroup) -> None:
    primary = group.spawn("agent-a", "primary")
    primary.wait_for("serving as primary", lambda s: s.role == "primary")
    intruder = group.spawn("agent-x", "secondary", peer=primary, secret="another secret, long enough")
    reason = "wrong secret for this VM"
    deadline = time.monotonic() + 60
    while not (reason in primary.log() and reason in intruder.log()):
        assert time.monotonic() < deadline, f"refusal not logged:\n{primary.tail()}\n{intruder.tail()}"
        assert intruder.proc.poll() is None and primary.proc.poll() is None
        time.sleep(0.1)
    assert "refused (bad_auth)" in primary.log() and "refused (bad_auth)" in intruder.log()
    st = primary.status()
    assert st is not None and not st.synced and st.last_acked_epoch == 0
    i_st = intruder.status()
    assert i_st is not None and not i_st.synced
    with primary.client() as c:
        assert c.call("SET", "k", "v") == b"OK"
        assert c.call("GET", "k") == b"v"
    # Refusals cost the primary nothing: a rightful secondary pairs once the intruder is gone.
    intruder.kill()
    rightful = group.spawn("agent-b", "secondary", peer=primary)
    wait_protected(primary, rightful)


def test_a_refused_dialer_does_not_keep_the_rightful_secondary_out(group: AgentGroup) -> None:
    """An intruder that keeps retrying in step with the primary must not take channels of the
    rightful secondary's pairing (each refused connection used to fail the whole pairing)."""
    primary = group.spawn("agent-a", "primary")
    primary.wait_for("serving as primary", lambda s: s.role == "primary")
    intruder = group.spawn("agent-x", "secondary", peer=primary, secret="another secret, long enough")
    intruder.wait_for("refused", lambda s: "wrong secret for this VM" in intruder.log())
    rightful = group.spawn("agent-b", "secondary", peer=primary)
    # Pairing and syncing 64 MiB takes a few seconds here; fifteen allow for a loaded machine.
    wait_protected(primary, rightful, timeout=15)
    # And the intruder, still dialling, does not disturb the pairing it was kept out of.
    epoch = primary.wait_for("protected", lambda s: s.synced).last_acked_epoch
    primary.wait_for("acknowledging epochs", lambda s: s.synced and s.last_acked_epoch > epoch + 10)
    assert intruder.proc.poll() is None
    st = intruder.status()
    assert st is not None and not st.synced
