"""etcd, kube-apiserver, kube-controller-manager and kube-scheduler as local processes.

Everything listens on one address of this machine (loopback by default; the
process-node cluster passes an address of its own bridge so that pods in
network namespaces reach the API server too). Ports are picked free at
start, so several clusters can run side by side. Logs go to
``<workdir>/logs/<component>.log``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import build, pki
from .rest import direct_opener, without_proxies

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "colo-e2e-admin"


class ControlPlaneError(RuntimeError):
    """A component did not start or did not get ready; the message names its log."""


def free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def write_kubeconfig(
    path: Path, server: str, ca: Path, cert: Path, key: Path, user: str, context: str = "colo-e2e"
) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": context, "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": context, "context": {"cluster": context, "user": user}}],
        "current-context": context,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class Component:
    name: str
    argv: list[str]
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=without_proxies(dict(os.environ) if env is None else env),
                start_new_session=True,
            )

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise ControlPlaneError(
                f"{self.name} exited with status {self.process.returncode}; see {self.log}:\n"
                + _tail(self.log)
            )

    def stop(self, timeout: float = 10.0) -> None:
        proc = self.process
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


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class ControlPlane:
    """A single-member control plane in ``workdir``, started by :meth:`start`."""

    workdir: Path
    address: str = "127.0.0.1"
    extra_server_names: tuple[str, ...] = ()
    node_monitor_grace_seconds: int = 6
    controllers: bool = True  # False: etcd and kube-apiserver only
    bin_dir: Path = field(default_factory=build.bin_dir)
    components: list[Component] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pki_dir = self.workdir / "pki"
        self.log_dir = self.workdir / "logs"
        self.log_dir.mkdir(exist_ok=True)
        self.kubeconfig = self.workdir / "admin.kubeconfig"

    @property
    def server(self) -> str:
        return f"https://{self.address}:{self.port}"

    # -- credentials ---------------------------------------------------------

    def _make_pki(self) -> None:
        self.ca = pki.CertificateAuthority(self.pki_dir)
        names = [
            self.address,
            "127.0.0.1",
            "10.96.0.1",
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
            *self.extra_server_names,
        ]
        self.serving = self.ca.issue("apiserver", "kube-apiserver", server_names=dict.fromkeys(names))
        self.sa_keys = pki.service_account_keys(self.pki_dir)
        self.admin = self.ca.issue("admin", ADMIN_USER, ["system:masters"])
        # The controller-manager and scheduler authenticate as the users the
        # bootstrap RBAC policy grants their permissions to, so a missing
        # permission shows up here as it would in a real cluster.
        self.controller_manager = self.ca.issue("controller-manager", "system:kube-controller-manager")
        self.scheduler = self.ca.issue("scheduler", "system:kube-scheduler")

    def client_kubeconfig(self, name: str, pair: pki.KeyPair, user: str) -> Path:
        return write_kubeconfig(
            self.workdir / f"{name}.kubeconfig", self.server, self.ca.cert, pair.cert, pair.key, user
        )

    def issue_node_credentials(self, node: str) -> Path:
        """A kubeconfig for ``node`` as ``system:node:<node>`` (Node authorizer, NodeRestriction)."""
        pair = self.ca.issue(f"node-{node}", f"system:node:{node}", ["system:nodes"])
        return self.client_kubeconfig(f"node-{node}", pair, f"system:node:{node}")

    # -- lifecycle -----------------------------------------------------------

    def start(self, timeout: float = 180.0) -> ControlPlane:
        for binary in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"):
            if not os.access(self.bin_dir / binary, os.X_OK):
                raise ControlPlaneError(f"{self.bin_dir / binary} is missing; run bash .ci/e2e-tools")
        self._make_pki()
        self.port = free_port(self.address)
        etcd_client = free_port("127.0.0.1")
        etcd_peer = free_port("127.0.0.1")
        write_kubeconfig(
            self.kubeconfig, self.server, self.ca.cert, self.admin.cert, self.admin.key, ADMIN_USER
        )
        cm_config = self.client_kubeconfig(
            "controller-manager", self.controller_manager, "system:kube-controller-manager"
        )
        sched_config = self.client_kubeconfig("scheduler", self.scheduler, "system:kube-scheduler")
        b = self.bin_dir
        grace = self.node_monitor_grace_seconds
        self.components = [
            Component(
                "etcd",
                [
                    str(b / "etcd"), "--name=default", f"--data-dir={self.workdir / 'etcd'}",
                    f"--listen-client-urls=http://127.0.0.1:{etcd_client}",
                    f"--advertise-client-urls=http://127.0.0.1:{etcd_client}",
                    f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
                    f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
                    f"--initial-cluster=default=http://127.0.0.1:{etcd_peer}",
                    # A test cluster's data is thrown away; fsync would only
                    # make every write wait for a disk shared with builds.
                    "--unsafe-no-fsync", "--log-level=warn", "--listen-metrics-urls=",
                ],
                self.log_dir / "etcd.log",
            ),
            Component(
                "kube-apiserver",
                [
                    str(b / "kube-apiserver"),
                    f"--etcd-servers=http://127.0.0.1:{etcd_client}",
                    f"--bind-address={self.address}", f"--advertise-address={self.address}",
                    f"--secure-port={self.port}",
                    f"--tls-cert-file={self.serving.cert}", f"--tls-private-key-file={self.serving.key}",
                    f"--client-ca-file={self.ca.cert}",
                    "--authorization-mode=Node,RBAC",
                    "--enable-admission-plugins=NodeRestriction",
                    f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                    f"--service-account-key-file={self.sa_keys.cert}",
                    f"--service-account-signing-key-file={self.sa_keys.key}",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    "--allow-privileged=true",
                    *(
                        # Endpoints may not hold a loopback address, so a
                        # loopback-only API server does not advertise itself.
                        ["--endpoint-reconciler-type=none"]
                        if ipaddress.ip_address(self.address).is_loopback
                        else []
                    ),
                    "--profiling=false",
                    "--v=1",
                ],
                self.log_dir / "kube-apiserver.log",
            ),
            Component(
                "kube-controller-manager",
                [
                    str(b / "kube-controller-manager"),
                    f"--kubeconfig={cm_config}",
                    "--leader-elect=false", "--secure-port=0",
                    "--use-service-account-credentials=true",
                    f"--service-account-private-key-file={self.sa_keys.key}",
                    f"--root-ca-file={self.ca.cert}",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    # Node loss must be seen in seconds, not the default 50 s.
                    "--node-monitor-period=1s",
                    f"--node-monitor-grace-period={grace}s",
                    "--concurrent-endpoint-syncs=5",
                    "--profiling=false",
                    "--v=1",
                ],
                self.log_dir / "kube-controller-manager.log",
            ),
            Component(
                "kube-scheduler",
                [
                    str(b / "kube-scheduler"),
                    f"--kubeconfig={sched_config}",
                    f"--authentication-kubeconfig={sched_config}",
                    f"--authorization-kubeconfig={sched_config}",
                    "--leader-elect=false", "--secure-port=0", "--profiling=false", "--v=1",
                ],
                self.log_dir / "kube-scheduler.log",
            ),
        ]  # fmt: skip
        try:
            self.components[0].start()
            self.components[1].start()
            self._wait_ready(timeout)
            if not self.controllers:
                del self.components[2:]
            for component in self.components[2:]:
                component.start()
        except BaseException:
            self.stop()
            raise
        return self

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca.cert))
        context.load_cert_chain(str(self.admin.cert), str(self.admin.key))
        return context

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """GET ``path`` from the API server as admin; returns (status, body)."""
        request = urllib.request.Request(self.server + path)
        try:
            with direct_opener(self._ssl_context()).open(request, timeout=timeout) as response:
                return int(response.status), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            for component in self.components:
                component.check_alive()
            try:
                status, body = self.get("/readyz", timeout=2.0)
                if status == 200:
                    return
                last = f"HTTP {status}: {body.decode(errors='replace')[-300:]}"
            except (OSError, ssl.SSLError) as exc:
                last = str(exc)
            time.sleep(0.3)
        log = self.log_dir / "kube-apiserver.log"
        raise ControlPlaneError(f"kube-apiserver not ready after {timeout:.0f}s ({last}); see {log}")

    def check_alive(self) -> None:
        for component in self.components:
            component.check_alive()

    def component(self, name: str) -> Component:
        for component in self.components:
            if component.name == name:
                return component
        raise ValueError(f"no component {name!r}")

    def kill_apiserver(self) -> None:
        """An API server outage: kube-apiserver SIGKILLed, etcd and the controllers left running."""
        proc = self.component("kube-apiserver").process
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def restart_apiserver(self, timeout: float = 120.0) -> None:
        """kube-apiserver started again, on the same address and port, and ready."""
        component = self.component("kube-apiserver")
        if component.process is not None and component.process.poll() is None:
            raise ControlPlaneError("kube-apiserver is running")
        component.start()
        self._wait_ready(timeout)

    def stop(self) -> None:
        for component in reversed(self.components):
            component.stop()
