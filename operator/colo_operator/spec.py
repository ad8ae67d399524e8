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

from colo_agent.constants import (
    HEARTBEAT_INTERVAL_MS,
    HEARTBEAT_TIMEOUT_MS,
    MAX_CHANNELS,
    MAX_GUEST_RAM,
    MIN_GUEST_RAM,
    PAGE_SIZE,
)

RUN_STRATEGIES = ("Always", "Halted")
UPDATE_STRATEGIES = ("Automatic", "Manual")


class SpecError(ValueError):
    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"spec.{field}: {reason}")


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
class GuestSpec:
    backend: str = "microvm"
    accel: str = "auto"
    memory: str = "64Mi"
    memory_bytes: int = 64 << 20


@dataclass(frozen=True, slots=True)
class ReplicationSpec:
    mode: str = "checkpoint"
    checkpoint_interval_ms: int = 100
    channels: int = 2


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


@dataclass(frozen=True, slots=True)
class ColoVMSpec:
    guest: GuestSpec = GuestSpec()
    replication: ReplicationSpec = ReplicationSpec()
    failover: FailoverSpec = FailoverSpec()
    placement: PlacementSpec = PlacementSpec()
    service: ServiceSpec = ServiceSpec()
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
        r = _Reader(spec if spec is not None else {}, "")
        guest = r.child("guest")
        memory = guest.string("memory", "64Mi")
        memory_bytes = _memory_bytes(memory)

        failover = r.child("failover")
        interval = failover.integer("heartbeatIntervalMs", HEARTBEAT_INTERVAL_MS, 10, 60000)
        timeout = failover.integer("heartbeatTimeoutMs", HEARTBEAT_TIMEOUT_MS, 20, 600000)
        if timeout <= interval:
            raise SpecError("failover.heartbeatTimeoutMs", "must be greater than heartbeatIntervalMs")
        lease = failover.integer("leaseDurationMs", 1000, 100, 300000)
        if lease <= interval:
            raise SpecError("failover.leaseDurationMs", "must be greater than heartbeatIntervalMs")

        placement = r.child("placement")
        selector = placement.mapping("nodeSelector")
        tolerations = tuple(
            Toleration(
                key=t.optional_string("key"),
                operator=t.choice("operator", ("Exists", "Equal"), "Equal"),
                value=t.optional_string("value"),
                effect=t.optional_choice("effect", ("NoSchedule", "PreferNoSchedule", "NoExecute")),
                toleration_seconds=t.optional_integer("tolerationSeconds"),
            )
            for t in placement.children("tolerations")
        )
        replication = r.child("replication")
        service = r.child("service")
        resources = r.mapping_any("resources")
        return cls(
            guest=GuestSpec(
                backend=guest.choice("backend", ("microvm",), "microvm"),
                accel=guest.choice("accel", ("auto", "kvm", "tcg"), "auto"),
                memory=memory,
                memory_bytes=memory_bytes,
            ),
            replication=ReplicationSpec(
                mode=replication.choice("mode", ("checkpoint", "lockstep"), "checkpoint"),
                checkpoint_interval_ms=replication.integer("checkpointIntervalMs", 100, 1, 60000),
                channels=replication.integer("channels", 2, 1, MAX_CHANNELS),
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
                type=service.choice("type", ("ClusterIP", "NodePort", "LoadBalancer"), "ClusterIP"),
                port=service.integer("port", 6379, 1, 65535),
            ),
            image=r.optional_string("image"),
            image_pull_policy=r.optional_choice("imagePullPolicy", ("Always", "IfNotPresent", "Never")),
            resources=resources,
            run_strategy=r.choice("runStrategy", RUN_STRATEGIES, "Always"),
            update_strategy=r.choice("updateStrategy", UPDATE_STRATEGIES, "Automatic"),
        )


class _Reader:
    def __init__(self, data: object, path: str) -> None:
        if not isinstance(data, Mapping):
            raise SpecError(path or "(root)", f"expected an object, got {type(data).__name__}")
        self._data: Mapping[str, Any] = data
        self._path = path

    def _where(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def child(self, key: str) -> _Reader:
        value = self._data.get(key)
        return _Reader({} if value is None else value, self._where(key))

    def children(self, key: str) -> list[_Reader]:
        value = self._data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise SpecError(self._where(key), "expected a list")
        return [_Reader(item, f"{self._where(key)}[{i}]") for i, item in enumerate(value)]

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self._data.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise SpecError(self._where(key), f"expected an integer, got {value!r}")
        if not low <= value <= high:
            raise SpecError(self._where(key), f"must be between {low} and {high}, got {value}")
        return value

    def optional_integer(self, key: str) -> int | None:
        value = self._data.get(key)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise SpecError(self._where(key), f"expected an integer, got {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._data.get(key, default)
        if not isinstance(value, bool):
            raise SpecError(self._where(key), f"expected true or false, got {value!r}")
        return value

    def string(self, key: str, default: str) -> str:
        value = self._data.get(key, default)
        if not isinstance(value, str) or not value:
            raise SpecError(self._where(key), f"expected a non-empty string, got {value!r}")
        return value

    def optional_string(self, key: str) -> str | None:
        value = self._data.get(key)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise SpecError(self._where(key), f"expected a string, got {value!r}")
        return value

    def choice(self, key: str, allowed: tuple[str, ...], default: str) -> str:
        value = self._data.get(key, default)
        if value not in allowed:
            raise SpecError(self._where(key), f"{value!r} is not one of {', '.join(allowed)}")
        return str(value)

    def optional_choice(self, key: str, allowed: tuple[str, ...]) -> str | None:
        if self._data.get(key) is None:
            return None
        return self.choice(key, allowed, allowed[0])

    def mapping(self, key: str) -> dict[str, str]:
        value = self._data.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise SpecError(self._where(key), "expected an object of strings")
        return dict(value)

    def mapping_any(self, key: str) -> dict[str, Any]:
        value = self._data.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise SpecError(self._where(key), "expected an object")
        return dict(value)
