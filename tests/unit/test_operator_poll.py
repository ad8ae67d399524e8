"""Which agents the operator polls with one short try: those on a node that is not Ready, and
the pod an unplanned failover in progress moves away from (a planned switchover needs the old
primary's answers, so it keeps the full retries); and that the peers of an agent that did not
answer are asked again, so their heartbeat ages describe the end of the poll."""

from __future__ import annotations

import asyncio
from typing import Any

from support.operator_world import agent, world

from colo_agent.api.models import PeerState, Role
from colo_operator import handlers
from colo_operator.agent_client import SUSPECT_TIMEOUT_S
from colo_operator.decide import decide
from colo_operator.snapshot import AgentReport, NodeHealth, NodeView, PodView


class _Agents:
    def __init__(self, answering: frozenset[str] = frozenset()) -> None:
        self.suspect: dict[str, bool] = {}
        self.answering = answering
        self.calls: list[str] = []
        self.answers: list[AgentReport] = []

    async def status(
        self, ip: str, port: int, *, peer: str | None = None, suspect: bool = False
    ) -> AgentReport:
        self.suspect.setdefault(ip, suspect)
        self.calls.append(ip)
        if ip in self.answering:
            self.answers.append(agent(Role.SECONDARY))
            return self.answers[-1]
        return AgentReport(status=None, error="unreachable")


def _pod(name: str, ip: str, node: str) -> PodView:
    return PodView(name=name, role=None, serial=1, node=node, phase="Running", ip=ip, ready=True,
                   deleting=False)


def _suspects(body: dict[str, Any], health_b: NodeHealth = NodeHealth.READY) -> dict[str, bool]:
    agents = _Agents()
    rt: Any = type("Rt", (), {"agents": agents, "control_port": 8443})()
    pods = (_pod("vm-1", "10.0.0.1", "a"), _pod("vm-2", "10.0.0.2", "b"))
    nodes = {"a": NodeView("a", NodeHealth.READY), "b": NodeView("b", health_b)}
    asyncio.run(handlers._poll(rt, pods, nodes, None, handlers._failing_over_from(body),
                                heartbeat_timeout_ms=500))
    return agents.suspect


def test_the_pod_a_failover_moves_away_from_gets_one_short_try() -> None:
    body = {"status": {"transition": {"kind": "Failover", "from": "vm-1", "to": "vm-2", "step": "Promote"}}}
    assert _suspects(body) == {"10.0.0.1": True, "10.0.0.2": False}


def test_a_switchover_keeps_full_retries_for_the_old_primary() -> None:
    body = {"status": {"transition": {"kind": "Switchover", "from": "vm-1", "to": "vm-2",
                                      "step": "Checkpoint"}}}
    assert _suspects(body) == {"10.0.0.1": False, "10.0.0.2": False}


def test_without_a_transition_only_a_node_that_is_not_ready_makes_an_agent_suspect() -> None:
    assert _suspects({"status": {}}) == {"10.0.0.1": False, "10.0.0.2": False}
    assert _suspects({}, health_b=NodeHealth.UNKNOWN) == {"10.0.0.1": False, "10.0.0.2": True}


def test_peers_of_a_silent_agent_are_asked_again_once_its_poll_timed_out() -> None:
    agents = _Agents(answering=frozenset({"10.0.0.2"}))
    rt: Any = type("Rt", (), {"agents": agents, "control_port": 8443})()
    pods = (_pod("vm-1", "10.0.0.1", "a"), _pod("vm-2", "10.0.0.2", "b"))
    nodes = {"a": NodeView("a", NodeHealth.READY), "b": NodeView("b", NodeHealth.READY)}
    reports = asyncio.run(handlers._poll(rt, pods, nodes, None, heartbeat_timeout_ms=500))
    assert sorted(agents.calls) == ["10.0.0.1", "10.0.0.2", "10.0.0.2"]
    assert reports["vm-2"] is agents.answers[1] and reports["vm-1"].status is None


def test_nobody_is_asked_twice_when_every_agent_answers() -> None:
    agents = _Agents(answering=frozenset({"10.0.0.1", "10.0.0.2"}))
    rt: Any = type("Rt", (), {"agents": agents, "control_port": 8443})()
    pods = (_pod("vm-1", "10.0.0.1", "a"), _pod("vm-2", "10.0.0.2", "b"))
    nodes = {"a": NodeView("a", NodeHealth.READY), "b": NodeView("b", NodeHealth.READY)}
    asyncio.run(handlers._poll(rt, pods, nodes, None, heartbeat_timeout_ms=500))
    assert sorted(agents.calls) == ["10.0.0.1", "10.0.0.2"]


class _Hanging:
    """The primary (10.0.0.1) never answers within the test; the secondary answers at once."""

    def __init__(self, secondary: AgentReport) -> None:
        self.secondary = secondary
        self.cancelled = False
        self.calls: list[str] = []

    async def status(
        self, ip: str, port: int, *, peer: str | None = None, suspect: bool = False
    ) -> AgentReport:
        self.calls.append(ip)
        if ip == "10.0.0.2":
            return self.secondary
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return AgentReport(status=None, error="timed out after its full retries")


def _poll_hanging(secondary: AgentReport, budget: float) -> tuple[dict[str, AgentReport], _Hanging]:
    agents = _Hanging(secondary)
    rt: Any = type("Rt", (), {"agents": agents, "control_port": 8443})()
    pods = (_pod("vm-0", "10.0.0.1", "a"), _pod("vm-1", "10.0.0.2", "b"))
    nodes = {"a": NodeView("a", NodeHealth.READY), "b": NodeView("b", NodeHealth.READY)}

    async def run() -> dict[str, AgentReport]:
        return await asyncio.wait_for(handlers._poll(rt, pods, nodes, None, heartbeat_timeout_ms=500), budget)

    return asyncio.run(run()), agents


def test_a_silent_agent_whose_peer_lost_the_heartbeat_is_cut_short() -> None:
    lost = agent(Role.SECONDARY, peer=PeerState.LOST, heartbeat_age_ms=900.0)
    # Generous for a loaded machine, far below the 30 s the primary's poll would take.
    reports, agents = _poll_hanging(lost, budget=SUSPECT_TIMEOUT_S + 10)
    assert agents.cancelled
    assert reports["vm-0"].status is None
    assert "peer reporting the heartbeat lost" in (reports["vm-0"].error or "")
    # The secondary was asked again once the primary's answer was given up on.
    assert reports["vm-1"] is lost and agents.calls.count("10.0.0.2") == 2


def test_a_stale_heartbeat_of_a_connected_peer_also_cuts_the_wait_short() -> None:
    stale = agent(Role.SECONDARY, peer=PeerState.CONNECTED, heartbeat_age_ms=800.0)
    reports, agents = _poll_hanging(stale, budget=SUSPECT_TIMEOUT_S + 10)
    assert agents.cancelled and reports["vm-0"].status is None


def test_a_silent_agent_whose_peer_still_hears_it_gets_its_full_retries() -> None:
    hears = agent(Role.SECONDARY, peer=PeerState.CONNECTED, heartbeat_age_ms=20.0)
    try:
        _poll_hanging(hears, budget=SUSPECT_TIMEOUT_S + 1.0)
    except TimeoutError:
        return
    raise AssertionError("the poll gave up on an agent whose peer still receives its heartbeats")


def test_an_agent_without_a_peer_yet_cuts_nothing_short() -> None:
    alone = agent(Role.SECONDARY, peer=PeerState.NONE, heartbeat_age_ms=None, synced=False)
    try:
        _poll_hanging(alone, budget=SUSPECT_TIMEOUT_S + 1.0)
    except TimeoutError:
        return
    raise AssertionError("the poll gave up on an agent although its peer has nothing to lose track of")


def test_the_long_poll_goes_to_the_secondary_only_while_it_hears_the_primary() -> None:
    steady = world()
    assert handlers._watch_target(steady, decide(steady)) == "10.0.0.11"
    syncing = world(agents={"vm-0": agent(Role.PRIMARY),
                            "vm-1": agent(Role.SECONDARY, peer=PeerState.SYNCING)})
    assert handlers._watch_target(syncing, decide(syncing)) is None
    # Once it lost the primary the failover starts; nothing is left to wait for.
    lost = world(agents={"vm-0": AgentReport(status=None, error="timeout"),
                         "vm-1": agent(Role.SECONDARY, peer=PeerState.LOST)})
    plan = decide(lost)
    assert plan.status.get("transition") and handlers._watch_target(lost, plan) is None
