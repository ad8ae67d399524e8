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
two primaries. The pods are relabelled, which moves the Service, in the plan
that promotes, after the promote call succeeded; an unplanned failover takes
the lost primary out of the Service as soon as it starts.

The rest of a VM's life is decided here too: `runStrategy: Halted` stops it
(pods deleted, a fresh guest on the next start), and a rolling update
replaces an outdated secondary and then switches over to it, so it needs no
step of its own: the switchover retires the old primary.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from colo_agent.api.models import PeerState, Role
from colo_agent.constants import EXIT_NEVER_SERVED

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


class TransitionKind(enum.StrEnum):
    """Why the primary moves: it was lost (failover), or it is moved on purpose (switchover)."""

    FAILOVER = "Failover"
    SWITCHOVER = "Switchover"

    @classmethod
    def parse(cls, value: object) -> TransitionKind:
        # Anything unknown is treated as the unplanned case: it never waits for the old primary.
        return cls.SWITCHOVER if value == cls.SWITCHOVER.value else cls.FAILOVER


class Step(enum.StrEnum):
    """The pending step of a transition, recorded in status before it is carried out."""

    CHECKPOINT = "Checkpoint"  # switchover only: final acknowledged checkpoint, then demote
    PROMOTE = "Promote"  # the target takes the Lease with the recorded term and promotes
    RELABEL = "Relabel"  # the target is primary: move the Service, retire the old primary

    @classmethod
    def parse(cls, value: object) -> Step:
        # Unknown: Promote, which first checks whether the target already promoted itself.
        return cls(str(value)) if value in cls.__members__.values() else cls.PROMOTE


@dataclass(frozen=True, slots=True)
class Transition:
    """`status.transition`: a failover or switchover in progress, resumable from status alone.

    Its fields are strings in status, so an operator restarted mid-transition
    (of this or an earlier version) reads it back as it was written.
    """

    kind: TransitionKind
    cause: str
    frm: str
    to: str
    step: Step
    term: int
    started_at: str | None
    message: str = ""
    from_node: str | None = None

    @classmethod
    def from_status(cls, raw: Mapping[str, Any], current: str, next_term: int) -> Transition:
        term = raw.get("term")
        return cls(
            kind=TransitionKind.parse(raw.get("kind")),
            cause=str(raw.get("cause") or ""),
            frm=str(raw.get("from") or current),
            to=str(raw["to"]),
            step=Step.parse(raw.get("step") or Step.PROMOTE.value),
            term=term if isinstance(term, int) and not isinstance(term, bool) else next_term,
            started_at=raw.get("startedAt") if isinstance(raw.get("startedAt"), str) else None,
            message=str(raw.get("message") or ""),
            from_node=raw.get("fromNode") or None,
        )

    def to_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind.value,
            "cause": self.cause,
            "from": self.frm,
            "to": self.to,
            "step": self.step.value,
            "term": self.term,
            "message": self.message,
        }
        if self.started_at is not None:
            out["startedAt"] = self.started_at
        if self.from_node:
            out["fromNode"] = self.from_node
        return out

    @property
    def planned(self) -> bool:
        return self.kind is TransitionKind.SWITCHOVER

    @property
    def name(self) -> str:
        return self.kind.value.lower()


def replication(
    make: Callable[[ConditionType, Reason, str], Condition], reason: Reason, message: str
) -> list[Condition]:
    """`Protected` and `Synced` with the same verdict: they part only while a synced secondary
    exists whose protection is in doubt, which callers spell out."""
    return [make(ConditionType.PROTECTED, reason, message), make(ConditionType.SYNCED, reason, message)]


# The condition sets a plan ends with, each written once.

NO_PRIMARY_YET = "a secondary follows once the primary runs"


def no_primary(ready_reason: Reason, detail: str) -> list[Condition]:
    """No primary serves yet, so nothing is protected either."""
    return [
        false(ConditionType.READY, ready_reason, detail),
        false(ConditionType.PROTECTED, Reason.NO_SECONDARY, NO_PRIMARY_YET),
        false(ConditionType.SYNCED, Reason.NO_SECONDARY, "no secondary yet"),
    ]


def state_lost(detail: str) -> list[Condition]:
    """The primary is gone and nothing holds its state."""
    return [
        false(ConditionType.READY, Reason.PRIMARY_LOST, detail),
        *replication(false, Reason.UNRECOVERABLE, detail),
    ]


def serving(
    ready: Condition, make: Callable[[ConditionType, Reason, str], Condition], reason: Reason, message: str
) -> list[Condition]:
    """A primary serves; `Protected` and `Synced` share one verdict."""
    return [ready, *replication(make, reason, message)]


def serving_alone(ready: Condition, reason: Reason, message: str) -> list[Condition]:
    """A primary serves and no secondary is coming: `Protected` says why, `Synced` that there is none."""
    return [
        ready,
        false(ConditionType.PROTECTED, reason, message),
        false(ConditionType.SYNCED, Reason.NO_SECONDARY, message),
    ]


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
    # The UpToDate condition, added to whatever the plan ends with (see _note_rollout).
    up_to_date: Condition | None = None

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
        if self.up_to_date is not None:
            conditions = [*conditions, self.up_to_date]
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
    if s.vm.spec.run_strategy == "Halted":
        return _stop(d)
    if st.get("phase") == Phase.STOPPED.value:
        return _start(d)
    if st.get("phase") == Phase.FAILED.value:
        return _failed(d)
    _note_rollout(d)

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


def _failed(d: _Draft) -> Plan:
    # Sticky: the guest's state is gone, and bringing up an empty VM under
    # the same name would hide that from whoever relies on it.
    st = d.s.vm.status
    previous = [
        Condition(ConditionType(cd["type"]), cd["status"], Reason(cd["reason"]), cd.get("message", ""))
        for cd in st.get("conditions") or ()
        if cd.get("type") in ConditionType.__members__.values()
        and cd.get("reason") in Reason.__members__.values()
    ]
    return d.finish(
        Phase.FAILED, previous, str(st.get("message") or ""), "failed; delete and recreate the ColoVM"
    )


# --------------------------------------------------------------------------- stop and start

# What a stopped VM no longer has: who serves, how far replication got, a transition in flight.
_RUN_STATE = (
    "currentPrimary", "targetPrimary", "transition",
    "epoch", "lastCheckpoint", "checkpoints", "primaryRestarts",
)  # fmt: skip


def _stop(d: _Draft) -> Plan:
    """runStrategy Halted: delete the agent pods (and with them the guest); keep the rest."""
    s = d.s
    phase = s.vm.status.get("phase")
    if phase != Phase.STOPPED.value:
        d.status["stoppedFrom"] = str(phase or Phase.PENDING.value)
        d.event("Normal", "Stopping", "runStrategy is Halted: deleting the agent pods and the guest's state")
    why = "the VM is stopped (runStrategy Halted)"
    for pod in s.pods:
        if not pod.deleting:
            d.act(DeletePod(pod.name, force=_node_lost(s, pod), why=why))
    for key in _RUN_STATE:
        d.status.pop(key, None)
    d.status["primary"] = d.status["secondary"] = {}
    msg = f"stopping: {len(s.pods)} agent pod(s) terminating" if s.pods else "stopped (runStrategy Halted)"
    return d.finish(Phase.STOPPED, _stopped(msg), msg, msg)


def _stopped(message: str) -> list[Condition]:
    return [
        false(ConditionType.READY, Reason.STOPPED, message),
        *replication(false, Reason.STOPPED, message),
    ]


def _start(d: _Draft) -> Plan:
    """runStrategy Always after Halted: a fresh guest, once the pods of the earlier run are gone."""
    s = d.s
    if s.pods:
        # Their anti-affinity and primary label would still count; the new run starts without them.
        msg = f"starting once {len(s.pods)} agent pod(s) of the stopped VM are gone"
        _strays(d, set())
        return d.finish(Phase.STOPPED, _stopped(msg), msg, f"wait: {msg}")
    if d.status.pop("stoppedFrom", None) == Phase.FAILED.value:
        d.event(
            "Warning",
            "StateLost",
            "restarted after it Failed: the guest's state was lost, a fresh guest boots",
        )
    else:
        d.event(
            "Normal", "Starting", "runStrategy is Always: a fresh guest boots (a stopped VM keeps no state)"
        )
    return _create_primary(d)


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
            no_primary(Reason.NO_SPARE_NODE, place.message),
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
        no_primary(Reason.PRIMARY_STARTING, f"primary {name} is being created"),
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


# --------------------------------------------------------------------------- steady state


@dataclass(frozen=True, slots=True)
class _Pair:
    """The primary and secondary as observed in this pass, with their health and sync verdicts."""

    primary: PodView | None
    secondary: PodView | None
    p_report: AgentReport
    s_report: AgentReport
    p_health: ReplicaHealth
    s_health: ReplicaHealth | None
    # What status remembers: this very secondary pod once held a committed image.
    was_synced: bool
    # The secondary's report (or the primary's view of it) says synced now.
    live_synced: bool
    # Promotable: synced now, or remembered as synced while it merely cannot be asked.
    synced: bool

    @property
    def healthy_synced(self) -> bool:
        return self.secondary is not None and isinstance(self.s_health, Healthy) and self.synced


def _observe(s: Snapshot, current: str) -> _Pair:
    primary = s.pod(current)
    secondary = _secondary(s, current)
    p_report, s_report = s.agent(primary), s.agent(secondary)
    timeout = s.vm.spec.failover.heartbeat_timeout_ms
    p_health = assess_replica(
        primary, s.node_of(primary), p_report, s_report,
        expected_role=Role.PRIMARY, heartbeat_timeout_ms=timeout, what="primary",
    )  # fmt: skip
    s_health: ReplicaHealth | None = None
    if secondary is not None:
        s_health = assess_replica(
            secondary, s.node_of(secondary), s_report, p_report,
            expected_role=Role.SECONDARY, heartbeat_timeout_ms=timeout, what="secondary",
        )  # fmt: skip
    remembered = s.vm.status.get("secondary") or {}
    # status.secondary.synced is sticky for a given pod: once it holds a
    # committed image it stays promotable, even after its own report turns
    # false because it lost the primary (exactly when it is needed).
    was_synced = bool(secondary and remembered.get("pod") == secondary.name and remembered.get("synced"))
    live_synced = secondary is not None and _secondary_synced(p_report, s_report)
    synced = live_synced or (
        was_synced and isinstance(s_health, Healthy | Uncertain) and s_report.status is None
    )
    return _Pair(primary, secondary, p_report, s_report, p_health, s_health, was_synced, live_synced, synced)


def _steady(d: _Draft, current: str) -> Plan:
    s = d.s
    r = _observe(s, current)
    _strays(d, {current} | ({r.secondary.name} if r.secondary else set()))
    d.status["term"] = max(_term(s), r.p_report.status.term if r.p_report.status else 0)
    d.status["primary"] = _replica_status(r.primary, r.p_report, synced=False)
    d.status["secondary"] = _replica_status(r.secondary, r.s_report, r.live_synced or r.was_synced)
    d.status.update(figures(s.vm.status, r.p_report.status, s.now))

    verdict = failover_verdict(r.p_health, r.secondary, r.s_health, r.s_report, r.was_synced)
    if isinstance(verdict, Promote):
        kind = TransitionKind.FAILOVER
        return _start_transition(d, kind, verdict.cause, current, verdict.target, verdict.detail)
    if isinstance(verdict, Unrecoverable):
        return _unrecoverable(d, r, verdict.detail)
    if isinstance(verdict, Wait):
        return _uncertain_primary(d, verdict.detail, r.synced)
    assert isinstance(verdict, NoFailover)
    if isinstance(r.p_health, Starting) or r.primary is None:
        detail = r.p_health.detail if isinstance(r.p_health, Starting) else "the primary pod is missing"
        return d.finish(Phase.PENDING, no_primary(Reason.PRIMARY_STARTING, detail), detail, f"wait: {detail}")
    planned = _planned_switchover(d, current, r)
    if planned is not None:
        return planned
    primary = r.primary
    if isinstance(r.p_health, Healthy):
        _serve_label(d, current)
    ready = true(ConditionType.READY, Reason.PRIMARY_SERVING, f"primary {current} serves on {primary.node}")
    return _rolling_update(d, current, r, ready) or _manage_secondary(d, primary, r, ready)


def _unrecoverable(d: _Draft, r: _Pair, detail: str) -> Plan:
    st = d.s.vm.status
    restarts = int(st.get("primaryRestarts") or 0)
    # Pending: the primary never served. Later (Syncing: it serves alone) only its agent can
    # tell, by its exit status, that no client reached the guest it booted.
    never_served = st.get("phase") in (None, Phase.PENDING.value) or (
        r.primary is not None and r.primary.exit_code == EXIT_NEVER_SERVED
    )
    if never_served and restarts < MAX_PRIMARY_RESTARTS and isinstance(r.p_health, Lost) and r.primary:
        return _restart_primary(
            d, r.primary, f"{r.p_health.detail}; it never served, so a new primary replaces it"
        )
    d.event("Warning", Reason.UNRECOVERABLE.value, detail)
    return d.finish(Phase.FAILED, state_lost(detail), detail, f"unrecoverable: {detail}")


def _restart_primary(d: _Draft, primary: PodView, detail: str) -> Plan:
    """No client ever reached this primary, so nothing is lost by starting over."""
    d.act(DeletePod(primary.name, force=_node_lost(d.s, primary), why=detail))
    for key in ("currentPrimary", "targetPrimary"):
        d.status.pop(key, None)
    d.status["primaryRestarts"] = int(d.s.vm.status.get("primaryRestarts") or 0) + 1
    d.status["primary"] = {}
    d.event("Warning", "PrimaryRestarted", detail)
    d.again = True
    return d.finish(
        Phase.PENDING, no_primary(Reason.PRIMARY_STARTING, detail), detail, f"restart primary: {detail}"
    )


def _planned_switchover(d: _Draft, current: str, r: _Pair) -> Plan | None:
    """The primary serves: a switchover asked for, or forced by a drain of the primary's node?"""
    s = d.s
    requested = s.vm.annotations.get(c.ANNOTATION_SWITCHOVER)
    if requested and requested != s.vm.status.get("switchoverHandled"):
        d.status["switchoverHandled"] = requested
        if r.healthy_synced and r.secondary is not None:
            detail = f"switchover requested at {requested}"
            return _start_transition(
                d, TransitionKind.SWITCHOVER, Cause.SWITCHOVER, current, r.secondary.name, detail
            )
        d.event(
            "Warning",
            "SwitchoverRefused",
            "no synced secondary to switch over to; retry once the VM is Protected",
        )
    p_node, s_node = s.node_of(r.primary), s.node_of(r.secondary)
    drained = p_node is not None and p_node.unschedulable and s_node is not None and not s_node.unschedulable
    if r.healthy_synced and r.secondary is not None and drained:
        assert p_node is not None
        detail = f"node {p_node.name} of the primary is cordoned"
        return _start_transition(
            d, TransitionKind.SWITCHOVER, Cause.NODE_DRAIN, current, r.secondary.name, detail
        )
    return None


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


# --------------------------------------------------------------------------- the secondary


def _manage_secondary(d: _Draft, primary: PodView, r: _Pair, ready: Condition) -> Plan:
    secondary = r.secondary
    if secondary is None:
        return _create_secondary(d, primary, ready)
    if isinstance(r.s_health, Lost):
        why = r.s_health.detail
        d.event("Warning", Reason.SECONDARY_LOST.value, why)
        return _drop_secondary(
            d, secondary, ready, Reason.SECONDARY_LOST, why, f"replace lost secondary {secondary.name}"
        )
    s_node = d.s.node_of(secondary)
    if s_node is not None and s_node.unschedulable:
        why = f"node {s_node.name} of the secondary is cordoned; moving the secondary"
        d.event("Normal", "MovingSecondary", why)
        summary = f"move secondary {secondary.name} off cordoned {s_node.name}"
        return _drop_secondary(d, secondary, ready, Reason.NO_SECONDARY, why, summary)
    return _secondary_progress(d, secondary, r, ready)


def _drop_secondary(
    d: _Draft,
    secondary: PodView,
    ready: Condition,
    reason: Reason,
    why: str,
    summary: str,
    phase: Phase = Phase.DEGRADED,
) -> Plan:
    """Delete the secondary; the next pass creates its replacement."""
    d.act(DeletePod(secondary.name, force=_node_lost(d.s, secondary), why=why))
    d.status["secondary"] = {}
    d.again = True
    return d.finish(phase, serving(ready, false, reason, why), why, summary)


def _create_secondary(d: _Draft, primary: PodView, ready: Condition) -> Plan:
    s = d.s
    spec = s.vm.spec
    first = int(s.vm.status.get("podSerial") or 0) <= 1
    if not (spec.failover.auto_reprotect or first):
        msg = "no secondary and failover.autoReprotect is false"
        return d.finish(
            Phase.DEGRADED,
            serving_alone(ready, Reason.REPROTECT_DISABLED, msg),
            msg,
            "degraded: re-protection disabled",
        )
    if primary.ip is None:
        msg = "waiting for the primary's address"
        return d.finish(Phase.DEGRADED, serving(ready, false, Reason.NO_SECONDARY, msg), msg, msg)
    occupied = [primary.node or ""]
    if _avoid_lost_node(s):
        occupied.append(str((s.vm.status.get("lastFailover") or {}).get("fromNode")))
    place = place_replica(spec.placement, s.nodes, occupied)
    if isinstance(place, NoSpareNode):
        return d.finish(
            Phase.DEGRADED,
            serving_alone(ready, Reason.NO_SPARE_NODE, place.message),
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
        Phase.SYNCING, serving(ready, false, Reason.SECONDARY_STARTING, msg), msg, f"create secondary {name}"
    )


def _secondary_progress(d: _Draft, secondary: PodView, r: _Pair, ready: Condition) -> Plan:
    """A secondary exists and is not lost: starting, uncertain, syncing or synced."""
    health = r.s_health
    if isinstance(health, Starting):
        reason = Reason.NO_SPARE_NODE if secondary.unschedulable else Reason.SECONDARY_STARTING
        phase = Phase.DEGRADED if secondary.unschedulable else Phase.SYNCING
        return d.finish(
            phase, serving(ready, false, reason, health.detail), health.detail, f"wait: {health.detail}"
        )
    if isinstance(health, Uncertain):
        previous = d.s.vm.status.get("phase")
        phase = Phase(previous) if previous in (Phase.PROTECTED, Phase.SYNCING) else Phase.DEGRADED
        conditions = serving(ready, unknown, Reason.SECONDARY_UNCERTAIN, health.detail)
        return d.finish(phase, conditions, health.detail, f"wait: {health.detail}")
    if r.synced:
        msg = f"secondary {secondary.name} on {secondary.node} holds epoch {d.status.get('epoch', 0)}"
        return d.finish(Phase.PROTECTED, serving(ready, true, Reason.SECONDARY_SYNCED, msg), "", "protected")
    status = r.s_report.status
    if status is not None and status.peer.state is PeerState.LOST:
        msg = f"secondary {secondary.name} lost its connection to the primary"
        return d.finish(Phase.DEGRADED, serving(ready, false, Reason.PEER_LOST, msg), msg, f"wait: {msg}")
    msg = f"secondary {secondary.name} is receiving the first copy of guest RAM"
    return d.finish(Phase.SYNCING, serving(ready, false, Reason.FIRST_SYNC, msg), msg, "syncing")


# --------------------------------------------------------------------------- rolling update


def _note_rollout(d: _Draft) -> None:
    """`status.upToDate` ("updated/replicas") and the UpToDate condition; record a manual approval."""
    s = d.s
    if not s.template:
        return
    requested = s.vm.annotations.get(c.ANNOTATION_UPGRADE)
    if requested and requested != s.vm.status.get("upgradeHandled"):
        # Approves the template called for now; a later change needs approving again.
        d.status.update(upgradeHandled=requested, approvedTemplate=s.template)
        d.event("Normal", "UpgradeRequested", f"rolling update to pod template {s.template} requested")
    replicas = [p for p in s.pods if p.role in (c.ROLE_PRIMARY, c.ROLE_SECONDARY) and not p.deleting]
    outdated = ", ".join(p.name for p in replicas if p.template != s.template)
    d.status["upToDate"] = f"{sum(p.template == s.template for p in replicas)}/{len(replicas)}"
    if not outdated:
        d.up_to_date = true(
            ConditionType.UP_TO_DATE, Reason.UP_TO_DATE, "every agent pod runs the desired template"
        )
    elif _update_allowed(d):
        msg = f"replacing {outdated}: the secondary first, then a switchover to it"
        d.up_to_date = false(ConditionType.UP_TO_DATE, Reason.UPDATING, msg)
    else:
        msg = f"{outdated} run an older pod template; `kubectl colo upgrade {s.vm.name}` replaces them"
        d.up_to_date = false(ConditionType.UP_TO_DATE, Reason.UPDATE_PENDING, msg)


def _update_allowed(d: _Draft) -> bool:
    s = d.s
    return s.vm.spec.update_strategy == "Automatic" or d.status.get("approvedTemplate") == s.template


def _outdated(s: Snapshot, pod: PodView | None) -> bool:
    return bool(s.template) and pod is not None and pod.template != s.template


def _rolling_update(d: _Draft, current: str, r: _Pair, ready: Condition) -> Plan | None:
    """CloudNativePG's order: replace the secondary, let the new one sync, switch over to it
    (term + 1, nothing lost), and the old primary is retired by the switchover itself."""
    s, secondary = d.s, r.secondary
    if not _update_allowed(d) or not (_outdated(s, secondary) or _outdated(s, r.primary)):
        return None
    if secondary is not None and _outdated(s, secondary) and isinstance(r.s_health, Healthy | Starting):
        why = f"pod template changed: replacing the secondary {secondary.name} first"
        d.event("Normal", "UpdatingSecondary", why)
        summary = f"rolling update: replace secondary {secondary.name}"
        return _drop_secondary(d, secondary, ready, Reason.UPDATING, why, summary, Phase.SYNCING)
    if secondary is not None and _outdated(s, r.primary) and r.healthy_synced:
        detail = f"pod template changed: the updated secondary {secondary.name} takes over"
        return _start_transition(d, TransitionKind.SWITCHOVER, Cause.UPGRADE, current, secondary.name, detail)
    return None


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


# --------------------------------------------------------------------------- failover and switchover


def _start_transition(d: _Draft, kind: TransitionKind, cause: Cause, frm: str, to: str, detail: str) -> Plan:
    s = d.s
    from_pod = s.pod(frm)
    t = Transition(
        kind=kind,
        cause=cause.value,
        frm=frm,
        to=to,
        # The pending step: recorded before anything is asked of an agent.
        step=Step.CHECKPOINT if kind is TransitionKind.SWITCHOVER else Step.PROMOTE,
        term=_term(s) + 1,
        started_at=timestamp_ms(s.now),
        message=detail,
        from_node=from_pod.node if from_pod is not None else None,
    )
    d.status["transition"] = t.to_status()
    d.status["targetPrimary"] = to
    if not t.planned and from_pod is not None and from_pod.role == c.ROLE_PRIMARY:
        # Out of the Service at once: its clients stop waiting on a primary that cannot
        # answer and wait for the new one instead (an abort puts the label back).
        d.act(LabelPod(frm, ROLE_FENCED))
    d.event(
        "Normal" if t.planned else "Warning",
        f"{kind.value}Started",
        f"{to} will take over from {frm}: {detail}",
    )
    d.again = True
    if t.planned:
        ready = true(ConditionType.READY, Reason.PRIMARY_SERVING, f"{frm} serves until {to} takes over")
    else:
        ready = false(ConditionType.READY, Reason.PRIMARY_LOST, detail)
    return d.finish(
        Phase.FAILING_OVER,
        serving(ready, false, _transition_reason(kind), detail),
        detail,
        f"start {t.name} {frm} -> {to} (term {t.term}): {detail}",
    )


def _transition_reason(kind: TransitionKind) -> Reason:
    return Reason.SWITCHING_OVER if kind is TransitionKind.SWITCHOVER else Reason.FAILING_OVER


def _in_progress(d: _Draft, t: Transition, detail: str, summary: str, then: Step | None = None) -> Plan:
    """End the pass in FailingOver with conditions for step `t.step`; status records step `then`
    (the next pending one) when the current step's actions are in this plan."""
    d.status["transition"] = replace(t, step=then or t.step, message=detail).to_status()
    if t.planned and t.step is Step.CHECKPOINT:
        ready = true(ConditionType.READY, Reason.PRIMARY_SERVING, detail)
    else:
        ready = false(ConditionType.READY, Reason.PROMOTING, detail)
    return d.finish(
        Phase.FAILING_OVER, serving(ready, false, _transition_reason(t.kind), detail), detail, summary
    )


@dataclass(frozen=True, slots=True)
class _Handover:
    """The two ends of a transition as observed in this pass."""

    from_pod: PodView | None
    to_pod: PodView | None
    from_report: AgentReport
    to_report: AgentReport
    from_health: ReplicaHealth
    to_health: ReplicaHealth


def _observe_handover(s: Snapshot, t: Transition) -> _Handover:
    from_pod, to_pod = s.pod(t.frm), s.pod(t.to)
    from_report, to_report = s.agent(from_pod), s.agent(to_pod)
    timeout = s.vm.spec.failover.heartbeat_timeout_ms
    to_health = assess_replica(
        to_pod, s.node_of(to_pod), to_report, from_report,
        expected_role=Role.PRIMARY if t.step is Step.RELABEL else Role.SECONDARY,
        heartbeat_timeout_ms=timeout, what="promotion target",
    )  # fmt: skip
    from_health = assess_replica(
        from_pod, s.node_of(from_pod), from_report, to_report,
        expected_role=Role.PRIMARY, heartbeat_timeout_ms=timeout, what="primary",
    )  # fmt: skip
    return _Handover(from_pod, to_pod, from_report, to_report, from_health, to_health)


StepFn = Callable[[_Draft, Transition, _Handover, str], Plan]


def _continue_transition(d: _Draft, current: str, raw: Mapping[str, Any]) -> Plan:
    s = d.s
    t = Transition.from_status(raw, current, _term(s) + 1)
    h = _observe_handover(s, t)
    _strays(d, {t.frm, t.to})
    d.status["transition"] = t.to_status()
    d.status["targetPrimary"] = t.to
    if isinstance(h.to_health, Lost):
        return _target_lost(d, t, current, h.to_health.detail)
    return _STEPS[t.step](d, t, h, current)


def _target_lost(d: _Draft, t: Transition, current: str, why: str) -> Plan:
    if t.planned and t.step is Step.CHECKPOINT:
        return _abort(d, t.kind, current, f"{why}; {t.frm} keeps serving")
    detail = f"{why} during the {t.name}"
    d.event("Warning", Reason.UNRECOVERABLE.value, detail)
    d.status.pop("transition", None)
    return d.finish(Phase.FAILED, state_lost(detail), detail, f"unrecoverable: {detail}")


def _checkpoint_step(d: _Draft, t: Transition, h: _Handover, current: str) -> Plan:
    """Switchover: final acknowledged checkpoint on the primary, which then stops releasing output."""
    s = d.s
    if isinstance(h.from_health, Lost):
        # The primary died before the switchover demoted it: this is now a failover.
        lost = h.from_health
        t = replace(t, kind=TransitionKind.FAILOVER, cause=lost.cause.value, step=Step.PROMOTE)
        d.again = True
        return _in_progress(d, t, lost.detail, f"switchover became a failover: {lost.detail}")
    started = parse_time(t.started_at) or s.now
    if (s.now - started).total_seconds() > SWITCHOVER_TIMEOUT_S:
        why = f"the final checkpoint did not complete within {SWITCHOVER_TIMEOUT_S:g}s"
        return _abort(d, t.kind, current, why)
    d.act(CheckpointAgent(t.frm))
    d.act(DemoteAgent(t.frm))
    d.again = True
    detail = f"final checkpoint on {t.frm}, then {t.frm} stops releasing output"
    return _in_progress(
        d, t, detail, f"switchover {t.frm} -> {t.to}: checkpoint and demote", then=Step.PROMOTE
    )


def _promote_step(d: _Draft, t: Transition, h: _Handover, current: str) -> Plan:
    """Ask the target to take the Lease with the recorded term and promote itself."""
    target = h.to_report.status
    if target is not None and target.role is Role.PRIMARY and target.term >= t.term:
        # It promoted, but the operator did not record it (a restart in between).
        return _relabel_step(d, replace(t, step=Step.RELABEL), h, current)
    lease = d.s.lease
    answers_again = isinstance(h.from_health, Healthy) and lease is not None and lease.holder == t.frm
    if not t.planned and answers_again:
        return _abort(d, t.kind, current, f"{t.frm} answers again and still holds the Lease")
    if lease is not None and lease.term >= t.term and lease.holder != t.to:
        # Someone else moved the Lease since the transition started: ask for a term above it.
        t = replace(t, term=lease.term + 1)
    if target is None:
        detail = f"waiting for the promotion target {t.to}: {h.to_report.error}"
        return _in_progress(d, t, detail, f"{t.name}: {detail}")
    d.act(PromoteAgent(t.to, t.term))
    # The Service moves in the same plan. A plan stops at its first failed action, so the
    # labels move only once the target answered that it is primary in the term (what the
    # Relabel step reads from its report); status is written after all of them, so a crash in
    # between leaves step Promote, which finds the target promoted and relabels.
    return _hand_over(d, t, h, t.term, f"{t.name} {t.frm} -> {t.to}: promote with term {t.term}, ")


def _relabel_step(d: _Draft, t: Transition, h: _Handover, current: str) -> Plan:
    """The target is primary in the term: move the Service to it and retire the old primary."""
    target = h.to_report.status
    if target is None or target.role is not Role.PRIMARY:
        # The promote call failed after the step was recorded: go back and ask again.
        detail = f"{t.to} does not report itself primary yet"
        return _in_progress(d, replace(t, step=Step.PROMOTE), detail, f"{t.name}: {detail}")
    return _hand_over(d, t, h, max(t.term, target.term), f"{t.name} ")


def _hand_over(d: _Draft, t: Transition, h: _Handover, term: int, summary: str) -> Plan:
    """Move the Service to the target (primary in `term`) and retire the old primary."""
    s = d.s
    if h.from_pod is not None and h.from_pod.role != ROLE_FENCED:
        d.act(LabelPod(t.frm, ROLE_FENCED))
    # The Service follows the label: moved before the old pod's deletion, which no client waits for.
    d.act(LabelPod(t.to, c.ROLE_PRIMARY))
    if h.from_pod is not None:
        d.act(DeletePod(t.frm, force=not t.planned, why=f"replaced by {t.to} in term {term}"))
    record = _handover_record(t, s.now)
    d.status.pop("transition", None)
    d.status.update(currentPrimary=t.to, targetPrimary=t.to, term=term, lastFailover=record)
    if not t.planned:
        d.status["failovers"] = int(d.status.get("failovers") or 0) + 1
    d.status["primary"] = _replica_status(h.to_pod, h.to_report, synced=False)
    d.status["secondary"] = {}
    d.again = True
    ms = record["durationMs"]
    d.event("Normal", "Promoted", f"{t.to} is primary in term {term} after {record['cause']} ({ms} ms)")
    ready = true(ConditionType.READY, Reason.PRIMARY_SERVING, f"primary {t.to} serves")
    msg = "re-protecting: a new secondary follows"
    return d.finish(
        Phase.DEGRADED,
        serving(ready, false, Reason.NO_SECONDARY, msg),
        msg,
        f"{summary}done: {t.to} primary in term {term} ({ms} ms)",
    )


def _handover_record(t: Transition, now: dt.datetime) -> dict[str, Any]:
    """`status.lastFailover`: what moved, why and how long it took."""
    started = parse_time(t.started_at) or now
    record: dict[str, Any] = {
        "kind": t.kind.value,
        "time": timestamp_ms(now),
        "durationMs": round((now - started).total_seconds() * 1000.0, 1),
        "cause": t.cause,
        "from": t.frm,
        "to": t.to,
    }
    if t.from_node:
        record["fromNode"] = t.from_node
    return record


_STEPS: dict[Step, StepFn] = {
    Step.CHECKPOINT: _checkpoint_step,
    Step.PROMOTE: _promote_step,
    Step.RELABEL: _relabel_step,
}


def _abort(d: _Draft, kind: TransitionKind, current: str, detail: str) -> Plan:
    _serve_label(d, current)
    d.status.pop("transition", None)
    d.status["targetPrimary"] = current
    d.event("Warning", f"{kind.value}Aborted", detail)
    d.again = True
    ready = true(ConditionType.READY, Reason.PRIMARY_SERVING, f"primary {current} serves")
    return d.finish(
        Phase.DEGRADED,
        serving(ready, unknown, Reason.SECONDARY_UNCERTAIN, detail),
        detail,
        f"{kind.value.lower()} aborted: {detail}",
    )


def _serve_label(d: _Draft, current: str) -> None:
    """The primary that serves carries the label the Service selects (a failover that started
    took it away, and one that was aborted, or whose start was never recorded, gives it back)."""
    pod = d.s.pod(current)
    if pod is not None and not pod.deleting and pod.role != c.ROLE_PRIMARY:
        d.act(LabelPod(current, c.ROLE_PRIMARY))
