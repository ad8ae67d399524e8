"""pytest helpers shared by ``tests/conftest.py`` and ``tests/e2e/conftest.py``."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from . import build
from .cluster import LocalCluster

if TYPE_CHECKING:
    from kindhost.cluster import KindCluster

FAILED = pytest.StashKey[bool]()


def mark_failed(session: pytest.Session) -> None:
    session.stash[FAILED] = True


def any_test_failed(session: pytest.Session) -> bool:
    return session.stash.get(FAILED, False)


def binaries_or_skip() -> None:
    """Skip when the control plane binaries are not built; fail instead under CI, where they must be."""
    lacking = build.missing()
    if lacking:
        message = f"control plane binaries missing ({', '.join(lacking)}): run bash .ci/e2e-tools"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@dataclass
class ClusterHandle:
    """What a test may know and do about the cluster under test, whichever the driver."""

    driver: str
    kubeconfig: Path
    node_names: list[str]
    local: LocalCluster | None = None
    kind: KindCluster | None = None
    # `helm install/upgrade` arguments that point the chart at the image under test.
    chart_values: tuple[str, ...] = ()

    @property
    def can_kill_nodes(self) -> bool:
        return self.local is not None or self.kind is not None

    def _need_local(self, what: str) -> LocalCluster:
        if self.local is None:
            pytest.skip(f"{what} needs --e2e-driver local")
        return self.local

    def kill_node(self, name: str) -> None:
        """Power loss of a node: its processes (local) or its container (kind) SIGKILLed."""
        if self.kind is not None:
            self.kind.kill_node(name)
            return
        self._need_local("kill_node").kill_node(name)

    def revive_node(self, name: str) -> None:
        if self.kind is not None:
            self.kind.revive_node(name)
            return
        self._need_local("revive_node").revive_node(name)

    def partition(self, a: str, b: str) -> None:
        self._need_local("partition").partition(a, b)

    def partition_from_apiserver(self, a: str) -> None:
        self._need_local("partition_from_apiserver").partition_from_apiserver(a)

    def heal(self) -> None:
        self._need_local("heal").heal()

    def run_in_node(
        self, name: str, argv: Sequence[str], timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` where node ``name``'s pods are reachable (inside its network namespace)."""
        return self._need_local("run_in_node").run_in_node(name, argv, timeout=timeout)

    def pod_log(self, namespace: str, pod: str, container: str) -> str:
        """A container's output (local driver: the runner's log file of it; kind: kubectl logs)."""
        if self.kind is not None:
            return self.kubectl("logs", "-n", namespace, pod, "-c", container, check=False).stdout
        return self._need_local("pod_log").pod_log(namespace, pod, container)

    def kubectl(
        self, *args: str, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """kubectl of the cluster's version (the cached build), against this cluster."""
        local_kubectl = build.bin_dir() / "kubectl"
        binary = str(local_kubectl) if local_kubectl.exists() else "kubectl"
        return subprocess.run(
            [binary, f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )


def model(cls: Any, body: dict[str, Any]) -> Any:
    """A ``kubernetes`` client model from a manifest dict (camelCase keys, as in YAML)."""
    obj = cls.from_dict(body)
    if obj is None:
        raise ValueError(f"{cls.__name__}: empty manifest")
    return obj


def ready_endpoints(
    api: Any, namespace: str, service: str, port_name: str | None = None
) -> list[tuple[str, int]]:
    """(address, port) of the ready endpoints of ``service``, from its EndpointSlices.

    This is how tests reach a Service: ClusterIPs are blackholed on the
    local driver (no kube-proxy), endpoint addresses are pod IPs on the
    cluster bridge. ``port_name`` picks one of several ports.
    """
    import kubernetes

    slices = kubernetes.client.DiscoveryV1Api(api).list_namespaced_endpoint_slice(
        namespace, label_selector=f"kubernetes.io/service-name={service}"
    )
    found: list[tuple[str, int]] = []
    for item in slices.items:
        ports = [p for p in item.ports or [] if port_name is None or p.name == port_name]
        if not ports or ports[0].port is None:
            continue
        for endpoint in item.endpoints or []:
            if endpoint.conditions is not None and endpoint.conditions.ready:
                found += [(address, int(ports[0].port)) for address in endpoint.addresses or []]
    return sorted(found)
