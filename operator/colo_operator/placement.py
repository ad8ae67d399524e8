"""Where a new agent pod may go.

The scheduler places the pod; this module decides whether placing it can
succeed at all, so that a VM with no spare topology domain is reported as
`Degraded` with the reason instead of leaving a Pending pod behind, and it
names the domains and nodes the new pod must stay out of (the manifest turns
them into required node affinity on top of the pod anti-affinity, which alone
would not keep a pod off the domain of a replica whose pod was already
force-deleted).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .snapshot import NodeHealth, NodeView
from .spec import PlacementSpec

_HARD_EFFECTS = ("NoSchedule", "NoExecute")


@dataclass(frozen=True, slots=True)
class Place:
    """A pod can be placed: on one of `candidates`, never in `excluded_domains` or on `excluded_nodes`."""

    candidates: tuple[str, ...]
    excluded_domains: tuple[str, ...]
    excluded_nodes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NoSpareNode:
    """No node can take the pod now; `message` says why for each node, for the status condition."""

    message: str


PlacementVerdict = Place | NoSpareNode


def why_not_eligible(node: NodeView, placement: PlacementSpec) -> str | None:
    """Why `node` cannot run an agent pod of this ColoVM at all, or None if it can."""
    if node.health is not NodeHealth.READY:
        return node.health.value
    if node.unschedulable:
        return "cordoned"
    for key, value in placement.node_selector.items():
        if node.labels.get(key) != value:
            return f"does not match nodeSelector {key}={value}"
    for taint in node.taints:
        if taint.effect in _HARD_EFFECTS and not any(
            t.tolerates(taint.key, taint.value, taint.effect) for t in placement.tolerations
        ):
            shown = f"{taint.key}={taint.value}" if taint.value else taint.key
            return f"taint {shown}:{taint.effect} not tolerated"
    if placement.topology_key not in node.labels:
        return f"no {placement.topology_key} label"
    return None


def place_replica(
    placement: PlacementSpec,
    nodes: Mapping[str, NodeView],
    occupied_nodes: Iterable[str],
) -> PlacementVerdict:
    """Place a replica away from the topology domains of `occupied_nodes`.

    `occupied_nodes` are the nodes of the VM's other replicas, including a lost
    primary's node during a failover: its domain may come back, and the new
    secondary must not share it with anyone.
    """
    key = placement.topology_key
    occupied = tuple(dict.fromkeys(n for n in occupied_nodes if n))
    excluded_domains: list[str] = []
    for name in occupied:
        node = nodes.get(name)
        if node is not None and key in node.labels and node.labels[key] not in excluded_domains:
            excluded_domains.append(node.labels[key])

    candidates: list[str] = []
    reasons: list[str] = []
    for name in sorted(nodes):
        node = nodes[name]
        reason = why_not_eligible(node, placement)
        if reason is None and name in occupied:
            reason = "holds a replica"
        elif reason is None and node.labels[key] in excluded_domains:
            reason = f"shares {key}={node.labels[key]} with a replica"
        if reason is None:
            candidates.append(name)
        else:
            reasons.append(f"{name}: {reason}")
    if not candidates:
        checked = "; ".join(reasons) if reasons else "the cluster has no nodes"
        return NoSpareNode(
            message=(
                f"no node can take a replica outside the {key} domain(s) "
                f"{', '.join(excluded_domains) or '(none)'} ({checked})"
            )
        )
    return Place(
        candidates=tuple(candidates),
        excluded_domains=tuple(excluded_domains),
        excluded_nodes=occupied,
    )
