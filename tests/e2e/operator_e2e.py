"""What the operator's end-to-end tests share: waiting, helm, and a writer that records what a
Service acknowledged."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from support.resp import RespClient, RespError

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "colo-operator"
RELEASE, RELEASE_NAMESPACE = "colo", "colo-system"
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


def with_chart_values(cluster: Any, args: tuple[str, ...]) -> tuple[str, ...]:
    """`helm install/upgrade` args plus what points the chart at the image under test (kind)."""
    if args and args[0] in ("install", "upgrade"):
        return (*args, *getattr(cluster, "chart_values", ()))
    return args


def helm(cluster: Any, *args: str) -> subprocess.CompletedProcess[str]:
    from cluster import build

    binary = build.bin_dir() / "helm"
    return subprocess.run(
        [str(binary) if binary.exists() else "helm", f"--kubeconfig={cluster.kubeconfig}",
         *with_chart_values(cluster, args)],
        capture_output=True, text=True, timeout=400, check=False,
    )  # fmt: skip


# --------------------------------------------------------------------------- the operator and ColoVMs


def operator_installed(cluster: Any, namespace: str) -> Iterator[None]:
    """For a module's `operator` fixture: the chart installed (the operator polling every half
    second) and `namespace` created for the test's ColoVMs; both removed after."""
    result = helm(
        cluster, "upgrade", "--install", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE,
        "--create-namespace", "--wait", "--timeout", "300s", "--set-json", "operator.pollIntervalSeconds=0.5",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    cluster.kubectl("create", "namespace", namespace, check=False)
    yield
    cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    helm(cluster, "uninstall", RELEASE, "--namespace", RELEASE_NAMESPACE, "--wait")


def cvm_status(cluster: Any, namespace: str, name: str) -> dict[str, Any]:
    """The ColoVM's status ({} while it has none, or does not exist)."""
    result = cluster.kubectl("get", "cvm", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(result.stdout).get("status") or {} if result.returncode == 0 else {}


def ready_addresses(cluster: Any, namespace: str, service: str) -> list[str]:
    """The ready endpoint addresses of a Service, from its EndpointSlices ([] if none)."""
    result = cluster.kubectl(
        "get", "endpointslices", "-n", namespace, "-l", f"kubernetes.io/service-name={service}", "-o", "json",
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


def kubectl_apply(cluster: Any, namespace: str, obj: dict[str, Any]) -> None:
    from cluster import build

    binary = build.bin_dir() / "kubectl"
    subprocess.run(
        [str(binary) if binary.exists() else "kubectl", f"--kubeconfig={cluster.kubeconfig}",
         "apply", "-n", namespace, "-f", "-"],
        input=json.dumps(obj), capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip


def colovm(name: str, **spec: Any) -> dict[str, Any]:
    """A ColoVM of a 16 MiB guest; `spec` adds to (or replaces parts of) its spec."""
    return {"apiVersion": "colo.dev/v1alpha1", "kind": "ColoVM", "metadata": {"name": name},
            "spec": {"guest": {"memory": "16Mi"}, **spec}}  # fmt: skip


def wall_time(stamp: str) -> float:
    """Seconds since the epoch of an RFC 3339 time as status and JSON logs write it."""
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def logged_at(log: str, needle: str) -> float | None:
    """Wall time of the first agent log line containing `needle` (JSON lines, or text in local time)."""
    for line in log.splitlines():
        if needle not in line:
            continue
        if line.startswith("{"):
            return wall_time(json.loads(line)["time"])
        return dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


# --------------------------------------------------------------------------- checking writes


def missing(address: tuple[str, int], acknowledged: dict[str, str]) -> list[str]:
    keys = sorted(acknowledged)
    with RespClient.connect(*address, timeout=30.0) as conn:
        values = conn.mget(keys)
    return [k for k, v in zip(keys, values, strict=True) if v != acknowledged[k].encode()]


# --------------------------------------------------------------------------- the test


@dataclass
class Writer:
    """Writes `<prefix>:n` = n in order through `endpoint()` (the address to use now, or None),
    reconnecting when a connection fails or a reply does not come within `reply_timeout` (a
    primary that stopped releasing output holds replies back). Records every acknowledgement,
    when (monotonic) it arrived and which address gave it."""

    prefix: str
    endpoint: Callable[[], tuple[str, int] | None]
    reply_timeout: float = 5.0
    acknowledged: dict[str, str] = field(default_factory=dict)
    ack_times: list[float] = field(default_factory=list)  # in order
    ack_at: dict[str, float] = field(default_factory=dict)
    acks_by_address: dict[tuple[str, int], int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Writer:
        self.thread = threading.Thread(target=self._run, name=f"resp-writer-{self.prefix}", daemon=True)
        self.thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(60)
            assert not self.thread.is_alive(), f"writer {self.prefix} did not stop"

    def acks_after(self, moment: float) -> int:
        return sum(1 for t in list(self.ack_times) if t > moment)

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            address = self.endpoint()
            if address is None:
                time.sleep(0.1)
                continue
            try:
                conn = RespClient.connect(*address, timeout=self.reply_timeout)
            except OSError as exc:
                self.errors.append(f"connect {address}: {exc!r}")
                time.sleep(0.1)
                continue
            try:
                while not self.stop.is_set():
                    n += 1
                    key, value = f"{self.prefix}:{n}", str(n)
                    if conn.call("SET", key, value) != b"OK":
                        self.errors.append(f"{key}: unexpected reply")
                        break
                    now = time.monotonic()
                    self.acknowledged[key] = value
                    self.ack_times.append(now)
                    self.ack_at[key] = now
                    self.acks_by_address[address] = self.acks_by_address.get(address, 0) + 1
            except (OSError, RespError) as exc:
                self.errors.append(f"{address}: {exc!r}")
                time.sleep(0.1)
            finally:
                conn.close()
