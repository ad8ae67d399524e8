"""The ColoVM CustomResourceDefinition, written once.

This module is the one source of the CRD: `crds/colovm.yaml` and the chart's
`charts/colo-operator/files/colovm.yaml` are generated from it
(`python -m colo_operator.crd` rewrites both; `--check` fails when either is
stale, and the unit tests run that check). Every property carries a
description, so `kubectl explain colovm.spec...` explains every field.

Units: every duration in the spec and the status is an integer (spec) or a
number (status) of milliseconds, in a field whose name ends in `Ms`; memory is
a Kubernetes quantity. Rules that span fields are CEL rules, derived from the
agent's own argument checks (`colo_agent.config.FailoverTimings`) and from the
Pod validation the agent pods must pass, so a spec that could never run is
refused by `kubectl apply` naming the field.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from colo_agent.constants import (
    CHANNELS,
    CHECKPOINT_INTERVAL_MS,
    HEARTBEAT_INTERVAL_MS,
    HEARTBEAT_TIMEOUT_MS,
    LOCKSTEP_CHECKPOINT_INTERVAL_MS,
    MAX_CHANNELS,
    PAGE_SIZE,
)

from . import constants as c
from .spec import (
    MAX_QEMU_DISK,
    MAX_QEMU_VCPUS,
    QEMU_INITRD,
    QEMU_KERNEL,
    QEMU_NICS,
    RUN_STRATEGIES,
    UPDATE_STRATEGIES,
)

# --------------------------------------------------------------------------- schema helpers (pure)

Schema = dict[str, Any]


def _node(kind: str, description: str, **extra: Any) -> Schema:
    node: Schema = {"type": kind, "description": " ".join(description.split())}
    node.update({k.rstrip("_"): v for k, v in extra.items() if v is not None})
    return node


def integer(description: str, **extra: Any) -> Schema:
    return _node("integer", description, **extra)


def int64(description: str, **extra: Any) -> Schema:
    return _node("integer", description, format="int64", **extra)


def number(description: str, **extra: Any) -> Schema:
    return _node("number", description, **extra)


def string(description: str, **extra: Any) -> Schema:
    return _node("string", description, **extra)


def boolean(description: str, **extra: Any) -> Schema:
    return _node("boolean", description, **extra)


def time(description: str) -> Schema:
    return string(description, format="date-time")


def obj(description: str, properties: dict[str, Schema] | None = None, **extra: Any) -> Schema:
    node = _node("object", description, **extra)
    if properties is not None:
        node["properties"] = properties
    return node


def rule(expression: str, message: str, field_path: str | None = None) -> dict[str, str]:
    out = {"rule": " ".join(expression.split()), "message": message}
    if field_path is not None:
        out["fieldPath"] = field_path
        out["reason"] = "FieldValueInvalid"
    return out


QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|"
    r"(\.[0-9]+))))?$"
)
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# Resource names a container may request (cpu, memory, hugepages-2Mi, devices.kubevirt.io/kvm, ...).
MAX_RESOURCES = 16


def _resource_list(description: str) -> Schema:
    return obj(
        description,
        maxProperties=MAX_RESOURCES,
        additionalProperties={
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "description": "A quantity such as 500m, 2 or 256Mi.",
            "x-kubernetes-int-or-string": True,
            "pattern": QUANTITY_PATTERN,
            # Bounds the CEL cost of comparing requests with limits.
            "maxLength": 64,
        },
    )


# --------------------------------------------------------------------------- spec

GUEST = obj(
    "What runs inside. Immutable while the VM runs: the RAM image and device state of a running VM "
    "cannot change shape. It may change while runStrategy stays Halted.",
    {
        "backend": string(
            "Guest backend. microvm is the agent's own virtual machine monitor running the "
            "built-in key-value firmware; qemu is the user's own Linux VM under QEMU's COLO "
            "(configured in guest.qemu).",
            enum=["microvm", "qemu"],
            default="microvm",
        ),
        "qemu": obj(
            "The QEMU guest (backend qemu only). Its RAM is guest.memory (a whole number of MiB); "
            "the secondary's QEMU needs about twice that. COLO runs single-stream.",
            {
                "vcpus": integer("Virtual CPUs.", minimum=1, maximum=MAX_QEMU_VCPUS, default=1),
                "nic": string(
                    "The guest's network device model.", enum=list(QEMU_NICS), default=QEMU_NICS[0]
                ),
                "kernel": string(
                    "Path of the guest's kernel inside the agent image.", default=QEMU_KERNEL, maxLength=256,
                    pattern="^/",
                ),
                "initrd": string(
                    "Path of the guest's initramfs inside the agent image.", default=QEMU_INITRD,
                    maxLength=256, pattern="^/",
                ),
                "disk": obj(
                    "The guest's disk, replicated to the secondary by QEMU's quorum and replication "
                    "drivers. The first primary starts from the image in the claim, or from an empty "
                    "disk of the given size; from then on the disk lives in the agent pods (each "
                    "secondary copies it from its primary), so a restarted VM starts from the claim "
                    "again.",
                    {
                        "size": string(
                            "Virtual size of the disk, a quantity; the image in the claim must have "
                            "exactly this size.",
                            maxLength=32,
                            **{"x-kubernetes-validations": [
                                rule("isQuantity(self)", "size must be a quantity such as 1Gi"),
                                rule(
                                    "!isQuantity(self) || (quantity(self).isInteger() && "
                                    "quantity(self).compareTo(quantity('1Mi')) >= 0 && "
                                    f"quantity(self).compareTo(quantity('{MAX_QEMU_DISK}')) <= 0)",
                                    f"size must be a whole number of bytes between 1Mi and {MAX_QEMU_DISK}",
                                ),
                            ]},
                        ),
                        "claimName": string(
                            "PersistentVolumeClaim in the VM's namespace holding the first primary's "
                            "disk image; absent: an empty disk.", maxLength=253,
                        ),
                        "path": string(
                            "The qcow2 image's path inside the claim.", default="disk.qcow2", maxLength=256,
                            pattern="^[^/].*$",
                            **{"x-kubernetes-validations": [
                                rule("!self.split('/').exists(p, p == '..')",
                                     "path must stay inside the claim"),
                            ]},
                        ),
                    },
                    required=["size"],
                ),
            },
            required=["disk"],
        ),
        "accel": string(
            "kvm needs /dev/kvm on the node (the operator then requests it for the pod), tcg "
            "emulates in software, auto measures both when the agent starts and takes the faster.",
            enum=["auto", "kvm", "tcg"],
            default="auto",
        ),
        "memory": string(
            "Guest RAM as a quantity, between 4Mi and 1Gi, a whole number of 4 KiB pages. The "
            "agent container needs this much memory on top of its own.",
            default="64Mi",
            maxLength=32,
            **{
                "x-kubernetes-validations": [
                    rule("isQuantity(self)", "memory must be a quantity such as 64Mi"),
                    rule(
                        "!isQuantity(self) || (quantity(self).compareTo(quantity('4Mi')) >= 0 && "
                        "quantity(self).compareTo(quantity('1Gi')) <= 0)",
                        "memory must be between 4Mi and 1Gi",
                    ),
                    rule(
                        "!isQuantity(self) || !quantity(self).isInteger() || "
                        f"quantity(self).asInteger() % {PAGE_SIZE} == 0",
                        f"memory must be a whole number of {PAGE_SIZE}-byte pages",
                    ),
                    rule(
                        "!isQuantity(self) || quantity(self).isInteger()",
                        "memory must be a whole number of bytes",
                    ),
                ]
            },
        ),
    },
    default={},
    **{
        "x-kubernetes-validations": [
            rule(
                "has(self.qemu) == (has(self.backend) && self.backend == 'qemu')",
                "guest.qemu is required with backend qemu, and only allowed with it",
                ".qemu",
            ),
            rule(
                "!has(self.backend) || self.backend != 'qemu' || !has(self.memory) || "
                "!isQuantity(self.memory) || !quantity(self.memory).isInteger() || "
                "quantity(self.memory).asInteger() % 1048576 == 0",
                "a qemu guest's memory must be a whole number of MiB",
                ".memory",
            ),
        ]
    },
)

REPLICATION = obj(
    "How the guest's state reaches the secondary.",
    {
        "mode": string(
            "checkpoint holds output until its epoch is acknowledged (Remus-like); lockstep runs "
            "both guests on the same input and releases output as soon as both produced it (COLO).",
            enum=["checkpoint", "lockstep"],
            default="checkpoint",
        ),
        "checkpointIntervalMs": integer(
            "Milliseconds between checkpoints. In lockstep mode checkpoints only bound the divergence "
            "of state that produces no output, so a longer interval "
            f"(e.g. {LOCKSTEP_CHECKPOINT_INTERVAL_MS}) is usual there.",
            minimum=1,
            maximum=60000,
            default=CHECKPOINT_INTERVAL_MS,
        ),
        "channels": integer(
            "Data connections the checkpoint stream is striped across. Backend qemu runs "
            "single-stream whatever this says (multifd with COLO does not work in QEMU 10.0); "
            "status.stream.channels shows what it uses.",
            minimum=1,
            maximum=MAX_CHANNELS,
            default=CHANNELS,
        ),
        "insecureClear": boolean(
            "Opt out of mutual TLS: the agents replicate guest memory and serve their control API "
            "in clear, readable and alterable by anyone on the pod network. Off by default; the "
            "operator records a Warning event on a ColoVM that sets it.",
            default=False,
        ),
    },
    default={},
)

# The agent refuses to start unless heartbeatIntervalMs < heartbeatTimeoutMs and
# heartbeatIntervalMs < leaseDurationMs (colo_agent.config.FailoverTimings). The API
# server also checks these rules against the bare default {}, before the fields
# inside are defaulted; hence the has() guards.
FAILOVER = obj(
    "When a peer counts as lost and who may serve then.",
    {
        "heartbeatIntervalMs": integer(
            "Milliseconds between heartbeats the agents send each other. Must be below "
            "heartbeatTimeoutMs and leaseDurationMs.",
            minimum=10,
            maximum=60000,
            default=HEARTBEAT_INTERVAL_MS,
        ),
        "heartbeatTimeoutMs": integer(
            "Milliseconds of heartbeat silence after which the peer counts as lost.",
            minimum=20,
            maximum=600000,
            default=HEARTBEAT_TIMEOUT_MS,
        ),
        "leaseDurationMs": integer(
            "Milliseconds a renewal of the primary's fencing Lease stays valid. A primary without "
            "a secondary releases output only while its Lease is valid; a secondary may take over "
            "only after the old primary's Lease ran out. The Lease object itself shows it rounded "
            "up to whole seconds.",
            minimum=100,
            maximum=300000,
            default=1000,
        ),
        "autoReprotect": boolean(
            "Create a new secondary on another node after a failover or a lost secondary.",
            default=True,
        ),
    },
    default={},
    **{
        "x-kubernetes-validations": [
            rule(
                "!has(self.heartbeatTimeoutMs) || !has(self.heartbeatIntervalMs) || "
                "self.heartbeatTimeoutMs > self.heartbeatIntervalMs",
                "heartbeatTimeoutMs must be greater than heartbeatIntervalMs",
                ".heartbeatTimeoutMs",
            ),
            rule(
                "!has(self.leaseDurationMs) || !has(self.heartbeatIntervalMs) || "
                "self.leaseDurationMs > self.heartbeatIntervalMs",
                "leaseDurationMs must be greater than heartbeatIntervalMs (the agent renews its "
                "Lease between heartbeats)",
                ".leaseDurationMs",
            ),
        ]
    },
)

# Pod validation refuses these tolerations, so agent pods carrying them could never be created.
TOLERATION = obj(
    "A toleration added to both agent pods (the Pod API's toleration).",
    {
        "key": string(
            "Taint key the toleration matches; empty with operator Exists matches every taint.",
            maxLength=316,
        ),
        "operator": string(
            "Exists matches any value; Equal matches value (default).",
            enum=["Exists", "Equal"],
        ),
        "value": string("Taint value to match with operator Equal; empty with Exists.", maxLength=63),
        "effect": string(
            "Taint effect to match; empty matches every effect.",
            enum=["NoSchedule", "PreferNoSchedule", "NoExecute"],
        ),
        "tolerationSeconds": int64(
            "Seconds the pod stays bound to a node tainted NoExecute (effect must be NoExecute); "
            "unset: forever.",
        ),
    },
    **{
        "x-kubernetes-validations": [
            rule(
                "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
                "value must be empty when operator is Exists",
                ".value",
            ),
            rule(
                "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
                "operator must be Exists when key is empty",
                ".operator",
            ),
            rule(
                "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
                "effect must be NoExecute when tolerationSeconds is set",
                ".tolerationSeconds",
            ),
        ]
    },
)

PLACEMENT = obj(
    "Where the agent pods may run.",
    {
        "topologyKey": string(
            "Node label whose values the primary and secondary must not share (hostname: different "
            "nodes; a zone label: different zones).",
            default="kubernetes.io/hostname",
            minLength=1,
            maxLength=316,
        ),
        "nodeSelector": obj(
            "Labels a node must carry to run an agent pod of this VM.",
            maxProperties=64,
            additionalProperties=string("Label value.", maxLength=63, pattern=LABEL_VALUE_PATTERN),
        ),
        "tolerations": {
            "type": "array",
            "description": "Taints the agent pods tolerate.",
            "maxItems": 32,
            "items": TOLERATION,
        },
    },
    default={},
)

SERVICE = obj(
    "The Service clients connect through; it always selects the current primary.",
    {
        "type": string(
            "Service type.",
            enum=["ClusterIP", "NodePort", "LoadBalancer"],
            default="ClusterIP",
        ),
        "port": integer(
            "Port clients connect to (the guest speaks RESP, the Redis protocol).",
            minimum=1,
            maximum=65535,
            default=6379,
        ),
        "annotations": obj(
            "Annotations of the Service (a cloud load balancer's settings, for example).",
            maxProperties=64,
            additionalProperties=string("Annotation value."),
        ),
    },
    default={},
)

POD = obj(
    "Settings of the agent pods beyond what the operator decides. Each field left out takes the "
    "operator's default (chart value agent.pod); labels and annotations add to those defaults.",
    {
        "labels": obj(
            "Extra labels of the agent pods; the operator's own labels (app.kubernetes.io/*, "
            "colo.dev/*) cannot be overridden.",
            maxProperties=64,
            additionalProperties=string("Label value.", maxLength=63, pattern=LABEL_VALUE_PATTERN),
        ),
        "annotations": obj(
            "Extra annotations of the agent pods.",
            maxProperties=64,
            additionalProperties=string("Annotation value."),
        ),
        "priorityClassName": string("PriorityClass of the agent pods.", maxLength=253),
        "imagePullSecrets": {
            "type": "array",
            "description": "Secrets holding credentials to pull the agent image.",
            "maxItems": 16,
            "items": obj(
                "A Secret of type kubernetes.io/dockerconfigjson in the ColoVM's namespace.",
                {"name": string("Name of the Secret.", minLength=1, maxLength=253)},
                required=["name"],
            ),
        },
        "affinity": obj(
            "A Pod affinity (nodeAffinity, podAffinity, podAntiAffinity) added to the operator's "
            "own rules, which keep the primary and secondary apart and away from lost nodes; "
            "checked by the API server when a pod is created.",
            None,
            **{"x-kubernetes-preserve-unknown-fields": True},
        ),
    },
)

RESOURCES = obj(
    "Compute resources of the agent container. Unset: requests equal limits (Guaranteed QoS), "
    "cpu 1 and memory twice guest.memory (the RAM file and the colo cache) plus the agent's own "
    "192Mi. What is given here wins per resource; a request without its limit raises the limit.",
    {
        "requests": _resource_list("Minimum resources the scheduler reserves, by resource name."),
        "limits": _resource_list("Maximum resources the container may use, by resource name."),
    },
    **{
        "x-kubernetes-validations": [
            rule(
                "!has(self.requests) || !has(self.limits) || self.requests.all(k, !(k in self.limits) || "
                "quantity(string(self.requests[k])).compareTo(quantity(string(self.limits[k]))) <= 0)",
                "every request must be less than or equal to its limit",
                ".requests",
            ),
        ]
    },
)

SPEC = obj(
    "The desired VM. Fields outside guest may change while it runs.",
    {
        "guest": GUEST,
        "replication": REPLICATION,
        "failover": FAILOVER,
        "placement": PLACEMENT,
        "service": SERVICE,
        "pod": POD,
        "image": string("Agent image; the operator's default when empty.", maxLength=512),
        "imagePullPolicy": string(
            "Pull policy of the agent image; the operator's default when empty.",
            enum=["Always", "IfNotPresent", "Never"],
        ),
        "resources": RESOURCES,
        "runStrategy": string(
            "Always: the VM runs. Halted: the VM is stopped: its agent pods are deleted, while the "
            "ColoVM, its Service, Secret and Lease stay (the Lease's term keeps counting, so no agent "
            "of an earlier run can serve again). The guest's RAM and device state live only in the "
            "agent pods and the microvm backend keeps no persistent image, so setting Always again "
            "starts a fresh guest: whatever it held before is gone. A Failed VM is restarted the "
            "same way (Halted, then Always).",
            enum=list(RUN_STRATEGIES),
            default="Always",
        ),
        "updateStrategy": string(
            "What happens when the agent pod template (image, resources, agent flags, the operator's "
            "defaults) no longer matches the running pods. Automatic: a rolling update at once: the "
            "secondary is replaced and syncs, the primary switches over to it (term + 1, no "
            "acknowledged write lost), then the old primary is replaced. Manual: the UpToDate "
            "condition turns False and the rolling update waits for `kubectl colo upgrade NAME`. "
            "`kubectl colo restart NAME` replaces both pods the same way under either strategy.",
            enum=list(UPDATE_STRATEGIES),
            default="Automatic",
        ),
    },
    default={},
    **{
        "x-kubernetes-validations": [
            # A fresh guest starts from the spec, so the guest may change while the VM stays stopped.
            rule(
                "!has(oldSelf.guest) || !has(self.guest) || self.guest == oldSelf.guest || "
                "(has(oldSelf.runStrategy) && oldSelf.runStrategy == 'Halted' && "
                "has(self.runStrategy) && self.runStrategy == 'Halted')",
                "guest is immutable while the VM runs; set runStrategy to Halted first (it then "
                "starts afresh), or create a new ColoVM",
                ".guest",
            ),
            rule(
                "!has(self.resources) || !has(self.resources.limits) || "
                "!('memory' in self.resources.limits) || !has(self.guest) || !has(self.guest.memory) || "
                "!isQuantity(self.guest.memory) || "
                "quantity(string(self.resources.limits['memory']))"
                ".compareTo(quantity(self.guest.memory)) > 0",
                "resources.limits.memory must be greater than guest.memory: the guest's RAM comes on top "
                "of the agent's own",
                ".resources.limits",
            ),
            rule(
                "!has(self.guest) || !has(self.guest.backend) || self.guest.backend != 'qemu' || "
                "!has(self.replication) || !has(self.replication.mode) || "
                "self.replication.mode != 'lockstep'",
                "replication.mode lockstep is for the microvm backend: QEMU's COLO compares the guests' "
                "output itself",
                ".replication.mode",
            ),
        ]
    },
)

# --------------------------------------------------------------------------- status


def _replica(role: str) -> Schema:
    return obj(
        f"The {role} agent.",
        {
            "pod": string("Pod name."),
            "node": string("Node the pod runs on."),
            "address": string("Replication address (HOST:PORT) of the pod."),
            "synced": boolean(
                "Primary: its secondary is synced (the VM is protected). Secondary: holds a complete "
                "committed image and can be promoted."
            ),
            "state": string("The agent's peer state as it reports it (e.g. connected, syncing, lost)."),
        },
    )


CONDITION = obj(
    "One aspect of the VM's state (Ready, Protected, Synced, ...).",
    {
        "type": string("Condition type."),
        "status": string("True, False or Unknown.", enum=["True", "False", "Unknown"]),
        "reason": string("One CamelCase word saying why."),
        "message": string("Human-readable details."),
        "lastTransitionTime": time("When status last changed."),
        "observedGeneration": int64("metadata.generation the condition was computed from."),
    },
    required=["type", "status"],
)

STATUS = obj(
    "What is true now, as the operator observed it.",
    {
        "observedGeneration": int64("metadata.generation the operator last acted upon."),
        "phase": string(
            "Pending: no pods yet; Syncing: the secondary receives its first image; Protected: a "
            "synced secondary can take over; Degraded: serving without a synced secondary; "
            "FailingOver: a promotion is under way; Failed: cannot serve, see message; Stopped: "
            "runStrategy is Halted and the agent pods are gone or going.",
            enum=["Pending", "Syncing", "Protected", "Degraded", "FailingOver", "Failed", "Stopped"],
        ),
        "message": string("Why the VM is in its phase."),
        "conditions": {
            "type": "array",
            "description": "Conditions, one per type.",
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
            "items": CONDITION,
        },
        "currentPrimary": string("Pod that serves clients now."),
        "targetPrimary": string(
            "Pod that should serve; differs from currentPrimary while a promotion is pending."
        ),
        "transition": obj(
            "The failover or switchover in progress; the operator resumes it from here after a restart.",
            {
                "kind": string(
                    "Failover (the primary was lost) or Switchover (planned).",
                    enum=["Failover", "Switchover"],
                ),
                "cause": string(
                    "What started it: PodGone, PodDeleted, PodFailed, NodeGone, NodeNotReady, NodeUnknown, "
                    "AgentUnreachable (failovers); Switchover, NodeDrain, Upgrade (planned)."
                ),
                "from": string("Pod of the old primary."),
                "to": string("Pod being promoted."),
                "step": string(
                    "Checkpoint: final checkpoint on the old primary (switchover only); Promote: the "
                    "secondary takes the Lease and resumes; Relabel: the Service moves to the new primary.",
                    enum=["Checkpoint", "Promote", "Relabel"],
                ),
                "fromNode": string("Node of the old primary."),
                "term": int64("Term the new primary takes."),
                "startedAt": time("When the transition started."),
                "message": string("Progress or the reason it waits."),
            },
        ),
        "primary": _replica("primary"),
        "secondary": _replica("secondary"),
        "term": int64("Fencing generation: the Lease's term, up by one at every promotion."),
        "epoch": int64("Last checkpoint epoch the secondary acknowledged, within term."),
        "lastCheckpoint": obj(
            "The newest acknowledged checkpoint the primary reported.",
            {
                "epoch": int64("Its epoch."),
                "pauseMs": number("Milliseconds the guest was paused to take it."),
                "pages": int64("Guest pages it carried."),
                "bytes": int64("Payload bytes it carried (pages and device state)."),
                "durationMs": number("Milliseconds from its pause to its acknowledgement."),
                "cause": string("What triggered it (interval, mismatch, timeout, ...)."),
                "observedAt": time("When the operator first saw this epoch acknowledged."),
                "ackAgeMs": number(
                    "Milliseconds since the primary's last acknowledged checkpoint, as the primary "
                    "measured it at checkpoints.sampledAt: how much guest execution a failover at "
                    "that moment would have rolled back."
                ),
            },
        ),
        "checkpoints": obj(
            "Checkpoint totals of the current primary agent.",
            {
                "total": int64("Acknowledged checkpoints since the primary agent started."),
                "perSecond": number("Acknowledged checkpoints per second over the last sample period."),
                "bytes": int64("Payload bytes of all acknowledged checkpoints."),
                "sampledAt": time("When these figures were read from the primary agent."),
            },
        ),
        "stream": obj(
            "The primary's replication when the backend replicates itself (backend qemu: QEMU's COLO).",
            {
                "state": string("QEMU's migration status (query-migrate): colo while protected."),
                "channels": int64(
                    "Connections the checkpoint stream uses: 1, single-stream (QEMU 10.0 cannot combine "
                    "multifd with COLO)."
                ),
                "mismatches": int64("Checkpoints colo-compare forced because the guests' outputs differed."),
            },
        ),
        "failovers": int64("Promotions (failovers and switchovers) since the VM was created."),
        "lastFailover": obj(
            "The most recent completed failover or switchover.",
            {
                "kind": string("Failover or Switchover."),
                "time": time("When it completed."),
                "durationMs": number("Milliseconds from its start to the new primary serving."),
                "cause": string("What started it."),
                "from": string("Pod of the old primary."),
                "fromNode": string("Node of the old primary."),
                "to": string("Pod of the new primary."),
            },
        ),
        "primaryRestarts": int64("Primaries replaced because they failed before ever serving."),
        "podSerial": int64("Ordinal of the next agent pod; pod names never repeat within a ColoVM."),
        "switchoverHandled": string("Value of the colo.dev/switchover annotation last acted upon."),
        "upToDate": string(
            "Agent pods running the desired pod template, of all agent pods (e.g. 1/2 during a "
            "rolling update)."
        ),
        "upgradeHandled": string("Value of the colo.dev/upgrade annotation last acted upon."),
        "approvedTemplate": string(
            "Pod template hash a `kubectl colo upgrade` approved (updateStrategy Manual)."
        ),
        "stoppedFrom": string(
            "Phase the VM was in when it was stopped; Failed means the guest's state had been lost."
        ),
    },
)

PRINTER_COLUMNS: list[Schema] = [
    {"name": "Phase", "type": "string", "description": "Phase of the VM.", "jsonPath": ".status.phase"},
    {"name": "Primary", "type": "string", "description": "Node of the primary agent pod.",
     "jsonPath": ".status.primary.node"},
    {"name": "Secondary", "type": "string", "description": "Node of the secondary agent pod.",
     "jsonPath": ".status.secondary.node"},
    {"name": "Term", "type": "integer",
     "description": "Fencing generation; goes up by one at every promotion.", "jsonPath": ".status.term"},
    {"name": "Pause-ms", "type": "number",
     "description": "Guest pause of the last acknowledged checkpoint, in milliseconds.",
     "jsonPath": ".status.lastCheckpoint.pauseMs"},
    {"name": "Mismatches", "type": "integer", "priority": 1,
     "description": "Checkpoints colo-compare forced because the guests' outputs differed (backend qemu).",
     "jsonPath": ".status.stream.mismatches"},
    {"name": "Up-To-Date", "type": "string",
     "description": "Agent pods running the desired pod template, of all agent pods.",
     "jsonPath": ".status.upToDate"},
    {"name": "Age", "type": "date", "description": "Time since the ColoVM was created.",
     "jsonPath": ".metadata.creationTimestamp"},
]  # fmt: skip


def crd() -> Schema:
    """The CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{c.PLURAL}.{c.GROUP}",
            "labels": {
                "app.kubernetes.io/name": "colo-operator",
                "app.kubernetes.io/part-of": "colo-operator",
            },
        },
        "spec": {
            "group": c.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": c.KIND,
                "listKind": f"{c.KIND}List",
                "plural": c.PLURAL,
                "singular": c.KIND.lower(),
                "shortNames": ["cvm"],
                # `kubectl get all` and `kubectl get colo` list ColoVMs.
                "categories": ["all", "colo"],
            },
            "versions": [
                {
                    "name": c.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": obj(
                            "A fault-tolerant virtual machine replicated from a primary to a secondary "
                            "agent pod on another node.",
                            {
                                "apiVersion": string("Versioned schema of this object (colo.dev/v1alpha1)."),
                                "kind": string("ColoVM."),
                                # The API server refuses anything but a bare type here.
                                "metadata": {"type": "object"},
                                "spec": SPEC,
                                "status": STATUS,
                            },
                            required=["spec"],
                        )
                    },
                }
            ],
        },
    }


# --------------------------------------------------------------------------- the generated files

HEADER = """\
# ColoVM: a virtual machine kept alive across the loss of its node by
# continuous checkpointing (COLO style) from a primary agent pod to a secondary
# agent pod on another topology domain.
#
# GENERATED from operator/colo_operator/crd.py; do not edit. Regenerate with
#   python -m colo_operator.crd
# which writes this file and charts/colo-operator/files/colovm.yaml.
"""

ROOT = Path(__file__).resolve().parents[2]
TARGETS = (Path("crds/colovm.yaml"), Path("charts/colo-operator/files/colovm.yaml"))


def render() -> str:
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=100, allow_unicode=True)


def stale(root: Path = ROOT) -> list[Path]:
    """The generated files under `root` that differ from `render()`."""
    text = render()
    return [t for t in TARGETS if not (root / t).exists() or (root / t).read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m colo_operator.crd",
        description="Write the ColoVM CRD to crds/colovm.yaml and the chart's copy.",
    )
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.check:
        out_of_date = stale(args.root)
        for path in out_of_date:
            print(f"{path} is stale: python -m colo_operator.crd", file=sys.stderr)
        return 1 if out_of_date else 0
    text = render()
    for target in TARGETS:
        (args.root / target).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
