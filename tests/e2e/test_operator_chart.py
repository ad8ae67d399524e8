"""The Helm chart installs, the operator runs under its own ServiceAccount (so an RBAC gap
would stop it), reconciles a ColoVM into agent pods and per-VM objects, and a delete
leaves nothing behind."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from operator_e2e import CHART, RELEASE, RELEASE_NAMESPACE, ROOT, wait_for, with_chart_values

SERVICE_ACCOUNT = f"system:serviceaccount:{RELEASE_NAMESPACE}:colo-colo-operator"
NAMESPACE = "colo-chart-e2e"


def helm_binary() -> str:
    from cluster import build

    binary = build.bin_dir() / "helm"
    return str(binary) if binary.exists() else "helm"


def helm(cluster: Any, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm_binary(), f"--kubeconfig={cluster.kubeconfig}", *with_chart_values(cluster, args)],
        capture_output=True, text=True, timeout=400, check=check,
    )  # fmt: skip


def get_json(cluster: Any, *args: str) -> Any:
    result = cluster.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def is_ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


@pytest.fixture(scope="module")
def release(cluster: Any) -> Iterator[None]:
    result = helm(
        cluster, "upgrade", "--install", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE,
        "--create-namespace", "--wait", "--timeout", "300s",
        "--set-json", "operator.pollIntervalSeconds=0.5", check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    yield
    cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
    helm(cluster, "uninstall", RELEASE, "--namespace", RELEASE_NAMESPACE, "--wait", check=False)


def test_operator_runs_two_peered_replicas_under_its_service_account(cluster: Any, release: None) -> None:
    def ready_pods() -> list[dict[str, Any]] | None:
        pods = get_json(
            cluster, "pods", "-n", RELEASE_NAMESPACE, "-l", f"app.kubernetes.io/instance={RELEASE}"
        )
        items = (pods or {}).get("items", [])
        ready = [p for p in items if is_ready(p)]
        return ready if len(ready) == 2 else None

    pods = wait_for(ready_pods, 120, "two ready operator pods")
    for pod in pods:
        assert pod["spec"]["serviceAccountName"] == "colo-colo-operator"
        assert pod["spec"]["containers"][0]["command"] == ["colo-operator"]
    # The replicas found each other through the peering object the operator created.
    peers = wait_for(
        lambda: (
            (get_json(cluster, "clusterkopfpeering", "colo-operator") or {}).get("status")
            if len((get_json(cluster, "clusterkopfpeering", "colo-operator") or {}).get("status") or {}) >= 2
            else None
        ),
        60,
        "both replicas in the ClusterKopfPeering",
    )
    assert len(peers) >= 2


@pytest.mark.parametrize(
    ("verb", "resource", "allowed"),
    [
        ("create", "pods", True),
        ("patch", "colovms.colo.dev/status", True),
        ("update", "leases.coordination.k8s.io", True),
        ("delete", "nodes", False),
        ("update", "deployments.apps", False),
        ("create", "clusterroles.rbac.authorization.k8s.io", False),
        ("update", "secrets", False),
        ("escalate", "roles.rbac.authorization.k8s.io", False),
    ],
)
def test_operator_rbac_is_least_privilege(
    cluster: Any, release: None, verb: str, resource: str, allowed: bool
) -> None:
    result = cluster.kubectl("auth", "can-i", verb, resource, f"--as={SERVICE_ACCOUNT}", "-A", check=False)
    assert result.stdout.strip() == ("yes" if allowed else "no"), result.stdout + result.stderr


def test_colovm_is_reconciled_then_deleted_without_leftovers(cluster: Any, release: None) -> None:
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", str(ROOT / "examples" / "colovm-basic.yaml"))

    def reconciled() -> dict[str, Any] | None:
        vm = get_json(cluster, "cvm", "basic", "-n", NAMESPACE)
        return vm if (vm or {}).get("status", {}).get("currentPrimary") else None

    vm = wait_for(reconciled, 60, "the operator to take the ColoVM in hand")
    assert vm["status"]["observedGeneration"] == vm["metadata"]["generation"]
    # Every per-VM object exists: the operator was allowed to create each kind.
    per_vm = [
        ("secret", "basic-agent-key"),
        ("lease", "basic-primary"),
        ("service", "basic"),
        ("serviceaccount", "basic-agent"),
        ("role", "basic-agent"),
        ("rolebinding", "basic-agent"),
        ("poddisruptionbudget", "basic"),
    ]
    for kind, name in per_vm:
        obj = wait_for(lambda k=kind, n=name: get_json(cluster, k, n, "-n", NAMESPACE), 30, f"{kind}/{name}")
        assert obj["metadata"]["ownerReferences"][0]["name"] == "basic"
    pod = wait_for(lambda: get_json(cluster, "pod", "basic-0", "-n", NAMESPACE), 30, "the primary pod")
    assert pod["spec"]["containers"][0]["command"] == ["colo-agent"]
    assert pod["metadata"]["labels"]["colo.dev/role"] == "primary"
    events = get_json(cluster, "events", "-n", NAMESPACE, "--field-selector", "involvedObject.name=basic")
    assert any(e.get("reason") == "CreatingPrimary" for e in events["items"])

    cluster.kubectl("delete", "cvm", "basic", "-n", NAMESPACE, "--timeout=120s")
    selector = "colo.dev/vm=basic"
    for kind in ("pods", "services", "leases", "secrets", "serviceaccounts", "roles", "rolebindings",
                 "poddisruptionbudgets"):  # fmt: skip
        left = wait_for(
            lambda k=kind: (
                (get_json(cluster, k, "-n", NAMESPACE, "-l", selector) or {"items": [1]})["items"] == []
            ),
            60,
            f"no {kind} left",
        )
        assert left


def test_every_operator_replica_serves_its_metrics(cluster: Any, release: None) -> None:
    import urllib.request

    pods = get_json(
        cluster, "pods", "-n", RELEASE_NAMESPACE, "-l", f"app.kubernetes.io/instance={RELEASE}"
    )
    items = (pods or {}).get("items", [])
    addresses = [p["status"]["podIP"] for p in items if p.get("status", {}).get("podIP")]
    assert addresses
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def scrape(address: str) -> str | None:
        try:
            with opener.open(f"http://{address}:9090/metrics", timeout=5) as response:
                return str(response.read().decode())
        except OSError:
            return None

    for address in addresses:
        text = wait_for(lambda a=address: scrape(a), 60, f"/metrics of the operator at {address}")
        assert 'colo_operator_vms{phase="Protected"}' in text
        assert "colo_operator_reconcile_errors_total" in text and "process_cpu_seconds_total" in text
    service = get_json(cluster, "service", "colo-colo-operator-metrics", "-n", RELEASE_NAMESPACE)
    assert service["spec"]["ports"][0]["port"] == 9090


SCOPED, WATCHED = "colo-scoped", "colo-watched"
SCOPED_ACCOUNT = f"system:serviceaccount:{SCOPED}:{SCOPED}-colo-operator"


@pytest.fixture(scope="module")
def scoped_rbac(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The chart's RBAC with watchNamespaces set, applied under a second release name."""
    for ns in (SCOPED, WATCHED):
        cluster.kubectl("create", "namespace", ns, check=False)
    rendered = tmp_path_factory.mktemp("scoped") / "rbac.yaml"
    rendered.write_text(helm(
        cluster, "template", SCOPED, str(CHART), "--namespace", SCOPED,
        "--set", f"watchNamespaces={{{WATCHED}}}",
        "--show-only", "templates/rbac.yaml", "--show-only", "templates/serviceaccount.yaml",
    ).stdout)  # fmt: skip
    applied = cluster.kubectl("apply", "-f", str(rendered), check=False)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    yield
    cluster.kubectl("delete", "-f", str(rendered), "--wait=false", check=False)
    for ns in (SCOPED, WATCHED):
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.mark.parametrize(
    ("verb", "resource", "where", "allowed"),
    [
        ("get", "secrets", ["-n", WATCHED], True),
        ("create", "networkpolicies.networking.k8s.io", ["-n", WATCHED], True),
        ("create", "pods", ["-n", WATCHED], True),
        ("get", "secrets", ["-n", "default"], False),
        ("get", "secrets", ["-A"], False),
        ("create", "pods", ["-n", "default"], False),
        ("create", "rolebindings.rbac.authorization.k8s.io", ["-n", "default"], False),
        # The cluster CA's Secret in the operator's own namespace: read it and create it, nothing more.
        ("get", "secrets/colo-operator-ca", ["-n", SCOPED], True),
        ("create", "secrets", ["-n", SCOPED], True),
        ("get", "secrets/some-app-password", ["-n", SCOPED], False),
        ("list", "secrets", ["-n", SCOPED], False),
        ("delete", "secrets/colo-operator-ca", ["-n", SCOPED], False),
        ("list", "nodes", [], True),
    ],
)
def test_watch_namespaces_confine_the_operators_rights(
    cluster: Any, scoped_rbac: None, verb: str, resource: str, where: list[str], allowed: bool
) -> None:
    result = cluster.kubectl("auth", "can-i", verb, resource, f"--as={SCOPED_ACCOUNT}", *where, check=False)
    assert result.stdout.strip() == ("yes" if allowed else "no"), result.stdout + result.stderr
