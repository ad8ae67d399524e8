"""A planned switchover loses nothing: while a client writes keys through the Service's ready
endpoint, `kubectl colo switchover` moves the primary to the secondary after a final acknowledged
checkpoint (term + 1); every write the client saw acknowledged is readable on the new primary, and
the VM is Protected again with a fresh secondary."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cluster.testing import ready_endpoints

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "colo-operator"
RELEASE, RELEASE_NAMESPACE = "colo", "colo-system"
NAMESPACE = "colo-switchover-e2e"
KUBECTL_COLO = Path(sys.executable).parent / "kubectl-colo"
T = TypeVar("T")


def wait_for(predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.25) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def helm(cluster: Any, *args: str) -> subprocess.CompletedProcess[str]:
    from cluster import build

    binary = build.bin_dir() / "helm"
    return subprocess.run(
        [str(binary) if binary.exists() else "helm", f"--kubeconfig={cluster.kubeconfig}", *args],
        capture_output=True, text=True, timeout=400, check=False,
    )  # fmt: skip


def status(cluster: Any, name: str) -> dict[str, Any]:
    result = cluster.kubectl("get", "cvm", name, "-n", NAMESPACE, "-o", "json", check=False)
    return json.loads(result.stdout).get("status") or {} if result.returncode == 0 else {}


# --------------------------------------------------------------------------- a RESP writer


def _command(*args: str) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Connection:
    """One blocking RESP connection; enough for SET and MGET."""

    def __init__(self, address: tuple[str, int], timeout: float) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.file = self.sock.makefile("rb")

    def call(self, *args: str) -> Any:
        self.sock.sendall(_command(*args))
        return self._reply()

    def _reply(self) -> Any:
        line = self.file.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError(f"connection closed inside a reply ({line!r})")
        kind, body = line[:1], line[1:-2]
        if kind == b"+":
            return body
        if kind == b"-":
            raise ConnectionError(f"error reply: {body.decode(errors='replace')}")
        if kind == b":":
            return int(body)
        if kind == b"$":
            n = int(body)
            if n < 0:
                return None
            data = self.file.read(n + 2)
            if len(data) != n + 2:
                raise ConnectionError("connection closed inside a bulk string")
            return data[:-2]
        if kind == b"*":
            n = int(body)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise ConnectionError(f"not a RESP reply: {line!r}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


@dataclass
class Writer:
    """Writes `key:n` = n in order through whatever the Service's ready endpoint is, reconnecting
    when a connection fails; records what the guest acknowledged and at which address."""

    endpoint: Callable[[], tuple[str, int] | None]
    acknowledged: dict[str, str] = field(default_factory=dict)
    acknowledged_at: dict[tuple[str, int], int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="resp-writer", daemon=True)
        self.thread.start()

    def finish(self) -> None:
        self.stop.set()
        assert self.thread is not None
        self.thread.join(60)
        assert not self.thread.is_alive(), "the writer did not stop"

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            address = self.endpoint()
            if address is None:
                time.sleep(0.1)
                continue
            try:
                # A primary that has stopped releasing output holds replies back: give up on it
                # after a while and ask the Service again.
                conn = _Connection(address, timeout=5.0)
            except OSError as exc:
                self.errors.append(f"connect {address}: {exc!r}")
                time.sleep(0.1)
                continue
            try:
                while not self.stop.is_set():
                    n += 1
                    key, value = f"key:{n}", str(n)
                    if conn.call("SET", key, value) != b"OK":
                        self.errors.append(f"{key}: unexpected reply")
                        break
                    self.acknowledged[key] = value
                    self.acknowledged_at[address] = self.acknowledged_at.get(address, 0) + 1
            except (OSError, ConnectionError) as exc:
                self.errors.append(f"{address}: {exc!r}")
            finally:
                conn.close()


def missing(address: tuple[str, int], acknowledged: dict[str, str]) -> list[str]:
    keys = sorted(acknowledged)
    conn = _Connection(address, timeout=30.0)
    try:
        values: list[Any] = []
        for start in range(0, len(keys), 256):
            values += conn.call("MGET", *keys[start : start + 256])
    finally:
        conn.close()
    return [k for k, v in zip(keys, values, strict=True) if v != acknowledged[k].encode()]


# --------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def operator(cluster: Any) -> Iterator[None]:
    result = helm(
        cluster, "upgrade", "--install", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE,
        "--create-namespace", "--wait", "--timeout", "300s", "--set-json", "operator.pollIntervalSeconds=0.5",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    yield
    cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
    helm(cluster, "uninstall", RELEASE, "--namespace", RELEASE_NAMESPACE, "--wait")


def _apply(cluster: Any, obj: dict[str, Any]) -> None:
    from cluster import build

    binary = build.bin_dir() / "kubectl"
    subprocess.run(
        [str(binary) if binary.exists() else "kubectl", f"--kubeconfig={cluster.kubeconfig}",
         "apply", "-n", NAMESPACE, "-f", "-"],
        input=json.dumps(obj), capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip


def test_switchover_moves_the_primary_without_losing_a_write(
    cluster: Any, kube_api: Any, operator: None
) -> None:
    name = "so"
    vm = {"apiVersion": "colo.dev/v1alpha1", "kind": "ColoVM", "metadata": {"name": name},
          "spec": {"guest": {"memory": "16Mi"}}}  # fmt: skip
    _apply(cluster, vm)
    before = wait_for(
        lambda: (s := status(cluster, name)).get("phase") == "Protected" and s, 240, "Protected"
    )
    primary, secondary = before["primary"], before["secondary"]
    assert primary["node"] != secondary["node"]
    old = wait_for(
        lambda: (e := ready_endpoints(kube_api, NAMESPACE, name)) and e[0][0] == primary["address"] and e[0],
        60,
        "the Service on the primary",
    )

    def endpoint() -> tuple[str, int] | None:
        try:
            found = ready_endpoints(kube_api, NAMESPACE, name)
        except Exception:  # the API server is busy; the next try will do
            return None
        return found[0] if len(found) == 1 else None

    writer = Writer(endpoint)
    writer.start()
    try:
        wait_for(lambda: writer.acknowledged_at.get(old, 0) >= 50, 60, "writes acknowledged by the primary")
        started = time.monotonic()
        result = subprocess.run(
            [str(KUBECTL_COLO), "--kubeconfig", str(cluster.kubeconfig), "-n", NAMESPACE,
             "switchover", name, "--timeout", "90"],
            capture_output=True, text=True, timeout=120, check=False,
            env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
        )  # fmt: skip
        switched_s = time.monotonic() - started
        assert result.returncode == 0, result.stdout + result.stderr
        assert "switched over" in result.stdout, result.stdout
        new = wait_for(
            lambda: (e := endpoint()) is not None and e[0] == secondary["address"] and e,
            60,
            "the Service on the new primary",
        )
        wait_for(
            lambda: writer.acknowledged_at.get(new, 0) >= 50, 60, "writes acknowledged by the new primary"
        )
    finally:
        writer.finish()

    after = status(cluster, name)
    assert after["currentPrimary"] == secondary["pod"]
    assert after["term"] == before["term"] + 1
    assert after["lastFailover"]["kind"] == "Switchover"
    assert after["lastFailover"]["from"] == primary["pod"] and after["lastFailover"]["to"] == secondary["pod"]
    lost = missing(new, writer.acknowledged)
    assert not lost, f"{len(lost)} of {len(writer.acknowledged)} acknowledged writes lost: {lost[:10]}"

    again = wait_for(
        lambda: (s := status(cluster, name)).get("phase") == "Protected" and s, 240, "Protected again"
    )
    assert again["primary"]["pod"] == secondary["pod"]
    assert again["secondary"]["node"] != again["primary"]["node"]
    print(
        f"\nswitchover: kubectl colo switchover returned in {switched_s:.1f}s "
        f"(operator: {after['lastFailover']['durationMs']:.0f} ms from decision to promotion); "
        f"{len(writer.acknowledged)} writes acknowledged ({writer.acknowledged_at.get(old, 0)} on the old "
        f"primary, {writer.acknowledged_at.get(new, 0)} on the new), none lost; "
        f"client errors during the move: {writer.errors[:3]}"
    )
