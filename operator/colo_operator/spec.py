"""The ColoVM spec as a frozen value, with the CRD's defaults and bounds.

The API server defaults and validates through the CRD schema already; this
parser applies the same defaults and bounds again so that an object written
before a CRD upgrade, or a hand-made test snapshot, can never crash a decision
with a KeyError deep inside. Every problem is a `SpecError` naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes.utils import parse_quantity

from colo_agent.api.reader import Reader
from colo_agent.constants import (
    CHANNELS,
    CHECKPOINT_INTERVAL_MS,
    HEARTBEAT_INTERVAL_MS,
    HEARTBEAT_TIMEOUT_MS,
    MAX_CHANNELS,
    MAX_GUEST_RAM,
    MIN_GUEST_RAM,
    PAGE_SIZE,
)

RUN_STRATEGIES = ("Always", "Halted")
# The qemu backend (`colo_agent.qemu`): NIC models it knows, bounds, and where the agent image
# carries the guest's kernel and initramfs.
QEMU_NICS = ("e1000", "virtio-net-pci")
MAX_QEMU_VCPUS = 16
MAX_QEMU_DISK = "1Ti"
QEMU_KERNEL = "/usr/share/colo/guest/vmlinuz"
QEMU_INITRD = "/usr/share/colo/guest/initrd.img"
MEBIBYTE = 1 << 20
UPDATE_STRATEGIES = ("Automatic", "Manual")


class SpecError(ValueError):
    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"spec.{field}: {reason}")


def _spec_error(field: str, reason: str) -> SpecError:
    return SpecError(field or "(root)", reason)


def _memory_bytes(memory: str) -> int:
    """spec.guest.memory as bytes, by the Kubernetes client's quantity parser.

    That parser lets Decimal accept what the API server refuses (inner blanks,
    `NaN`, `Infinity`): refused here too, so a hand-made object cannot get past.
    """
    try:
        amount = None if any(ch.isspace() for ch in memory) else parse_quantity(memory)
    except ValueError:
        amount = None
    if amount is None or not amount.is_finite():
        raise SpecError("guest.memory", f"{memory!r} is not a quantity such as 64Mi, 1Gi or 512M")
    if amount != amount.to_integral_value():
        raise SpecError("guest.memory", f"{memory!r} is not a whole number of bytes")
    if not MIN_GUEST_RAM <= amount <= MAX_GUEST_RAM:
        raise SpecError("guest.memory", f"{memory!r} must be between 4Mi and 1Gi")
    if int(amount) % PAGE_SIZE:
        raise SpecError("guest.memory", f"{memory!r} is not a whole number of {PAGE_SIZE}-byte pages")
    return int(amount)


@dataclass(frozen=True, slots=True)
class QemuDisk:
    size_bytes: int
    claim_name: str | None = None  # the first primary's image; None: an empty disk
    path: str = "disk.qcow2"  # inside the claim


@dataclass(frozen=True, slots=True)
class QemuSpec:
    disk: QemuDisk
    vcpus: int = 1
    nic: str = QEMU_NICS[0]
    kernel: str = QEMU_KERNEL
    initrd: str = QEMU_INITRD

    @classmethod
    def read(cls, r: Reader) -> QemuSpec:
        disk = r.child("disk")
        size = disk.string("size")
        try:
            amount = None if any(ch.isspace() for ch in size) else parse_quantity(size)
        except ValueError:
            amount = None
        if amount is None or not amount.is_finite() or amount != amount.to_integral_value():
            raise SpecError("guest.qemu.disk.size", f"{size!r} is not a whole number of bytes such as 1Gi")
        if not MEBIBYTE <= amount <= parse_quantity(MAX_QEMU_DISK):
            raise SpecError("guest.qemu.disk.size", f"{size!r} must be between 1Mi and {MAX_QEMU_DISK}")
        path = disk.string("path", "disk.qcow2")
        if not path or path.startswith("/") or ".." in path.split("/"):
            raise SpecError("guest.qemu.disk.path", f"{path!r} must be a relative path inside the claim")
        kernel, initrd = r.string("kernel", QEMU_KERNEL), r.string("initrd", QEMU_INITRD)
        for key, value in (("kernel", kernel), ("initrd", initrd)):
            if not value.startswith("/"):
                raise SpecError(f"guest.qemu.{key}", f"{value!r} must be an absolute path in the agent image")
        return cls(
            disk=QemuDisk(int(amount), disk.optional_string("claimName", empty_is_absent=True), path),
            vcpus=r.integer("vcpus", 1, minimum=1, maximum=MAX_QEMU_VCPUS),
            nic=r.one_of("nic", QEMU_NICS, QEMU_NICS[0]),
            kernel=kernel,
            initrd=initrd,
        )


@dataclass(frozen=True, slots=True)
class GuestSpec:
    backend: str = "microvm"
    accel: str = "auto"
    memory: str = "64Mi"
    memory_bytes: int = 64 << 20
    qemu: QemuSpec | None = None  # backend qemu only

    @classmethod
    def read(cls, guest: Reader) -> GuestSpec:
        memory = guest.string("memory", "64Mi")
        memory_bytes = _memory_bytes(memory)
        backend = guest.one_of("backend", ("microvm", "qemu"), "microvm")
        qemu_section = guest.optional_child("qemu")
        if (qemu_section is not None) != (backend == "qemu"):
            raise SpecError("guest.qemu", "is required with backend qemu, and only allowed with it")
        qemu = None if qemu_section is None else QemuSpec.read(qemu_section)
        if qemu is not None and memory_bytes % MEBIBYTE:
            raise SpecError("guest.memory",
                            f"{memory!r}: a qemu guest's memory must be a whole number of MiB")
        return cls(backend=backend, accel=guest.one_of("accel", ("auto", "kvm", "tcg"), "auto"),
                   memory=memory, memory_bytes=memory_bytes, qemu=qemu)


@dataclass(frozen=True, slots=True)
class ReplicationSpec:
    mode: str = "checkpoint"
    checkpoint_interval_ms: int = CHECKPOINT_INTERVAL_MS
    channels: int = CHANNELS
    # The explicit opt-out of mutual TLS between the agents and to their control API.
    insecure_clear: bool = False


@dataclass(frozen=True, slots=True)
class FailoverSpec:
    heartbeat_interval_ms: int = HEARTBEAT_INTERVAL_MS
    heartbeat_timeout_ms: int = HEARTBEAT_TIMEOUT_MS
    lease_duration_ms: int = 1000
    auto_reprotect: bool = True


@dataclass(frozen=True, slots=True)
class Toleration:
    key: str | None = None
    operator: str = "Equal"
    value: str | None = None
    effect: str | None = None
    toleration_seconds: int | None = None

    def tolerates(self, key: str, value: str | None, effect: str) -> bool:
        """Kubernetes' rule: empty key with Exists matches everything; empty effect matches every effect."""
        if self.effect and self.effect != effect:
            return False
        if self.operator == "Exists":
            return self.key in (None, "") or self.key == key
        return self.key == key and (self.value or "") == (value or "")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"operator": self.operator}
        if self.key is not None:
            out["key"] = self.key
        if self.value is not None:
            out["value"] = self.value
        if self.effect is not None:
            out["effect"] = self.effect
        if self.toleration_seconds is not None:
            out["tolerationSeconds"] = self.toleration_seconds
        return out


@dataclass(frozen=True, slots=True)
class PlacementSpec:
    topology_key: str = "kubernetes.io/hostname"
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    type: str = "ClusterIP"
    port: int = 6379
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PodSettings:
    """What the agent pods carry beyond what the operator decides (spec.pod, or the chart's defaults)."""

    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    priority_class_name: str | None = None
    image_pull_secrets: tuple[str, ...] = ()
    # A Pod affinity as the API takes it; combined with the operator's own terms.
    affinity: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, r: Reader) -> PodSettings:
        return cls(
            labels=r.strings("labels"),
            annotations=r.strings("annotations"),
            priority_class_name=r.optional_string("priorityClassName", empty_is_absent=True),
            image_pull_secrets=tuple(item.string("name") for item in r.children("imagePullSecrets")),
            affinity=r.anything("affinity"),
        )

    def over(self, defaults: PodSettings) -> PodSettings:
        """These settings on top of ``defaults``: maps merge (these win), the rest replaces when set."""
        return PodSettings(
            labels={**defaults.labels, **self.labels},
            annotations={**defaults.annotations, **self.annotations},
            priority_class_name=self.priority_class_name or defaults.priority_class_name,
            image_pull_secrets=self.image_pull_secrets or defaults.image_pull_secrets,
            affinity=self.affinity or defaults.affinity,
        )


@dataclass(frozen=True, slots=True)
class ColoVMSpec:
    guest: GuestSpec = GuestSpec()
    replication: ReplicationSpec = ReplicationSpec()
    failover: FailoverSpec = FailoverSpec()
    placement: PlacementSpec = PlacementSpec()
    service: ServiceSpec = ServiceSpec()
    pod: PodSettings = PodSettings()
    image: str | None = None
    image_pull_policy: str | None = None
    # Passed through to the container as given (already validated by the API server).
    resources: Mapping[str, Any] = field(default_factory=dict)
    # Always: the VM runs. Halted: stopped, its agent pods deleted (see the CRD's description).
    run_strategy: str = "Always"
    # Automatic: outdated agent pods are replaced at once; Manual: after `kubectl colo upgrade`.
    update_strategy: str = "Automatic"

    @classmethod
    def from_dict(cls, spec: object) -> ColoVMSpec:
        r = Reader(spec if spec is not None else {}, "", _spec_error)
        guest = GuestSpec.read(r.section("guest"))
        backend = guest.backend

        failover = r.section("failover")
        interval = failover.integer("heartbeatIntervalMs", HEARTBEAT_INTERVAL_MS, minimum=10, maximum=60000)
        timeout = failover.integer("heartbeatTimeoutMs", HEARTBEAT_TIMEOUT_MS, minimum=20, maximum=600000)
        if timeout <= interval:
            raise SpecError("failover.heartbeatTimeoutMs", "must be greater than heartbeatIntervalMs")
        lease = failover.integer("leaseDurationMs", 1000, minimum=100, maximum=300000)
        if lease <= interval:
            raise SpecError("failover.leaseDurationMs", "must be greater than heartbeatIntervalMs")

        placement = r.section("placement")
        selector = placement.strings("nodeSelector")
        tolerations = tuple(
            Toleration(
                key=t.optional_string("key", empty_is_absent=True),
                operator=t.one_of("operator", ("Exists", "Equal"), "Equal"),
                value=t.optional_string("value", empty_is_absent=True),
                effect=t.optional_one_of("effect", ("NoSchedule", "PreferNoSchedule", "NoExecute")),
                toleration_seconds=t.optional_integer("tolerationSeconds", minimum=None),
            )
            for t in placement.children("tolerations")
        )
        replication = r.section("replication")
        mode = replication.one_of("mode", ("checkpoint", "lockstep"), "checkpoint")
        if backend == "qemu" and mode == "lockstep":
            raise SpecError("replication.mode", "lockstep is for the microvm backend: QEMU's COLO "
                            "compares the guests' output itself")
        service = r.section("service")
        resources = r.anything("resources")
        return cls(
            guest=guest,
            replication=ReplicationSpec(
                mode=mode,
                checkpoint_interval_ms=replication.integer(
                    "checkpointIntervalMs", CHECKPOINT_INTERVAL_MS, minimum=1, maximum=60000
                ),
                channels=replication.integer("channels", CHANNELS, minimum=1, maximum=MAX_CHANNELS),
                insecure_clear=replication.boolean("insecureClear", False),
            ),
            failover=FailoverSpec(
                heartbeat_interval_ms=interval,
                heartbeat_timeout_ms=timeout,
                lease_duration_ms=lease,
                auto_reprotect=failover.boolean("autoReprotect", True),
            ),
            placement=PlacementSpec(
                topology_key=placement.string("topologyKey", "kubernetes.io/hostname"),
                node_selector=selector,
                tolerations=tolerations,
            ),
            service=ServiceSpec(
                type=service.one_of("type", ("ClusterIP", "NodePort", "LoadBalancer"), "ClusterIP"),
                port=service.integer("port", 6379, minimum=1, maximum=65535),
                annotations=service.strings("annotations"),
            ),
            pod=PodSettings.read(r.section("pod")),
            image=r.optional_string("image", empty_is_absent=True),
            image_pull_policy=r.optional_one_of("imagePullPolicy", ("Always", "IfNotPresent", "Never")),
            resources=resources,
            run_strategy=r.one_of("runStrategy", RUN_STRATEGIES, "Always"),
            update_strategy=r.one_of("updateStrategy", UPDATE_STRATEGIES, "Automatic"),
        )


def read_pod_settings(data: object, where: str) -> PodSettings:
    """Agent pod settings from a JSON object (the operator's defaults); errors name ``where``."""
    return PodSettings.read(Reader(data, where, _spec_error))
