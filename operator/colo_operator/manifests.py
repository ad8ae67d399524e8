"""Pure builders of every object the operator creates for a ColoVM.

Each returns a plain dict ready for the API server. Everything carries the
`app.kubernetes.io/*` labels plus `colo.dev/vm`, and an owner reference to the
ColoVM (controller, blocking owner deletion), so garbage collection removes
it even if the finalizer never ran.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from . import constants as c
from .config import KvmMode, OperatorConfig
from .decide import CreatePod
from .placement import Place
from .snapshot import VMView


@dataclass(frozen=True, slots=True)
class Names:
    """Names of the per-VM objects; all derived from the ColoVM's name."""

    vm: str

    @property
    def service(self) -> str:
        return self.vm

    @property
    def secret(self) -> str:
        return f"{self.vm}-agent-key"

    @property
    def lease(self) -> str:
        return f"{self.vm}-primary"

    @property
    def service_account(self) -> str:
        return f"{self.vm}-agent"

    @property
    def role(self) -> str:
        return f"{self.vm}-agent"

    @property
    def pdb(self) -> str:
        return self.vm


def labels(vm: VMView, component: str, role: str | None = None) -> dict[str, str]:
    out = {
        c.LABEL_NAME: c.APP_NAME,
        c.LABEL_INSTANCE: vm.name,
        c.LABEL_COMPONENT: component,
        c.LABEL_MANAGED_BY: c.MANAGED_BY,
        c.LABEL_PART_OF: "colo-operator",
        c.LABEL_VM: vm.name,
    }
    if role is not None:
        out[c.LABEL_ROLE] = role
    return out


def owner_reference(vm: VMView) -> dict[str, Any]:
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "name": vm.name,
        "uid": vm.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(vm: VMView, name: str, component: str, role: str | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": vm.namespace,
        "labels": labels(vm, component, role),
        "ownerReferences": [owner_reference(vm)],
    }


def agent_args(vm: VMView, role: str, peer: str | None) -> list[str]:
    """`colo-agent run` flags from the spec, per the agent's command-line contract."""
    spec = vm.spec
    args = [
        "run",
        "--role", role,
        "--vm", f"{vm.namespace}/{vm.name}",
        "--backend", spec.guest.backend,
        "--memory", str(spec.guest.memory_bytes),
        "--accel", spec.guest.accel,
        "--mode", spec.replication.mode,
        "--interval-ms", str(spec.replication.checkpoint_interval_ms),
        "--channels", str(spec.replication.channels),
        "--replication-port", str(c.REPLICATION_PORT),
        "--heartbeat-interval-ms", str(spec.failover.heartbeat_interval_ms),
        "--heartbeat-timeout-ms", str(spec.failover.heartbeat_timeout_ms),
        "--arbiter", f"lease:{vm.namespace}/{Names(vm.name).lease}",
        "--lease-duration-ms", str(spec.failover.lease_duration_ms),
        "--port", str(c.CLIENT_PORT),
        "--control-port", str(c.CONTROL_PORT),
    ]  # fmt: skip
    if peer is not None:
        args += ["--peer", peer]
    return args


def _affinity(vm: VMView, action: CreatePod) -> dict[str, Any]:
    key = vm.spec.placement.topology_key
    affinity: dict[str, Any] = {
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchLabels": {c.LABEL_VM: vm.name}}, "topologyKey": key}
            ]
        }
    }
    # Anti-affinity only sees pods that still exist; a lost primary's pod is
    # force-deleted while its node may come back, so its domain is excluded by name too.
    term: dict[str, Any] = {}
    if action.place.excluded_domains:
        term["matchExpressions"] = [
            {"key": key, "operator": "NotIn", "values": list(action.place.excluded_domains)}
        ]
    if action.place.excluded_nodes:
        # The API server takes exactly one value per metadata.name requirement;
        # requirements within a term are ANDed, so one per excluded node.
        term["matchFields"] = [
            {"key": "metadata.name", "operator": "NotIn", "values": [node]}
            for node in action.place.excluded_nodes
        ]
    if term:
        affinity["nodeAffinity"] = {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}
        }
    return affinity


def agent_pod(vm: VMView, config: OperatorConfig, action: CreatePod) -> dict[str, Any]:
    spec = vm.spec
    names = Names(vm.name)
    meta = _meta(vm, action.name, "agent", action.role)
    meta["annotations"] = {c.ANNOTATION_SERIAL: str(action.serial)}
    resources: dict[str, Any] = {k: dict(v) for k, v in spec.resources.items() if isinstance(v, dict)}
    container: dict[str, Any] = {
        "name": c.AGENT_CONTAINER,
        "image": spec.image or config.agent_image,
        "imagePullPolicy": spec.image_pull_policy or config.agent_image_pull_policy,
        "command": ["colo-agent"],
        "args": agent_args(vm, action.role, action.peer),
        "env": [
            {"name": "COLO_IDENTITY", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {
                "name": "COLO_SECRET",
                "valueFrom": {"secretKeyRef": {"name": names.secret, "key": c.SECRET_KEY}},
            },
        ],
        "ports": [
            {"name": "client", "containerPort": c.CLIENT_PORT, "protocol": "TCP"},
            {"name": "control", "containerPort": c.CONTROL_PORT, "protocol": "TCP"},
            {"name": "replication", "containerPort": c.REPLICATION_PORT, "protocol": "TCP"},
        ],
        # Primary: ready while it serves clients (the Service follows readiness
        # as well as the role label). Secondary: ready once synced.
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "control"},
            "periodSeconds": 1,
            "timeoutSeconds": 1,
            "failureThreshold": 2,
        },
        # Generous: a restart loses the guest (restartPolicy Never turns it into
        # a lost replica), so only a really stuck agent should be killed.
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "control"},
            "initialDelaySeconds": 5,
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 6,
        },
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": names.service_account,
        # The guest lives in the agent's memory: a restarted container would come
        # back empty under the same name. The operator replaces a failed pod instead.
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 10,
        "affinity": _affinity(vm, action),
        "containers": [container],
    }
    if spec.placement.node_selector:
        pod_spec["nodeSelector"] = dict(spec.placement.node_selector)
    if spec.placement.tolerations:
        pod_spec["tolerations"] = [t.to_dict() for t in spec.placement.tolerations]
    if spec.guest.accel == "kvm":
        if config.kvm_mode is KvmMode.RESOURCE:
            # Extended resources are set as limits; requests default to them.
            limits = resources.setdefault("limits", {})
            limits[config.kvm_resource_name] = 1
        else:
            container["securityContext"] = {"privileged": True}
            container["volumeMounts"] = [{"name": "kvm", "mountPath": "/dev/kvm"}]
            pod_spec["volumes"] = [{"name": "kvm", "hostPath": {"path": "/dev/kvm", "type": "CharDevice"}}]
    if resources:
        container["resources"] = resources
    meta["annotations"][c.ANNOTATION_TEMPLATE] = _template_hash(vm, pod_spec)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}


# Agent flags that differ between the two pods of one template.
_PER_POD_FLAGS = ("--role", "--peer")


def _template_hash(vm: VMView, pod_spec: dict[str, Any]) -> str:
    """Hash of what a running agent pod cannot change: its containers (image, resources, agent
    flags) and volumes, without the per-pod role and peer, plus the ColoVM's restartedAt
    annotation. A pod whose colo.dev/template-hash differs is replaced by a rolling update."""
    containers = []
    for box in pod_spec["containers"]:
        args = list(box.get("args") or ())
        per_pod = {i + 1 for i, arg in enumerate(args) if arg in _PER_POD_FLAGS}
        kept = [a for i, a in enumerate(args) if a not in _PER_POD_FLAGS and i not in per_pod]
        containers.append({**box, "args": kept})
    restarted = vm.annotations.get(c.ANNOTATION_RESTARTED_AT)
    text = json.dumps([containers, pod_spec.get("volumes"), restarted], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def template_hash(vm: VMView, config: OperatorConfig) -> str:
    """The template hash the spec and the operator's settings call for now."""
    pod = agent_pod(vm, config, CreatePod("", 0, c.ROLE_SECONDARY, None, Place((), (), ())))
    return str(pod["metadata"]["annotations"][c.ANNOTATION_TEMPLATE])


def secret(vm: VMView, key: str) -> dict[str, Any]:
    """The per-VM key: HMAC between the agents and the control API's bearer token."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(vm, Names(vm.name).secret, "agent-key"),
        "type": "Opaque",
        "immutable": True,
        "data": {c.SECRET_KEY: base64.b64encode(key.encode()).decode()},
    }


def lease(vm: VMView) -> dict[str, Any]:
    """The fencing token. Empty until the first primary takes it; leaseTransitions is the term."""
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": _meta(vm, Names(vm.name).lease, "lease"),
        # The Lease API counts whole seconds; the agents renew by the spec's milliseconds.
        "spec": {
            "leaseDurationSeconds": -(-vm.spec.failover.lease_duration_ms // 1000),
            "leaseTransitions": 0,
        },
    }


def service_account(vm: VMView) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(vm, Names(vm.name).service_account, "agent"),
    }


def role(vm: VMView) -> dict[str, Any]:
    names = Names(vm.name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(vm, names.role, "agent"),
        "rules": [
            {
                "apiGroups": ["coordination.k8s.io"],
                "resources": ["leases"],
                "resourceNames": [names.lease],
                # The agent's compare-and-swap is a PUT carrying the resourceVersion
                # it read; the operator creates the Lease, so no create either.
                "verbs": ["get", "update"],
            }
        ],
    }


def role_binding(vm: VMView) -> dict[str, Any]:
    names = Names(vm.name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(vm, names.role, "agent"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": names.role},
        "subjects": [{"kind": "ServiceAccount", "name": names.service_account, "namespace": vm.namespace}],
    }


def client_service(vm: VMView) -> dict[str, Any]:
    """Clients' entry point: selects whichever pod carries the primary role label."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(vm, Names(vm.name).service, "client"),
        "spec": {
            "type": vm.spec.service.type,
            "selector": {c.LABEL_VM: vm.name, c.LABEL_ROLE: c.ROLE_PRIMARY},
            "ports": [
                {"name": "resp", "port": vm.spec.service.port, "targetPort": "client", "protocol": "TCP"}
            ],
        },
    }


def pod_disruption_budget(vm: VMView) -> dict[str, Any]:
    """Blocks evictions that would leave the VM without a synced pair.

    minAvailable 2 over both replicas (readiness = serving / synced) lets no
    eviction through while the VM depends on both; a drain waits until the
    operator has switched the primary over and moved the secondary off the
    cordoned node itself. An integer minAvailable is the form Kubernetes
    supports for pods owned by a custom resource.
    """
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(vm, Names(vm.name).pdb, "agent"),
        "spec": {
            "minAvailable": 2,
            "selector": {"matchLabels": {c.LABEL_VM: vm.name, c.LABEL_COMPONENT: "agent"}},
            # A replica that is not ready (first sync) protects nothing; let it go.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def base_objects(vm: VMView) -> list[dict[str, Any]]:
    """Everything but the pods and the Secret (whose key the caller generates)."""
    return [
        service_account(vm),
        role(vm),
        role_binding(vm),
        lease(vm),
        client_service(vm),
        pod_disruption_budget(vm),
    ]
