"""Builders of ColoVM worlds (snapshots) for the operator's decision tests."""

from __future__ import annotations

import datetime as dt
from typing import Any

from colo_agent.api.models import (
    AgentStatus,
    CheckpointFigures,
    GuestStatus,
    PeerState,
    PeerStatus,
    ReplicationMode,
    Role,
    Totals,
)
from colo_operator import constants as c
from colo_operator.snapshot import (
    AgentReport,
    LeaseView,
    NodeHealth,
    NodeView,
    PodView,
    Snapshot,
    VMView,
)
from colo_operator.spec import ColoVMSpec

NOW = dt.datetime(2026, 11, 25, 20, 0, 0, tzinfo=dt.UTC)


def node(name: str, health: NodeHealth = NodeHealth.READY, **kw: Any) -> NodeView:
    labels = {"kubernetes.io/hostname": name, **kw.pop("labels", {})}
    return NodeView(name=name, health=health, labels=labels, **kw)


def nodes(*views: NodeView) -> dict[str, NodeView]:
    return {v.name: v for v in views}


def pod(
    name: str, role: str | None, node_name: str | None, *, serial: int | None = None, **kw: Any
) -> PodView:
    if serial is None:
        serial = int(name.rsplit("-", 1)[-1])
    defaults: dict[str, Any] = dict(
        phase="Running" if node_name else "Pending",
        ip=f"10.0.0.{serial + 10}" if node_name else None,
        ready=bool(node_name),
        deleting=False,
    )
    defaults.update(kw)
    return PodView(
        name=name,
        role=role,
        serial=serial,
        node=node_name,
        **defaults,
    )


def agent(
    role: Role,
    *,
    term: int = 1,
    epoch: int = 5,
    peer: PeerState = PeerState.CONNECTED,
    heartbeat_age_ms: float | None = 20.0,
    synced: bool = True,
    checkpoints: int = 50,
) -> AgentReport:
    return AgentReport(
        status=AgentStatus(
            role=role,
            term=term,
            last_acked_epoch=epoch,
            mode=ReplicationMode.CHECKPOINT,
            peer=PeerStatus(state=peer, address="10.0.0.1:7700", last_heartbeat_age_ms=heartbeat_age_ms),
            guest=GuestStatus(
                state="running" if role is Role.PRIMARY else "paused", accel="tcg", memory_bytes=64 << 20
            ),
            totals=Totals(checkpoints=checkpoints, pages=1000, bytes=4096000),
            last_checkpoint=CheckpointFigures(
                epoch=epoch, pause_ms=1.25, pages=12, bytes=49152, duration_ms=3.5, cause="interval"
            ),
            synced=synced,
        )
    )


DEFAULT_LEASE = LeaseView(holder="vm-0", term=1)
UNREACHABLE = AgentReport(status=None, error="connection refused")


def vm(status: dict[str, Any] | None = None, spec: dict[str, Any] | None = None, **kw: Any) -> VMView:
    return VMView(
        namespace="ns",
        name="vm",
        uid="uid-1",
        generation=kw.pop("generation", 1),
        spec=ColoVMSpec.from_dict(spec or {}),
        status=status or {},
        **kw,
    )


def protected_status(**over: Any) -> dict[str, Any]:
    st: dict[str, Any] = {
        "observedGeneration": 1,
        "phase": "Protected",
        "currentPrimary": "vm-0",
        "targetPrimary": "vm-0",
        "podSerial": 2,
        "term": 1,
        "failovers": 0,
        "primary": {"pod": "vm-0", "node": "n1", "synced": False},
        "secondary": {"pod": "vm-1", "node": "n2", "synced": True},
    }
    st.update(over)
    return st


def world(
    *,
    status: dict[str, Any] | None = None,
    pods: tuple[PodView, ...] | None = None,
    node_views: dict[str, NodeView] | None = None,
    agents: dict[str, AgentReport] | None = None,
    lease: LeaseView | None = DEFAULT_LEASE,
    spec: dict[str, Any] | None = None,
    annotations: dict[str, str] | None = None,
    now: dt.datetime = NOW,
) -> Snapshot:
    """Default: a Protected VM, primary vm-0 on n1, secondary vm-1 on n2, spare n3."""
    return Snapshot(
        vm=vm(status if status is not None else protected_status(), spec, annotations=annotations or {}),
        pods=pods
        if pods is not None
        else (pod("vm-0", c.ROLE_PRIMARY, "n1"), pod("vm-1", c.ROLE_SECONDARY, "n2")),
        nodes=node_views if node_views is not None else nodes(node("n1"), node("n2"), node("n3")),
        agents=agents if agents is not None else {"vm-0": agent(Role.PRIMARY), "vm-1": agent(Role.SECONDARY)},
        lease=lease,
        now=now,
    )


def lost_primary_world(**kw: Any) -> Snapshot:
    """The primary's node is Unknown and its agent unreachable; the secondary lost the heartbeat."""
    return world(
        node_views=nodes(node("n1", NodeHealth.UNKNOWN), node("n2"), node("n3")),
        agents={"vm-0": UNREACHABLE, "vm-1": agent(Role.SECONDARY, peer=PeerState.LOST)},
        **kw,
    )
