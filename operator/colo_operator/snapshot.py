"""An immutable picture of one ColoVM's world, read once per reconcile.

Handlers build a `Snapshot` from the API objects (`*_view` functions below
turn raw dicts into views, tolerating missing or malformed fields) and the
agents' reports; every decision is a pure function of it.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from colo_agent.api.models import AgentStatus

from . import constants as c
from .spec import ColoVMSpec


class NodeHealth(enum.StrEnum):
    READY = "Ready"
    NOT_READY = "NotReady"  # the kubelet says it is unhealthy
    UNKNOWN = "Unknown"  # the node stopped reporting (lost, partitioned)
    GONE = "Gone"  # no Node object


@dataclass(frozen=True, slots=True)
class Taint:
    key: str
    value: str | None
    effect: str


@dataclass(frozen=True, slots=True)
class NodeView:
    name: str
    health: NodeHealth
    unschedulable: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()


@dataclass(frozen=True, slots=True)
class PodView:
    name: str
    role: str | None  # colo.dev/role label
    serial: int
    node: str | None
    phase: str  # Pending, Running, Succeeded, Failed, Unknown
    ip: str | None
    ready: bool
    deleting: bool
    # Why the pod cannot run, when the kubelet or the scheduler said so.
    problem: str | None = None
    unschedulable: bool = False
    # colo.dev/template-hash: the pod template it was created from (None: created before hashes).
    template: str | None = None
    # The agent container's exit status once terminated (EXIT_NEVER_SERVED: no client saw its guest).
    exit_code: int | None = None

    @property
    def terminated(self) -> bool:
        return self.phase in ("Succeeded", "Failed")


@dataclass(frozen=True, slots=True)
class LeaseView:
    holder: str | None
    # The fencing term: spec.leaseTransitions, bumped by every successful take-over.
    term: int


@dataclass(frozen=True, slots=True)
class AgentReport:
    """What polling one agent's control API produced: its status, or why there is none."""

    status: AgentStatus | None
    error: str | None = None


UNPOLLED = AgentReport(status=None, error="not polled")


@dataclass(frozen=True, slots=True)
class VMView:
    namespace: str
    name: str
    uid: str
    generation: int
    spec: ColoVMSpec
    status: Mapping[str, Any]
    annotations: Mapping[str, str] = field(default_factory=dict)
    deleting: bool = False


@dataclass(frozen=True, slots=True)
class Snapshot:
    vm: VMView
    pods: tuple[PodView, ...]
    nodes: Mapping[str, NodeView]
    agents: Mapping[str, AgentReport]  # by pod name
    lease: LeaseView | None
    now: dt.datetime
    # Hash of the agent pod template the spec and operator settings call for now
    # (manifests.template_hash); empty: unknown, no rolling update.
    template: str = ""

    def pod(self, name: str | None) -> PodView | None:
        if not name:
            return None
        for pod in self.pods:
            if pod.name == name:
                return pod
        return None

    def node_of(self, pod: PodView | None) -> NodeView | None:
        if pod is None or pod.node is None:
            return None
        return self.nodes.get(pod.node) or NodeView(name=pod.node, health=NodeHealth.GONE)

    def agent(self, pod: PodView | None) -> AgentReport:
        if pod is None:
            return UNPOLLED
        return self.agents.get(pod.name, UNPOLLED)


# --------------------------------------------------------------------------- raw API objects -> views


def _get(obj: object, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def _str_map(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): str(v) for k, v in value.items() if isinstance(v, str)}


def parse_time(value: object) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def node_view(node: Mapping[str, Any]) -> NodeView:
    health = NodeHealth.UNKNOWN
    for cond in _get(node, "status", "conditions") or ():
        if isinstance(cond, Mapping) and cond.get("type") == "Ready":
            health = {"True": NodeHealth.READY, "False": NodeHealth.NOT_READY}.get(
                str(cond.get("status")), NodeHealth.UNKNOWN
            )
    taints = tuple(
        Taint(key=str(t.get("key", "")), value=t.get("value"), effect=str(t.get("effect", "")))
        for t in _get(node, "spec", "taints") or ()
        if isinstance(t, Mapping)
    )
    return NodeView(
        name=str(_get(node, "metadata", "name") or ""),
        health=health,
        unschedulable=bool(_get(node, "spec", "unschedulable")),
        labels=_str_map(_get(node, "metadata", "labels")),
        taints=taints,
    )


def pod_view(pod: Mapping[str, Any]) -> PodView:
    labels = _str_map(_get(pod, "metadata", "labels"))
    annotations = _str_map(_get(pod, "metadata", "annotations"))
    try:
        serial = int(annotations.get(c.ANNOTATION_SERIAL, "-1"))
    except ValueError:
        serial = -1
    ready = False
    problem: str | None = None
    unschedulable = False
    exit_code: int | None = None
    for cond in _get(pod, "status", "conditions") or ():
        if not isinstance(cond, Mapping):
            continue
        if cond.get("type") == "Ready":
            ready = cond.get("status") == "True"
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            unschedulable = cond.get("reason") == "Unschedulable"
            problem = str(cond.get("message") or cond.get("reason") or "not scheduled")
    for status in _get(pod, "status", "containerStatuses") or ():
        terminated = _get(status, "state", "terminated")
        waiting = _get(status, "state", "waiting")
        if isinstance(terminated, Mapping):
            code = terminated.get("exitCode")
            exit_code = code if isinstance(code, int) and not isinstance(code, bool) else None
            problem = (
                f"agent exited: {terminated.get('reason') or 'exit code ' + str(terminated.get('exitCode'))}"
            )
        elif isinstance(waiting, Mapping) and waiting.get("reason") not in (None, "ContainerCreating"):
            problem = f"agent waiting: {waiting.get('reason')}: {waiting.get('message') or ''}".rstrip(": ")
    return PodView(
        name=str(_get(pod, "metadata", "name") or ""),
        role=labels.get(c.LABEL_ROLE),
        serial=serial,
        node=_get(pod, "spec", "nodeName") or None,
        phase=str(_get(pod, "status", "phase") or "Pending"),
        ip=_get(pod, "status", "podIP") or None,
        ready=ready,
        deleting=_get(pod, "metadata", "deletionTimestamp") is not None,
        problem=problem,
        unschedulable=unschedulable,
        template=annotations.get(c.ANNOTATION_TEMPLATE),
        exit_code=exit_code,
    )


def lease_view(lease: Mapping[str, Any]) -> LeaseView:
    transitions = _get(lease, "spec", "leaseTransitions")
    holder = _get(lease, "spec", "holderIdentity")
    return LeaseView(
        holder=holder if isinstance(holder, str) and holder else None,
        term=transitions if isinstance(transitions, int) and not isinstance(transitions, bool) else 0,
    )


def vm_view(body: Mapping[str, Any]) -> VMView:
    """Raises SpecError (from ColoVMSpec) if the spec is unusable."""
    meta = body.get("metadata") or {}
    status = body.get("status")
    return VMView(
        namespace=str(meta.get("namespace") or "default"),
        name=str(meta.get("name") or ""),
        uid=str(meta.get("uid") or ""),
        generation=int(meta.get("generation") or 0),
        spec=ColoVMSpec.from_dict(body.get("spec")),
        status=dict(status) if isinstance(status, Mapping) else {},
        annotations=_str_map(meta.get("annotations")),
        deleting=meta.get("deletionTimestamp") is not None,
    )
