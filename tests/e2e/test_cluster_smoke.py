"""The cluster under test behaves like Kubernetes where the suite relies on it.

Pods run where they are scheduled, get Ready through their probes, reach
each other across nodes, back Services through EndpointSlices, carry a
service-account token whose RBAC the API server enforces, and stop when
deleted; a killed node goes NotReady within the node-monitor grace period;
a killed pod is restarted, and pods serve through an API server outage.
"""

from __future__ import annotations

import contextlib
import functools
import json
import secrets
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from cluster import build, netns
from cluster.testing import ClusterHandle, model, ready_endpoints
from kubernetes.client import (
    ApiException,
    V1Namespace,
    V1Pod,
    V1Role,
    V1RoleBinding,
    V1Secret,
    V1Service,
    V1ServiceAccount,
)
from operator_e2e import wait_for

# A pod's program: an HTTP server that answers /healthz and reports its env.
WEB_SERVER = textwrap.dedent(
    """
    import json, os, http.server
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            keys = ("POD_NAME", "POD_NAMESPACE", "POD_IP", "NODE_NAME", "GREETING", "EXPANDED")
            body = json.dumps({k: os.environ.get(k) for k in keys}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    http.server.ThreadingHTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
    """
)

# A pod's program: uses in-cluster config (token mounted where the client
# looks) and reports what the API server allowed it to do.
RBAC_PROBE = textwrap.dedent(
    """
    import json, socket, sys
    import kubernetes
    kubernetes.config.load_incluster_config()
    api = kubernetes.client.CoreV1Api()
    ns = open("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read()
    result = {"namespace": ns}
    try:
        result["pods"] = len(api.list_namespaced_pod(ns).items)
    except kubernetes.client.ApiException as exc:
        result["pods"] = exc.status
    try:
        api.list_namespaced_secret(ns)
        result["secrets"] = 200
    except kubernetes.client.ApiException as exc:
        result["secrets"] = exc.status
    try:
        socket.create_connection(("10.96.0.1", 443), timeout=2).close()
        result["service_ip"] = "reachable"
    except OSError as exc:
        result["service_ip"] = type(exc).__name__
    print(json.dumps(result), flush=True)
    ok = result["pods"] >= 1 and result["secrets"] == 403 and result["service_ip"] != "reachable"
    sys.exit(0 if ok else 1)
    """
)


@pytest.fixture
def namespace(kube_api: kubernetes.client.ApiClient) -> Iterator[str]:
    core = kubernetes.client.CoreV1Api(kube_api)
    name = f"smoke-{secrets.token_hex(3)}"
    core.create_namespace(model(V1Namespace, {"metadata": {"name": name}}))
    wait_for(lambda: _has_default_account(core, name), 60, f"the default ServiceAccount of namespace {name}")
    yield name
    with contextlib.suppress(ApiException):
        core.delete_namespace(name)


def _has_default_account(core: kubernetes.client.CoreV1Api, namespace: str) -> bool:
    try:
        core.read_namespaced_service_account("default", namespace)
        return True
    except ApiException:
        return False


GREETING = {"metadata": {"name": "greeting"}, "stringData": {"text": "hi"}}


def web_pod(name: str, node: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {
                    "name": "web",
                    "image": "python",
                    "command": [sys.executable, "-c", WEB_SERVER],
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "env": [
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {
                            "name": "POD_NAMESPACE",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                        },
                        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                        {
                            "name": "GREETING",
                            "valueFrom": {"secretKeyRef": {"name": "greeting", "key": "text"}},
                        },
                        {"name": "EXPANDED", "value": "$(NODE_NAME)/$(POD_NAME)"},
                    ],
                    "readinessProbe": {
                        "httpGet": {"path": "/healthz", "port": "http"},
                        "periodSeconds": 1,
                    },
                    "livenessProbe": {
                        "exec": {"command": ["true"]},
                        "periodSeconds": 2,
                    },
                }
            ],
        },
    }


def pod_ready(core: kubernetes.client.CoreV1Api, namespace: str, name: str) -> Any:
    pod = core.read_namespaced_pod(name, namespace)
    for condition in (pod.status.conditions if pod.status else None) or []:
        if condition.type == "Ready" and condition.status == "True":
            return pod
    return None


def pod_gone(core: kubernetes.client.CoreV1Api, namespace: str, name: str) -> bool:
    try:
        core.read_namespaced_pod(name, namespace)
    except ApiException as exc:
        return exc.status == 404
    return False


def process_alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie (a killed node's orphans wait for init to reap them)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def container_pid(pod: Any) -> int:
    container_id = pod.status.container_statuses[0].container_id
    assert container_id.startswith("process://"), container_id
    return int(container_id.removeprefix("process://"))


def test_pod_serves_other_nodes_backs_a_service_and_stops_on_delete(
    cluster: ClusterHandle, kube_api: kubernetes.client.ApiClient, namespace: str
) -> None:
    core = kubernetes.client.CoreV1Api(kube_api)
    server_node, client_node = cluster.node_names[0], cluster.node_names[1]
    core.create_namespaced_secret(namespace, model(V1Secret, GREETING))
    service = {
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]},
    }
    core.create_namespaced_service(namespace, model(V1Service, service))
    core.create_namespaced_pod(namespace, model(V1Pod, web_pod("web", server_node)))

    pod = wait_for(lambda: pod_ready(core, namespace, "web"), 90, "pod web to be Ready")
    assert pod.spec.node_name == server_node
    assert pod.status.phase == "Running"
    pod_ip = pod.status.pod_ip
    assert pod_ip and pod_ip != pod.status.host_ip

    # Reached from another node's namespace, over the bridge.
    url = f"http://{pod_ip}:8080/env"
    fetch = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=5).read().decode())"
    done = cluster.run_in_node(client_node, [sys.executable, "-c", fetch])
    assert done.returncode == 0, done.stderr
    env = json.loads(done.stdout)
    assert env == {
        "POD_NAME": "web",
        "POD_NAMESPACE": namespace,
        "POD_IP": pod_ip,
        "NODE_NAME": server_node,
        "GREETING": "hi",
        "EXPANDED": f"{server_node}/web",
    }

    def ready_endpoint() -> bool:
        return ready_endpoints(kube_api, namespace, "web") == [(pod_ip, 8080)]

    wait_for(ready_endpoint, 60, "an EndpointSlice with the pod's address")

    pid = container_pid(pod)
    assert process_alive(pid)
    core.delete_namespaced_pod("web", namespace)
    wait_for(lambda: pod_gone(core, namespace, "web"), 60, "pod web to be removed")
    wait_for(lambda: not process_alive(pid), 10, f"process {pid} to exit")
    if cluster.local is not None:
        # Ports came and went; the bridge kept its MAC, so no namespace's
        # neighbour entry for the API server went stale.
        bridge = subprocess.run(
            ["ip", "-br", "link", "show", cluster.local.bridge], capture_output=True, text=True, check=True
        )
        assert bridge.stdout.split()[2] == netns.mac_for(cluster.local.gateway)


def test_service_account_token_carries_its_rbac(
    cluster: ClusterHandle, kube_api: kubernetes.client.ApiClient, namespace: str
) -> None:
    core = kubernetes.client.CoreV1Api(kube_api)
    rbac = kubernetes.client.RbacAuthorizationV1Api(kube_api)
    account = {"metadata": {"name": "reader"}}
    core.create_namespaced_service_account(namespace, model(V1ServiceAccount, account))
    rbac.create_namespaced_role(
        namespace,
        model(
            V1Role,
            {
                "metadata": {"name": "pod-reader"},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
            },
        ),
    )
    rbac.create_namespaced_role_binding(
        namespace,
        model(
            V1RoleBinding,
            {
                "metadata": {"name": "reader"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
                "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
            },
        ),
    )
    core.create_namespaced_pod(
        namespace,
        model(
            V1Pod,
            {
                "metadata": {"name": "rbac"},
                "spec": {
                    "serviceAccountName": "reader",
                    "restartPolicy": "Never",
                    "containers": [
                        {"name": "probe", "image": "python", "command": [sys.executable, "-c", RBAC_PROBE]}
                    ],
                },
            },
        ),
    )

    def finished() -> Any:
        pod = core.read_namespaced_pod("rbac", namespace)
        return pod if pod.status and pod.status.phase in ("Succeeded", "Failed") else None

    pod = wait_for(finished, 90, "pod rbac to finish")
    report = cluster.pod_log(namespace, "rbac", "probe") if cluster.local else ""
    assert pod.status.phase == "Succeeded", f"in-pod API checks failed: {report}"
    if cluster.local:
        result = json.loads(report.strip().splitlines()[-1])
        assert result["secrets"] == 403
        assert result["namespace"] == namespace
        assert result["service_ip"] != "reachable"


def ready_web_pod(core: kubernetes.client.CoreV1Api, namespace: str, name: str, node: str) -> Any:
    """A web pod on ``node``, once Ready."""
    core.create_namespaced_secret(namespace, model(V1Secret, GREETING))
    core.create_namespaced_pod(namespace, model(V1Pod, web_pod(name, node)))
    return wait_for(lambda: pod_ready(core, namespace, name), 90, f"pod {name} to be Ready")


def test_killed_node_goes_not_ready_within_grace_and_comes_back(
    cluster: ClusterHandle, kube_api: kubernetes.client.ApiClient, namespace: str
) -> None:
    local = cluster.local
    if local is None:
        pytest.skip("node loss needs --e2e-driver local")
    core = kubernetes.client.CoreV1Api(kube_api)
    victim = cluster.node_names[-1]
    pod = ready_web_pod(core, namespace, "doomed", victim)
    pid = container_pid(pod)

    killed_at = time.monotonic()
    cluster.kill_node(victim)
    wait_for(lambda: not process_alive(pid), 10, "kill_node to kill the pod's process")
    wait_for(lambda: local.node_ready(victim) != "True", 120, f"{victim} to go NotReady")
    seen_after = time.monotonic() - killed_at
    grace = local.grace
    print(f"\n{victim} NotReady {seen_after:.1f}s after it was killed (grace {grace}s)")
    # The node-lifecycle controller checks every second; allow for a loaded
    # machine on top of the grace period, which is what is being checked.
    assert seen_after < grace + 15

    cluster.revive_node(victim)
    wait_for(lambda: local.node_ready(victim) == "True", 120, f"{victim} to be Ready again")
    wait_for(lambda: pod_ready(core, namespace, "doomed"), 90, "pod doomed to run again on the revived node")


def fetch_from(cluster: ClusterHandle, node: str, url: str) -> bool:
    """Whether a client inside ``node``'s namespace gets an answer from ``url``."""
    code = f"import urllib.request; urllib.request.urlopen({url!r}, timeout=3).read()"
    return cluster.run_in_node(node, [sys.executable, "-c", code]).returncode == 0


def test_partitions_cut_what_they_say_and_heal(
    cluster: ClusterHandle, kube_api: kubernetes.client.ApiClient, namespace: str
) -> None:
    local = cluster.local
    if local is None:
        pytest.skip("partitions need --e2e-driver local")
    core = kubernetes.client.CoreV1Api(kube_api)
    isolated, cut_off, bystander = cluster.node_names[:3]
    core.create_namespaced_secret(namespace, model(V1Secret, GREETING))
    core.create_namespaced_pod(namespace, model(V1Pod, web_pod("island", isolated)))
    pod = wait_for(lambda: pod_ready(core, namespace, "island"), 90, "pod island to be Ready")
    url = f"http://{pod.status.pod_ip}:8080/"
    assert fetch_from(cluster, cut_off, url)
    try:
        cluster.partition(isolated, cut_off)
        assert not fetch_from(cluster, cut_off, url)
        assert fetch_from(cluster, bystander, url)

        cluster.heal()
        assert fetch_from(cluster, cut_off, url)

        cluster.partition_from_apiserver(isolated)
        wait_for(lambda: local.node_ready(isolated) != "True", 120, f"{isolated} to go NotReady")
        # The node lost the API server, not its pods: clients still get answers.
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
        assert fetch_from(cluster, bystander, url)
    finally:
        cluster.heal()
    wait_for(lambda: local.node_ready(isolated) == "True", 120, f"{isolated} to be Ready again")


def simple_pod(name: str, code: str, **spec: Any) -> dict[str, Any]:
    container = {"name": "main", "image": "python", "command": [sys.executable, "-c", code]}
    container.update(spec.pop("container", {}))
    return {"metadata": {"name": name}, "spec": {"containers": [container], **spec}}


def container_status(core: kubernetes.client.CoreV1Api, namespace: str, name: str) -> Any:
    pod = core.read_namespaced_pod(name, namespace)
    statuses = (pod.status.container_statuses if pod.status else None) or []
    return statuses[0] if statuses else None


def test_exits_restart_per_policy_and_deletion_honours_the_grace_period(
    cluster: ClusterHandle, kube_api: kubernetes.client.ApiClient, namespace: str, tmp_path: Path
) -> None:
    if cluster.local is None:
        pytest.skip("reads process state of the local driver")
    core = kubernetes.client.CoreV1Api(kube_api)
    crash = "import sys, time; time.sleep(0.2); sys.exit(3)"
    core.create_namespaced_pod(namespace, model(V1Pod, simple_pod("crasher", crash, restartPolicy="Always")))
    core.create_namespaced_pod(namespace, model(V1Pod, simple_pod("once", crash, restartPolicy="Never")))
    sick = simple_pod(
        "sick",
        "import time; time.sleep(3600)",
        container={
            "livenessProbe": {"exec": {"command": ["false"]}, "periodSeconds": 1, "failureThreshold": 2}
        },
    )
    core.create_namespaced_pod(namespace, model(V1Pod, sick))
    marker = tmp_path / "signals"
    stubborn = textwrap.dedent(
        f"""
        import signal, time
        def term(signum, frame):
            open({str(marker)!r}, "a").write("TERM\\n")
        signal.signal(signal.SIGTERM, term)
        open({str(marker)!r}, "a").write("up\\n")
        while True:
            time.sleep(1)
        """
    )
    core.create_namespaced_pod(
        namespace, model(V1Pod, simple_pod("stubborn", stubborn, terminationGracePeriodSeconds=2))
    )

    def restarted(name: str, times: int) -> Any:
        status = container_status(core, namespace, name)
        if status is None or status.restart_count < times or status.last_state.terminated is None:
            return None
        return status

    crashed = wait_for(lambda: restarted("crasher", 2), 90, "crasher to be restarted twice")
    assert crashed.last_state.terminated.exit_code == 3
    killed = wait_for(lambda: restarted("sick", 1), 90, "the failing liveness probe to restart sick")
    assert killed.last_state.terminated.exit_code == 137  # SIGKILL

    def finished_once() -> Any:
        pod = core.read_namespaced_pod("once", namespace)
        return pod if pod.status and pod.status.phase in ("Succeeded", "Failed") else None

    once = wait_for(finished_once, 90, "pod once to finish")
    assert once.status.phase == "Failed"
    assert once.status.container_statuses[0].restart_count == 0
    assert once.status.container_statuses[0].state.terminated.exit_code == 3

    pod = wait_for(lambda: pod_ready(core, namespace, "stubborn"), 90, "pod stubborn to be Ready")
    wait_for(lambda: marker.exists(), 30, "stubborn to start")
    pid = container_pid(pod)
    deleted_at = time.monotonic()
    core.delete_namespaced_pod("stubborn", namespace)
    wait_for(lambda: pod_gone(core, namespace, "stubborn"), 60, "pod stubborn to be removed")
    took = time.monotonic() - deleted_at
    wait_for(lambda: not process_alive(pid), 10, "stubborn's process to die")
    assert marker.read_text().splitlines() == ["up", "TERM"]
    # It ignored SIGTERM, so only SIGKILL at the end of the grace period ended it.
    assert took >= 1.5


def test_nodes_advertise_their_address_and_kvm_where_it_exists(
    cluster: ClusterHandle, kube_api: kubernetes.client.ApiClient
) -> None:
    if cluster.local is None:
        pytest.skip("checks the local driver's node registration")
    core = kubernetes.client.CoreV1Api(kube_api)
    listing = kube_api.sanitize_for_serialization(core.list_node(label_selector="colo.dev/process-node=true"))
    nodes = {n["metadata"]["name"]: n for n in listing["items"]}
    assert sorted(nodes) == sorted(cluster.node_names)
    for name, node in nodes.items():
        kvm = node["status"]["allocatable"].get("devices.kubevirt.io/kvm")
        assert (kvm is not None) == Path("/dev/kvm").exists()
        addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
        assert addresses["Hostname"] == name
        assert addresses["InternalIP"] == cluster.local.node(name).ip


def test_kubectl_and_helm_see_the_cluster_version(cluster: ClusterHandle, tmp_path: Path) -> None:
    if cluster.local is None:
        pytest.skip("checks the binaries the local driver builds")
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert version["clientVersion"]["gitVersion"] == "v1.34.4"
    assert version["serverVersion"]["gitVersion"] == "v1.34.4"

    # A chart that only installs on 1.34 or later: helm takes the server's
    # version for its kubeVersion check.
    chart = tmp_path / "probe-chart"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(
        "apiVersion: v2\nname: probe-chart\nversion: 0.1.0\nkubeVersion: '>=1.34.0-0'\n"
    )
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: helm-probe\ndata:\n  ok: 'yes'\n"
    )
    helm = build.bin_dir() / "helm"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KUBECONFIG": str(cluster.kubeconfig)}
    run = functools.partial(subprocess.run, capture_output=True, text=True, env=env, timeout=120)
    assert "v3.19.5" in run([str(helm), "version", "--short"]).stdout
    namespace = f"helm-{secrets.token_hex(3)}"
    installed = run(
        [str(helm), "install", "probe", str(chart), "-n", namespace, "--create-namespace", "--wait"]
    )
    assert installed.returncode == 0, installed.stderr
    data = cluster.kubectl(
        "get", "configmap", "helm-probe", "-n", namespace, "-o", "jsonpath={.data.ok}"
    ).stdout
    assert data == "yes"
    assert run([str(helm), "uninstall", "probe", "-n", namespace]).returncode == 0
    cluster.kubectl("delete", "namespace", namespace, "--wait=false")


def test_a_killed_pod_restarts_and_pods_serve_through_an_api_server_outage(
    cluster: ClusterHandle, kube_api: kubernetes.client.ApiClient, namespace: str
) -> None:
    if cluster.local is None:
        pytest.skip("killing pods and the API server needs --e2e-driver local")
    local, core = cluster.local, kubernetes.client.CoreV1Api(kube_api)
    pid = container_pid(pod := ready_web_pod(core, namespace, "phoenix", cluster.node_names[0]))
    url = f"http://{pod.status.pod_ip}:8080/"

    local.kill_pod(pod.status.pod_ip)
    wait_for(lambda: not process_alive(pid), 10, "kill_pod to kill the container")

    def restarted() -> Any:
        p = pod_ready(core, namespace, "phoenix")
        return p if p and p.status.container_statuses[0].restart_count >= 1 else None

    again = wait_for(restarted, 90, "phoenix restarted by its runner")
    assert container_pid(again) != pid
    assert again.status.container_statuses[0].last_state.terminated.exit_code == 137

    local.stop_apiserver()
    try:
        with pytest.raises(OSError):
            local.control_plane.get("/readyz", timeout=2.0)  # type: ignore[union-attr]
        time.sleep(3)  # long enough for a runner to have noticed
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
    finally:
        local.start_apiserver()
    assert wait_for(lambda: pod_ready(core, namespace, "phoenix"), 60, "phoenix seen Ready after the outage")
