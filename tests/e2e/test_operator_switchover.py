"""A planned switchover loses nothing: while clients write keys through the Service's ready
endpoint, `kubectl colo switchover` (or `kubectl drain` of the primary's node) moves the primary to
the secondary after a final acknowledged checkpoint (term + 1); every write a client saw
acknowledged is readable on the new primary, and the VM is Protected again with a fresh secondary
(off the drained node). A rolling update (a changed agent flag, or `kubectl colo restart` under
updateStrategy Manual) moves the same way after replacing the secondary, so both pods are replaced
and nothing acknowledged is lost."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster.testing import ready_endpoints
from operator_e2e import Writer, colovm, cvm_status, kubectl_apply, missing, operator_installed, wait_for

NAMESPACE = "colo-switchover-e2e"
KUBECTL_COLO = Path(sys.executable).parent / "kubectl-colo"


def status(cluster: Any, name: str) -> dict[str, Any]:
    return cvm_status(cluster, NAMESPACE, name)


# --------------------------------------------------------------------------- a RESP writer


class Writers:
    """Several writers at once, so that writes are in flight on the old primary when it hands over."""

    def __init__(self, endpoint: Callable[[], tuple[str, int] | None], count: int = 4) -> None:
        self.writers = [Writer(f"c{i}", endpoint) for i in range(count)]

    def start(self) -> None:
        for writer in self.writers:
            writer.start()

    def finish(self) -> None:
        for writer in self.writers:
            writer.stop.set()
        for writer in self.writers:
            writer.finish()

    @property
    def acknowledged(self) -> dict[str, str]:
        return {k: v for writer in self.writers for k, v in list(writer.acknowledged.items())}

    def acknowledged_at(self, address: tuple[str, int]) -> int:
        return sum(writer.acks_by_address.get(address, 0) for writer in self.writers)

    @property
    def errors(self) -> list[str]:
        return [e for writer in self.writers for e in writer.errors]


@pytest.fixture(scope="module")
def operator(cluster: Any) -> Iterator[None]:
    yield from operator_installed(cluster, NAMESPACE)


def _apply(cluster: Any, obj: dict[str, Any]) -> None:
    kubectl_apply(cluster, NAMESPACE, obj)


def _protected(cluster: Any, kube_api: Any, name: str) -> tuple[dict[str, Any], tuple[str, int]]:
    """Create ColoVM `name`, wait for Protected and for its Service on the primary."""
    vm = colovm(name)
    _apply(cluster, vm)
    before = wait_for(
        lambda: (s := status(cluster, name)).get("phase") == "Protected" and s, 240, "Protected"
    )
    assert before["primary"]["node"] != before["secondary"]["node"]
    address = before["primary"]["address"]
    old = wait_for(
        lambda: (e := ready_endpoints(kube_api, NAMESPACE, name)) and e[0][0] == address and e[0],
        60,
        "the Service on the primary",
    )
    return before, old


def _service_endpoint(kube_api: Any, name: str) -> Callable[[], tuple[str, int] | None]:
    def endpoint() -> tuple[str, int] | None:
        try:
            found = ready_endpoints(kube_api, NAMESPACE, name)
        except Exception:  # the API server is busy; the next try will do
            return None
        # Two ready endpoints would be two pods releasing output; the writer waits that out.
        return found[0] if len(found) == 1 else None

    return endpoint


def _moved(
    cluster: Any, name: str, before: dict[str, Any], writers: Writers, new: tuple[str, int], cause: str
) -> dict[str, Any]:
    """Check the roles swapped in term + 1 with nothing lost, and wait for Protected again."""
    primary, secondary = before["primary"], before["secondary"]
    after = status(cluster, name)
    assert after["currentPrimary"] == secondary["pod"]
    assert after["term"] == before["term"] + 1
    last = after["lastFailover"]
    assert (last["kind"], last["cause"]) == ("Switchover", cause), last
    assert last["from"] == primary["pod"] and last["to"] == secondary["pod"], last
    assert after.get("failovers", 0) == before.get("failovers", 0), "a switchover is not a failover"
    assert writers.acknowledged, "the client saw no write acknowledged"
    lost = missing(new, writers.acknowledged)
    assert not lost, f"{len(lost)} of {len(writers.acknowledged)} acknowledged writes lost: {lost[:10]}"
    again = wait_for(
        lambda: (s := status(cluster, name)).get("phase") == "Protected" and s, 240, "Protected again"
    )
    assert again["primary"]["pod"] == secondary["pod"]
    assert again["term"] == after["term"]
    assert again["secondary"]["node"] != again["primary"]["node"]
    return after


def test_switchover_moves_the_primary_without_losing_a_write(
    cluster: Any, kube_api: Any, operator: None
) -> None:
    name = "so"
    before, old = _protected(cluster, kube_api, name)
    endpoint = _service_endpoint(kube_api, name)
    writers = Writers(endpoint)
    writers.start()
    try:
        wait_for(lambda: writers.acknowledged_at(old) >= 100, 60, "writes acknowledged by the primary")
        started = time.monotonic()
        result = subprocess.run(
            [str(KUBECTL_COLO), "--kubeconfig", str(cluster.kubeconfig), "-n", NAMESPACE,
             "switchover", name, "--timeout", "90"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        switched_s = time.monotonic() - started
        assert result.returncode == 0, result.stdout + result.stderr
        assert "switched over" in result.stdout, result.stdout
        address = before["secondary"]["address"]
        new = wait_for(
            lambda: (e := endpoint()) is not None and e[0] == address and e,
            60,
            "the Service on the new primary",
        )
        wait_for(lambda: writers.acknowledged_at(new) >= 100, 60, "writes acknowledged by the new primary")
    finally:
        writers.finish()

    after = _moved(cluster, name, before, writers, new, "Switchover")
    print(
        f"\nswitchover: kubectl colo switchover returned in {switched_s:.1f}s "
        f"(operator: {after['lastFailover']['durationMs']:.0f} ms from decision to promotion); "
        f"{len(writers.acknowledged)} writes acknowledged ({writers.acknowledged_at(old)} on the old "
        f"primary, {writers.acknowledged_at(new)} on the new), none lost; "
        f"{len(writers.errors)} client connections cut by the move, first: {writers.errors[:1]}"
    )
    # The drain test below cordons a node: this VM would only add work there.
    cluster.kubectl("delete", "cvm", name, "-n", NAMESPACE, "--wait=true", "--timeout=120s")


def test_drain_of_the_primary_node_switches_over_without_losing_a_write(
    cluster: Any, kube_api: Any, operator: None
) -> None:
    name = "dr"
    before, old = _protected(cluster, kube_api, name)
    drained = before["primary"]["node"]
    endpoint = _service_endpoint(kube_api, name)
    writers = Writers(endpoint)
    writers.start()
    try:
        try:
            wait_for(lambda: writers.acknowledged_at(old) >= 100, 60, "writes acknowledged by the primary")
            started = time.monotonic()
            # The PodDisruptionBudget turns the eviction of the primary away until the operator
            # has switched over (it sees the cordon) and retired the old primary itself.
            result = cluster.kubectl(
                "drain", drained, "--ignore-daemonsets", "--delete-emptydir-data", "--force",
                "--timeout=150s", check=False, timeout=180,
            )  # fmt: skip
            drained_s = time.monotonic() - started
            assert result.returncode == 0, result.stdout + result.stderr
            address = before["secondary"]["address"]
            new = wait_for(
                lambda: (e := endpoint()) is not None and e[0] == address and e,
                60,
                "the Service on the new primary",
            )
            wait_for(
                lambda: writers.acknowledged_at(new) >= 100, 60, "writes acknowledged by the new primary"
            )
        finally:
            writers.finish()
        # While the node is still cordoned: the new secondary must have gone elsewhere.
        after = _moved(cluster, name, before, writers, new, "NodeDrain")
        again = status(cluster, name)
        assert drained not in (again["primary"]["node"], again["secondary"]["node"])
    finally:
        cluster.kubectl("uncordon", drained, check=False)

    print(
        f"\ndrain of {drained}: kubectl drain returned in {drained_s:.1f}s "
        f"(operator: {after['lastFailover']['durationMs']:.0f} ms from decision to promotion); "
        f"{len(writers.acknowledged)} writes acknowledged ({writers.acknowledged_at(old)} on the old "
        f"primary, {writers.acknowledged_at(new)} on the new), none lost"
    )


def _agent_args(cluster: Any, pod: str) -> list[str]:
    result = cluster.kubectl("get", "pod", pod, "-n", NAMESPACE, "-o", "json")
    return list(json.loads(result.stdout)["spec"]["containers"][0]["args"])


def _rolled(cluster: Any, name: str, old_pods: set[str]) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        s = status(cluster, name)
        replicas = {(s.get("primary") or {}).get("pod"), (s.get("secondary") or {}).get("pod")}
        fresh = s.get("phase") == "Protected" and s.get("upToDate") == "2/2" and not replicas & old_pods
        return s if fresh else None

    return wait_for(done, 240, "both agent pods replaced and the VM Protected")


def test_rolling_update_replaces_both_pods_without_losing_a_write(
    cluster: Any, kube_api: Any, operator: None
) -> None:
    name = "ru"
    before, old = _protected(cluster, kube_api, name)
    old_pods = {before["primary"]["pod"], before["secondary"]["pod"]}
    endpoint = _service_endpoint(kube_api, name)
    writers = Writers(endpoint)
    writers.start()
    try:
        wait_for(lambda: writers.acknowledged_at(old) >= 100, 60, "writes acknowledged by the primary")
        started = time.monotonic()
        # An agent flag: the local cluster runs agents as host processes, where an image tag means nothing.
        cluster.kubectl("patch", "cvm", name, "-n", NAMESPACE, "--type=merge",
                        "-p", '{"spec":{"replication":{"checkpointIntervalMs":50}}}')  # fmt: skip
        after = _rolled(cluster, name, old_pods)
        rolled_s = time.monotonic() - started
        address = after["primary"]["address"]
        new = wait_for(
            lambda: (e := endpoint()) is not None and e[0] == address and e,
            60,
            "the Service on the new primary",
        )
        wait_for(lambda: writers.acknowledged_at(new) >= 100, 60, "writes acknowledged by the new primary")
    finally:
        writers.finish()

    last = after["lastFailover"]
    assert (last["kind"], last["cause"], last["from"]) == ("Switchover", "Upgrade", before["primary"]["pod"])
    assert after["term"] == before["term"] + 1, "one switchover, term + 1"
    assert after.get("failovers", 0) == before.get("failovers", 0)
    assert next(c for c in after["conditions"] if c["type"] == "UpToDate")["status"] == "True"
    for pod in (after["primary"]["pod"], after["secondary"]["pod"]):
        args = _agent_args(cluster, pod)
        assert args[args.index("--interval-ms") + 1] == "50", args
    assert writers.acknowledged, "the client saw no write acknowledged"
    lost = missing(new, writers.acknowledged)
    assert not lost, f"{len(lost)} of {len(writers.acknowledged)} acknowledged writes lost: {lost[:10]}"
    print(
        f"\nrolling update: spec change -> both pods replaced and Protected in {rolled_s:.1f}s "
        f"(switchover {last['durationMs']:.0f} ms); {len(writers.acknowledged)} writes acknowledged "
        f"({writers.acknowledged_at(old)} on the old primary, {writers.acknowledged_at(new)} on the new), "
        f"none lost"
    )
    cluster.kubectl("delete", "cvm", name, "-n", NAMESPACE, "--wait=true", "--timeout=120s")


def test_manual_update_strategy_waits_for_kubectl_colo_restart(
    cluster: Any, kube_api: Any, operator: None
) -> None:
    name = "mu"
    vm = {"apiVersion": "colo.dev/v1alpha1", "kind": "ColoVM", "metadata": {"name": name},
          "spec": {"guest": {"memory": "16Mi"}, "updateStrategy": "Manual"}}  # fmt: skip
    _apply(cluster, vm)
    before = wait_for(
        lambda: (s := status(cluster, name)).get("phase") == "Protected" and s, 240, "Protected"
    )
    old_pods = {before["primary"]["pod"], before["secondary"]["pod"]}
    cluster.kubectl("patch", "cvm", name, "-n", NAMESPACE, "--type=merge",
                    "-p", '{"spec":{"replication":{"checkpointIntervalMs":50}}}')  # fmt: skip
    pending = wait_for(
        lambda: (s := status(cluster, name)).get("upToDate") == "0/2" and s, 60, "the update noticed"
    )
    condition = next(c for c in pending["conditions"] if c["type"] == "UpToDate")
    assert (condition["status"], condition["reason"]) == ("False", "UpdatePending"), condition
    time.sleep(3)
    held = status(cluster, name)
    assert {held["primary"]["pod"], held["secondary"]["pod"]} == old_pods, "Manual must not replace pods"
    result = subprocess.run(
        [str(KUBECTL_COLO), "--kubeconfig", str(cluster.kubeconfig), "-n", NAMESPACE, "restart", name],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    after = _rolled(cluster, name, old_pods)
    assert after["term"] == before["term"] + 1 and after["lastFailover"]["cause"] == "Upgrade"
    cluster.kubectl("delete", "cvm", name, "-n", NAMESPACE, "--wait=true", "--timeout=120s")
