"""Is a replica alive? Should the secondary be promoted? Pure verdicts, uncertain ones included.

The operator only ever sees the world from outside: the API server's view of
pods and nodes, and the agents' own reports over their control API. Each can
be stale or cut off on its own, so the verdicts cross-check them:

- A pod that is gone, deleted or terminated is lost for certain.
- A node that is NotReady or Unknown is not proof: the kubelet may be down
  while the agent runs on. The replica counts as lost only when its peer
  agent also reports the heartbeat gone; while the peer still receives
  heartbeats the verdict is `Uncertain` (wait), and if the peer cannot be
  asked either it is `Uncertain` too.
- An agent the operator cannot reach on a Ready node is lost only if its
  peer agrees.

Promotion itself is safe against a wrong verdict: the secondary must take
the Lease with a higher term, which it can only do after the old holder's
lease ran out, and a primary that cannot renew stops releasing output. A
wrong `Lost` costs a needless failover, never two primaries.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from colo_agent.api.models import PeerState, Role

from .snapshot import UNPOLLED, AgentReport, NodeHealth, NodeView, PodView


class Cause(enum.StrEnum):
    POD_GONE = "PodGone"
    POD_DELETED = "PodDeleted"
    POD_FAILED = "PodFailed"
    NODE_GONE = "NodeGone"
    NODE_NOT_READY = "NodeNotReady"
    NODE_UNKNOWN = "NodeUnknown"
    AGENT_UNREACHABLE = "AgentUnreachable"
    # Planned transitions.
    SWITCHOVER = "Switchover"
    NODE_DRAIN = "NodeDrain"
    UPGRADE = "Upgrade"  # rolling update: the primary moves to an updated secondary


@dataclass(frozen=True, slots=True)
class Healthy:
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Starting:
    """Created but not yet running (scheduling, pulling, booting); not a failure."""

    detail: str


@dataclass(frozen=True, slots=True)
class Lost:
    cause: Cause
    detail: str


@dataclass(frozen=True, slots=True)
class Uncertain:
    """Signals disagree; acting now could be wrong, so wait for them to settle."""

    detail: str


ReplicaHealth = Healthy | Starting | Lost | Uncertain


def peer_hears(report: AgentReport, timeout_ms: int) -> bool | None:
    """Does this agent still receive its peer's heartbeats?

    None when it cannot tell: the agent cannot be asked, or it reports a
    connected peer without the age of the last heartbeat (a state it set
    when the connection was made says nothing about now).
    """
    status = report.status
    if status is None:
        return None
    if status.peer.state in (PeerState.LOST, PeerState.NONE):
        return False
    age = status.peer.last_heartbeat_age_ms
    if age is None:
        return None
    return age <= timeout_ms


def assess_replica(
    pod: PodView | None,
    node: NodeView | None,
    report: AgentReport,
    peer_report: AgentReport,
    *,
    expected_role: Role,
    heartbeat_timeout_ms: int,
    what: str,
) -> ReplicaHealth:
    """Health of one replica (`what` is "primary" or "secondary", for messages)."""
    if pod is None:
        return Lost(Cause.POD_GONE, f"the {what} pod no longer exists")
    if pod.deleting:
        return Lost(Cause.POD_DELETED, f"the {what} pod {pod.name} is being deleted")
    if pod.terminated:
        detail = f": {pod.problem}" if pod.problem else ""
        return Lost(Cause.POD_FAILED, f"the {what} pod {pod.name} is {pod.phase}{detail}")
    if node is None:
        why = f": {pod.problem}" if pod.problem else ""
        return Starting(f"the {what} pod {pod.name} is not scheduled yet{why}")

    hears = peer_hears(peer_report, heartbeat_timeout_ms)
    if node.health is NodeHealth.GONE:
        return Lost(Cause.NODE_GONE, f"node {node.name} of the {what} no longer exists")
    if node.health is not NodeHealth.READY:
        cause = Cause.NODE_NOT_READY if node.health is NodeHealth.NOT_READY else Cause.NODE_UNKNOWN
        state = "NotReady" if cause is Cause.NODE_NOT_READY else "Unknown"
        if hears is None:
            if peer_report.status is not None and report.status is None:
                # The peer cannot vouch either way, but the kubelet and the agent
                # are both silent: two independent signals. The Lease still
                # refuses a promotion while a live primary renews it.
                return Lost(
                    cause,
                    f"node {node.name} of the {what} is {state} and its agent is silent: {report.error}",
                )
            return Uncertain(
                f"node {node.name} of the {what} is {state} and its peer agent cannot tell whether it "
                f"still receives heartbeats ({peer_report.error or 'no heartbeat age reported'})"
            )
        if hears:
            return Uncertain(
                f"node {node.name} of the {what} is {state} but its peer still receives heartbeats"
            )
        return Lost(cause, f"node {node.name} of the {what} is {state} and its peer lost the heartbeat")

    if pod.phase != "Running":
        return Starting(f"the {what} pod {pod.name} is {pod.phase}")
    if report.status is None:
        if hears is None:
            if peer_report is UNPOLLED:
                return Uncertain(f"the {what} agent does not answer ({report.error}) and has no running peer")
            if peer_report.status is None:
                return Uncertain(
                    f"neither agent answers the operator ({what}: {report.error}; peer: {peer_report.error})"
                )
            return Uncertain(
                f"the {what} agent does not answer the operator ({report.error}) and its peer cannot tell "
                "whether it still receives heartbeats"
            )
        if hears:
            return Uncertain(
                f"the {what} agent does not answer the operator ({report.error}) "
                "but its peer still receives heartbeats"
            )
        # A running pod whose agent never answered may still be booting; its
        # peer has nothing to lose track of yet.
        if peer_report.status is not None and peer_report.status.peer.state is PeerState.NONE:
            return Starting(f"the {what} agent does not answer yet: {report.error}")
        return Lost(
            Cause.AGENT_UNREACHABLE,
            f"the {what} agent does not answer ({report.error}) and its peer lost the heartbeat",
        )
    if report.status.role is not expected_role:
        return Uncertain(f"the {what} agent reports role {report.status.role.value}")
    return Healthy()


# --------------------------------------------------------------------------- promotion


@dataclass(frozen=True, slots=True)
class Promote:
    """Fail over: promote `target` (the secondary) because the primary is lost."""

    target: str
    cause: Cause
    detail: str


@dataclass(frozen=True, slots=True)
class Wait:
    detail: str


@dataclass(frozen=True, slots=True)
class Unrecoverable:
    """The primary is lost and nothing holds its state: the VM is gone."""

    detail: str


@dataclass(frozen=True, slots=True)
class NoFailover:
    pass


FailoverVerdict = Promote | Wait | Unrecoverable | NoFailover


def failover_verdict(
    primary_health: ReplicaHealth,
    secondary: PodView | None,
    secondary_health: ReplicaHealth | None,
    secondary_report: AgentReport,
    secondary_was_synced: bool,
) -> FailoverVerdict:
    """Decide on a failover from the primary's and secondary's health.

    `secondary_was_synced` is what status remembers of this very secondary
    pod: it stays promotable after its own report stops saying so (an agent
    may report `synced: false` once its peer is gone).
    """
    if not isinstance(primary_health, Lost):
        if isinstance(primary_health, Uncertain):
            return Wait(primary_health.detail)
        return NoFailover()
    lost = primary_health
    if secondary is None or secondary_health is None:
        return Unrecoverable(f"{lost.detail}, and there is no secondary to take over")
    if isinstance(secondary_health, Lost):
        return Unrecoverable(f"{lost.detail}, and {secondary_health.detail}")
    status = secondary_report.status
    if status is None:
        # The secondary may only be out of the operator's reach; it holds the state, so wait for it.
        return Wait(
            f"{lost.detail}; the secondary {secondary.name} cannot be asked: {secondary_report.error}"
        )
    if not (status.synced or secondary_was_synced):
        return Unrecoverable(
            f"{lost.detail}, and the secondary {secondary.name} never completed its first sync"
        )
    return Promote(target=secondary.name, cause=lost.cause, detail=lost.detail)
