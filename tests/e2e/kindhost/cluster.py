"""A kind cluster of the offline node image: one control plane, N workers, pod routes, host routes.

Pod network: kindnetd (kind's default CNI) is not buildable offline, so
each node gets the reference CNI plugins (Debian's ``bridge`` with
``host-local`` IPAM on the node's ``spec.podCIDR``, ``portmap``) and a route
to every other node's pod subnet via that node's address on the kind
network. That is the whole of kindnet's job on one L2 network, with parts
that exist here; it does not enforce NetworkPolicy (nothing here does).

Host side: the tests reach pods by endpoint (pod) addresses, so the host
routes each node's pod subnet to that node; the rest of the pod CIDR and
the whole service CIDR are blackholed while the cluster runs, so a client
that tries a ClusterIP or a stale pod address fails at once and sends
nothing anywhere else. The kubeconfig points at the API server's own
address on the kind network (no port forward). ``stop()`` deletes the
cluster, its Docker network and the host routes; ``start()`` first removes
what an earlier, interrupted run left behind.

On machines without ``CAP_SYS_RESOURCE`` in the bounding set (see
``dockerhost.engine``) the nodes' containerd also needs
``restrict_oom_score_adj = true`` (it may not lower a process's OOM score
there); the cluster configuration patches it in only on such machines.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from dockerhost.engine import Engine, EngineError, lacks_cap_sys_resource

from . import build

NAME = "colo-e2e"
NETWORK = "colo-kind"
POD_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.112.0.0/16"
STATE_DIR = Path("/run/colo-kind")

CNI_CONFIG = {
    "cniVersion": "0.4.0",
    "name": "colo-pods",
    "plugins": [
        {
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": True,
            "ipMasq": False,
            "hairpinMode": True,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": "SUBNET"}]],
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        },
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ],
}


def config(workers: int, quirk: bool) -> str:
    """The kind cluster configuration (YAML is a superset of JSON)."""
    cluster_patch = (
        "kind: ClusterConfiguration\n"
        f"imageRepository: {build.IMAGE_REPOSITORY}\n"
        f"etcd:\n  local:\n    imageTag: {build.ETCD_IMAGE_TAG}\n"
        # (kind writes kubeadm's v1beta3 for this version: extraArgs is a map.)
        "controllerManager:\n  extraArgs:\n"
        # See node loss in seconds, as the local driver does.
        '    node-monitor-grace-period: "8s"\n'
        '    node-monitor-period: "1s"\n'
    )
    # Renew the node Lease every second (a quarter of its duration), so a
    # short grace period never marks a live node NotReady.
    kubelet_patch = "kind: KubeletConfiguration\nnodeLeaseDurationSeconds: 4\nnodeStatusUpdateFrequency: 2s\n"
    body: dict[str, Any] = {
        "kind": "Cluster",
        "apiVersion": "kind.x-k8s.io/v1alpha4",
        "name": NAME,
        "networking": {"disableDefaultCNI": True, "podSubnet": POD_CIDR, "serviceSubnet": SERVICE_CIDR},
        "kubeadmConfigPatches": [cluster_patch, kubelet_patch],
        "nodes": [{"role": "control-plane"}] + [{"role": "worker"} for _ in range(workers)],
    }
    if quirk:
        body["containerdConfigPatches"] = [
            '[plugins."io.containerd.grpc.v1.cri"]\n  restrict_oom_score_adj = true\n'
        ]
    return json.dumps(body, indent=2)


class KindCluster:
    def __init__(self, engine: Engine, workers: int = 3, name: str = NAME) -> None:
        self.engine = engine
        self.workers = workers
        self.name = name
        self.kubeconfig = STATE_DIR / f"{name}.kubeconfig"
        self.host_routes: list[str] = []
        self.nodes: dict[str, dict[str, str]] = {}  # name -> {"ip", "podCIDR"}

    # ------------------------------------------------------------------ commands

    def _env(self) -> dict[str, str]:
        return {**os.environ, **self.engine.env, "KIND_EXPERIMENTAL_DOCKER_NETWORK": NETWORK}

    def kind(self, *args: str, timeout: float = 600, **kw: Any) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(build.kind_binary()), *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kw,
        )
        if done.returncode != 0:
            raise EngineError(
                f"kind {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-3000:]}"
            )
        return done

    def kubectl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        from cluster import build as cluster_build

        done = subprocess.run(
            [str(cluster_build.bin_dir() / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise EngineError(f"kubectl {' '.join(args)} failed: {done.stderr.strip()[-2000:]}")
        return done

    def node_exec(
        self, node: str, *argv: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["docker", "exec", node, *argv],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise EngineError(f"{node}: {' '.join(argv)} failed: {done.stderr.strip()[-2000:]}")
        return done

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> float:
        """Create the cluster and its routes; returns the seconds ``kind create cluster`` took."""
        self.stop()
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        quirk = lacks_cap_sys_resource()
        started = time.monotonic()
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="colo-kind-") as f:
            f.write(config(self.workers, quirk))
            f.flush()
            self.kind(
                "create",
                "cluster",
                "--name",
                self.name,
                "--image",
                build.node_image(),
                "--config",
                f.name,
                "--kubeconfig",
                str(self.kubeconfig),
                "--retain",
            )
        created = time.monotonic() - started
        self._route_host(blackholes_only=True)
        self._point_kubeconfig_at_the_api_server()
        self.setup_network()
        self.wait_ready()
        return created

    def stop(self) -> None:
        """Delete the cluster, its network and host routes (also those of an interrupted run)."""
        listed = subprocess.run(
            [str(build.kind_binary()), "get", "clusters"],
            env=self._env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if self.name in listed.stdout.split():
            self.kind("delete", "cluster", "--name", self.name, timeout=300)
        self._unroute_host()
        subprocess.run(
            ["docker", "network", "rm", NETWORK], env=self._env(), capture_output=True, check=False
        )
        self.kubeconfig.unlink(missing_ok=True)

    def _point_kubeconfig_at_the_api_server(self) -> None:
        """kind's kubeconfig reaches the API server through a port on 127.0.0.1; use its real address."""
        control_plane = f"{self.name}-control-plane"
        ip = self.node_ip(control_plane)
        self.kubectl("config", "set-cluster", f"kind-{self.name}", f"--server=https://{ip}:6443")

    def node_ip(self, node: str) -> str:
        done = subprocess.run(
            [
                "docker",
                "inspect",
                "--format",
                f'{{{{(index .NetworkSettings.Networks "{NETWORK}").IPAddress}}}}',
                node,
            ],
            env=self._env(),
            capture_output=True,
            text=True,
            check=False,
        )
        ip = done.stdout.strip()
        if done.returncode != 0 or not ip:
            raise EngineError(f"no address of {node} on {NETWORK}: {done.stderr.strip()}")
        return ip

    def node_names(self) -> list[str]:
        return sorted(self.nodes)

    def worker_names(self) -> list[str]:
        return sorted(n for n in self.nodes if not n.endswith("-control-plane"))

    # ------------------------------------------------------------------ network

    def _read_nodes(self) -> None:
        listing = json.loads(self.kubectl("get", "nodes", "-o", "json").stdout)
        for item in listing["items"]:
            name = item["metadata"]["name"]
            cidr = item["spec"].get("podCIDR")
            if not cidr:
                raise EngineError(f"node {name} has no podCIDR yet")
            self.nodes[name] = {"ip": self.node_ip(name), "podCIDR": cidr}

    def setup_network(self, only: str | None = None) -> None:
        """Pod networking on every node (or re-done for ``only``, e.g. after a restart), and host routes."""
        deadline = time.monotonic() + 60
        while True:
            try:
                self._read_nodes()
                break
            except EngineError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        for name, node in self.nodes.items():
            if only is None or name == only:
                cni = json.loads(json.dumps(CNI_CONFIG).replace("SUBNET", node["podCIDR"]))
                subprocess.run(
                    [
                        "docker",
                        "exec",
                        "-i",
                        name,
                        "sh",
                        "-c",
                        "mkdir -p /etc/cni/net.d && cat > /etc/cni/net.d/10-colo-pods.conflist",
                    ],
                    input=json.dumps(cni, indent=2),
                    env=self._env(),
                    capture_output=True,
                    text=True,
                    check=True,
                )
            for peer, other in self.nodes.items():
                if peer != name and (only is None or only in (name, peer)):
                    self.node_exec(name, "ip", "route", "replace", other["podCIDR"], "via", other["ip"])
        self._route_host()

    def _route_host(self, blackholes_only: bool = False) -> None:
        routes = [f"blackhole {SERVICE_CIDR}", f"blackhole {POD_CIDR}"]
        if not blackholes_only:
            routes += [f"{node['podCIDR']} via {node['ip']}" for node in self.nodes.values()]
        for route in routes:
            subprocess.run(
                ["ip", "route", "replace", *route.split()], capture_output=True, text=True, check=True
            )
            if route not in self.host_routes:
                self.host_routes.append(route)
        (STATE_DIR / f"{self.name}.routes.json").write_text(json.dumps(self.host_routes))

    def _unroute_host(self) -> None:
        saved = STATE_DIR / f"{self.name}.routes.json"
        routes = list(self.host_routes)
        if saved.exists():
            routes += [r for r in json.loads(saved.read_text()) if r not in routes]
        for route in routes:
            prefix = route.split()[1] if route.startswith("blackhole") else route.split()[0]
            ipaddress.ip_network(prefix)  # only ever one of ours
            subprocess.run(["ip", "route", "del", *route.split()], capture_output=True, check=False)
        saved.unlink(missing_ok=True)
        self.host_routes = []

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            listing = json.loads(self.kubectl("get", "nodes", "-o", "json").stdout)
            ready = [
                i["metadata"]["name"]
                for i in listing["items"]
                if any(
                    c["type"] == "Ready" and c["status"] == "True" for c in i["status"].get("conditions", [])
                )
            ]
            if len(ready) == self.workers + 1:
                return
            if time.monotonic() > deadline:
                raise EngineError(f"only {sorted(ready)} Ready after {timeout:.0f}s")
            time.sleep(1)

    def export_logs(self, directory: Path) -> None:
        subprocess.run(
            [str(build.kind_binary()), "export", "logs", str(directory), "--name", self.name],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    # ------------------------------------------------------------------ images and faults

    def load_image(self, image: str) -> float:
        started = time.monotonic()
        # Only the workers run agent and operator pods (the control plane keeps its taint).
        self.kind(
            "load", "docker-image", image, "--name", self.name, "--nodes", ",".join(self.worker_names())
        )
        return time.monotonic() - started

    def kill_node(self, node: str) -> None:
        """Power loss: SIGKILL to the node's container (its kubelet, containerd and pods with it)."""
        subprocess.run(["docker", "kill", node], env=self._env(), capture_output=True, text=True, check=True)

    def revive_node(self, node: str) -> None:
        """Boot the node again (``docker start``) and redo its pod network."""
        subprocess.run(["docker", "start", node], env=self._env(), capture_output=True, text=True, check=True)
        self.setup_network(only=node)
