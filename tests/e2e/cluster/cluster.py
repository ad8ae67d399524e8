"""A local Kubernetes cluster: the control plane plus process nodes in network namespaces.

Network layout (``o`` is a free second octet in 10.88-10.95, so several
clusters can run side by side on one machine)::

    root namespace
      bridge cb<id>   10.o.0.1/16 (clients in the root namespace)
                      10.o.0.2/16 (kube-apiserver binds here)
        |-- node-1 netns   eth0 10.o.1.1     runner (kubelet stand-in)
        |     |-- pod netns eth0 10.o.1.10   one per pod
        |     `-- pod netns eth0 10.o.1.11
        |-- node-2 netns   eth0 10.o.2.1 ...

Nothing has a default route; the service CIDR is blackholed everywhere the
cluster has a namespace and in the root namespace, so no packet can leave
the machine. Partitions are blackhole routes inside the affected
namespaces (``10.o.<node>.0/24`` for a node, ``10.o.0.2/32`` for the API
server); a killed node's processes are killed and its links set down.

A host firewall that drops forwarded traffic (Docker's FORWARD policy with
br_netfilter on) would drop frames between the bridge's ports too; one
ACCEPT rule for this bridge only, removed at teardown, lets them through
(``firewall.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import build, firewall, netns
from .controlplane import SERVICE_CIDR, ControlPlane, ControlPlaneError
from .noderunner import SA_MOUNT, NodeSpec
from .rest import ApiError, Kube, without_proxies

E2E_DIR = Path(__file__).resolve().parent.parent
REPO = E2E_DIR.parent.parent
LOCK = Path("/run/colo-e2e.lock")
# One record per running cluster, so that the next cluster can clean up
# after one whose test process died without tearing down.
REGISTRY = Path("/run/colo-e2e")
KVM_RESOURCE = "devices.kubevirt.io/kvm"


class ClusterError(RuntimeError):
    """The cluster could not be set up or did not converge; the message says where to look."""


@dataclass
class ProcessNode:
    name: str
    index: int
    netns: str
    host_veth: str
    ip: str
    spec_path: Path
    log_path: Path
    runner: subprocess.Popen[bytes] | None = None
    blackholes: set[str] = field(default_factory=set)
    killed: bool = False

    @property
    def pod_netns_prefix(self) -> str:
        return self.netns + "-p"

    def namespaces(self) -> list[str]:
        """The node's own namespace and those of its pods."""
        return [self.netns, *netns.list_names(self.pod_netns_prefix)]


def _wait(predicate: Any, timeout: float, what: str, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (ApiError, OSError) as exc:
            last_error = exc
        time.sleep(interval)
    suffix = f" (last error: {last_error})" if last_error else ""
    raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}{suffix}")


@contextlib.contextmanager
def _machine_lock() -> Iterator[None]:
    """Serializes address allocation between clusters started at the same time."""
    with LOCK.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _reap_abandoned() -> None:
    """Tear down clusters whose owning process is gone (killed test runs)."""
    for path in sorted(REGISTRY.glob("*.json")) if REGISTRY.is_dir() else []:
        try:
            record = json.loads(path.read_text())
            owner = int(record["owner"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _alive(owner):
            continue
        ours = (str(build.bin_dir()), "cluster.run_node")
        for pid in record.get("pids", []):
            try:
                cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes().decode(errors="replace")
            except (OSError, ValueError):
                continue
            # Only what this harness started: pids get reused.
            if any(mark in cmdline for mark in ours):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(pid), signal.SIGKILL)
        for name in netns.list_names(str(record.get("prefix", "\0"))):
            netns.delete(name)
        netns.ip("link", "del", str(record.get("bridge")), check=False)
        firewall.close_bridge(str(record.get("bridge")))
        if record.get("metric"):
            netns.unblackhole(None, [SERVICE_CIDR], metric=int(record["metric"]))
        netns.ip("netns", "delete", str(record.get("root_ns")), check=False)
        path.unlink(missing_ok=True)
        print(f"colo-e2e: cleaned up abandoned cluster {path.stem}", file=sys.stderr)


SYSTEM_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


class LocalCluster:
    """Control plane + ``nodes`` process nodes; use as a context manager or start()/stop()."""

    def __init__(
        self,
        nodes: int = 3,
        *,
        workdir: Path | None = None,
        node_monitor_grace_seconds: int = 6,
        keep_logs: bool = False,
        node_resources: dict[str, str] | None = None,
        extra_path: Sequence[str] = (),
    ) -> None:
        if not 1 <= nodes <= 9:
            raise ValueError(f"a local cluster has 1 to 9 nodes, not {nodes}")
        if os.geteuid() != 0:
            raise ClusterError("the local cluster needs root (network namespaces, bridge, mounts)")
        self.node_count = nodes
        self.grace = node_monitor_grace_seconds
        self.keep_logs = keep_logs
        if node_resources is None:
            # What KubeVirt's device plugin advertises where /dev/kvm exists;
            # agent pods of kvm guests request it.
            node_resources = {KVM_RESOURCE: "1k"} if os.path.exists("/dev/kvm") else {}
        self.node_resources = dict(node_resources)
        # Directories put first on the pods' PATH, as an image would have them
        # (e.g. the qemu backend's QEMU bundle).
        self.extra_path = tuple(str(p) for p in extra_path)
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="colo-e2e-"))
        self.id = secrets.token_hex(2)
        self.octet = 0
        self.bridge = f"cb{self.id}"
        self.root_ns = f"colo-root-{self.id}"  # handle on the root namespace, never killed
        self.prefix = f"colo-{self.id}-"
        self.nodes: dict[str, ProcessNode] = {}
        self.control_plane: ControlPlane | None = None
        self._route_metric = 0
        self._started = False

    # -- addresses -----------------------------------------------------------

    @property
    def gateway(self) -> str:
        return f"10.{self.octet}.0.1"

    @property
    def apiserver_ip(self) -> str:
        return f"10.{self.octet}.0.2"

    @property
    def kubeconfig(self) -> Path:
        assert self.control_plane is not None
        return self.control_plane.kubeconfig

    @property
    def server(self) -> str:
        assert self.control_plane is not None
        return self.control_plane.server

    @property
    def node_names(self) -> list[str]:
        return list(self.nodes)

    def admin(self) -> Kube:
        return Kube.from_kubeconfig(self.kubeconfig)

    # -- lifecycle -----------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.stop(failed=exc is not None)

    def start(self, timeout: float = 240.0) -> LocalCluster:
        lacking = build.missing()
        if lacking:
            raise ClusterError(f"binaries not built: {', '.join(lacking)}; run bash .ci/e2e-tools")
        try:
            self._setup_network()
            self.control_plane = ControlPlane(
                self.workdir / "control-plane",
                address=self.apiserver_ip,
                node_monitor_grace_seconds=self.grace,
            ).start(timeout)
            for index in range(1, self.node_count + 1):
                self._start_node(index)
            self._register()
            self._started = True
            self.wait_ready(timeout)
        except BaseException:
            self.stop(failed=True)
            raise
        return self

    def _record(self) -> Path:
        return REGISTRY / f"{self.id}.json"

    def _register(self) -> None:
        pids = (
            [c.process.pid for c in self.control_plane.components if c.process] if self.control_plane else []
        )
        pids += [n.runner.pid for n in self.nodes.values() if n.runner is not None]
        record = {
            "owner": os.getpid(),
            "octet": self.octet,
            "bridge": self.bridge,
            "root_ns": self.root_ns,
            "prefix": self.prefix,
            "metric": self._route_metric,
            "pids": pids,
        }
        REGISTRY.mkdir(exist_ok=True)
        tmp = self._record().with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self._record())

    def _setup_network(self) -> None:
        Path(SA_MOUNT).mkdir(parents=True, exist_ok=True)
        with _machine_lock():
            _reap_abandoned()
            used = netns.ip("-4", "addr", "show") + netns.ip("-4", "route", "show")
            for octet in range(88, 96):
                if f"10.{octet}." not in used:
                    self.octet = octet
                    break
            else:
                raise ClusterError("no free 10.88-10.95 subnet: too many local clusters running")
            # A bridge without an address of its own takes the lowest MAC of
            # its ports and changes it when that port goes (a pod deleted):
            # every namespace's neighbour entry for the gateway and the API
            # server then points at a MAC nobody answers to, for up to a
            # minute. A fixed MAC keeps them valid.
            mac = netns.mac_for(self.gateway)
            netns.ip("link", "add", self.bridge, "address", mac, "type", "bridge")
            netns.ip("addr", "add", f"{self.gateway}/16", "dev", self.bridge)
            netns.ip("addr", "add", f"{self.apiserver_ip}/16", "dev", self.bridge)
            netns.ip("link", "set", self.bridge, "up")
            # Docker (or ufw) may drop forwarded frames, bridged ones included
            # once br_netfilter is on; let this bridge's own ports through.
            firewall.open_bridge(self.bridge)
        netns.ip("netns", "attach", self.root_ns, str(os.getpid()))
        # A metric of our own lets several clusters hold the same blackhole
        # route and each remove only its own.
        self._route_metric = 4000 + self.octet
        netns.blackhole(None, [SERVICE_CIDR], metric=self._route_metric)
        self._register()

    def _start_node(self, index: int) -> ProcessNode:
        assert self.control_plane is not None
        name = f"node-{index}"
        node_dir = self.workdir / "nodes" / name
        node_dir.mkdir(parents=True, exist_ok=True)
        node = ProcessNode(
            name=name,
            index=index,
            netns=f"{self.prefix}n{index}",
            host_veth=f"cv{self.id}{index}n",
            ip=f"10.{self.octet}.{index}.1",
            spec_path=node_dir / "spec.json",
            log_path=node_dir / "runner.log",
        )
        netns.add(node.netns)
        netns.add_veth_to_bridge(None, self.bridge, node.host_veth, node.netns, node.ip, 16)
        netns.blackhole(node.netns, [SERVICE_CIDR])
        kubeconfig = self.control_plane.issue_node_credentials(name)
        venv_bin = Path(sys.executable).parent
        spec = NodeSpec(
            name=name,
            kubeconfig=str(kubeconfig),
            node_ip=node.ip,
            pod_ip_prefix=f"10.{self.octet}.{index}.",
            prefix_len=16,
            bridge=self.bridge,
            root_ns=self.root_ns,
            netns_prefix=node.netns,
            veth_prefix=f"cv{self.id}{index}",
            workdir=str(node_dir),
            ca_file=str(self.control_plane.ca.cert),
            apiserver_host=self.apiserver_ip,
            apiserver_port=self.control_plane.port,
            blackhole_file=str(node_dir / "blackholes.json"),
            path=":".join([*self.extra_path, str(venv_bin), *SYSTEM_PATH]),
            extra_resources=self.node_resources,
        )
        node.spec_path.write_text(json.dumps(dataclasses.asdict(spec), indent=2))
        self._write_blackholes(node)
        self.nodes[name] = node
        self._start_runner(node)
        return node

    def _start_runner(self, node: ProcessNode) -> None:
        env = without_proxies(dict(os.environ))
        env["PYTHONPATH"] = str(E2E_DIR) + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        with node.log_path.open("ab") as out:
            node.runner = subprocess.Popen(
                [
                    "nsenter",
                    f"--net={netns.NETNS_DIR / node.netns}",
                    sys.executable,
                    "-m",
                    "cluster.run_node",
                    str(node.spec_path),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=str(REPO),
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 120.0) -> None:
        kube = self.admin()

        def nodes_ready() -> bool:
            assert self.control_plane is not None
            self.control_plane.check_alive()
            for node in self.nodes.values():
                if node.runner is not None and node.runner.poll() is not None:
                    raise ClusterError(f"runner of {node.name} exited; see {node.log_path}")
            items = kube.get("/api/v1/nodes")["items"]
            ready = {
                n["metadata"]["name"]
                for n in items
                if self._ready(n)
                and not any(
                    t["key"] == "node.kubernetes.io/not-ready" for t in n["spec"].get("taints", []) or []
                )
            }
            return ready >= set(self.nodes)

        try:
            _wait(nodes_ready, timeout, "every node Ready")
            # Pods need the namespace's default ServiceAccount, which the
            # controller-manager creates shortly after it starts.
            _wait(
                lambda: kube.get("/api/v1/namespaces/default/serviceaccounts/default"),
                timeout,
                "the default ServiceAccount",
            )
        except ControlPlaneError as exc:
            raise ClusterError(str(exc)) from exc

    @staticmethod
    def _ready(node: dict[str, Any]) -> bool:
        for condition in node.get("status", {}).get("conditions", []) or []:
            if condition.get("type") == "Ready":
                return bool(condition.get("status") == "True")
        return False

    def node_ready(self, name: str) -> str:
        """The Ready condition's status of ``name`` as the API server has it ("True", "False", "Unknown")."""
        node = self.admin().get(f"/api/v1/nodes/{name}")
        for condition in node.get("status", {}).get("conditions", []) or []:
            if condition.get("type") == "Ready":
                return str(condition.get("status"))
        return "Unknown"

    def stop(self, failed: bool = False) -> None:
        for node in self.nodes.values():
            self._stop_runner(node)
        if self.control_plane is not None:
            self.control_plane.stop()
        for name in netns.list_names(self.prefix):
            netns.delete(name)
        if self.octet:
            netns.ip("link", "del", self.bridge, check=False)
            firewall.close_bridge(self.bridge)
            netns.unblackhole(None, [SERVICE_CIDR], metric=self._route_metric)
        netns.ip("netns", "delete", self.root_ns, check=False)
        self._record().unlink(missing_ok=True)
        if failed or self.keep_logs:
            print(f"\ncolo-e2e: cluster logs kept in {self.workdir}", file=sys.stderr)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _stop_runner(self, node: ProcessNode, timeout: float = 8.0) -> None:
        proc = node.runner
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    # -- faults --------------------------------------------------------------

    def node(self, name: str) -> ProcessNode:
        try:
            return self.nodes[name]
        except KeyError:
            raise ValueError(f"no node {name!r}; nodes are {', '.join(self.nodes)}") from None

    def kill_node(self, name: str) -> None:
        """Power loss: every process of the node dies, its heartbeat stops, its links go down."""
        node = self.node(name)
        if node.runner is not None and node.runner.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.runner.pid, signal.SIGKILL)
            node.runner.wait()
        for ns in node.namespaces():
            netns.kill_all(ns)
        links = netns.ip("-o", "link", "show")
        prefix = f"cv{self.id}{node.index}"
        for line in links.splitlines():
            parts = line.split(":")
            if len(parts) > 1:
                dev = parts[1].strip().split("@", 1)[0]
                if dev.startswith(prefix):
                    netns.set_link(dev, up=False)
        node.killed = True

    def revive_node(self, name: str) -> None:
        """Power a killed node back on: links up, runner restarted; its pods start afresh.

        Like a kubelet after a reboot, the runner finds the pods still bound
        to the node and starts them again in new namespaces.
        """
        node = self.node(name)
        if not node.killed:
            raise ValueError(f"{name} is not killed")
        for ns in netns.list_names(node.pod_netns_prefix):
            netns.delete(ns)
        netns.set_link(node.host_veth, up=True)
        node.killed = False
        self._start_runner(node)

    def kill_pod(self, ip: str) -> None:
        """SIGKILL every process of the pod at ``ip``; its runner restarts the containers per
        ``restartPolicy``, as a kubelet does after a crash."""
        parts = ip.split(".")
        if len(parts) != 4 or parts[:2] != ["10", str(self.octet)]:
            raise ValueError(f"{ip} is not a pod address of this cluster")
        node = self.node(f"node-{parts[2]}")
        netns.kill_all(f"{node.pod_netns_prefix}{parts[3]}")

    def stop_apiserver(self) -> None:
        """An API server outage (kube-apiserver killed); nodes and pods keep running."""
        assert self.control_plane is not None
        self.control_plane.kill_apiserver()

    def start_apiserver(self, timeout: float = 120.0) -> None:
        assert self.control_plane is not None
        self.control_plane.restart_apiserver(timeout)

    def partition(self, a: str, b: str) -> None:
        """Cut traffic between nodes ``a`` and ``b`` (and their pods), both ways."""
        first, second = self.node(a), self.node(b)
        if first is second:
            raise ValueError("a node cannot be partitioned from itself")
        self._add_blackholes(first, [f"10.{self.octet}.{second.index}.0/24"])
        self._add_blackholes(second, [f"10.{self.octet}.{first.index}.0/24"])

    def partition_from_apiserver(self, a: str) -> None:
        """Cut node ``a`` (runner and pods) off from the API server; clients still reach its pods."""
        self._add_blackholes(self.node(a), [f"{self.apiserver_ip}/32"])

    def heal(self) -> None:
        """Remove every partition (killed nodes stay dead)."""
        for node in self.nodes.values():
            cidrs = sorted(node.blackholes)
            node.blackholes.clear()
            self._write_blackholes(node)
            for ns in node.namespaces():
                netns.unblackhole(ns, cidrs)

    def _add_blackholes(self, node: ProcessNode, cidrs: Sequence[str]) -> None:
        node.blackholes.update(cidrs)
        # The runner reads the file for pods it creates later; write it
        # before touching the existing namespaces so none is missed.
        self._write_blackholes(node)
        for ns in node.namespaces():
            netns.blackhole(ns, cidrs)

    def _write_blackholes(self, node: ProcessNode) -> None:
        path = node.spec_path.parent / "blackholes.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps([SERVICE_CIDR, *sorted(node.blackholes)]))
        os.replace(tmp, path)

    # -- helpers for tests ---------------------------------------------------

    def run_in_node(
        self, name: str, argv: Sequence[str], timeout: float = 30.0, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside node ``name``'s network namespace (e.g. a client on that node)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.node(name).netns, *argv],
            env=without_proxies(dict(os.environ)),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def pod_log(self, namespace: str, pod: str, container: str) -> str:
        """The output of ``container`` of the newest pod named ``namespace/pod`` ("" if none yet)."""
        logs = list(self.workdir.glob(f"nodes/*/pods/{namespace}_{pod}_*/{container}.log"))
        if not logs:
            return ""
        return max(logs, key=lambda p: p.stat().st_mtime).read_text(errors="replace")

    def logs(self) -> list[Path]:
        """Every log file of the cluster (control plane, runners, containers)."""
        return sorted(self.workdir.rglob("*.log"))
