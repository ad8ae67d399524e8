"""Which agents the operator polls with one short try: those on a node that is not Ready, and
the pod an unplanned failover in progress moves away from (a planned switchover needs the old
primary's answers, so it keeps the full retries)."""

from __future__ import annotations

import asyncio
from typing import Any

from colo_operator import handlers
from colo_operator.snapshot import AgentReport, NodeHealth, NodeView, PodView


class _Agents:
    def __init__(self) -> None:
        self.suspect: dict[str, bool] = {}

    async def status(
        self, ip: str, port: int, *, peer: str | None = None, suspect: bool = False
    ) -> AgentReport:
        self.suspect[ip] = suspect
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
