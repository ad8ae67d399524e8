"""The reconcile decision: one `Snapshot` in, one `Plan` out.

A plan is the list of actions to apply in order, the status to write once
they all succeeded, the events to post and a one-line summary for the log.
The handler applies it; if an action fails it stops there, records the error
and calls `decide` again on a fresh snapshot later. Every decision is made
from what is observed, so re-deciding after a partial apply (or after an
operator restart) resumes instead of repeating: promotion is recognised as
done from the target agent's own report, pods are recognised by name and
label, and a failover or switchover in progress lives in `status.transition`.

Promotion follows CloudNativePG's shape: the operator first records
`targetPrimary` and the transition (the pending step), then asks the target
agent to promote with `term + 1`; the agent takes the Lease with that term by
compare-and-swap before it starts serving, so a wrong decision can never make
two primaries. Only then are the pods relabelled, which moves the Service.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from colo_agent.api.models import PeerState, Role

from . import constants as c
from .failover import (
    Cause,
    Healthy,
    Lost,
    NoFailover,
    Promote,
    ReplicaHealth,
    Starting,
    Uncertain,
    Unrecoverable,
    Wait,
    assess_replica,
    failover_verdict,
)
from .placement import NoSpareNode, Place, place_replica
from .snapshot import AgentReport, NodeHealth, PodView, Snapshot, parse_time
from .status import (
    Condition,
    ConditionType,
    EventNote,
    Phase,
    Reason,
    false,
    figures,
    merge_conditions,
    timestamp_ms,
    transition_events,
    true,
    unknown,
)

# A switchover that cannot get its final checkpoint acknowledged within this
# long is abandoned (before the primary was demoted, so nothing changed).
SWITCHOVER_TIMEOUT_S = 30.0

ROLE_FENCED = "fenced"

# A primary that fails before it ever served is replaced this many times
# before the VM is declared Failed (a bad image would otherwise loop forever).
MAX_PRIMARY_RESTARTS = 3

# After a failover caused by a node or agent going silent, its node takes no
# new replica for this long even if it still looks Ready (see _avoid_lost_node).
AVOID_LOST_NODE_S = 120.0
_SILENT_CAUSES = frozenset(
    {
        Cause.AGENT_UNREACHABLE.value,
        Cause.NODE_NOT_READY.value,
        Cause.NODE_UNKNOWN.value,
        Cause.NODE_GONE.value,
    }
)


def replication(
    make: Callable[[ConditionType, Reason, str], Condition], reason: Reason, message: str
) -> list[Condition]:
    """`Protected` and `Synced` with the same verdict: they part only while a synced secondary
    exists whose protection is in doubt, which callers spell out."""
    return [make(ConditionType.PROTECTED, reason, message), make(ConditionType.SYNCED, reason, message)]


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class EnsureObjects:
    """Create what every ColoVM needs besides its pods, if missing: Secret, Lease, RBAC, Services, PDB."""


@dataclass(frozen=True, slots=True)
class CreatePod:
    name: str
    serial: int
    role: str
    # The primary's replication address (HOST:PORT), for a secondary.
    peer: str | None
    place: Place


@dataclass(frozen=True, slots=True)
class DeletePod:
    name: str
    # Skip the grace period: the node is lost and will never confirm.
    force: bool
    why: str


@dataclass(frozen=True, slots=True)
class LabelPod:
    name: str
    role: str


@dataclass(frozen=True, slots=True)
class PromoteAgent:
    pod: str
    term: int


@dataclass(frozen=True, slots=True)
class CheckpointAgent:
    pod: str


@dataclass(frozen=True, slots=True)
class DemoteAgent:
    pod: str


Action = EnsureObjects | CreatePod | DeletePod | LabelPod | PromoteAgent | CheckpointAgent | DemoteAgent


@dataclass(frozen=True, slots=True)
class Plan:
    actions: tuple[Action, ...]
    status: dict[str, Any]
    events: tuple[EventNote, ...]
    summary: str
    # A step of a transition advanced: decide again at once instead of waiting for the next poll.
    again: bool = False


# --------------------------------------------------------------------------- the draft of a plan


@dataclass
class _Draft:
    s: Snapshot
    actions: list[Action] = field(default_factory=list)
    events: list[EventNote] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    again: bool = False

    def __post_init__(self) -> None:
        self.status = {k: v for k, v in self.s.vm.status.items() if k != "kopf"}
        self.status["observedGeneration"] = self.s.vm.generation

    def act(self, action: Action) -> None:
        self.actions.append(action)

    def event(self, kind: str, reason: str, message: str) -> None:
        self.events.append(EventNote(kind, reason, message))

    def finish(self, phase: Phase, conditions: list[Condition], message: str, summary: str) -> Plan:
        previous = self.s.vm.status
        self.status["phase"] = phase.value
        self.status["message"] = message
        self.status["conditions"] = merge_conditions(
            previous.get("conditions"), conditions, self.s.now, self.s.vm.generation
        )
        events = transition_events(previous, self.status) + self.events
        return Plan(
            actions=tuple(self.actions),
            status=self.status,
            events=tuple(events),
            summary=summary,
            again=self.again,
        )


def _replica_status(pod: PodView | None, report: AgentReport, synced: bool) -> dict[str, Any]:
    if pod is None:
        return {}
    out: dict[str, Any] = {"pod": pod.name, "synced": synced}
    if pod.node:
        out["node"] = pod.node
    if pod.ip:
        out["address"] = pod.ip
    if report.status is not None:
        out["state"] = report.status.guest.state
    else:
        out["state"] = pod.phase if pod.phase != "Running" else "unreachable"
    return out


def _address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _pod_name(s: Snapshot, serial: int) -> str:
    return f"{s.vm.name}-{serial}"


def _next_serial(s: Snapshot) -> int:
    serial = s.vm.status.get("podSerial")
    known = max((p.serial + 1 for p in s.pods), default=0)
    return max(serial if isinstance(serial, int) else 0, known)


def _node_lost(s: Snapshot, pod: PodView) -> bool:
    node = s.node_of(pod)
    return node is not None and node.health is not NodeHealth.READY


def _term(s: Snapshot) -> int:
    if s.lease is not None:
        return s.lease.term
    term = s.vm.status.get("term")
    return term if isinstance(term, int) else 0


# --------------------------------------------------------------------------- entry point


def decide(s: Snapshot) -> Plan:
    d = _Draft(s)
    st = s.vm.status
    if st.get("observedGeneration") != s.vm.generation or s.lease is None:
        d.act(EnsureObjects())
    if st.get("phase") == Phase.FAILED.value:
        # Sticky: the guest's state is gone, and bringing up an empty VM under
        # the same name would hide that from whoever relies on it.
        previous = [
            Condition(ConditionType(cd["type"]), cd["status"], Reason(cd["reason"]), cd.get("message", ""))
            for cd in st.get("conditions") or ()
            if cd.get("type") in ConditionType.__members__.values()
            and cd.get("reason") in Reason.__members__.values()
        ]
        return d.finish(
            Phase.FAILED, previous, str(st.get("message") or ""), "failed; delete and recreate the ColoVM"
        )

    current = st.get("currentPrimary") or None
    if current is None:
        adopted = _newest(p for p in s.pods if p.role == c.ROLE_PRIMARY and not p.deleting)
        if adopted is None:
            return _create_primary(d)
        # Created by an earlier run that stopped before it could write status.
        current = adopted.name
        d.status["currentPrimary"] = d.status["targetPrimary"] = current

    transition = st.get("transition")
    if isinstance(transition, dict) and transition.get("to"):
        return _continue_transition(d, current, transition)
    return _steady(d, current)


def _newest(pods: Any) -> PodView | None:
    return max(pods, key=lambda p: (p.serial, p.name), default=None)


def _secondary(s: Snapshot, current: str) -> PodView | None:
    remembered = (s.vm.status.get("secondary") or {}).get("pod")
    pod = s.pod(remembered)
    if pod is not None and pod.name != current:
        return pod
    return _newest(p for p in s.pods if p.role == c.ROLE_SECONDARY and p.name != current and not p.deleting)


def _strays(d: _Draft, keep: set[str]) -> None:
    """Delete agent pods that are neither the primary nor the chosen secondary.

    They come from a failed delete or an interrupted run; a stray that still
    carries the primary label would also receive client traffic.
    """
    for pod in d.s.pods:
        if pod.name not in keep and not pod.deleting:
            d.act(DeletePod(pod.name, force=_node_lost(d.s, pod), why="not a replica of this VM any more"))


def _create_primary(d: _Draft) -> Plan:
    s = d.s
    _strays(d, set())
    place = place_replica(s.vm.spec.placement, s.nodes, ())
    if isinstance(place, NoSpareNode):
        return d.finish(
            Phase.PENDING,
            [
                false(ConditionType.READY, Reason.NO_SPARE_NODE, place.message),
                false(ConditionType.PROTECTED, Reason.NO_SECONDARY, "no primary yet"),
                false(ConditionType.SYNCED, Reason.NO_SECONDARY, "no primary yet"),
            ],
            place.message,
            "no node for the primary",
        )
    serial = _next_serial(s)
    name = _pod_name(s, serial)
    d.act(CreatePod(name=name, serial=serial, role=c.ROLE_PRIMARY, peer=None, place=place))
    d.status.update(currentPrimary=name, targetPrimary=name, podSerial=serial + 1, term=_term(s))
    d.status.setdefault("failovers", 0)
    d.status["primary"] = {"pod": name, "synced": False, "state": "Pending"}
    d.status["secondary"] = {}
    d.event("Normal", "CreatingPrimary", f"creating primary agent pod {name}")
    return d.finish(
        Phase.PENDING,
        [
            false(ConditionType.READY, Reason.PRIMARY_STARTING, f"primary {name} is being created"),
            false(ConditionType.PROTECTED, Reason.NO_SECONDARY, "a secondary follows once the primary runs"),
            false(ConditionType.SYNCED, Reason.NO_SECONDARY, "no secondary yet"),
        ],
        f"creating primary {name}",
        f"create primary {name}",
    )


def _secondary_synced(p_report: AgentReport, s_report: AgentReport) -> bool:
    """The secondary holds a committed image: its own word when it can be asked (it is the one
    holding the image), else the primary's view of its peer."""
    if s_report.status is not None:
        return s_report.status.synced
    p = p_report.status
    return p is not None and p.synced and p.peer.state is PeerState.CONNECTED


def _steady(d: _Draft, current: str) -> Plan:
    s = d.s
    st = s.vm.status
    spec = s.vm.spec
    primary = s.pod(current)
    secondary = _secondary(s, current)
    _strays(d, {current} | ({secondary.name} if secondary else set()))
    p_report, s_report = s.agent(primary), s.agent(secondary)
    timeout = spec.failover.heartbeat_timeout_ms
    p_health = assess_replica(
        primary,
        s.node_of(primary),
        p_report,
        s_report,
        expected_role=Role.PRIMARY,
        heartbeat_timeout_ms=timeout,
        what="primary",
    )
    s_health: ReplicaHealth | None = None
    if secondary is not None:
        s_health = assess_replica(
            secondary,
            s.node_of(secondary),
            s_report,
            p_report,
            expected_role=Role.SECONDARY,
            heartbeat_timeout_ms=timeout,
            what="secondary",
        )
    remembered = st.get("secondary") or {}
    # status.secondary.synced is sticky for a given pod: once it holds a
    # committed image it stays promotable, even after its own report turns
    # false because it lost the primary (exactly when it is needed).
    was_synced = bool(secondary and remembered.get("pod") == secondary.name and remembered.get("synced"))
    live_synced = secondary is not None and _secondary_synced(p_report, s_report)
    synced = live_synced or (
        was_synced and isinstance(s_health, Healthy | Uncertain) and s_report.status is None
    )
    d.status["term"] = max(_term(s), p_report.status.term if p_report.status else 0)
    d.status["primary"] = _replica_status(primary, p_report, synced=False)
    d.status["secondary"] = _replica_status(secondary, s_report, live_synced or was_synced)
    d.status.update(figures(st, p_report.status, s.now))

    verdict = failover_verdict(p_health, secondary, s_health, s_report, was_synced)
    if isinstance(verdict, Promote):
        return _start_transition(d, "Failover", verdict.cause, current, verdict.target, verdict.detail)
    if isinstance(verdict, Unrecoverable):
        restarts = int(st.get("primaryRestarts") or 0)
        never_served = st.get("phase") in (None, Phase.PENDING.value)
        if (
            never_served
            and restarts < MAX_PRIMARY_RESTARTS
            and isinstance(p_health, Lost)
            and primary is not None
        ):
            # No client ever reached this primary, so nothing is lost by starting over.
            detail = f"{p_health.detail}; it never served, so a new primary replaces it"
            d.act(DeletePod(primary.name, force=_node_lost(s, primary), why=detail))
            for key in ("currentPrimary", "targetPrimary"):
                d.status.pop(key, None)
            d.status["primaryRestarts"] = restarts + 1
            d.status["primary"] = {}
            d.event("Warning", "PrimaryRestarted", detail)
            d.again = True
            return d.finish(
                Phase.PENDING,
                [
                    false(ConditionType.READY, Reason.PRIMARY_STARTING, detail),
                    false(
                        ConditionType.PROTECTED,
                        Reason.NO_SECONDARY,
                        "a secondary follows once the primary runs",
                    ),
                    false(ConditionType.SYNCED, Reason.NO_SECONDARY, "no secondary yet"),
                ],
                detail,
                f"restart primary: {detail}",
            )
        d.event("Warning", Reason.UNRECOVERABLE.value, verdict.detail)
        return d.finish(
            Phase.FAILED,
            [
                false(ConditionType.READY, Reason.PRIMARY_LOST, verdict.detail),
                false(ConditionType.PROTECTED, Reason.UNRECOVERABLE, verdict.detail),
                false(ConditionType.SYNCED, Reason.UNRECOVERABLE, verdict.detail),
            ],
            verdict.detail,
            f"unrecoverable: {verdict.detail}",
        )
    if isinstance(verdict, Wait):
        return _uncertain_primary(d, verdict.detail, synced)

    assert isinstance(verdict, NoFailover)
    if isinstance(p_health, Starting) or primary is None:
        detail = p_health.detail if isinstance(p_health, Starting) else "the primary pod is missing"
        return d.finish(
            Phase.PENDING,
            [
                false(ConditionType.READY, Reason.PRIMARY_STARTING, detail),
                false(
                    ConditionType.PROTECTED, Reason.NO_SECONDARY, "a secondary follows once the primary runs"
                ),
                false(ConditionType.SYNCED, Reason.NO_SECONDARY, "no secondary yet"),
            ],
            detail,
            f"wait: {detail}",
        )

    # The primary serves. Planned switchover, asked for or forced by a drain?
    healthy_synced = secondary is not None and isinstance(s_health, Healthy) and synced
    requested = s.vm.annotations.get(c.ANNOTATION_SWITCHOVER)
    if requested and requested != st.get("switchoverHandled"):
        d.status["switchoverHandled"] = requested
        if healthy_synced and secondary is not None:
            return _start_transition(
                d,
                "Switchover",
                Cause.SWITCHOVER,
                current,
                secondary.name,
                f"switchover requested at {requested}",
            )
        d.event(
            "Warning",
            "SwitchoverRefused",
            "no synced secondary to switch over to; retry once the VM is Protected",
        )
    p_node = s.node_of(primary)
    s_node = s.node_of(secondary)
    if (
        healthy_synced
        and secondary is not None
        and p_node is not None
        and p_node.unschedulable
        and s_node is not None
        and not s_node.unschedulable
    ):
        return _start_transition(
            d,
            "Switchover",
            Cause.NODE_DRAIN,
            current,
            secondary.name,
            f"node {p_node.name} of the primary is cordoned",
        )

    ready = true(ConditionType.READY, Reason.PRIMARY_SERVING, f"primary {current} serves on {primary.node}")
    return _manage_secondary(d, primary, secondary, s_health, s_report, synced, ready)


def _manage_secondary(
    d: _Draft,
    primary: PodView,
    secondary: PodView | None,
    s_health: ReplicaHealth | None,
    s_report: AgentReport,
    synced: bool,
    ready: Condition,
) -> Plan:
    s = d.s
    spec = s.vm.spec
    if secondary is not None and isinstance(s_health, Lost):
        d.act(DeletePod(secondary.name, force=_node_lost(s, secondary), why=s_health.detail))
        d.event("Warning", Reason.SECONDARY_LOST.value, s_health.detail)
        d.status["secondary"] = {}
        d.again = True
        return d.finish(
            Phase.DEGRADED,
            [
                ready,
                *replication(false, Reason.SECONDARY_LOST, s_health.detail),
            ],
            s_health.detail,
            f"replace lost secondary {secondary.name}",
        )
    s_node = s.node_of(secondary)
    if secondary is not None and s_node is not None and s_node.unschedulable:
        why = f"node {s_node.name} of the secondary is cordoned; moving the secondary"
        d.act(DeletePod(secondary.name, force=False, why=why))
        d.event("Normal", "MovingSecondary", why)
        d.status["secondary"] = {}
        d.again = True
        return d.finish(
            Phase.DEGRADED,
            [
                ready,
                *replication(false, Reason.NO_SECONDARY, why),
            ],
            why,
            f"move secondary {secondary.name} off cordoned {s_node.name}",
        )

    if secondary is None:
        first = int(s.vm.status.get("podSerial") or 0) <= 1
        if not (spec.failover.auto_reprotect or first):
            msg = "no secondary and failover.autoReprotect is false"
            return d.finish(
                Phase.DEGRADED,
                [
                    ready,
                    false(ConditionType.PROTECTED, Reason.REPROTECT_DISABLED, msg),
                    false(ConditionType.SYNCED, Reason.NO_SECONDARY, msg),
                ],
                msg,
                "degraded: re-protection disabled",
            )
        if primary.ip is None:
            msg = "waiting for the primary's address"
            return d.finish(
                Phase.DEGRADED,
                [
                    ready,
                    *replication(false, Reason.NO_SECONDARY, msg),
                ],
                msg,
                msg,
            )
        occupied = [primary.node or ""]
        if _avoid_lost_node(s):
            occupied.append(str((s.vm.status.get("lastFailover") or {}).get("fromNode")))
        place = place_replica(spec.placement, s.nodes, occupied)
        if isinstance(place, NoSpareNode):
            return d.finish(
                Phase.DEGRADED,
                [
                    ready,
                    false(ConditionType.PROTECTED, Reason.NO_SPARE_NODE, place.message),
                    false(ConditionType.SYNCED, Reason.NO_SECONDARY, place.message),
                ],
                place.message,
                "degraded: no spare node",
            )
        serial = _next_serial(s)
        name = _pod_name(s, serial)
        peer = _address(primary.ip, c.REPLICATION_PORT)
        d.act(CreatePod(name=name, serial=serial, role=c.ROLE_SECONDARY, peer=peer, place=place))
        d.status["podSerial"] = serial + 1
        d.status["secondary"] = {"pod": name, "synced": False, "state": "Pending"}
        d.event("Normal", "CreatingSecondary", f"creating secondary agent pod {name}, peer {peer}")
        msg = f"secondary {name} is being created"
        return d.finish(
            Phase.SYNCING,
            [
                ready,
                *replication(false, Reason.SECONDARY_STARTING, msg),
            ],
            msg,
            f"create secondary {name}",
        )

    if isinstance(s_health, Starting):
        reason = Reason.NO_SPARE_NODE if secondary.unschedulable else Reason.SECONDARY_STARTING
        phase = Phase.DEGRADED if secondary.unschedulable else Phase.SYNCING
        return d.finish(
            phase,
            [
                ready,
                *replication(false, reason, s_health.detail),
            ],
            s_health.detail,
            f"wait: {s_health.detail}",
        )
    if isinstance(s_health, Uncertain):
        previous = s.vm.status.get("phase")
        phase = Phase(previous) if previous in (Phase.PROTECTED, Phase.SYNCING) else Phase.DEGRADED
        return d.finish(
            phase,
            [
                ready,
                *replication(unknown, Reason.SECONDARY_UNCERTAIN, s_health.detail),
            ],
            s_health.detail,
            f"wait: {s_health.detail}",
        )
    if synced:
        msg = f"secondary {secondary.name} on {secondary.node} holds epoch {d.status.get('epoch', 0)}"
        return d.finish(
            Phase.PROTECTED,
            [
                ready,
                *replication(true, Reason.SECONDARY_SYNCED, msg),
            ],
            "",
            "protected",
        )
    status = s_report.status
    if status is not None and status.peer.state is PeerState.LOST:
        msg = f"secondary {secondary.name} lost its connection to the primary"
        return d.finish(
            Phase.DEGRADED,
            [
                ready,
                *replication(false, Reason.PEER_LOST, msg),
            ],
            msg,
            f"wait: {msg}",
        )
    msg = f"secondary {secondary.name} is receiving the first copy of guest RAM"
    return d.finish(
        Phase.SYNCING,
        [
            ready,
            *replication(false, Reason.FIRST_SYNC, msg),
        ],
        msg,
        "syncing",
    )


def _avoid_lost_node(s: Snapshot) -> bool:
    """Keep a new secondary off the node the last failover fled from.

    While that node is not Ready, obviously. Also for a while after a failover
    caused by the node or its agent going silent: the node controller marks a
    dead node NotReady only after its grace period, and a secondary scheduled
    there in between would never start.
    """
    last = s.vm.status.get("lastFailover") or {}
    node = last.get("fromNode")
    if not isinstance(node, str) or node not in s.nodes:
        return False
    if s.nodes[node].health is not NodeHealth.READY:
        return True
    when = parse_time(last.get("time"))
    recent = when is not None and (s.now - when).total_seconds() < AVOID_LOST_NODE_S
    return recent and last.get("cause") in _SILENT_CAUSES


def _uncertain_primary(d: _Draft, detail: str, synced: bool) -> Plan:
    previous = str(d.s.vm.status.get("phase"))
    phase = Phase(previous) if previous in Phase.__members__.values() else Phase.PENDING
    return d.finish(
        phase,
        [
            unknown(ConditionType.READY, Reason.PRIMARY_UNCERTAIN, detail),
            unknown(ConditionType.PROTECTED, Reason.PRIMARY_UNCERTAIN, detail),
            (true if synced else false)(
                ConditionType.SYNCED, Reason.SECONDARY_SYNCED if synced else Reason.NO_SECONDARY, ""
            ),
        ],
        detail,
        f"wait: {detail}",
    )


# --------------------------------------------------------------------------- failover and switchover


def _start_transition(d: _Draft, kind: str, cause: Cause, frm: str, to: str, detail: str) -> Plan:
    s = d.s
    term = _term(s) + 1
    from_pod = s.pod(frm)
    d.status["transition"] = {
        "kind": kind,
        "cause": cause.value,
        "from": frm,
        "to": to,
        # The pending step: recorded before anything is asked of an agent.
        "step": "Promote" if kind == "Failover" else "Checkpoint",
        "term": term,
        "startedAt": timestamp_ms(s.now),
        "message": detail,
    }
    d.status["targetPrimary"] = to
    if from_pod is not None and from_pod.node:
        d.status["transition"]["fromNode"] = from_pod.node
    d.event(
        "Warning" if kind == "Failover" else "Normal",
        f"{kind}Started",
        f"{to} will take over from {frm}: {detail}",
    )
    d.again = True
    reason = Reason.FAILING_OVER if kind == "Failover" else Reason.SWITCHING_OVER
    ready = (
        false(ConditionType.READY, Reason.PRIMARY_LOST, detail)
        if kind == "Failover"
        else true(ConditionType.READY, Reason.PRIMARY_SERVING, f"{frm} serves until {to} takes over")
    )
    return d.finish(
        Phase.FAILING_OVER,
        [ready, *replication(false, reason, detail)],
        detail,
        f"start {kind.lower()} {frm} -> {to} (term {term}): {detail}",
    )


def _transition_conditions(kind: str, step: str, detail: str) -> list[Condition]:
    reason = Reason.FAILING_OVER if kind == "Failover" else Reason.SWITCHING_OVER
    if kind == "Failover":
        ready = false(ConditionType.READY, Reason.PROMOTING, detail)
    elif step == "Checkpoint":
        ready = true(ConditionType.READY, Reason.PRIMARY_SERVING, detail)
    else:
        ready = false(ConditionType.READY, Reason.PROMOTING, detail)
    return [
        ready,
        *replication(false, reason, detail),
    ]


def _continue_transition(d: _Draft, current: str, t: dict[str, Any]) -> Plan:
    s = d.s
    spec = s.vm.spec
    kind = "Switchover" if t.get("kind") == "Switchover" else "Failover"
    step = str(t.get("step") or "Promote")
    frm = str(t.get("from") or current)
    to = str(t["to"])
    recorded = t.get("term")
    term: int = recorded if isinstance(recorded, int) else _term(s) + 1
    from_pod, to_pod = s.pod(frm), s.pod(to)
    from_report, to_report = s.agent(from_pod), s.agent(to_pod)
    timeout = spec.failover.heartbeat_timeout_ms
    _strays(d, {frm, to})
    transition = dict(t)
    d.status["transition"] = transition
    d.status["targetPrimary"] = to

    to_health = assess_replica(
        to_pod,
        s.node_of(to_pod),
        to_report,
        from_report,
        expected_role=Role.SECONDARY if step != "Relabel" else Role.PRIMARY,
        heartbeat_timeout_ms=timeout,
        what="promotion target",
    )
    from_health = assess_replica(
        from_pod,
        s.node_of(from_pod),
        from_report,
        to_report,
        expected_role=Role.PRIMARY,
        heartbeat_timeout_ms=timeout,
        what="primary",
    )
    before_demote = kind == "Switchover" and step == "Checkpoint"
    if isinstance(to_health, Lost):
        if before_demote:
            return _abort(d, kind, current, f"{to_health.detail}; {frm} keeps serving")
        detail = f"{to_health.detail} during the {kind.lower()}"
        d.event("Warning", Reason.UNRECOVERABLE.value, detail)
        d.status.pop("transition", None)
        return d.finish(
            Phase.FAILED,
            [
                false(ConditionType.READY, Reason.PRIMARY_LOST, detail),
                false(ConditionType.PROTECTED, Reason.UNRECOVERABLE, detail),
                false(ConditionType.SYNCED, Reason.UNRECOVERABLE, detail),
            ],
            detail,
            f"unrecoverable: {detail}",
        )

    if step == "Checkpoint":
        if isinstance(from_health, Lost):
            # The primary died before the switchover demoted it: this is now a failover.
            transition.update(
                kind="Failover", cause=from_health.cause.value, step="Promote", message=from_health.detail
            )
            d.again = True
            return d.finish(
                Phase.FAILING_OVER,
                _transition_conditions("Failover", "Promote", from_health.detail),
                from_health.detail,
                f"switchover became a failover: {from_health.detail}",
            )
        started = parse_time(t.get("startedAt")) or s.now
        if (s.now - started).total_seconds() > SWITCHOVER_TIMEOUT_S:
            return _abort(
                d, kind, current, f"the final checkpoint did not complete within {SWITCHOVER_TIMEOUT_S:g}s"
            )
        d.act(CheckpointAgent(frm))
        d.act(DemoteAgent(frm))
        transition["step"] = "Promote"
        d.again = True
        detail = f"final checkpoint on {frm}, then {frm} stops releasing output"
        return d.finish(
            Phase.FAILING_OVER,
            _transition_conditions(kind, "Checkpoint", detail),
            detail,
            f"switchover {frm} -> {to}: checkpoint and demote",
        )

    if step == "Promote":
        target = to_report.status
        if target is not None and target.role is Role.PRIMARY and target.term >= term:
            step = "Relabel"
        else:
            lease = s.lease
            if (
                kind == "Failover"
                and isinstance(from_health, Healthy)
                and lease is not None
                and lease.holder == frm
            ):
                return _abort(d, kind, current, f"{frm} answers again and still holds the Lease")
            if lease is not None and lease.term >= term and lease.holder != to:
                # Someone else moved the Lease since the transition started: ask for a term above it.
                term = lease.term + 1
            if target is None:
                detail = f"waiting for the promotion target {to}: {to_report.error}"
                transition["message"] = detail
                return d.finish(
                    Phase.FAILING_OVER,
                    _transition_conditions(kind, step, detail),
                    detail,
                    f"{kind.lower()}: {detail}",
                )
            d.act(PromoteAgent(to, term))
            transition.update(step="Relabel", term=term)
            d.again = True
            detail = f"{to} takes the Lease with term {term} and promotes"
            transition["message"] = detail
            return d.finish(
                Phase.FAILING_OVER,
                _transition_conditions(kind, "Promote", detail),
                detail,
                f"{kind.lower()} {frm} -> {to}: promote with term {term}",
            )

    # Relabel: the target is primary in `term`. Move the Service and retire the old primary.
    target = to_report.status
    if target is None or target.role is not Role.PRIMARY:
        # The promote call failed after the step was recorded: go back and ask again.
        transition["step"] = "Promote"
        detail = f"{to} does not report itself primary yet"
        transition["message"] = detail
        return d.finish(
            Phase.FAILING_OVER,
            _transition_conditions(kind, "Promote", detail),
            detail,
            f"{kind.lower()}: {detail}",
        )
    term = max(term, target.term)
    if from_pod is not None:
        d.act(LabelPod(frm, ROLE_FENCED))
        d.act(DeletePod(frm, force=kind == "Failover", why=f"replaced by {to} in term {term}"))
    d.act(LabelPod(to, c.ROLE_PRIMARY))
    started = parse_time(t.get("startedAt")) or s.now
    duration_ms = round((s.now - started).total_seconds() * 1000.0, 1)
    record: dict[str, Any] = {
        "kind": kind,
        "time": timestamp_ms(s.now),
        "durationMs": duration_ms,
        "cause": str(t.get("cause") or ""),
        "from": frm,
        "to": to,
    }
    if t.get("fromNode"):
        record["fromNode"] = t["fromNode"]
    d.status.pop("transition", None)
    d.status.update(currentPrimary=to, targetPrimary=to, term=term, lastFailover=record)
    if kind == "Failover":
        d.status["failovers"] = int(d.status.get("failovers") or 0) + 1
    d.status["primary"] = _replica_status(to_pod, to_report, synced=False)
    d.status["secondary"] = {}
    d.again = True
    d.event(
        "Normal", "Promoted", f"{to} is primary in term {term} after {record['cause']} ({duration_ms} ms)"
    )
    ready = true(ConditionType.READY, Reason.PRIMARY_SERVING, f"primary {to} serves")
    msg = "re-protecting: a new secondary follows"
    return d.finish(
        Phase.DEGRADED,
        [
            ready,
            *replication(false, Reason.NO_SECONDARY, msg),
        ],
        msg,
        f"{kind.lower()} done: {to} primary in term {term} ({duration_ms} ms)",
    )


def _abort(d: _Draft, kind: str, current: str, detail: str) -> Plan:
    d.status.pop("transition", None)
    d.status["targetPrimary"] = current
    d.event("Warning", f"{kind}Aborted", detail)
    d.again = True
    return d.finish(
        Phase.DEGRADED,
        [
            true(ConditionType.READY, Reason.PRIMARY_SERVING, f"primary {current} serves"),
            unknown(ConditionType.PROTECTED, Reason.SECONDARY_UNCERTAIN, detail),
            unknown(ConditionType.SYNCED, Reason.SECONDARY_UNCERTAIN, detail),
        ],
        detail,
        f"{kind.lower()} aborted: {detail}",
    )
