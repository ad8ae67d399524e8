"""Stop and start against the real API server and real agents: `runStrategy: Halted` deletes both
agent pods and keeps the ColoVM, its Service and its Lease; `Always` boots a fresh guest (a stopped
VM keeps no state) whose primary takes the Lease in a higher term. A Failed VM comes back the same
way, with a Warning event saying its state was lost."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from cluster.testing import ready_endpoints
from operator_e2e import colovm, cvm_status, kubectl_apply, operator_installed, wait_for
from support.resp import RespClient

NAMESPACE = "colo-stop-e2e"


def status(cluster: Any, name: str) -> dict[str, Any]:
    return cvm_status(cluster, NAMESPACE, name)


def pods(cluster: Any, name: str) -> list[str]:
    result = cluster.kubectl("get", "pods", "-n", NAMESPACE, "-l", f"colo.dev/vm={name}", "-o", "json")
    return [p["metadata"]["name"] for p in json.loads(result.stdout)["items"]]


def events(cluster: Any, name: str, reason: str) -> list[dict[str, Any]]:
    result = cluster.kubectl(
        "get", "events", "-n", NAMESPACE, "-o", "json",
        "--field-selector", f"involvedObject.name={name},reason={reason}",
    )  # fmt: skip
    return list(json.loads(result.stdout)["items"])


def patch(cluster: Any, name: str, spec: dict[str, Any]) -> None:
    cluster.kubectl("patch", "cvm", name, "-n", NAMESPACE, "--type=merge", "-p", json.dumps({"spec": spec}))


def phase_is(cluster: Any, name: str, phase: str) -> dict[str, Any] | None:
    s = status(cluster, name)
    return s if s.get("phase") == phase else None


@pytest.fixture(scope="module")
def operator(cluster: Any) -> Iterator[None]:
    yield from operator_installed(cluster, NAMESPACE)


def _protected(cluster: Any, name: str) -> dict[str, Any]:
    vm = colovm(name)
    _apply(cluster, vm)
    return wait_for(lambda: phase_is(cluster, name, "Protected"), 240, f"{name} Protected")


def _apply(cluster: Any, obj: dict[str, Any]) -> None:
    kubectl_apply(cluster, NAMESPACE, obj)


def _call(kube_api: Any, name: str, *command: str) -> Any:
    address = wait_for(
        lambda: (e := ready_endpoints(kube_api, NAMESPACE, name)) and len(e) == 1 and e[0],
        60,
        f"one ready endpoint of {name}",
    )
    with RespClient.connect(*address, timeout=10.0) as conn:
        return conn.call(*command)


def test_stop_frees_the_pods_and_start_boots_a_fresh_guest(
    cluster: Any, kube_api: Any, operator: None
) -> None:
    name = "stop"
    before = _protected(cluster, name)
    assert _call(kube_api, name, "SET", "kept", "no") == b"OK"
    old_pods = set(pods(cluster, name))
    assert old_pods == {before["primary"]["pod"], before["secondary"]["pod"]}

    patch(cluster, name, {"runStrategy": "Halted"})
    stopped = wait_for(
        lambda: (s := phase_is(cluster, name, "Stopped")) and not pods(cluster, name) and s, 120, "Stopped"
    )
    assert stopped["stoppedFrom"] == "Protected"
    assert "currentPrimary" not in stopped and not stopped.get("primary")
    ready = next(c for c in stopped["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "Stopped")
    # The definition, the Service and the Lease (with its term) stay.
    cluster.kubectl("get", "service", name, "-n", NAMESPACE)
    lease = json.loads(
        cluster.kubectl("get", "lease", f"{name}-primary", "-n", NAMESPACE, "-o", "json").stdout
    )
    assert lease["spec"]["leaseTransitions"] >= before["term"]
    # A stopped VM starts afresh, so its guest may change meanwhile (and only meanwhile).
    patch(cluster, name, {"guest": {"memory": "32Mi"}})

    patch(cluster, name, {"runStrategy": "Always"})
    after = wait_for(lambda: phase_is(cluster, name, "Protected"), 240, "Protected after start")
    assert not old_pods & {after["primary"]["pod"], after["secondary"]["pod"]}
    assert after["term"] > before["term"], "the fresh primary takes the Lease in a higher term"
    assert "stoppedFrom" not in after
    assert _call(kube_api, name, "GET", "kept") is None, "a stopped VM keeps no guest state"
    assert events(cluster, name, "Starting") and not events(cluster, name, "StateLost")
    cluster.kubectl("delete", "cvm", name, "-n", NAMESPACE, "--wait=true", "--timeout=120s")


def test_a_failed_vm_starts_again_with_an_event_that_its_state_was_lost(
    cluster: Any, kube_api: Any, operator: None
) -> None:
    name = "lost"
    before = _protected(cluster, name)
    # Both replicas gone at once: nothing holds the guest's state any more.
    cluster.kubectl(
        "delete", "pod", before["primary"]["pod"], before["secondary"]["pod"], "-n", NAMESPACE,
        "--force", "--grace-period=0", "--wait=false",
    )  # fmt: skip
    wait_for(lambda: phase_is(cluster, name, "Failed"), 120, "Failed")
    # Failed is sticky while runStrategy stays Always.
    time.sleep(3)
    assert phase_is(cluster, name, "Failed")

    patch(cluster, name, {"runStrategy": "Halted"})
    stopped = wait_for(lambda: phase_is(cluster, name, "Stopped"), 60, "Stopped")
    assert stopped["stoppedFrom"] == "Failed"
    patch(cluster, name, {"runStrategy": "Always"})
    wait_for(lambda: phase_is(cluster, name, "Protected"), 240, "Protected after restart")
    (lost,) = wait_for(lambda: events(cluster, name, "StateLost"), 30, "the StateLost event")
    assert lost["type"] == "Warning" and "state was lost" in lost["message"]
    cluster.kubectl("delete", "cvm", name, "-n", NAMESPACE, "--wait=true", "--timeout=120s")
