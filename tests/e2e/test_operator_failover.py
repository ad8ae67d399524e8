"""The operator against real agents on process nodes: a ColoVM becomes Protected on two nodes,
survives the loss of its primary's node (the secondary is promoted with a higher term and the
Service follows it) and is re-protected on the third node."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from operator_e2e import colovm, cvm_status, kubectl_apply, operator_installed, wait_for

NAMESPACE = "colo-failover-e2e"


def status(cluster: Any, name: str) -> dict[str, Any]:
    return cvm_status(cluster, NAMESPACE, name)


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
    yield from operator_installed(cluster, NAMESPACE)


def test_node_loss_promotes_the_secondary_and_reprotects(cluster: Any, operator: None) -> None:
    vm = colovm("fo")
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
    kubectl_apply(cluster, NAMESPACE, obj)
