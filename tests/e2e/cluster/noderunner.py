"""A process node's kubelet: runs the pods bound to one Node as local processes.

Started by the harness as ``nsenter --net=<node netns> python -m
cluster.run_node <spec.json>``, so its own API traffic leaves through the
node's link (a partition from the API server cuts it like it would cut a
kubelet) while it shares the host's mount namespace (the pods' named
network namespaces must be visible to the harness, which kills them when
the node is killed).

What it does, per tick (``TICK`` seconds):

- renews the node Lease in ``kube-node-lease`` and, less often, the Node's
  Ready condition, both as ``system:node:<name>`` (Node authorizer), from a
  thread of its own, as a kubelet's node lease controller is independent of
  its pod workers: a tick of pod work that takes seconds on a loaded machine
  (dozens of pods to probe and report) must not make the node look lost;
- lists the pods bound to the node and, for each new one, creates a network
  namespace with its own veth on the cluster bridge and address (so pods
  never collide on ports), writes a bound service-account token from the
  TokenRequest API into the pod's directory, resolves env (values,
  ``fieldRef``, ``secretKeyRef``, ``configMapKeyRef``, ``$(VAR)``
  expansion) and starts each container's ``command``/``args`` as a
  process inside that namespace; the token directory is bind-mounted onto
  ``/var/run/secrets/kubernetes.io/serviceaccount`` in a private mount
  namespace, where in-cluster config looks for it, as in a real pod;
  ``secret`` volumes are written into the pod's directory and bind-mounted
  the same way, an ``emptyDir`` is a directory of the pod's (a tmpfs of
  ``sizeLimit`` when its medium is Memory, as the kubelet makes it);
- runs startup, readiness and liveness probes (httpGet, tcpSocket, exec),
  restarts exited containers per ``restartPolicy`` (backoff 1 s doubling
  to 10 s, shorter than a kubelet's so tests do not wait minutes), and
  reports podIP, phase, container states and the Ready conditions;
- on deletion sends SIGTERM, then SIGKILL after the grace period, removes
  the namespace and finalizes the delete with grace period 0.

Not supported, and reported as such where it matters: images (the command
must exist on the host; ``.venv/bin`` is on PATH), volumes other than the
service-account token, ``secret`` and ``emptyDir``, init and ephemeral
containers, resource limits, securityContext (processes run as root).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import netns
from .rest import JSON, ApiError, Kube, direct_opener

TICK = 0.25
NODE_STATUS_EVERY = 4.0
TOKEN_SECONDS = 3607
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
MAX_BACKOFF = 10.0
SETUP_RETRY = 1.0
PROJECT_ROOT = Path(__file__).resolve().parents[3]
# Where a pod's mount namespace parks host paths that a volume is about to cover.
KEEP_DIR = "/run/colo-e2e/keep"


def _hidden_by(mount_path: str, paths: list[str]) -> list[str]:
    """The paths a mount at ``mount_path`` would hide, outermost only."""
    target = Path(mount_path)
    under = sorted({p for p in paths if Path(p) == target or target in Path(p).parents})
    return [p for p in under if not any(Path(q) in Path(p).parents for q in under)]


log = logging.getLogger("noderunner")


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class NodeSpec:
    """What the harness tells a runner; written as JSON next to the node's logs."""

    name: str
    kubeconfig: str
    node_ip: str
    pod_ip_prefix: str  # e.g. "10.88.1." — pods get .10 upwards
    prefix_len: int
    bridge: str
    root_ns: str
    netns_prefix: str  # pod namespaces are <prefix>-p<slot>
    veth_prefix: str  # host ends are <prefix>p<slot>
    workdir: str
    ca_file: str
    apiserver_host: str
    apiserver_port: int
    blackhole_file: str
    path: str
    heartbeat_seconds: float = 1.0
    lease_seconds: int = 40
    # Extended resources a device plugin would advertise (e.g. KubeVirt's
    # devices.kubevirt.io/kvm), added to capacity and allocatable.
    extra_resources: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> NodeSpec:
        return cls(**json.loads(path.read_text()))


# -- probes -------------------------------------------------------------------


@dataclass
class Probe:
    spec: JSON
    started: float
    successes: int = 0
    failures: int = 0
    next_due: float = 0.0
    ok: bool = False  # latched state (threshold reached)

    def __post_init__(self) -> None:
        self.next_due = self.started + float(self.spec.get("initialDelaySeconds", 0))

    @property
    def period(self) -> float:
        return float(self.spec.get("periodSeconds", 10))

    @property
    def timeout(self) -> float:
        return float(self.spec.get("timeoutSeconds", 1))

    def record(self, success: bool) -> None:
        if success:
            self.successes += 1
            self.failures = 0
            if self.successes >= int(self.spec.get("successThreshold", 1)):
                self.ok = True
        else:
            self.failures += 1
            self.successes = 0
            if self.failures >= int(self.spec.get("failureThreshold", 3)):
                self.ok = False

    @property
    def failed(self) -> bool:
        return self.failures >= int(self.spec.get("failureThreshold", 3))


def _port(value: Any, container: JSON) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    for port in container.get("ports", []) or []:
        if port.get("name") == value:
            return int(port["containerPort"])
    raise ValueError(f"probe port {value!r} is neither a number nor a named port of the container")


# -- pods ---------------------------------------------------------------------


@dataclass
class Container:
    spec: JSON
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    restart_count: int = 0
    started_at: str | None = None
    state: JSON = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: JSON = field(default_factory=dict)
    next_start: float = 0.0
    readiness: Probe | None = None
    liveness: Probe | None = None
    startup: Probe | None = None
    done: bool = False  # terminated and will not restart

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def ready(self) -> bool:
        if not self.running or (self.startup is not None and not self.startup.ok):
            return False
        return self.readiness.ok if self.readiness is not None else True


@dataclass
class PodRun:
    uid: str
    namespace: str
    name: str
    slot: int
    netns: str
    ip: str
    host_veth: str
    directory: Path
    containers: list[Container]
    env: dict[str, dict[str, str]] = field(default_factory=dict)  # per container
    token_dir: Path | None = None
    # Volume name -> ("bind", host directory) or ("tmpfs", size in bytes).
    volumes: dict[str, tuple[str, str]] = field(default_factory=dict)
    token_refresh_at: float = 0.0
    terminating_deadline: float | None = None
    started_at: str = field(default_factory=now_rfc3339)
    last_status: str | None = None
    setup_error: str | None = None
    retry_at: float = 0.0
    pod: JSON = field(default_factory=dict)  # as last listed


class NodeRunner:
    def __init__(self, spec: NodeSpec) -> None:
        self.spec = spec
        self.kube = Kube.from_kubeconfig(Path(spec.kubeconfig))
        self.node_kube = Kube.from_kubeconfig(Path(spec.kubeconfig))  # the heartbeat thread's own
        self.workdir = Path(spec.workdir)
        self.pods: dict[str, PodRun] = {}
        self.last_node_status = 0.0
        self.last_lease = 0.0
        self.registered = False
        self.stopping = False

    # -- node object and heartbeat -------------------------------------------

    def _node_status(self) -> JSON:
        stamp = now_rfc3339()

        def condition(kind: str, status: str, reason: str, message: str) -> JSON:
            return {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": stamp,
                "lastTransitionTime": stamp,
            }

        # Roomy: process nodes enforce no limits, and the scale benchmarks place
        # dozens of Guaranteed agent pods (1 CPU each by default) on three nodes.
        resources = {"cpu": "64", "memory": "256Gi", "pods": "110", "ephemeral-storage": "20Gi"}
        resources.update(self.spec.extra_resources)
        return {
            "capacity": resources,
            "allocatable": resources,
            "addresses": [
                {"type": "InternalIP", "address": self.spec.node_ip},
                {"type": "Hostname", "address": self.spec.name},
            ],
            "conditions": [
                condition("Ready", "True", "KubeletReady", "process node runner is posting ready status"),
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "ok"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "ok"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "ok"),
            ],
            "nodeInfo": {
                "machineID": self.spec.name,
                "systemUUID": self.spec.name,
                "bootID": self.spec.name,
                "kernelVersion": os.uname().release,
                "osImage": "colo-e2e process node",
                "containerRuntimeVersion": "process://0.1",
                "kubeletVersion": "v1.34.4",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }

    def register(self) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.spec.name,
                "labels": {
                    "kubernetes.io/hostname": self.spec.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "colo.dev/process-node": "true",
                },
            },
            "status": self._node_status(),
        }
        try:
            self.node_kube.post("/api/v1/nodes", body)
        except ApiError as exc:
            if exc.status != 409:
                raise
        self.registered = True
        self._post_node_status()
        log.info("node %s registered", self.spec.name)

    def _post_node_status(self) -> None:
        self.node_kube.patch(f"/api/v1/nodes/{self.spec.name}/status", {"status": self._node_status()})
        self.last_node_status = time.monotonic()

    def _renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.spec.name}"
        spec = {
            "holderIdentity": self.spec.name,
            "leaseDurationSeconds": self.spec.lease_seconds,
            "renewTime": now_micro(),
        }
        try:
            lease = self.node_kube.get(path)
        except ApiError as exc:
            if exc.status != 404:
                raise
            node = self.node_kube.get(f"/api/v1/nodes/{self.spec.name}")
            owner = {
                "apiVersion": "v1",
                "kind": "Node",
                "name": self.spec.name,
                "uid": node["metadata"]["uid"],
            }
            self.node_kube.post(
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                {"metadata": {"name": self.spec.name, "ownerReferences": [owner]}, "spec": spec},
            )
        else:
            lease["spec"].update(spec)
            self.node_kube.put(path, lease)
        self.last_lease = time.monotonic()

    def heartbeat(self) -> None:
        now = time.monotonic()
        if not self.registered:
            self.register()
        if now - self.last_lease >= self.spec.heartbeat_seconds:
            self._renew_lease()
        if now - self.last_node_status >= NODE_STATUS_EVERY:
            self._post_node_status()

    # -- pod setup -----------------------------------------------------------

    def _blackholes(self) -> list[str]:
        try:
            return list(json.loads(Path(self.spec.blackhole_file).read_text()))
        except (OSError, ValueError):
            return []

    def _free_slot(self) -> int:
        used = {p.slot for p in self.pods.values()}
        existing = set(netns.list_names(self.spec.netns_prefix + "-p"))
        for slot in range(10, 250):
            if slot not in used and f"{self.spec.netns_prefix}-p{slot}" not in existing:
                return slot
        raise RuntimeError("no free pod address on this node (240 in use)")

    def _admit(self, pod: JSON) -> PodRun:
        meta = pod["metadata"]
        slot = self._free_slot()
        directory = self.workdir / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"
        directory.mkdir(parents=True, exist_ok=True)
        run = PodRun(
            uid=meta["uid"],
            namespace=meta["namespace"],
            name=meta["name"],
            slot=slot,
            netns=f"{self.spec.netns_prefix}-p{slot}",
            ip=f"{self.spec.pod_ip_prefix}{slot}",
            host_veth=f"{self.spec.veth_prefix}p{slot}",
            directory=directory,
            containers=[
                Container(spec=c, log_path=directory / f"{c['name']}.log") for c in pod["spec"]["containers"]
            ],
        )
        self.pods[run.uid] = run
        try:
            self._setup_network(run)
            if pod["spec"].get("automountServiceAccountToken", True) is not False:
                self._write_token(run, pod)
            self._prepare_volumes(run, pod)
            run.env = self._pod_env(run, pod)
        except (ApiError, netns.NetnsError, OSError, ValueError, KeyError) as exc:
            # Often transient: the Node authorizer learns of a new pod's
            # secrets and service account a moment after it is bound.
            run.setup_error = str(exc)
            run.retry_at = time.monotonic() + SETUP_RETRY
            log.warning("pod %s/%s cannot start (retrying): %s", run.namespace, run.name, exc)
        return run

    def _setup_network(self, run: PodRun) -> None:
        netns.delete(run.netns)
        netns.add(run.netns)
        netns.add_veth_to_bridge(
            self.spec.root_ns, self.spec.bridge, run.host_veth, run.netns, run.ip, self.spec.prefix_len
        )
        netns.blackhole(run.netns, self._blackholes())

    def _write_token(self, run: PodRun, pod: JSON) -> None:
        account = pod["spec"].get("serviceAccountName") or "default"
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": TOKEN_SECONDS,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": run.name, "uid": run.uid},
            },
        }
        answer = self.kube.post(
            f"/api/v1/namespaces/{run.namespace}/serviceaccounts/{account}/token", request
        )
        token = answer["status"]["token"]
        directory = run.directory / "serviceaccount"
        directory.mkdir(exist_ok=True)
        for name, content in (
            ("token", token),
            ("namespace", run.namespace),
            ("ca.crt", Path(self.spec.ca_file).read_text()),
        ):
            tmp = directory / f".{name}.tmp"
            tmp.write_text(content)
            tmp.chmod(0o644)
            os.replace(tmp, directory / name)
        run.token_dir = directory
        # Refresh at 80 % of the lifetime, as the kubelet does.
        run.token_refresh_at = time.monotonic() + 0.8 * TOKEN_SECONDS

    def _prepare_volumes(self, run: PodRun, pod: JSON) -> None:
        for volume in pod["spec"].get("volumes") or []:
            name = volume["name"]
            if "secret" in volume:
                source = volume["secret"]
                obj = self.kube.get(f"/api/v1/namespaces/{run.namespace}/secrets/{source['secretName']}")
                directory = run.directory / "volumes" / name
                directory.mkdir(parents=True, exist_ok=True)
                data = obj.get("data") or {}
                items = source.get("items") or [{"key": k, "path": k} for k in data]
                mode = int(source.get("defaultMode", 0o644))
                for item in items:
                    target = directory / item["path"]
                    tmp = directory / f".{item['path']}.tmp"
                    tmp.write_bytes(base64.b64decode(data[item["key"]]))
                    tmp.chmod(int(item.get("mode", mode)))
                    os.replace(tmp, target)
                run.volumes[name] = ("bind", str(directory))
            elif "emptyDir" in volume:
                empty = volume["emptyDir"] or {}
                if empty.get("medium") == "Memory":
                    limit = empty.get("sizeLimit")
                    run.volumes[name] = ("tmpfs", str(_quantity_bytes(limit) if limit else 0))
                else:
                    directory = run.directory / "volumes" / name
                    directory.mkdir(parents=True, exist_ok=True)
                    run.volumes[name] = ("bind", str(directory))

    def _lookup(self, kind: str, namespace: str, ref: JSON) -> str | None:
        name, key = ref.get("name"), ref.get("key")
        try:
            obj = self.kube.get(f"/api/v1/namespaces/{namespace}/{kind}/{name}")
        except ApiError as exc:
            if exc.status == 404 and ref.get("optional"):
                return None
            raise
        data = obj.get("data") or {}
        if key not in data:
            if ref.get("optional"):
                return None
            raise KeyError(f"{kind[:-1]} {namespace}/{name} has no key {key!r}")
        value = data[key]
        return base64.b64decode(value).decode() if kind == "secrets" else str(value)

    def _pod_env(self, run: PodRun, pod: JSON) -> dict[str, dict[str, str]]:
        meta, spec = pod["metadata"], pod["spec"]
        env = {
            "PATH": self.spec.path,
            "HOME": "/root",
            "HOSTNAME": run.name,
            "LANG": "C.UTF-8",
            # In-cluster config must reach the API server's real address:
            # the `kubernetes` Service's ClusterIP is blackholed here.
            "KUBERNETES_SERVICE_HOST": self.spec.apiserver_host,
            "KUBERNETES_SERVICE_PORT": str(self.spec.apiserver_port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(self.spec.apiserver_port),
            "KUBERNETES_PORT": f"tcp://{self.spec.apiserver_host}:{self.spec.apiserver_port}",
            "COLO_E2E_POD_DIR": str(run.directory),
        }
        if run.token_dir is not None:
            env["COLO_E2E_SERVICEACCOUNT_DIR"] = str(run.token_dir)
        fields = {
            "metadata.name": run.name,
            "metadata.namespace": run.namespace,
            "metadata.uid": run.uid,
            "spec.nodeName": self.spec.name,
            "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
            "status.podIP": run.ip,
            "status.podIPs": run.ip,
            "status.hostIP": self.spec.node_ip,
            "status.hostIPs": self.spec.node_ip,
        }
        per_container: dict[str, dict[str, str]] = {}
        for container in run.containers:
            cenv = dict(env)
            for source in container.spec.get("envFrom", []) or []:
                prefix = source.get("prefix", "")
                for kind, key in (("configmaps", "configMapRef"), ("secrets", "secretRef")):
                    if key in source:
                        ref = source[key]
                        try:
                            obj = self.kube.get(f"/api/v1/namespaces/{run.namespace}/{kind}/{ref['name']}")
                        except ApiError as exc:
                            if exc.status == 404 and ref.get("optional"):
                                continue
                            raise
                        for k, v in (obj.get("data") or {}).items():
                            cenv[prefix + k] = base64.b64decode(v).decode() if kind == "secrets" else v
            for item in container.spec.get("env", []) or []:
                name = item["name"]
                if "value" in item:
                    cenv[name] = _expand(str(item["value"]), cenv)
                elif "valueFrom" in item:
                    source = item["valueFrom"]
                    value: str | None
                    if "fieldRef" in source:
                        path = source["fieldRef"]["fieldPath"]
                        value = _field(path, fields, meta)
                    elif "secretKeyRef" in source:
                        value = self._lookup("secrets", run.namespace, source["secretKeyRef"])
                    elif "configMapKeyRef" in source:
                        value = self._lookup("configmaps", run.namespace, source["configMapKeyRef"])
                    else:
                        raise ValueError(f"env {name}: unsupported valueFrom {sorted(source)}")
                    if value is not None:
                        cenv[name] = value
                else:
                    cenv[name] = ""
            per_container[container.name] = cenv
        return per_container

    # -- containers ----------------------------------------------------------

    def _argv(self, run: PodRun, container: Container, env: dict[str, str]) -> list[str]:
        command = [_expand(a, env) for a in container.spec.get("command", []) or []]
        args = [_expand(a, env) for a in container.spec.get("args", []) or []]
        if not command:
            raise ValueError(
                f"container {container.name} has no command; process nodes run commands, not images"
            )
        executable = command[0]
        if "/" not in executable:
            found = shutil.which(executable, path=env.get("PATH"))
            if found is None:
                raise ValueError(
                    f"container {container.name}: {executable!r} is not on PATH {env.get('PATH')}"
                )
            command[0] = found
        argv = ["ip", "netns", "exec", run.netns]
        # `ip netns exec` gives the child a private mount namespace, so these
        # mounts are seen by the pod alone (and a tmpfs goes with it).
        steps = []
        if run.token_dir is not None:
            steps += [
                f"mount --bind {shlex.quote(str(run.token_dir))} {SA_MOUNT}",
                f"mount -o remount,bind,ro {SA_MOUNT}",
            ]
        for mount in container.spec.get("volumeMounts") or []:
            kind, source = run.volumes.get(mount["name"], ("", ""))
            if kind not in ("bind", "tmpfs"):
                continue
            # A process pod shares the host's file system: a volume mounted over
            # an ancestor of what the process itself runs from (the project and
            # its virtualenv, the node's own directory; e.g. an emptyDir at /tmp
            # while the checkout lives under /tmp) would hide it. Those paths are
            # put back on top of the volume, as an image would have them.
            hidden = _hidden_by(mount["mountPath"], self._host_paths(command[0]))
            keep = [f"{KEEP_DIR}/{index}" for index in range(len(hidden))]
            for path, place in zip(hidden, keep, strict=True):
                steps += [f"mkdir -p {place}", f"mount --bind {shlex.quote(path)} {place}"]
            target = shlex.quote(mount["mountPath"])
            if kind == "bind":
                steps += [f"mkdir -p {target}", f"mount --bind {shlex.quote(source)} {target}"]
            elif kind == "tmpfs":
                size = f",size={source}" if source != "0" else ""
                steps += [f"mkdir -p {target}", f"mount -t tmpfs -o mode=1777{size} tmpfs {target}"]
            if mount.get("readOnly"):
                steps.append(f"mount -o remount,bind,ro {target}")
            for path, place in zip(hidden, keep, strict=True):
                steps += [f"mkdir -p {shlex.quote(path)}", f"mount --bind {place} {shlex.quote(path)}"]
        if steps:
            argv += ["sh", "-c", " && ".join([*steps, 'exec "$@"']), "sh"]
        return argv + command + args

    def _host_paths(self, executable: str) -> list[str]:
        """What a process pod runs from on the host: the project, the virtualenv
        of its executable, and this node's directory."""
        venv = Path(executable).absolute().parent.parent
        return [str(PROJECT_ROOT), str(venv), str(self.workdir.resolve())]

    def _start(self, run: PodRun, container: Container) -> None:
        env = run.env[container.name]
        try:
            argv = self._argv(run, container, env)
        except ValueError as exc:
            container.state = {"waiting": {"reason": "RunContainerError", "message": str(exc)}}
            container.next_start = time.monotonic() + MAX_BACKOFF
            return
        workdir = container.spec.get("workingDir") or str(run.directory)
        with container.log_path.open("ab") as out:
            out.write(f"--- start {now_rfc3339()}: {shlex.join(argv)}\n".encode())
            out.flush()
            container.process = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=workdir,
                start_new_session=True,
            )
        now = time.monotonic()
        container.started_at = now_rfc3339()
        container.state = {"running": {"startedAt": container.started_at}}
        spec = container.spec
        container.startup = Probe(spec["startupProbe"], now) if spec.get("startupProbe") else None
        container.readiness = Probe(spec["readinessProbe"], now) if spec.get("readinessProbe") else None
        container.liveness = Probe(spec["livenessProbe"], now) if spec.get("livenessProbe") else None
        log.info("started %s/%s:%s pid %d", run.namespace, run.name, container.name, container.process.pid)

    def _probe(self, run: PodRun, container: Container, probe: Probe) -> bool:
        spec = probe.spec
        try:
            if "httpGet" in spec:
                get = spec["httpGet"]
                host = get.get("host") or run.ip
                scheme = str(get.get("scheme", "HTTP")).lower()
                path = get.get("path", "/")
                if not path.startswith("/"):
                    path = "/" + path
                url = f"{scheme}://{host}:{_port(get['port'], container.spec)}{path}"
                request = urllib.request.Request(url)
                for header in get.get("httpHeaders", []) or []:
                    request.add_header(header["name"], header["value"])
                # Like the kubelet, an HTTPS probe does not verify the certificate.
                context = ssl._create_unverified_context() if scheme == "https" else None
                try:
                    with direct_opener(context).open(request, timeout=probe.timeout) as response:
                        return 200 <= int(response.status) < 400
                except urllib.error.HTTPError as exc:
                    return 200 <= exc.code < 400
            if "tcpSocket" in spec:
                tcp = spec["tcpSocket"]
                address = (tcp.get("host") or run.ip, _port(tcp["port"], container.spec))
                with socket.create_connection(address, timeout=probe.timeout):
                    return True
            if "exec" in spec:
                env = run.env[container.name]
                command = spec["exec"].get("command") or []
                done = subprocess.run(
                    ["ip", "netns", "exec", run.netns, *command],
                    env=env,
                    cwd=str(run.directory),
                    capture_output=True,
                    timeout=probe.timeout,
                    check=False,
                )
                return done.returncode == 0
        except (OSError, ValueError, subprocess.TimeoutExpired, urllib.error.URLError):
            return False
        log.warning("unsupported probe %s in %s/%s", sorted(spec), run.namespace, run.name)
        return False

    def _signal(self, container: Container, sig: int) -> None:
        if container.process is not None and container.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(container.process.pid, sig)

    def _run_probes(self, run: PodRun, container: Container, now: float) -> None:
        for probe in (container.startup, container.liveness, container.readiness):
            if probe is None or now < probe.next_due:
                continue
            if probe is not container.startup and container.startup is not None and not container.startup.ok:
                continue  # startup gates the other probes
            if probe is container.startup and probe.ok:
                continue
            probe.record(self._probe(run, container, probe))
            probe.next_due = now + probe.period
            if probe is not container.readiness and probe.failed:
                kind = "startup" if probe is container.startup else "liveness"
                log.info(
                    "%s probe of %s/%s:%s failed; killing it", kind, run.namespace, run.name, container.name
                )
                self._signal(container, signal.SIGKILL)

    def _reap(self, run: PodRun, container: Container, policy: str, now: float) -> None:
        proc = container.process
        if proc is None or proc.poll() is None:
            return
        code = int(proc.returncode)
        if code < 0:  # killed by a signal: report it the way a shell would
            code = 128 - code
        terminated = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": container.started_at,
            "finishedAt": now_rfc3339(),
            "containerID": f"process://{proc.pid}",
        }
        container.process = None
        restart = policy == "Always" or (policy == "OnFailure" and code != 0)
        if restart and run.terminating_deadline is None:
            container.last_state = {"terminated": terminated}
            backoff = min(MAX_BACKOFF, 2.0**container.restart_count)
            container.restart_count += 1
            container.next_start = now + backoff
            container.state = {
                "waiting": {"reason": "CrashLoopBackOff", "message": f"restarting in {backoff:.0f}s"}
            }
        else:
            container.state = {"terminated": terminated}
            container.done = True
        log.info("%s/%s:%s exited %d", run.namespace, run.name, container.name, code)

    # -- status --------------------------------------------------------------

    def _status(self, run: PodRun, pod: JSON) -> JSON:
        stamp = now_rfc3339()
        previous = {c.get("type"): c for c in (pod.get("status") or {}).get("conditions", []) or []}

        def condition(kind: str, ok: bool, reason: str | None = None) -> JSON:
            status = "True" if ok else "False"
            old = previous.get(kind)
            since = old.get("lastTransitionTime") if old and old.get("status") == status else stamp
            entry: JSON = {"type": kind, "status": status, "lastProbeTime": None, "lastTransitionTime": since}
            if reason and not ok:
                entry["reason"] = reason
            return entry

        statuses = []
        for c in run.containers:
            entry: JSON = {
                "name": c.name,
                "image": c.spec.get("image", ""),
                "imageID": "",
                "ready": c.ready,
                "started": c.running,
                "restartCount": c.restart_count,
                "state": c.state,
            }
            if c.process is not None:
                entry["containerID"] = f"process://{c.process.pid}"
            if c.last_state:
                entry["lastState"] = c.last_state
            statuses.append(entry)
        all_ready = all(c.ready for c in run.containers)
        if run.setup_error is not None:
            phase = "Pending"
        elif all(c.done for c in run.containers):
            codes = [c.state.get("terminated", {}).get("exitCode", 1) for c in run.containers]
            phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
        elif any(c.started_at for c in run.containers):
            phase = "Running"
        else:
            phase = "Pending"
        status: JSON = {
            "phase": phase,
            "hostIP": self.spec.node_ip,
            "hostIPs": [{"ip": self.spec.node_ip}],
            "podIP": run.ip,
            "podIPs": [{"ip": run.ip}],
            "startTime": run.started_at,
            "containerStatuses": statuses,
            "conditions": [
                condition("PodScheduled", True),
                condition("Initialized", True),
                condition("PodReadyToStartContainers", run.setup_error is None),
                condition("ContainersReady", all_ready, "ContainersNotReady"),
                condition("Ready", all_ready, "ContainersNotReady"),
            ],
        }
        if run.setup_error is not None:
            status["message"] = run.setup_error
            status["reason"] = "ProcessNodeSetupError"
        return status

    def _report(self, run: PodRun, pod: JSON) -> None:
        status = self._status(run, pod)
        comparable = json.dumps(status, sort_keys=True)
        if comparable == run.last_status:
            return
        self.kube.patch(f"/api/v1/namespaces/{run.namespace}/pods/{run.name}/status", {"status": status})
        run.last_status = comparable

    # -- teardown of pods ----------------------------------------------------

    def _cleanup(self, run: PodRun) -> None:
        for container in run.containers:
            self._signal(container, signal.SIGKILL)
            if container.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    container.process.wait(2)
        netns.delete(run.netns)
        netns.ip("link", "del", run.host_veth, ns=self.spec.root_ns, check=False)
        self.pods.pop(run.uid, None)

    def _terminate(self, run: PodRun, grace: float) -> None:
        if run.terminating_deadline is None:
            run.terminating_deadline = time.monotonic() + grace
            log.info("terminating %s/%s (grace %.0fs)", run.namespace, run.name, grace)
            for container in run.containers:
                self._signal(container, signal.SIGTERM)

    def _finish_termination(self, run: PodRun) -> bool:
        """True once every container has stopped (or was killed after the grace period)."""
        assert run.terminating_deadline is not None
        alive = [c for c in run.containers if c.running]
        if alive and time.monotonic() < run.terminating_deadline:
            return False
        self._cleanup(run)
        return True

    # -- main loop -----------------------------------------------------------

    def sync_pods(self) -> None:
        try:
            listing = self.kube.get(f"/api/v1/pods?fieldSelector=spec.nodeName%3D{self.spec.name}")
        except (ApiError, OSError):
            # Cut off from the API server: like a kubelet, keep the pods it
            # knows running (restarts, probes) and report once it is back.
            now = time.monotonic()
            for run in list(self.pods.values()):
                if run.setup_error is None and run.terminating_deadline is None:
                    self._drive(run, run.pod, now)
            raise
        seen: set[str] = set()
        for pod in listing.get("items", []):
            meta = pod["metadata"]
            seen.add(meta["uid"])
            try:
                self._sync_pod(pod)
            except (ApiError, OSError, ValueError, KeyError, TypeError) as exc:
                # One pod's trouble must not stop the others.
                log.warning("pod %s/%s: %s", meta.get("namespace"), meta.get("name"), exc)
        for uid in list(self.pods):
            if uid not in seen:  # force-deleted: stop at once
                run = self.pods[uid]
                log.info("pod %s/%s vanished; killing it", run.namespace, run.name)
                self._cleanup(run)

    def _sync_pod(self, pod: JSON) -> None:
        meta = pod["metadata"]
        now = time.monotonic()
        run = self.pods.get(meta["uid"])
        if meta.get("deletionTimestamp"):
            if run is None:
                self._finalize_delete(meta)
                return
            self._terminate(run, float(meta.get("deletionGracePeriodSeconds") or 0))
            if self._finish_termination(run):
                self._finalize_delete(meta)
            return
        phase = (pod.get("status") or {}).get("phase")
        if run is not None and run.setup_error is not None and now >= run.retry_at:
            self._cleanup(run)
            run = None
        if run is None:
            if phase in ("Succeeded", "Failed"):
                return  # finished before this runner started
            run = self._admit(pod)
        run.pod = pod
        if run.setup_error is None:
            self._drive(run, pod, now)
        self._report(run, pod)

    def _drive(self, run: PodRun, pod: JSON, now: float) -> None:
        policy = pod["spec"].get("restartPolicy", "Always")
        for container in run.containers:
            self._reap(run, container, policy, now)
            if container.done:
                continue
            if container.process is None and now >= container.next_start:
                self._start(run, container)
            if container.running:
                self._run_probes(run, container, now)
        if run.token_dir is not None and now >= run.token_refresh_at:
            try:
                self._write_token(run, pod)
            except (ApiError, OSError) as exc:
                run.token_refresh_at = now + 10.0  # the old token is still valid for a while
                log.warning("token refresh for %s/%s failed: %s", run.namespace, run.name, exc)

    def _finalize_delete(self, meta: JSON) -> None:
        body = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": meta["uid"]},
        }
        with contextlib.suppress(ApiError):
            self.kube.delete(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", body)

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        beat = threading.Thread(target=self._loop, args=(self.heartbeat,), name="heartbeat", daemon=True)
        beat.start()
        self._loop(self.sync_pods)
        beat.join(5)
        self.shutdown()

    def _loop(self, step: Any) -> None:
        """Run `step` every tick until stopping. Errors (cut off from the API server by a
        partition, or a transient one) keep the pods running and are tried again next tick;
        the same error is logged once, then every 10 s, then its end."""
        name = step.__name__
        failing: tuple[str, float] | None = None
        while not self.stopping:
            started = time.monotonic()
            try:
                step()
            except (ApiError, OSError, ValueError, KeyError) as exc:
                message = str(exc)
                if failing is None or failing[0] != message or started - failing[1] >= 10.0:
                    log.warning("%s: %s", name, message)
                    failing = (message, started)
            else:
                if failing is not None:
                    log.info("%s: working again", name)
                    failing = None
            time.sleep(max(0.0, TICK - (time.monotonic() - started)))

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.stopping = True

    def shutdown(self) -> None:
        for run in list(self.pods.values()):
            for container in run.containers:
                self._signal(container, signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and any(
            c.running for r in self.pods.values() for c in r.containers
        ):
            time.sleep(0.05)
        for run in list(self.pods.values()):
            self._cleanup(run)


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


_QUANTITY = re.compile(r"^([0-9]+)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_FACTORS = {
    None: 1,
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
}


def _quantity_bytes(text: str) -> int:
    match = _QUANTITY.match(str(text))
    if match is None:
        raise ValueError(f"quantity {text!r} is not a whole number with an optional binary or decimal suffix")
    return int(match.group(1)) * _FACTORS[match.group(2)]


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known names are replaced, $$ escapes, the rest stays."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR.sub(sub, text)


def _field(path: str, fields: dict[str, str], meta: JSON) -> str:
    if path in fields:
        return fields[path]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    raise ValueError(f"fieldRef {path!r} is not supported")
