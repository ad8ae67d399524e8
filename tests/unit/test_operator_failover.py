"""Replica health and failover verdicts, the uncertain ones included."""

from __future__ import annotations

from support.operator_world import UNREACHABLE, agent, node, pod

from colo_agent.api.models import PeerState, Role
from colo_operator.failover import (
    Cause,
    Healthy,
    Lost,
    NoFailover,
    Promote,
    Starting,
    Uncertain,
    Unrecoverable,
    Wait,
    assess_replica,
    failover_verdict,
    peer_hears,
)
from colo_operator.snapshot import NodeHealth

PRIMARY = pod("vm-0", "primary", "n1")
SECONDARY = pod("vm-1", "secondary", "n2")


def assess(p=PRIMARY, n=None, report=None, peer=None):
    return assess_replica(
        p,
        n if n is not None else (node(p.node) if p is not None and p.node else None),
        report if report is not None else agent(Role.PRIMARY),
        peer if peer is not None else agent(Role.SECONDARY),
        expected_role=Role.PRIMARY,
        heartbeat_timeout_ms=500,
        what="primary",
    )


def test_peer_hears() -> None:
    assert peer_hears(agent(Role.SECONDARY), 500) is True
    assert peer_hears(agent(Role.SECONDARY, heartbeat_age_ms=501), 500) is False
    assert peer_hears(agent(Role.SECONDARY, peer=PeerState.LOST), 500) is False
    # Connected, but no heartbeat age: the agent cannot vouch for now.
    assert peer_hears(agent(Role.SECONDARY, peer=PeerState.CONNECTED, heartbeat_age_ms=None), 500) is None
    assert peer_hears(UNREACHABLE, 500) is None


def test_healthy_and_starting() -> None:
    assert isinstance(assess(), Healthy)
    assert isinstance(assess(p=pod("vm-0", "primary", None)), Starting)
    assert isinstance(assess(p=pod("vm-0", "primary", "n1", phase="Pending")), Starting)


def test_certain_losses() -> None:
    assert assess(p=None).cause is Cause.POD_GONE  # type: ignore[union-attr]
    assert assess(p=pod("vm-0", "primary", "n1", deleting=True)).cause is Cause.POD_DELETED  # type: ignore[union-attr]
    failed = assess(p=pod("vm-0", "primary", "n1", phase="Failed", problem="agent exited: OOMKilled"))
    assert isinstance(failed, Lost) and failed.cause is Cause.POD_FAILED and "OOMKilled" in failed.detail
    gone = assess(n=node("n1", NodeHealth.GONE))
    assert isinstance(gone, Lost) and gone.cause is Cause.NODE_GONE


def test_node_not_ready_needs_the_peer_to_agree() -> None:
    bad = node("n1", NodeHealth.NOT_READY)
    assert isinstance(assess(n=bad, report=UNREACHABLE), Uncertain)
    assert isinstance(assess(n=bad, report=UNREACHABLE, peer=UNREACHABLE), Uncertain)
    lost = assess(n=bad, report=UNREACHABLE, peer=agent(Role.SECONDARY, peer=PeerState.LOST))
    assert isinstance(lost, Lost) and lost.cause is Cause.NODE_NOT_READY
    unknown = assess(n=node("n1", NodeHealth.UNKNOWN), peer=agent(Role.SECONDARY, heartbeat_age_ms=10_000))
    assert isinstance(unknown, Lost) and unknown.cause is Cause.NODE_UNKNOWN


def test_node_down_and_agent_silent_is_lost_when_the_peer_cannot_vouch() -> None:
    silent_peer = agent(Role.SECONDARY, heartbeat_age_ms=None)
    lost = assess(n=node("n1", NodeHealth.UNKNOWN), report=UNREACHABLE, peer=silent_peer)
    assert isinstance(lost, Lost) and lost.cause is Cause.NODE_UNKNOWN
    # The agent still answers the operator: only the kubelet is gone.
    assert isinstance(assess(n=node("n1", NodeHealth.UNKNOWN), peer=silent_peer), Uncertain)
    # On a Ready node an unreachable agent alone is not enough.
    assert isinstance(assess(report=UNREACHABLE, peer=silent_peer), Uncertain)


def test_unreachable_agent_on_ready_node() -> None:
    assert isinstance(assess(report=UNREACHABLE), Uncertain)
    assert isinstance(assess(report=UNREACHABLE, peer=UNREACHABLE), Uncertain)
    lost = assess(report=UNREACHABLE, peer=agent(Role.SECONDARY, peer=PeerState.LOST))
    assert isinstance(lost, Lost) and lost.cause is Cause.AGENT_UNREACHABLE
    # A peer that never had a partner cannot vouch either way: still booting.
    assert isinstance(assess(report=UNREACHABLE, peer=agent(Role.SECONDARY, peer=PeerState.NONE)), Starting)


def test_wrong_role_is_uncertain() -> None:
    assert isinstance(assess(report=agent(Role.SECONDARY)), Uncertain)


def test_failover_verdicts() -> None:
    lost = Lost(Cause.NODE_UNKNOWN, "gone")
    ok = agent(Role.SECONDARY, peer=PeerState.LOST)
    assert failover_verdict(Healthy(), SECONDARY, Healthy(), ok, True) == NoFailover()
    assert isinstance(failover_verdict(Uncertain("?"), SECONDARY, Healthy(), ok, True), Wait)
    assert failover_verdict(lost, SECONDARY, Healthy(), ok, False) == Promote(
        "vm-1", Cause.NODE_UNKNOWN, "gone"
    )
    assert isinstance(failover_verdict(lost, None, None, UNREACHABLE, False), Unrecoverable)
    both = failover_verdict(lost, SECONDARY, Lost(Cause.POD_FAILED, "also gone"), UNREACHABLE, True)
    assert isinstance(both, Unrecoverable) and "also gone" in both.detail
    assert isinstance(failover_verdict(lost, SECONDARY, Uncertain("?"), UNREACHABLE, True), Wait)
    unsynced = agent(Role.SECONDARY, peer=PeerState.LOST, synced=False)
    assert isinstance(failover_verdict(lost, SECONDARY, Healthy(), unsynced, False), Unrecoverable)
    assert isinstance(failover_verdict(lost, SECONDARY, Healthy(), unsynced, True), Promote)
