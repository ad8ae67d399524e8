"""The CRD's cross-field rules against a real API server: `kubectl apply` refuses a ColoVM
that could never run, naming the field, and accepts exactly what the agent accepts."""

from __future__ import annotations

import itertools
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster import ControlPlane, build
from support.crd import install_crd

from colo_agent.config import FailoverTimings

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "default"


def kubectl(plane: ControlPlane, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(build.bin_dir() / "kubectl"), f"--kubeconfig={plane.kubeconfig}", *args],
        input=stdin, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def api(kube_apiserver: ControlPlane) -> Iterator[ControlPlane]:
    install_crd([str(build.bin_dir() / "kubectl"), f"--kubeconfig={kube_apiserver.kubeconfig}"])
    # Left installed: the API server is this session's own, and other modules use the CRD too.
    yield kube_apiserver


def apply(plane: ControlPlane, spec: dict[str, Any], name: str = "vm") -> subprocess.CompletedProcess[str]:
    body = {"apiVersion": "colo.dev/v1alpha1", "kind": "ColoVM", "metadata": {"name": name}, "spec": spec}
    return kubectl(plane, "apply", "--dry-run=server", "-n", NAMESPACE, "-f", "-", stdin=json.dumps(body))


REFUSED = [
    # Every agent would exit 2: --lease-duration-ms must be greater than --heartbeat-interval-ms.
    ({"failover": {"heartbeatIntervalMs": 2000, "heartbeatTimeoutMs": 5000}},
     "spec.failover.leaseDurationMs", "leaseDurationMs must be greater than heartbeatIntervalMs"),
    ({"failover": {"heartbeatIntervalMs": 300, "heartbeatTimeoutMs": 1000, "leaseDurationMs": 300}},
     "spec.failover.leaseDurationMs", "greater than heartbeatIntervalMs"),
    ({"failover": {"heartbeatIntervalMs": 200, "heartbeatTimeoutMs": 200}},
     "spec.failover.heartbeatTimeoutMs", "greater than heartbeatIntervalMs"),
    # Pod validation would refuse the agent pods.
    ({"placement": {"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}},
     "spec.placement.tolerations[0].value", "value must be empty when operator is Exists"),
    ({"placement": {"tolerations": [{"operator": "Equal", "value": "v"}]}},
     "spec.placement.tolerations[0].operator", "operator must be Exists when key is empty"),
    ({"placement": {"tolerations": [{"key": "k", "effect": "NoSchedule", "tolerationSeconds": 30}]}},
     "spec.placement.tolerations[0].tolerationSeconds", "effect must be NoExecute"),
    ({"placement": {"nodeSelector": {"disk": "not a label value"}}},
     "spec.placement.nodeSelector.disk", "should match"),
    ({"resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "500m"}}},
     "spec.resources.requests", "less than or equal to its limit"),
    # The guest's RAM comes on top of the agent's own: the pod would be OOM-killed at once.
    ({"guest": {"memory": "256Mi"}, "resources": {"limits": {"memory": "128Mi"}}},
     "spec.resources.limits", "greater than guest.memory"),
    ({"resources": {"limits": {"memory": "64Mi"}}},
     "spec.resources.limits", "greater than guest.memory"),
    ({"guest": {"backend": "qemu"}}, "spec.guest.qemu", "required with backend qemu"),
    ({"guest": {"qemu": {"disk": {"size": "1Gi"}}}}, "spec.guest.qemu", "only allowed with it"),
    ({"guest": {"backend": "qemu", "memory": "4100Ki", "qemu": {"disk": {"size": "1Gi"}}}},
     "spec.guest.memory", "whole number of MiB"),
    ({"guest": {"backend": "qemu", "qemu": {"disk": {"size": "1Gi", "path": "a/../../b"}}}},
     "spec.guest.qemu.disk.path", "inside the claim"),
    ({"guest": {"backend": "qemu", "qemu": {"disk": {"size": "8Ti"}}}},
     "spec.guest.qemu.disk.size", "between 1Mi and 1Ti"),
    ({"guest": {"backend": "qemu", "qemu": {"disk": {"size": "1Gi"}}}, "replication": {"mode": "lockstep"}},
     "spec.replication.mode", "lockstep is for the microvm backend"),
]  # fmt: skip


@pytest.mark.parametrize(("spec", "field", "reason"), REFUSED, ids=[r[1] for r in REFUSED])
def test_a_spec_that_could_never_run_is_refused_naming_the_field(
    api: ControlPlane, spec: dict[str, Any], field: str, reason: str
) -> None:
    result = apply(api, spec)
    assert result.returncode != 0, f"accepted: {spec}"
    assert f"{field}: " in result.stderr, result.stderr
    assert reason in result.stderr, result.stderr


ACCEPTED = [
    {"placement": {"tolerations": [{"operator": "Exists"}, {"key": "k", "operator": "Exists"}]}},
    {"placement": {"tolerations": [{"key": "k", "value": "v", "effect": "NoExecute",
                                    "tolerationSeconds": 5}]}},
    {"placement": {"nodeSelector": {"disk": "ssd", "empty": ""}}},
    {"resources": {"requests": {"cpu": "250m", "memory": "128Mi"}, "limits": {"cpu": 1, "memory": "1Gi"}}},
    {"guest": {"memory": "32Mi"}, "resources": {"limits": {"memory": "256Mi"}}},
    {"resources": {"requests": {"cpu": "100m"}}},
    {"failover": {"heartbeatIntervalMs": 2000, "heartbeatTimeoutMs": 5000, "leaseDurationMs": 3000}},
    {"guest": {"backend": "qemu", "memory": "256Mi", "qemu": {"disk": {"size": "1Gi"}}}},
    {"guest": {"backend": "qemu", "qemu": {"disk": {"size": "10Gi", "claimName": "d", "path": "v/d.qcow2"},
                                           "vcpus": 2, "nic": "virtio-net-pci"}}},
]  # fmt: skip


@pytest.mark.parametrize("spec", ACCEPTED, ids=range(len(ACCEPTED)))
def test_specs_that_can_run_are_accepted(api: ControlPlane, spec: dict[str, Any]) -> None:
    result = apply(api, spec)
    assert result.returncode == 0, result.stderr


def test_the_api_server_accepts_exactly_the_timings_the_agent_accepts(api: ControlPlane) -> None:
    """The failover rules are the agent's own argument checks (FailoverTimings), nothing else."""
    values = (100, 500, 2000)
    disagreements = []
    for interval, timeout, lease in itertools.product(values, repeat=3):
        try:
            FailoverTimings(interval / 1000, timeout / 1000, lease / 1000)
            agent_ok = True
        except ValueError:
            agent_ok = False
        spec = {"failover": {"heartbeatIntervalMs": interval, "heartbeatTimeoutMs": timeout,
                             "leaseDurationMs": lease}}  # fmt: skip
        server_ok = apply(api, spec).returncode == 0
        if agent_ok != server_ok:
            disagreements.append((interval, timeout, lease, agent_ok, server_ok))
    assert disagreements == []


def test_kubectl_explain_describes_every_field_and_get_all_lists_colovms(api: ControlPlane) -> None:
    explained = kubectl(api, "explain", "colovm.spec.failover.heartbeatIntervalMs")
    assert explained.returncode == 0, explained.stderr
    assert "<no description>" not in explained.stdout
    assert "Milliseconds between heartbeats" in explained.stdout
    lease = kubectl(api, "explain", "colovm.spec.failover.leaseDurationMs")
    assert "Milliseconds a renewal" in lease.stdout, lease.stdout + lease.stderr
    body = {"apiVersion": "colo.dev/v1alpha1", "kind": "ColoVM", "metadata": {"name": "listed"}, "spec": {}}
    created = kubectl(api, "apply", "-n", NAMESPACE, "-f", "-", stdin=json.dumps(body))
    assert created.returncode == 0, created.stderr
    try:
        listed = kubectl(api, "get", "all", "-n", NAMESPACE)
        assert "colovm.colo.dev/listed" in listed.stdout, listed.stdout + listed.stderr
        colo = kubectl(api, "get", "colo", "-n", NAMESPACE)
        assert "listed" in colo.stdout, colo.stdout + colo.stderr
    finally:
        kubectl(api, "delete", "colovm", "listed", "-n", NAMESPACE, "--wait=false")
