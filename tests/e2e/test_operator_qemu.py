"""The qemu backend through the operator (local driver): a ColoVM with `guest.backend: qemu`
becomes Protected on two process nodes, a client writes to the Linux guest's redis through
colo-compare, the primary's node is killed, the secondary is promoted with a higher term and the
Service follows it, the VM is protected again on the third node, and `kubectl colo switchover`
moves the primary there; no write the client saw acknowledged is lost.

Process nodes run the agent pods as host processes, so they use the patched QEMU and the Linux
test guest that `.ci/qemu-build` and `.ci/qemu-guest` cache (the cluster puts that QEMU first
on the pods' PATH, where the agent image has it). TCG: these machines cannot run QEMU guests
under KVM."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
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
from support.qemu import QemuTools, cached_qemu_tools

NAMESPACE = "colo-qemu-e2e"
CLIENT_PORT = 6379
KUBECTL_COLO = Path(sys.executable).parent / "kubectl-colo"
pytestmark = pytest.mark.timeout(900)
# A TCG guest boots in about 6 s on an idle machine and in a minute on a loaded one; its first
# protection then copies the disk and starts COLO. Liveness bounds, not speed checks.
PROTECTED_TIMEOUT = 420.0


def status(cluster: Any, name: str) -> dict[str, Any]:
    return cvm_status(cluster, NAMESPACE, name)


def endpoints(cluster: Any, service: str) -> list[str]:
    return ready_addresses(cluster, NAMESPACE, service)


@pytest.fixture(scope="module")
def tools(cluster: Any) -> QemuTools:
    if cluster.local is None:
        pytest.skip("the qemu e2e runs on --e2e-driver local (process nodes use the cached QEMU)")
    found = cached_qemu_tools()
    if found is None:
        message = "the patched QEMU or the Linux test guest is not built: run .ci/qemu-build, .ci/qemu-guest"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    assert str(Path(found.binaries.qemu).parent) in cluster.local.extra_path, cluster.local.extra_path
    return found


@pytest.fixture(scope="module")
def operator(cluster: Any, tools: QemuTools) -> Iterator[None]:
    yield from operator_installed(cluster, NAMESPACE)


def qemu_vm(name: str, tools: QemuTools) -> dict[str, Any]:
    guest = {
        "backend": "qemu", "accel": "tcg", "memory": "192Mi",
        "qemu": {"disk": {"size": "64Mi"}, "kernel": str(tools.guest / "vmlinuz"),
                 "initrd": str(tools.guest / "initrd.img")},
    }  # fmt: skip
    return colovm(name, guest=guest, failover={"leaseDurationMs": 2000})


def test_qemu_guest_fails_over_without_losing_a_write_and_is_reprotected(
    cluster: Any, operator: None, tools: QemuTools
) -> None:
    started = time.monotonic()
    kubectl_apply(cluster, NAMESPACE, qemu_vm("qe", tools))
    before = wait_for(
        lambda: (s := status(cluster, "qe")).get("phase") == "Protected" and s, PROTECTED_TIMEOUT, "Protected"
    )
    protected_s = time.monotonic() - started
    primary, secondary = before["primary"], before["secondary"]
    assert primary["node"] != secondary["node"]
    third = next(n for n in cluster.node_names if n not in (primary["node"], secondary["node"]))
    wait_for(lambda: endpoints(cluster, "qe") == [primary["address"]], 60, "the Service on the primary")

    def endpoint() -> tuple[str, int] | None:
        found = endpoints(cluster, "qe")
        return (found[0], CLIENT_PORT) if len(found) == 1 else None

    # Every answer waits for both guests (colo-compare), both emulated on two shared cores.
    writer = Writer("key", endpoint, reply_timeout=10.0).start()
    try:
        wait_for(lambda: len(writer.acknowledged) >= 20, 180, "writes acknowledged through colo-compare")
        figures = wait_for(
            lambda: ((s := status(cluster, "qe")).get("checkpoints") or {}).get("total", 0) >= 1 and s,
            60, "checkpoints in the status",
        )  # fmt: skip
        killed_at = time.monotonic()
        cluster.kill_node(primary["node"])
        try:
            after = wait_for(
                lambda: (
                    (s := status(cluster, "qe")).get("currentPrimary") == secondary["pod"]
                    and not s.get("transition")
                    and s
                ),
                180,
                "the secondary promoted",
            )
            promoted_s = time.monotonic() - killed_at
            assert after["term"] == before["term"] + 1
            assert after["lastFailover"]["from"] == primary["pod"]
            assert after["lastFailover"]["to"] == secondary["pod"]
            moved = [secondary["address"]]
            wait_for(lambda: endpoints(cluster, "qe") == moved, 60, "the Service on the new primary")
            count = len(writer.acknowledged)
            wait_for(lambda: len(writer.acknowledged) >= count + 10, 120, "writes to the new primary")
            again = wait_for(
                lambda: (s := status(cluster, "qe")).get("phase") == "Protected" and s,
                PROTECTED_TIMEOUT,
                "Protected again",
            )
            assert again["primary"]["node"] == secondary["node"]
            assert again["secondary"]["node"] == third
            count = len(writer.acknowledged)
            wait_for(lambda: len(writer.acknowledged) >= count + 10, 120, "writes through the new pair")
        finally:
            cluster.revive_node(primary["node"])
        # A planned switchover to the third node while the client writes: term + 1, nothing lost.
        switch_at = time.monotonic()
        result = subprocess.run(
            [str(KUBECTL_COLO), "--kubeconfig", str(cluster.kubeconfig), "-n", NAMESPACE,
             "switchover", "qe", "--timeout", "120"],
            capture_output=True, text=True, timeout=150, check=False,
        )  # fmt: skip
        switched_s = time.monotonic() - switch_at
        assert result.returncode == 0, result.stdout + result.stderr
        final = status(cluster, "qe")
        assert final["currentPrimary"] == again["secondary"]["pod"], final
        assert final["term"] == again["term"] + 1 and final["lastFailover"]["cause"] == "Switchover"
        wait_for(lambda: endpoints(cluster, "qe") == [again["secondary"]["address"]], 60, "the Service moved")
        count = len(writer.acknowledged)
        wait_for(lambda: len(writer.acknowledged) >= count + 10, 120, "writes after the switchover")
    finally:
        writer.finish()
    lost = missing((again["secondary"]["address"], CLIENT_PORT), writer.acknowledged)
    assert not lost, f"{len(lost)} of {len(writer.acknowledged)} acknowledged writes lost: {lost[:10]}"
    print(
        f"\nqemu failover (local, TCG, load {os.getloadavg()[0]:.1f}): Protected {protected_s:.0f}s after "
        f"apply ({figures['checkpoints']['total']} checkpoints when sampled); node killed -> promoted in "
        f"{promoted_s:.1f}s (operator: {after['lastFailover']['durationMs']:.0f} ms from decision to "
        f"promotion, cause {after['lastFailover']['cause']}); {len(writer.acknowledged)} writes "
        f"acknowledged, 0 lost; re-protected on {third}; switchover to it in {switched_s:.1f}s; "
        f"{time.monotonic() - started:.0f}s in all"
    )
