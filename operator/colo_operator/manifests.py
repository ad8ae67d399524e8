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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from colo_agent.api.identity import vm_identity

from . import constants as c
from .config import KvmMode, OperatorConfig
from .decide import CreatePod
from .placement import Place
from .snapshot import VMView
from .spec import QemuSpec


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
    def tls_secret(self) -> str:
        return f"{self.vm}-agent-tls"

    @property
    def network_policy(self) -> str:
        return f"{self.vm}-agents"

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


# Where the agent pod mounts its VM's certificate Secret (tls.crt, tls.key, ca.crt).
TLS_MOUNT = "/var/run/colo/tls"


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
    if spec.replication.insecure_clear:
        args += ["--insecure-clear", "true"]
    else:
        args += ["--tls-dir", TLS_MOUNT]
    return args


# Where the pod puts guest RAM, the per-VM key and scratch files. A
# container's /dev/shm is 64 MiB unless told otherwise, so guest RAM goes to
# a memory-backed emptyDir sized from guest memory (COLO_RAM_DIR).
RAM_VOLUME, RAM_DIR = "guest-ram", "/var/lib/colo/ram"
KEY_VOLUME, KEY_DIR = "agent-key", "/var/run/secrets/colo"
TLS_VOLUME = "agent-tls"
TMP_VOLUME, TMP_DIR = "tmp", "/tmp"
# Room on top of the RAM file's exact size (tmpfs rounds to pages).
RAM_SLACK_BYTES = 1 << 20
# The agent's own memory beside guest RAM (interpreter, numpy, unicorn, the
# channels' buffers), measured at 80-90 MiB resident (anonymous + file) for
# 64-128 MiB guests in both modes; the rest is headroom.
AGENT_OVERHEAD_BYTES = 192 << 20
DEFAULT_CPU = "1"
MEBIBYTE = 1 << 20


def memory_bytes(vm: VMView) -> int:
    """The agent container's memory request and limit when the spec sets none.

    Guest RAM counts twice: once as the RAM file (a memory-backed emptyDir is
    charged to the pod) and once for the colo cache (lockstep: a full mirror;
    checkpoint: the epoch in flight and the primary's staging copy, at most
    guest RAM) -- roles swap at failover, so both replicas get the same.
    """
    guest = vm.spec.guest.memory_bytes
    total = 2 * guest + RAM_SLACK_BYTES + AGENT_OVERHEAD_BYTES
    return -(-total // MEBIBYTE) * MEBIBYTE


def agent_resources(vm: VMView) -> dict[str, dict[str, Any]]:
    """Requests equal to limits (Guaranteed QoS) unless spec.resources says otherwise.

    What spec.resources gives wins, per resource and per side; a request
    below its limit (Burstable) is the user's choice to make.
    """
    memory = f"{memory_bytes(vm) // MEBIBYTE}Mi"
    computed = {"cpu": DEFAULT_CPU, "memory": memory}
    given = {k: dict(v) for k, v in vm.spec.resources.items() if isinstance(v, dict)}
    given_requests, given_limits = given.get("requests", {}), given.get("limits", {})
    # A request given without its limit raises the limit with it, so a
    # request is never above its limit and the pod stays Guaranteed.
    limits = {**computed, **given_requests, **given_limits}
    requests = {**limits, **given_requests}
    return {"requests": requests, "limits": limits}


def _merge_affinity(ours: dict[str, Any], theirs: Mapping[str, Any]) -> dict[str, Any]:
    """The operator's placement rules AND the user's: terms are added, never replaced."""
    out = {k: v for k, v in theirs.items() if k not in ("podAntiAffinity", "nodeAffinity")}
    anti = dict(theirs.get("podAntiAffinity") or {})
    required = list(ours["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"])
    required += list(anti.get("requiredDuringSchedulingIgnoredDuringExecution") or [])
    anti["requiredDuringSchedulingIgnoredDuringExecution"] = required
    out["podAntiAffinity"] = anti
    node = dict(theirs.get("nodeAffinity") or {})
    exclusion = ours.get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution")
    user_required = node.get("requiredDuringSchedulingIgnoredDuringExecution")
    if exclusion and user_required:
        # Node selector terms are ORed: every one of the user's must also exclude.
        (ours_term,) = exclusion["nodeSelectorTerms"]
        terms = []
        for term in user_required.get("nodeSelectorTerms") or []:
            merged = dict(term)
            for key in ("matchExpressions", "matchFields"):
                if ours_term.get(key):
                    merged[key] = [*(term.get(key) or []), *ours_term[key]]
            terms.append(merged)
        node["requiredDuringSchedulingIgnoredDuringExecution"] = {"nodeSelectorTerms": terms}
    elif exclusion:
        node["requiredDuringSchedulingIgnoredDuringExecution"] = exclusion
    if node:
        out["nodeAffinity"] = node
    return out


def _affinity(vm: VMView, action: CreatePod, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
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
    return _merge_affinity(affinity, extra) if extra else affinity


def security_context(vm: VMView, config: OperatorConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(pod, container) security contexts.

    Every agent runs as the image's unprivileged user with no capability, no
    privilege escalation, a read-only root filesystem and the runtime's
    default seccomp profile: the Pod Security Standard ``restricted``. The
    agent needs nothing more for tcg guests (ports above 1024, mmap of its
    own files). kvm guests need ``/dev/kvm`` opened read-write and nothing
    else: with ``kvmMode: resource`` a device plugin (KubeVirt's) hands the
    device to the container, which stays ``restricted``, with the node's kvm
    group added through ``kvmGroup`` where /dev/kvm is not world-writable;
    with ``kvmMode: hostPath`` the device comes through a hostPath volume,
    which needs a privileged container (``privileged`` standard).
    """
    pod: dict[str, Any] = {
        "runAsNonRoot": True,
        "runAsUser": c.AGENT_UID,
        "runAsGroup": c.AGENT_UID,
        "fsGroup": c.AGENT_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if vm.spec.guest.accel == "kvm" and config.kvm_group is not None:
        pod["supplementalGroups"] = [config.kvm_group]
    if vm.spec.guest.accel == "kvm" and config.kvm_mode is KvmMode.HOST_PATH:
        return pod, {"privileged": True, "readOnlyRootFilesystem": True}
    container = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }
    return pod, container


def agent_pod(vm: VMView, config: OperatorConfig, action: CreatePod) -> dict[str, Any]:
    spec = vm.spec
    names = Names(vm.name)
    settings = spec.pod.over(config.agent_pod)
    meta = _meta(vm, action.name, "agent", action.role)
    # The operator's own labels win: selectors and the Service depend on them.
    meta["labels"] = {**settings.labels, **meta["labels"]}
    meta["annotations"] = {**settings.annotations, c.ANNOTATION_SERIAL: str(action.serial)}
    resources = agent_resources(vm)
    pod_security, container_security = security_context(vm, config)
    mounts, volumes = _agent_storage(vm, names)
    if spec.guest.accel == "kvm":
        _kvm_access(config, resources, mounts, volumes)
    container = _agent_container(vm, config, action, mounts, resources)
    if container_security is not None:
        container["securityContext"] = container_security
    if spec.guest.qemu is not None:
        _add_qemu(container, volumes, spec.guest.qemu, action.role)
    pod_spec: dict[str, Any] = {
        "serviceAccountName": names.service_account,
        # The guest lives in the agent's memory: a restarted container would come
        # back empty under the same name. The operator replaces a failed pod instead.
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 10,
        "securityContext": pod_security,
        "affinity": _affinity(vm, action, settings.affinity),
        "containers": [container],
        "volumes": volumes,
    }
    if settings.priority_class_name:
        pod_spec["priorityClassName"] = settings.priority_class_name
    if settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in settings.image_pull_secrets]
    if spec.placement.node_selector:
        pod_spec["nodeSelector"] = dict(spec.placement.node_selector)
    if spec.placement.tolerations:
        pod_spec["tolerations"] = [t.to_dict() for t in spec.placement.tolerations]
    meta["annotations"][c.ANNOTATION_TEMPLATE] = _template_hash(vm, pod_spec)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}


def _agent_storage(vm: VMView, names: Names) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The agent container's volume mounts and the pod's volumes: guest RAM, the VM's key,
    scratch space, and the TLS Secret unless the replication is in clear."""
    mounts: list[dict[str, Any]] = [
        {"name": RAM_VOLUME, "mountPath": RAM_DIR},
        {"name": KEY_VOLUME, "mountPath": KEY_DIR, "readOnly": True},
        {"name": TMP_VOLUME, "mountPath": TMP_DIR},
    ]
    volumes: list[dict[str, Any]] = [
        {
            "name": RAM_VOLUME,
            "emptyDir": {
                "medium": "Memory",
                "sizeLimit": f"{-(-(vm.spec.guest.memory_bytes + RAM_SLACK_BYTES) // MEBIBYTE)}Mi",
            },
        },
        {
            "name": KEY_VOLUME,
            "secret": {
                "secretName": names.secret,
                "defaultMode": 0o440,
                "items": [{"key": c.SECRET_KEY, "path": c.SECRET_KEY}],
            },
        },
        {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": "64Mi"}},
    ]
    if not vm.spec.replication.insecure_clear:
        # A Secret volume (not subPath), so a renewed certificate reaches the running agent.
        # Beside the key, before the scratch tmpfs (whose mount point may cover a host's
        # view of where the Secret's files are staged).
        mounts.insert(2, {"name": TLS_VOLUME, "mountPath": TLS_MOUNT, "readOnly": True})
        volumes.append(
            {"name": TLS_VOLUME, "secret": {"secretName": names.tls_secret, "defaultMode": 0o440}}
        )
    return mounts, volumes


def _kvm_access(
    config: OperatorConfig, resources: dict[str, Any], mounts: list[dict[str, Any]],
    volumes: list[dict[str, Any]],
) -> None:
    """/dev/kvm for the agent: a device plugin's extended resource, or the host's device node."""
    if config.kvm_mode is KvmMode.RESOURCE:
        # Extended resources are set as limits, and requests must equal them.
        resources["limits"][config.kvm_resource_name] = "1"
        resources["requests"][config.kvm_resource_name] = "1"
    else:
        mounts.append({"name": "kvm", "mountPath": "/dev/kvm"})
        volumes.append({"name": "kvm", "hostPath": {"path": "/dev/kvm", "type": "CharDevice"}})


def _agent_container(
    vm: VMView, config: OperatorConfig, action: CreatePod, mounts: list[dict[str, Any]],
    resources: dict[str, Any],
) -> dict[str, Any]:
    spec = vm.spec
    return {
        "name": c.AGENT_CONTAINER,
        "image": spec.image or config.agent_image,
        "imagePullPolicy": spec.image_pull_policy or config.agent_image_pull_policy,
        "command": ["colo-agent"],
        "args": agent_args(vm, action.role, action.peer),
        "env": [
            {"name": "COLO_IDENTITY", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            # A file, not an environment variable: it never shows in the pod
            # spec's resolved env, `kubectl describe` or a child's environment.
            {"name": "COLO_SECRET_FILE", "value": f"{KEY_DIR}/{c.SECRET_KEY}"},
            {"name": "COLO_RAM_DIR", "value": RAM_DIR},
        ],
        "ports": [
            {"name": "client", "containerPort": c.CLIENT_PORT, "protocol": "TCP"},
            {"name": "control", "containerPort": c.CONTROL_PORT, "protocol": "TCP"},
            {"name": "replication", "containerPort": c.REPLICATION_PORT, "protocol": "TCP"},
        ],
        **_agent_probes("HTTP" if spec.replication.insecure_clear else "HTTPS"),
        "volumeMounts": mounts,
        "resources": resources,
    }


def _agent_probes(scheme: str) -> dict[str, Any]:
    return {
        # Until the control API answers (interpreter start, guest RAM allocated
        # and booted), liveness is not checked; 60 s covers a loaded node.
        "startupProbe": {
            "httpGet": {"path": "/healthz", "port": "control", "scheme": scheme},
            "periodSeconds": 1,
            "timeoutSeconds": 1,
            "failureThreshold": 60,
        },
        # Primary: ready while it serves clients (the Service follows readiness
        # as well as the role label). Secondary: ready once synced.
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "control", "scheme": scheme},
            "periodSeconds": 1,
            "timeoutSeconds": 1,
            "failureThreshold": 2,
        },
        # Generous: a restart loses the guest (restartPolicy Never turns it into
        # a lost replica), so only a really stuck agent should be killed.
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "control", "scheme": scheme},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 6,
        },
    }


QEMU_VOLUME, QEMU_DIR = "qemu", "/var/lib/colo/qemu"
QEMU_DISK_VOLUME, QEMU_DISK_DIR = "qemu-disk", "/var/lib/colo/disk"


def _add_qemu(container: dict[str, Any], volumes: list[dict[str, Any]], qemu: QemuSpec, role: str) -> None:
    """The qemu backend's settings (`colo_agent.qemu.backend`, COLO_QEMU_*) and disks.

    QEMU's run directory (QMP sockets, a secondary's parent, hidden and active
    disks, an empty first disk) is a disk-backed emptyDir. Only a pod created
    as primary boots a fresh guest, so only it mounts the claim with the
    first disk; every secondary copies the disk from its primary."""
    disk = qemu.disk
    if disk.claim_name is not None and role == c.ROLE_PRIMARY:
        first = f"{QEMU_DISK_DIR}/{disk.path}"
        container["volumeMounts"].append({"name": QEMU_DISK_VOLUME, "mountPath": QEMU_DISK_DIR})
        volumes.append({"name": QEMU_DISK_VOLUME, "persistentVolumeClaim": {"claimName": disk.claim_name}})
    else:
        first = f"{QEMU_DIR}/disk.qcow2"  # created empty by the agent
    container["volumeMounts"].append({"name": QEMU_VOLUME, "mountPath": QEMU_DIR})
    # A secondary's three disks, sparse: they grow with what the guest writes.
    limit = -(-3 * disk.size_bytes // MEBIBYTE) + 64
    volumes.append({"name": QEMU_VOLUME, "emptyDir": {"sizeLimit": f"{limit}Mi"}})
    container["env"] += [
        {"name": "COLO_QEMU_KERNEL", "value": qemu.kernel},
        {"name": "COLO_QEMU_INITRD", "value": qemu.initrd},
        {"name": "COLO_QEMU_DISK", "value": first},
        {"name": "COLO_QEMU_DISK_SIZE", "value": str(disk.size_bytes)},
        {"name": "COLO_QEMU_RUN_DIR", "value": QEMU_DIR},
        {"name": "COLO_QEMU_VCPUS", "value": str(qemu.vcpus)},
        {"name": "COLO_QEMU_NIC", "value": qemu.nic},
        {"name": "COLO_QEMU_PORTS", "value": ",".join(str(p) for p in c.QEMU_COLO_PORTS)},
        {"name": "COLO_QEMU_LISTEN", "value": "0.0.0.0"},
        # The other agent's QEMU reaches this pod's COLO ports at the pod's address.
        {"name": "COLO_QEMU_ADVERTISE", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]


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
        # The qemu backend's first disk: only a pod created as primary has it.
        mounts = [m for m in box.get("volumeMounts", ()) if m["name"] != QEMU_DISK_VOLUME]
        env = [e for e in box.get("env", ()) if e["name"] != "COLO_QEMU_DISK"]
        containers.append({**box, "args": kept, "volumeMounts": mounts, "env": env})
    volumes = [v for v in pod_spec.get("volumes", ()) if v["name"] != QEMU_DISK_VOLUME]
    restarted = vm.annotations.get(c.ANNOTATION_RESTARTED_AT)
    text = json.dumps([containers, volumes, restarted], sort_keys=True)
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


def tls_secret(vm: VMView, cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> dict[str, Any]:
    """The certificate both agents of the VM present, issued by the operator's CA."""

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(vm, Names(vm.name).tls_secret, "agent-tls"),
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": b64(cert_pem), "tls.key": b64(key_pem), "ca.crt": b64(ca_pem)},
    }


def certificate(vm: VMView, issuer_ref: dict[str, str]) -> dict[str, Any]:
    """The same certificate asked of cert-manager, which writes the Secret and renews it."""
    names = Names(vm.name)
    return {
        "apiVersion": "cert-manager.io/v1",
        "kind": "Certificate",
        "metadata": _meta(vm, names.tls_secret, "agent-tls"),
        "spec": {
            "secretName": names.tls_secret,
            "secretTemplate": {"labels": labels(vm, "agent-tls")},
            "commonName": vm.name[:64],
            "uris": [vm_identity(vm.namespace, vm.name)],
            "duration": "720h",
            "renewBefore": "240h",
            "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
            "usages": ["digital signature", "server auth", "client auth"],
            "issuerRef": dict(issuer_ref),
        },
    }


def _agent_ports(vm: VMView) -> list[int]:
    """Ports one agent pod of the VM reaches on another: replication, and QEMU's own COLO ports."""
    qemu = list(c.QEMU_COLO_PORTS) if vm.spec.guest.qemu is not None else []
    return [c.REPLICATION_PORT, *qemu]


def network_policy(vm: VMView, operator_namespace: str, operator_labels: Mapping[str, str]) -> dict[str, Any]:
    """Who may reach the VM's agent pods: the operator the control port, the VM's own
    agents the replication port, anyone the client port (the Service's clients)."""
    agents = {"matchLabels": {c.LABEL_VM: vm.name, c.LABEL_COMPONENT: "agent"}}
    operator = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": operator_namespace}},
        "podSelector": {"matchLabels": dict(operator_labels)},
    }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(vm, Names(vm.name).network_policy, "agent"),
        "spec": {
            "podSelector": agents,
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [operator], "ports": [{"protocol": "TCP", "port": c.CONTROL_PORT}]},
                {
                    "from": [{"podSelector": agents}],
                    "ports": [{"protocol": "TCP", "port": port} for port in _agent_ports(vm)],
                },
                {"ports": [{"protocol": "TCP", "port": c.CLIENT_PORT}]},
            ],
        },
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
        "metadata": {
            **_meta(vm, Names(vm.name).service, "client"),
            "annotations": {
                **vm.spec.service.annotations,
                c.ANNOTATION_SERVICE_KEYS: ",".join(sorted(vm.spec.service.annotations)),
            },
        },
        "spec": {
            "type": vm.spec.service.type,
            "selector": {c.LABEL_VM: vm.name, c.LABEL_ROLE: c.ROLE_PRIMARY},
            "ports": [
                {"name": "resp", "port": vm.spec.service.port, "targetPort": "client", "protocol": "TCP"}
            ],
        },
    }


def service_update(vm: VMView, current: dict[str, Any]) -> dict[str, Any]:
    """Merge patch of an existing client Service to the spec: type, ports and annotations.

    The selector never changes. Annotation keys the spec dropped since the last update are
    removed (set to null); keys not listed as ours are someone else's and stay.
    """
    desired = client_service(vm)
    annotations: dict[str, str | None] = dict(desired["metadata"]["annotations"])
    ours = (current.get("metadata", {}).get("annotations") or {}).get(c.ANNOTATION_SERVICE_KEYS, "")
    for key in filter(None, ours.split(",")):
        annotations.setdefault(key, None)
    return {
        "metadata": {"annotations": annotations},
        "spec": {"type": desired["spec"]["type"], "ports": desired["spec"]["ports"]},
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
