"""The operator's own settings, read from its environment (set by the Helm chart)."""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from .spec import PodSettings, SpecError, read_pod_settings


class ConfigError(ValueError):
    """An operator setting is malformed; the message names the variable."""


class KvmMode(enum.StrEnum):
    # Request `resource_name` (a device plugin advertises /dev/kvm, e.g. KubeVirt's).
    RESOURCE = "resource"
    # Mount the node's /dev/kvm through a hostPath; needs a privileged container.
    HOST_PATH = "hostPath"


DEFAULT_AGENT_IMAGE = "ghcr.io/colo-dev/colo-operator:0.1.0"


@dataclass(frozen=True, slots=True)
class OperatorConfig:
    agent_image: str = DEFAULT_AGENT_IMAGE
    agent_image_pull_policy: str = "IfNotPresent"
    kvm_mode: KvmMode = KvmMode.RESOURCE
    kvm_resource_name: str = "devices.kubevirt.io/kvm"
    # The nodes' kvm group, added to kvm agents' supplementalGroups where
    # /dev/kvm is not world-writable; None adds nothing.
    kvm_group: int | None = None
    # How often each ColoVM is re-read and its agents polled when nothing happens.
    poll_interval_s: float = 1.0
    # Timeout of one agent control API request.
    agent_timeout_s: float = 1.0
    # Liveness endpoint (kopf probes), host and port.
    liveness_host: str = "0.0.0.0"
    liveness_port: int = 8080
    # Agent pod labels, annotations, priority class, pull secrets and affinity
    # every ColoVM gets unless its spec.pod says otherwise (chart: agent.pod).
    agent_pod: PodSettings = field(default_factory=PodSettings)
    # Namespace of the operator itself: where the cluster CA's Secret lives.
    namespace: str = "colo-system"
    # cert-manager issuer of the agents' certificates, "Issuer/NAME" or
    # "ClusterIssuer/NAME"; empty: the operator issues them from its own CA.
    cert_issuer: str = ""
    # With cert-manager: the operator's own client certificate (tls.crt, tls.key, ca.crt).
    tls_dir: str = ""
    # Labels of the operator's own pods: the agents' NetworkPolicy admits them to the control port.
    operator_labels: Mapping[str, str] = field(
        default_factory=lambda: {"app.kubernetes.io/name": "colo-operator"}
    )

    @property
    def issuer_ref(self) -> dict[str, str] | None:
        if not self.cert_issuer:
            return None
        kind, _, name = self.cert_issuer.partition("/")
        return {"group": "cert-manager.io", "kind": kind, "name": name}

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> OperatorConfig:
        defaults = cls()

        def number(name: str, default: float, low: float, high: float) -> float:
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                value = float(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r} is not a number") from None
            if not low <= value <= high:
                raise ConfigError(f"{name}={raw!r} must be between {low} and {high}")
            return value

        mode_raw = env.get("COLO_KVM_MODE") or defaults.kvm_mode.value
        try:
            kvm_mode = KvmMode(mode_raw)
        except ValueError:
            allowed = ", ".join(m.value for m in KvmMode)
            raise ConfigError(f"COLO_KVM_MODE={mode_raw!r} is not one of {allowed}") from None
        pull = env.get("COLO_AGENT_IMAGE_PULL_POLICY") or defaults.agent_image_pull_policy
        if pull not in ("Always", "IfNotPresent", "Never"):
            raise ConfigError(f"COLO_AGENT_IMAGE_PULL_POLICY={pull!r} is not Always, IfNotPresent or Never")
        pod_raw = env.get("COLO_AGENT_POD") or "{}"
        try:
            agent_pod = read_pod_settings(json.loads(pod_raw), "COLO_AGENT_POD")
        except (ValueError, SpecError) as exc:
            raise ConfigError(f"COLO_AGENT_POD is not valid agent pod settings (JSON): {exc}") from None
        return cls(
            agent_pod=agent_pod,
            agent_image=env.get("COLO_AGENT_IMAGE") or defaults.agent_image,
            agent_image_pull_policy=pull,
            kvm_mode=kvm_mode,
            kvm_resource_name=env.get("COLO_KVM_RESOURCE") or defaults.kvm_resource_name,
            kvm_group=int(number("COLO_KVM_GROUP", -1, -1, 2**31 - 1)) if env.get("COLO_KVM_GROUP") else None,
            poll_interval_s=number("COLO_POLL_INTERVAL_S", defaults.poll_interval_s, 0.05, 600),
            agent_timeout_s=number("COLO_AGENT_TIMEOUT_S", defaults.agent_timeout_s, 0.05, 60),
            liveness_host=env.get("COLO_LIVENESS_HOST") or defaults.liveness_host,
            liveness_port=int(number("COLO_LIVENESS_PORT", defaults.liveness_port, 1, 65535)),
            namespace=env.get("COLO_OPERATOR_NAMESPACE") or defaults.namespace,
            cert_issuer=_issuer(env.get("COLO_CERT_ISSUER", "")),
            tls_dir=env.get("COLO_TLS_DIR", ""),
            operator_labels=_labels(env.get("COLO_OPERATOR_POD_LABELS", "")) or defaults.operator_labels,
        )


def _labels(raw: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"COLO_OPERATOR_POD_LABELS: {item!r} is not KEY=VALUE")
        out[key] = value
    return out


def _issuer(raw: str) -> str:
    if not raw:
        return ""
    kind, slash, name = raw.partition("/")
    if not slash or kind not in ("Issuer", "ClusterIssuer") or not name or "/" in name:
        raise ConfigError(f"COLO_CERT_ISSUER={raw!r} is not Issuer/NAME or ClusterIssuer/NAME")
    return raw
