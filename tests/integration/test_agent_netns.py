"""A primary and a secondary in two network namespaces joined by a veth: the path between two hosts."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.agents import (
    AgentGroup,
    Netns,
    WriteLog,
    missing_writes,
    netns_unavailable_reason,
    veth_pair,
    wait_protected,
    write_keys,
)

from colo_agent.api.models import PromoteResult

pytestmark = pytest.mark.netns


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[tuple[AgentGroup, Netns, str, Netns, str]]:
    """Two namespaces, 10.78.0.1 and 10.78.0.2, and a group whose agents die before they go."""
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with contextlib.ExitStack() as stack:
        try:
            ns_a, ns_b, addr_a, addr_b = stack.enter_context(veth_pair(f"colo-agt{os.getpid()}"))
        except (RuntimeError, OSError) as exc:
            pytest.skip(f"cannot create network namespaces here: {exc}")
        group = AgentGroup(tmp_path)
        stack.callback(group.close)
        yield group, ns_a, addr_a, ns_b, addr_b


def test_pair_across_a_veth_survives_kill_9_of_the_primary(
    hosts: tuple[AgentGroup, Netns, str, Netns, str],
) -> None:
    group, ns_a, addr_a, ns_b, addr_b = hosts
    primary = group.spawn("agent-a", "primary", netns=ns_a, host=addr_a)
    primary.wait_for("serving as primary", lambda s: s.role == "primary")
    secondary = group.spawn("agent-b", "secondary", peer=primary, netns=ns_b, host=addr_b)
    term = wait_protected(primary, secondary)
    # The replication connections really cross the veth: the secondary's end is 10.78.0.2.
    assert f"paired with {addr_b}:" in primary.log()

    writes = WriteLog()
    stop = threading.Event()
    # Clients connect from inside the primary's namespace; the sockets then serve any thread.
    writers = [threading.Thread(target=write_keys, args=(primary, f"w{i}", stop.is_set, writes))
               for i in range(3)]
    for t in writers:
        t.start()
    time.sleep(2.0)
    primary.kill()
    stop.set()
    for t in writers:
        t.join(60)
    assert len(writes.acknowledged) >= 10

    r = secondary.promote(term + 1, group.secret)
    assert r.status_code == 200, r.text
    assert PromoteResult.from_json(r.text).term == term + 1
    st = secondary.wait_for("primary", lambda s: s.role == "primary")
    assert st.term == term + 1
    missing = missing_writes(secondary, writes)
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
    # The new primary serves in its own namespace.
    with secondary.client() as c:
        assert c.call("SET", "after", "failover") == b"OK"

