"""The data plane without the control plane: a protected VM serves through an API server outage.

Real agent processes with the Kubernetes Lease arbiter against a real
kube-apiserver (the `kube_apiserver` fixture). Each agent reaches the API
server through its own `CuttableProxy`, so a test can cut one agent off, or
stop the API server itself for everyone.

The rule under test (docs/architecture.md, "Output and the Lease"): output
the secondary acknowledged leaves without a valid Lease; only output
released without a secondary needs the Lease and the epoch floor.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from cluster import ControlPlane
from prometheus_client.parser import text_string_to_metric_families
from support.agents import AgentGroup, AgentProcess, WriteLog, missing_writes, wait_protected, write_keys
from support.proxy import CuttableProxy

# Long enough that the loaded machine's hiccups are not lost leases; short
# enough that a test waits a few of them.
LEASE_MS = 2000
LEASE = LEASE_MS / 1000


@dataclass
class Site:
    """A pair of agents on the Lease arbiter, each behind its own proxy to the API server."""

    group: AgentGroup
    lease: str
    proxies: dict[str, CuttableProxy]
    kubeconfigs: dict[str, Path]

    def spawn(self, name: str, role: str, peer: AgentProcess | None = None,
              peer_address: str | None = None) -> AgentProcess:
        return self.group.spawn(name, role, peer=peer, peer_address=peer_address,
                                extra=["--arbiter", f"lease:default/{self.lease}"],
                                env={"KUBECONFIG": str(self.kubeconfigs[name])})


@pytest.fixture
def site(kube_apiserver: ControlPlane, tmp_path: Path) -> Iterator[Site]:
    group = AgentGroup(tmp_path, lease_duration_ms=LEASE_MS)
    admin = yaml.safe_load(kube_apiserver.kubeconfig.read_text())
    port = int(kube_apiserver.server.rsplit(":", 1)[1])
    proxies, kubeconfigs = {}, {}
    for name in ("agent-a", "agent-b"):
        proxy = CuttableProxy("127.0.0.1", port)
        config = yaml.safe_load(yaml.safe_dump(admin))
        config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
        path = tmp_path / f"{name}.kubeconfig"
        path.write_text(yaml.safe_dump(config))
        proxies[name], kubeconfigs[name] = proxy, path
    try:
        yield Site(group, f"vm-{uuid.uuid4().hex[:8]}", proxies, kubeconfigs)
    finally:
        group.close()
        for proxy in proxies.values():
            proxy.close()


class Writers:
    """Clients writing unique keys through the primary until stopped."""

    def __init__(self, agent: AgentProcess, n: int = 2) -> None:
        self.log = WriteLog()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=write_keys, args=(agent, f"w{i}", self._stop.is_set, self.log),
                             kwargs={"timeout": 60.0}, daemon=True)
            for i in range(n)
        ]
        for t in self._threads:
            t.start()

    def count(self) -> int:
        return len(self.log.acknowledged)

    def stop(self) -> WriteLog:
        self._stop.set()
        for t in self._threads:
            t.join(90)
        return self.log


def failover_possible_metric(agent: AgentProcess) -> float:
    text = httpx.get(f"{agent.control_url}/metrics", timeout=5.0).text
    for family in text_string_to_metric_families(text):
        if family.name == "colo_failover_possible":
            return family.samples[0].value
    raise AssertionError("no colo_failover_possible in /metrics")


def wait_writes(writers: Writers, more_than: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while writers.count() <= more_than:
        assert not writers.log.errors, writers.log.errors
        assert time.monotonic() < deadline, f"no write acknowledged past {more_than} in {timeout:.0f} s"
        time.sleep(0.05)


def _apiserver_pgid(plane: ControlPlane) -> int:
    (component,) = [c for c in plane.components if c.name == "kube-apiserver"]
    assert component.process is not None
    return component.process.pid


def test_a_protected_vm_serves_through_an_api_server_stopped_for_60_s(
    site: Site, kube_apiserver: ControlPlane
) -> None:
    primary = site.spawn("agent-a", "primary")
    primary.wait_for("serving as primary", lambda s: s.role == "primary")
    secondary = site.spawn("agent-b", "secondary", peer=primary)
    term = wait_protected(primary, secondary)
    primary.wait_for("able to fail over", lambda s: s.failover_possible is True)
    writers = Writers(primary)
    wait_writes(writers, 20)
    pgid = _apiserver_pgid(kube_apiserver)
    os.killpg(pgid, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        st = primary.wait_for("saying failover is impossible", lambda s: s.failover_possible is False,
                              timeout=6 * LEASE)
        assert st.synced and st.role == "primary"
        assert failover_possible_metric(primary) == 0
        secondary.wait_for("saying failover is impossible", lambda s: s.failover_possible is False,
                           timeout=6 * LEASE)
        # Long past the lease: writes are still acknowledged, through checkpoints the secondary took.
        at_lease_end = writers.count()
        while time.monotonic() - stopped < 60:
            time.sleep(1.0)
            assert not writers.log.errors, writers.log.errors
        during = writers.count() - at_lease_end
        assert during > 100, f"only {during} writes acknowledged while the API server was stopped"
        assert primary.status().failover_possible is False  # type: ignore[union-attr]
    finally:
        os.killpg(pgid, signal.SIGCONT)
    primary.wait_for("able to fail over again", lambda s: s.failover_possible is True, timeout=60)
    assert failover_possible_metric(primary) == 1
    log = writers.stop()
    assert not log.errors, log.errors
    # Nothing lost: the secondary, promoted, has every acknowledged write.
    primary.kill()
    response = secondary.promote(term + 1, site.group.secret)
    assert response.status_code == 200, response.text
    secondary.wait_for("primary", lambda s: s.role == "primary")
    assert missing_writes(secondary, log) == []


def test_primary_cut_from_the_api_server_only_keeps_serving_and_keeps_its_term(site: Site) -> None:
    primary = site.spawn("agent-a", "primary")
    primary.wait_for("serving as primary", lambda s: s.role == "primary")
    secondary = site.spawn("agent-b", "secondary", peer=primary)
    term = wait_protected(primary, secondary)
    writers = Writers(primary)
    wait_writes(writers, 20)
    site.proxies["agent-a"].cut()
    primary.wait_for("saying failover is impossible", lambda s: s.failover_possible is False,
                     timeout=6 * LEASE)
    before = writers.count()
    time.sleep(3 * LEASE)
    assert writers.count() > before + 20, "writes stopped while the primary was cut from the API server"
    # The secondary still sees the API server: for it a failover is possible.
    assert secondary.status().failover_possible is True  # type: ignore[union-attr]
    site.proxies["agent-a"].restore()
    st = primary.wait_for("renewing again", lambda s: s.failover_possible is True, timeout=60)
    assert st.term == term and st.role == "primary"
    log = writers.stop()
    assert not log.errors, log.errors
    assert missing_writes(primary, log) == []


def test_secondary_cut_from_the_primary_only_cannot_be_promoted_over_released_output(site: Site) -> None:
    primary = site.spawn("agent-a", "primary")
    primary.wait_for("serving as primary", lambda s: s.role == "primary")
    link = CuttableProxy("127.0.0.1", primary.replication_port)
    try:
        secondary = site.spawn("agent-b", "secondary", peer_address=f"127.0.0.1:{link.port}")
        term = wait_protected(primary, secondary)
        writers = Writers(primary)
        wait_writes(writers, 20)
        link.cut()
        # The primary raises the epoch floor (it reaches the API server) and goes on alone.
        primary.wait_for("unprotected", lambda s: not s.synced, timeout=30)
        before = writers.count()
        wait_writes(writers, before + 20)
        assert primary.status().failover_possible is False  # type: ignore[union-attr]
        # The cut-off secondary's image is older than what the primary released: refused.
        primary.kill()
        response = secondary.promote(term + 1, site.group.secret, timeout=60)
        assert response.status_code == 409, response.text
        assert "stale" in response.text
        writers.stop()
    finally:
        link.close()


def test_secondary_whose_acknowledgement_was_lost_cannot_be_promoted_over_released_output(site: Site) -> None:
    """The boundary case: the secondary committed the epoch in flight, the primary never heard
    its acknowledgement and went on alone. The floor must be above that epoch too."""
    primary = site.spawn("agent-a", "primary")
    primary.wait_for("serving as primary", lambda s: s.role == "primary")
    link = CuttableProxy("127.0.0.1", primary.replication_port)
    try:
        secondary = site.spawn("agent-b", "secondary", peer_address=f"127.0.0.1:{link.port}")
        term = wait_protected(primary, secondary)
        writers = Writers(primary)
        wait_writes(writers, 20)
        # The secondary still receives (and commits) epochs; nothing it says reaches the primary.
        link.mute_upstream()
        st = primary.wait_for("unprotected", lambda s: not s.synced, timeout=30)
        before = writers.count()
        wait_writes(writers, before + 20)
        acked = primary.status().last_acked_epoch  # type: ignore[union-attr]
        assert acked == st.last_acked_epoch
        committed = secondary.status().last_acked_epoch  # type: ignore[union-attr]
        assert committed > acked, "no epoch was in flight when the secondary stopped being heard"
        primary.kill()
        response = secondary.promote(term + 1, site.group.secret, timeout=60)
        assert response.status_code == 409, response.text
        assert "stale" in response.text
        writers.stop()
    finally:
        link.close()


def test_primary_cut_from_both_holds_what_it_cannot_protect_and_the_secondary_has_every_ack(
    site: Site,
) -> None:
    primary = site.spawn("agent-a", "primary")
    primary.wait_for("serving as primary", lambda s: s.role == "primary")
    link = CuttableProxy("127.0.0.1", primary.replication_port)
    try:
        secondary = site.spawn("agent-b", "secondary", peer_address=f"127.0.0.1:{link.port}")
        term = wait_protected(primary, secondary)
        writers = Writers(primary)
        wait_writes(writers, 20)
        # The primary loses the API server and then its secondary: it can neither keep the
        # secondary's image current nor write the epoch floor, so nothing may leave alone.
        site.proxies["agent-a"].cut()
        primary.wait_for("saying failover is impossible", lambda s: s.failover_possible is False,
                         timeout=6 * LEASE)
        link.cut()
        primary.wait_for("unprotected", lambda s: not s.synced, timeout=30)
        time.sleep(0.5)
        frozen = writers.count()
        time.sleep(2 * LEASE)
        assert writers.count() == frozen, "a primary without secondary, floor or lease acknowledged writes"
        # The secondary (which reaches the API server) takes over once the lease ran out.
        response = secondary.promote(term + 1, site.group.secret, timeout=60)
        assert response.status_code == 200, response.text
        secondary.wait_for("primary", lambda s: s.role == "primary")
        primary.kill()
        log = writers.stop()
        assert missing_writes(secondary, log) == []
    finally:
        link.close()
