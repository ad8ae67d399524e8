"""The operator against real agents on process nodes: a ColoVM becomes Protected on two nodes,
survives the loss of its primary's node (the secondary is promoted with a higher term and the
Service follows it) and is re-protected on the third node."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from operator_e2e import CHART, RELEASE, RELEASE_NAMESPACE, helm, wait_for

NAMESPACE = "colo-failover-e2e"


def status(cluster: Any, name: str) -> dict[str, Any]:
    result = cluster.kubectl("get", "cvm", name, "-n", NAMESPACE, "-o", "json", check=False)
    return json.loads(result.stdout).get("status") or {} if result.returncode == 0 else {}


def endpoints(cluster: Any, service: str) -> list[str]:
    result = cluster.kubectl(
        "get", "endpointslices", "-n", NAMESPACE, "-l", f"kubernetes.io/service-name={service}", "-o", "json",
        check=False,
    )  # fmt: skip
    if result.returncode != 0:
        return []
    return [
        address
        for item in json.loads(result.stdout)["items"]
        for endpoint in item.get("endpoints") or []
        if (endpoint.get("conditions") or {}).get("ready")
        for address in endpoint["addresses"]
    ]


@pytest.fixture(scope="module")
def operator(cluster: Any) -> Iterator[None]:
    if cluster.local is None:
        pytest.skip("killing a node needs --e2e-driver local")
    result = helm(
        cluster, "upgrade", "--install", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE,
        "--create-namespace", "--wait", "--timeout", "300s", "--set-json", "operator.pollIntervalSeconds=0.5",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    yield
    cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
    helm(cluster, "uninstall", RELEASE, "--namespace", RELEASE_NAMESPACE, "--wait")


def test_node_loss_promotes_the_secondary_and_reprotects(cluster: Any, operator: None) -> None:
    vm = {"apiVersion": "colo.dev/v1alpha1", "kind": "ColoVM", "metadata": {"name": "fo"},
          "spec": {"guest": {"memory": "16Mi"}}}  # fmt: skip
    _apply(cluster, vm)
    before = wait_for(
        lambda: (s := status(cluster, "fo")).get("phase") == "Protected" and s, 240, "Protected"
    )
    primary, secondary = before["primary"], before["secondary"]
    assert primary["node"] != secondary["node"]
    third = next(n for n in cluster.node_names if n not in (primary["node"], secondary["node"]))
    wait_for(lambda: endpoints(cluster, "fo") == [primary["address"]], 60, "the Service on the primary")

    killed_at = time.monotonic()
    cluster.kill_node(primary["node"])
    try:
        after = wait_for(
            lambda: (
                (s := status(cluster, "fo")).get("currentPrimary") == secondary["pod"]
                and not s.get("transition")
                and s
            ),
            120,
            "the secondary promoted",
        )
        promoted_s = time.monotonic() - killed_at
        assert after["term"] == before["term"] + 1
        assert after["failovers"] == before.get("failovers", 0) + 1
        assert (
            after["lastFailover"]["from"] == primary["pod"]
            and after["lastFailover"]["to"] == secondary["pod"]
        )
        wait_for(
            lambda: endpoints(cluster, "fo") == [secondary["address"]], 60, "the Service on the new primary"
        )
        again = wait_for(
            lambda: (s := status(cluster, "fo")).get("phase") == "Protected" and s, 240, "Protected again"
        )
        assert again["primary"]["node"] == secondary["node"]
        assert again["secondary"]["node"] == third
        print(
            f"\nfailover: node killed -> promoted in {promoted_s:.1f}s "
            f"(operator: {after['lastFailover']['durationMs']:.0f} ms from decision to promotion, "
            f"cause {after['lastFailover']['cause']})"
        )
    finally:
        cluster.revive_node(primary["node"])


def _apply(cluster: Any, obj: dict[str, Any]) -> None:
    from cluster import build

    binary = build.bin_dir() / "kubectl"
    subprocess.run(
        [str(binary) if binary.exists() else "kubectl", f"--kubeconfig={cluster.kubeconfig}",
         "apply", "-n", NAMESPACE, "-f", "-"],
        input=json.dumps(obj), capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
