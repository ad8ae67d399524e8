"""Which agents the operator polls with one short try: those on a node that is not Ready, and
the pod an unplanned failover in progress moves away from (a planned switchover needs the old
primary's answers, so it keeps the full retries); and that the peers of an agent that did not
answer are asked again, so their heartbeat ages describe the end of the poll."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from colo_operator import handlers
from colo_operator.snapshot import AgentReport, NodeHealth, NodeView, PodView


class _Agents:
    def __init__(self, answering: frozenset[str] = frozenset()) -> None:
        self.suspect: dict[str, bool] = {}
        self.answering = answering
        self.calls: list[str] = []

    async def status(
        self, ip: str, port: int, *, peer: str | None = None, suspect: bool = False
    ) -> AgentReport:
        self.suspect.setdefault(ip, suspect)
        self.calls.append(ip)
        if ip in self.answering:
            return AgentReport(status=cast(Any, f"status {self.calls.count(ip)} of {ip}"))
        return AgentReport(status=None, error="unreachable")


def _pod(name: str, ip: str, node: str) -> PodView:
    return PodView(name=name, role=None, serial=1, node=node, phase="Running", ip=ip, ready=True,
                   deleting=False)


def _suspects(body: dict[str, Any], health_b: NodeHealth = NodeHealth.READY) -> dict[str, bool]:
    agents = _Agents()
    rt: Any = type("Rt", (), {"agents": agents, "control_port": 8443})()
    pods = (_pod("vm-1", "10.0.0.1", "a"), _pod("vm-2", "10.0.0.2", "b"))
    nodes = {"a": NodeView("a", NodeHealth.READY), "b": NodeView("b", health_b)}
    asyncio.run(handlers._poll(rt, pods, nodes, None, handlers._failing_over_from(body)))
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
    reports = asyncio.run(handlers._poll(rt, pods, nodes, None))
    assert sorted(agents.calls) == ["10.0.0.1", "10.0.0.2", "10.0.0.2"]
    assert reports["vm-2"].status == "status 2 of 10.0.0.2" and reports["vm-1"].status is None


def test_nobody_is_asked_twice_when_every_agent_answers() -> None:
    agents = _Agents(answering=frozenset({"10.0.0.1", "10.0.0.2"}))
    rt: Any = type("Rt", (), {"agents": agents, "control_port": 8443})()
    pods = (_pod("vm-1", "10.0.0.1", "a"), _pod("vm-2", "10.0.0.2", "b"))
    nodes = {"a": NodeView("a", NodeHealth.READY), "b": NodeView("b", NodeHealth.READY)}
    asyncio.run(handlers._poll(rt, pods, nodes, None))
    assert sorted(agents.calls) == ["10.0.0.1", "10.0.0.2"]
