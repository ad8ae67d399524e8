"""The real `colo-operator` process against a real API server serves its metrics: a ColoVM it
reconciles shows up by phase, with reconcile timings, on --metrics-port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cluster import ControlPlane, build
from support.crd import install_crd

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "metrics-e2e"
OPERATOR_NAMESPACE = "colo-system"  # colo_operator.config default


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def test_the_operator_serves_its_metrics(kube_apiserver: ControlPlane, tmp_path: Path) -> None:
    kubectl = [str(build.bin_dir() / "kubectl"), f"--kubeconfig={kube_apiserver.kubeconfig}"]
    install_crd(kubectl)
    subprocess.run([*kubectl, "create", "namespace", NAMESPACE], check=False, capture_output=True)
    # The operator's own namespace (the chart's release namespace) holds the cluster CA it creates
    # at start-up; in a cluster it always exists, since the operator runs there.
    subprocess.run([*kubectl, "create", "namespace", OPERATOR_NAMESPACE], check=False, capture_output=True)
    vm = {"apiVersion": "colo.dev/v1alpha1", "kind": "ColoVM", "metadata": {"name": "watched"},
          "spec": {"guest": {"memory": "16Mi"}}}  # fmt: skip
    subprocess.run([*kubectl, "apply", "-n", NAMESPACE, "-f", "-"], input=json.dumps(vm), text=True,
                   check=True, capture_output=True)  # fmt: skip
    metrics_port, health_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLO_")}
    log = (tmp_path / "operator.log").open("wb")
    operator = subprocess.Popen(
        [str(Path(sys.executable).parent / "colo-operator"), "--standalone", "-n", NAMESPACE,
         "--kubeconfig", str(kube_apiserver.kubeconfig), "--metrics-port", str(metrics_port),
         "--liveness", f"http://127.0.0.1:{health_port}/healthz", "--log-format", "json"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    text = ""
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert operator.poll() is None, (tmp_path / "operator.log").read_text()
            try:
                text = scrape(metrics_port)
            except OSError:
                text = ""
            # No node runs the agent pods, so the VM stays Pending.
            if 'colo_operator_vms{phase="Pending"} 1.0' in text:
                break
            time.sleep(0.5)
    finally:
        operator.terminate()
        try:
            operator.wait(timeout=20)
        except subprocess.TimeoutExpired:
            operator.kill()
            operator.wait()
        subprocess.run([*kubectl, "delete", "namespace", NAMESPACE, "--wait=false"], capture_output=True)
    assert 'colo_operator_vms{phase="Pending"} 1.0' in text, (tmp_path / "operator.log").read_text()
    assert f'colo_operator_vm_phase{{name="watched",namespace="{NAMESPACE}",phase="Pending"}} 1.0' in text
    assert 'colo_operator_vms{phase="Protected"} 0.0' in text
    assert "colo_operator_reconcile_duration_seconds_count" in text
    count = next(line for line in text.splitlines()
                 if line.startswith("colo_operator_reconcile_duration_seconds_count"))  # fmt: skip
    assert float(count.split()[-1]) >= 1
    assert 'colo_operator_transitions_total{cause="NodeNotReady",kind="Failover"} 0.0' in text
    assert "process_resident_memory_bytes" in text
    # Its log is JSON lines.
    lines = (tmp_path / "operator.log").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert records and {"time", "level", "logger", "message"} <= set(records[0])
