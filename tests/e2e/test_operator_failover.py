"""The operator against real agents (process nodes, or kind's containers): a ColoVM becomes
Protected on two nodes, survives the loss of its primary's node (the secondary is promoted with a
higher term and the Service follows it) without losing a write a client saw acknowledged, and is
re-protected on the third node."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from operator_e2e import (
    Writer,
    colovm,
    cvm_status,
    kubectl_apply,
    missing,
    operator_installed,
    ready_addresses,
    wait_for,
)

NAMESPACE = "colo-failover-e2e"
CLIENT_PORT = 6379


def status(cluster: Any, name: str) -> dict[str, Any]:
    return cvm_status(cluster, NAMESPACE, name)


def endpoints(cluster: Any, service: str) -> list[str]:
    return ready_addresses(cluster, NAMESPACE, service)


@pytest.fixture(scope="module")
def operator(cluster: Any) -> Iterator[None]:
    if not cluster.can_kill_nodes:
        pytest.skip("killing a node needs --e2e-driver local or kind")
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

    def endpoint() -> tuple[str, int] | None:
        found = endpoints(cluster, "fo")
        return (found[0], CLIENT_PORT) if len(found) == 1 else None

    writer = Writer("key", endpoint, reply_timeout=1.0).start()
    try:
        wait_for(lambda: len(writer.acknowledged) >= 50, 60, "writes acknowledged by the primary")
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
                lambda: endpoints(cluster, "fo") == [secondary["address"]],
                60,
                "the Service on the new primary",
            )
            count = len(writer.acknowledged)
            wait_for(
                lambda: len(writer.acknowledged) >= count + 50, 60, "writes acknowledged by the new primary"
            )
            again = wait_for(
                lambda: (s := status(cluster, "fo")).get("phase") == "Protected" and s, 240, "Protected again"
            )
            assert again["primary"]["node"] == secondary["node"]
            assert again["secondary"]["node"] == third
        finally:
            cluster.revive_node(primary["node"])
    finally:
        writer.finish()
    lost = missing((secondary["address"], CLIENT_PORT), writer.acknowledged)
    assert not lost, f"{len(lost)} of {len(writer.acknowledged)} acknowledged writes lost: {lost[:10]}"
    print(
        f"\nfailover ({cluster.driver}): node killed -> promoted in {promoted_s:.1f}s "
        f"(operator: {after['lastFailover']['durationMs']:.0f} ms from decision to promotion, "
        f"cause {after['lastFailover']['cause']}); {len(writer.acknowledged)} writes acknowledged, "
        f"0 lost; re-protected on {third}"
    )


def _apply(cluster: Any, obj: dict[str, Any]) -> None:
    kubectl_apply(cluster, NAMESPACE, obj)
