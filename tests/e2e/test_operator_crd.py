"""The ColoVM CRD against a real API server: accepted, defaulted, and invalid ColoVMs refused
with the offending field named."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "colovm.yaml"
NAMESPACE = "colo-crd-e2e"
# The chart test installs this release; marking a CRD applied here as its own
# lets `helm install` adopt it instead of refusing to touch it.
RELEASE, RELEASE_NAMESPACE = "colo", "colo-system"


def kubectl(
    cluster: Any, *args: str, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    if stdin is None:
        return cluster.kubectl(*args, check=check)
    from cluster import build

    binary = build.bin_dir() / "kubectl"
    return subprocess.run(
        [str(binary) if binary.exists() else "kubectl", f"--kubeconfig={cluster.kubeconfig}", *args],
        input=stdin, capture_output=True, text=True, timeout=60, check=check,
    )  # fmt: skip


@pytest.fixture(scope="module")
def crd(cluster: Any) -> Iterator[None]:
    present = kubectl(cluster, "get", "crd", "colovms.colo.dev", check=False).returncode == 0
    if not present:
        kubectl(cluster, "apply", "-f", str(CRD))
        kubectl(
            cluster,
            "annotate",
            "--overwrite",
            "crd",
            "colovms.colo.dev",
            f"meta.helm.sh/release-name={RELEASE}",
            f"meta.helm.sh/release-namespace={RELEASE_NAMESPACE}",
        )
        kubectl(
            cluster, "label", "--overwrite", "crd", "colovms.colo.dev", "app.kubernetes.io/managed-by=Helm"
        )
    kubectl(cluster, "wait", "--for=condition=Established", "crd/colovms.colo.dev", "--timeout=60s")
    kubectl(cluster, "create", "namespace", NAMESPACE, check=False)
    yield
    kubectl(cluster, "delete", "namespace", NAMESPACE, "--wait=false", check=False)


def colovm(name: str, spec: dict[str, Any]) -> str:
    return json.dumps(
        {"apiVersion": "colo.dev/v1alpha1", "kind": "ColoVM", "metadata": {"name": name}, "spec": spec}
    )


def test_crd_is_accepted_and_defaults_a_bare_colovm(cluster: Any, crd: None) -> None:
    kubectl(cluster, "apply", "-n", NAMESPACE, "-f", "-", stdin=colovm("defaults", {}))
    spec = json.loads(kubectl(cluster, "get", "cvm", "defaults", "-n", NAMESPACE, "-o", "json").stdout)[
        "spec"
    ]
    assert spec["guest"] == {"backend": "microvm", "accel": "auto", "memory": "64Mi"}
    assert spec["replication"] == {
        "mode": "checkpoint", "checkpointIntervalMs": 100, "channels": 2, "insecureClear": False
    }
    assert spec["failover"]["heartbeatTimeoutMs"] == 500 and spec["failover"]["autoReprotect"] is True
    assert spec["placement"]["topologyKey"] == "kubernetes.io/hostname"
    header = kubectl(cluster, "get", "cvm", "-n", NAMESPACE).stdout.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "PRIMARY", "SECONDARY", "TERM", "PAUSE-MS", "UP-TO-DATE", "AGE"]
    kubectl(cluster, "delete", "cvm", "defaults", "-n", NAMESPACE, "--wait=false")


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")))
def test_examples_pass_server_side_validation(cluster: Any, crd: None, example: str) -> None:
    kubectl(cluster, "apply", "--dry-run=server", "-n", NAMESPACE, "-f", str(ROOT / "examples" / example))


HEARTBEAT = "spec.failover.heartbeatTimeoutMs"
INVALID = [
    ({"replication": {"channels": 0}}, "spec.replication.channels", "greater than or equal to 1"),
    ({"replication": {"channels": 17}}, "spec.replication.channels", "less than or equal to 16"),
    ({"replication": {"mode": "remus"}}, "spec.replication.mode", "Unsupported value"),
    ({"replication": {"checkpointIntervalMs": 0}}, "spec.replication.checkpointIntervalMs", "greater than"),
    ({"guest": {"accel": "hvf"}}, "spec.guest.accel", "Unsupported value"),
    ({"guest": {"memory": "2Mi"}}, "spec.guest.memory", "between 4Mi and 1Gi"),
    ({"guest": {"memory": "2Gi"}}, "spec.guest.memory", "between 4Mi and 1Gi"),
    ({"guest": {"memory": "lots"}}, "spec.guest.memory", "must be a quantity"),
    ({"guest": {"memory": "4097Ki"}}, "spec.guest.memory", "4096-byte pages"),
    ({"failover": {"heartbeatIntervalMs": 100, "heartbeatTimeoutMs": 100}}, HEARTBEAT, "greater than"),
    ({"failover": {"heartbeatTimeoutMs": 50}}, HEARTBEAT, "greater than heartbeatIntervalMs"),
    ({"service": {"port": 70000}}, "spec.service.port", "less than or equal to 65535"),
    ({"service": {"type": "ExternalName"}}, "spec.service.type", "Unsupported value"),
    ({"placement": {"topologyKey": ""}}, "spec.placement.topologyKey", "at least 1 chars"),
    ({"runStrategy": "Paused"}, "spec.runStrategy", "Unsupported value"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "field", "reason"), INVALID, ids=[f"{i}-{c[1]}" for i, c in enumerate(INVALID)]
)
def test_invalid_colovm_is_rejected_naming_the_field(
    cluster: Any, crd: None, spec: dict[str, Any], field: str, reason: str
) -> None:
    result = kubectl(cluster, "apply", "-n", NAMESPACE, "-f", "-", stdin=colovm("invalid", spec), check=False)
    assert result.returncode != 0, f"accepted: {spec}"
    assert f"{field}: " in result.stderr, result.stderr
    assert reason in result.stderr, result.stderr


def test_guest_is_immutable(cluster: Any, crd: None) -> None:
    kubectl(
        cluster, "apply", "-n", NAMESPACE, "-f", "-", stdin=colovm("frozen", {"guest": {"memory": "32Mi"}})
    )
    result = kubectl(cluster, "patch", "cvm", "frozen", "-n", NAMESPACE, "--type=merge",
                     "-p", '{"spec":{"guest":{"memory":"64Mi"}}}', check=False)  # fmt: skip
    assert result.returncode != 0
    assert "spec.guest: " in result.stderr and "immutable" in result.stderr
    # Everything outside guest stays changeable.
    kubectl(cluster, "patch", "cvm", "frozen", "-n", NAMESPACE, "--type=merge",
            "-p", '{"spec":{"replication":{"channels":4}}}')  # fmt: skip
    kubectl(cluster, "delete", "cvm", "frozen", "-n", NAMESPACE, "--wait=false")


def test_guest_may_change_only_while_the_vm_stays_halted(cluster: Any, crd: None) -> None:
    def patch(spec: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        return kubectl(cluster, "patch", "cvm", "halted", "-n", NAMESPACE, "--type=merge",
                       "-p", json.dumps({"spec": spec}), check=False)  # fmt: skip

    spec = {"guest": {"memory": "32Mi"}, "runStrategy": "Halted"}
    kubectl(cluster, "apply", "-n", NAMESPACE, "-f", "-", stdin=colovm("halted", spec))
    assert patch({"guest": {"memory": "64Mi"}}).returncode == 0
    # Starting and changing the guest in one step would let running pods disagree with the spec.
    both = patch({"runStrategy": "Always", "guest": {"memory": "16Mi"}})
    assert both.returncode != 0 and "spec.guest: " in both.stderr and "Halted" in both.stderr
    assert patch({"runStrategy": "Always"}).returncode == 0
    running = patch({"guest": {"memory": "16Mi"}})
    assert running.returncode != 0 and "immutable while the VM runs" in running.stderr
    kubectl(cluster, "delete", "cvm", "halted", "-n", NAMESPACE, "--wait=false")
