"""`kubectl colo` as a user runs it (the installed `kubectl-colo`) against a real API server:
list in one namespace or all, -o json|yaml, --context, and the LAG figure."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster import ControlPlane, build
from support.crd import install_crd

from colo_operator import constants as c
from colo_operator.kube import Kube

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = Path(sys.executable).parent / "kubectl-colo"


def kubectl_colo(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    binary = str(PLUGIN) if PLUGIN.exists() else shutil.which("kubectl-colo")
    assert binary, "kubectl-colo is not installed"
    return subprocess.run(
        [binary, "--kubeconfig", str(kubeconfig), *args],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def colovm(namespace: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"guest": {"memory": "16Mi"}},
    }


def status(ack_age_ms: float, sampled: dt.datetime) -> dict[str, Any]:
    when = sampled.isoformat(timespec="seconds").replace("+00:00", "Z")
    return {
        "phase": "Protected",
        "term": 2,
        "epoch": 41,
        "primary": {"pod": "vm-1", "node": "node-a", "synced": True},
        "secondary": {"pod": "vm-2", "node": "node-b", "synced": True},
        "lastCheckpoint": {"epoch": 41, "pauseMs": 0.8, "observedAt": when, "ackAgeMs": ack_age_ms},
        "checkpoints": {"total": 400, "perSecond": 9.9, "sampledAt": when},
    }


@pytest.fixture(scope="module")
def cluster_with_vms(
    kube_apiserver: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    kubectl = [str(build.bin_dir() / "kubectl"), f"--kubeconfig={kube_apiserver.kubeconfig}"]
    install_crd(kubectl)
    for ns in ("plugin-a", "plugin-b"):
        subprocess.run([*kubectl, "create", "namespace", ns], check=False, capture_output=True)

    async def populate() -> None:
        kube = Kube.connect(str(kube_apiserver.kubeconfig))
        try:
            sampled = dt.datetime.now(dt.UTC)
            vms = (("plugin-a", "web", 93.0), ("plugin-a", "db", 12.0), ("plugin-b", "cache", 7.0))
            for ns, name, lag in vms:
                await kube.create(colovm(ns, name))
                await kube.patch_vm_status(ns, name, status(lag, sampled))
        finally:
            kube.close()

    asyncio.run(populate())
    # A second context of the same cluster whose default namespace is plugin-b.
    config = yaml.safe_load(kube_apiserver.kubeconfig.read_text())
    base = config["contexts"][0]
    config["contexts"].append(
        {"name": "team-b", "context": {**base["context"], "namespace": "plugin-b"}}
    )
    path = tmp_path_factory.mktemp("plugin") / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    yield path


def test_list_shows_the_namespace_or_every_namespace(cluster_with_vms: Path) -> None:
    one = kubectl_colo(cluster_with_vms, "-n", "plugin-a", "list")
    assert one.returncode == 0, one.stderr
    rows = [line.split() for line in one.stdout.splitlines()[1:] if line.strip()]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("plugin-a", "db", "Protected"),
        ("plugin-a", "web", "Protected"),
    ]
    every = kubectl_colo(cluster_with_vms, "list", "-A")
    assert every.returncode == 0, every.stderr
    names = [line.split()[:2] for line in every.stdout.splitlines()[1:] if line.strip()]
    assert ["plugin-b", "cache"] in names and ["plugin-a", "web"] in names
    # LAG: the primary's time since its last acknowledged epoch, with the sample's age.
    web = next(line for line in every.stdout.splitlines() if " web " in line)
    assert "93 ms (" in web and "s ago)" in web


def test_output_json_and_yaml_are_the_objects(cluster_with_vms: Path) -> None:
    listed = kubectl_colo(cluster_with_vms, "list", "-A", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    document = json.loads(listed.stdout)
    assert document["kind"] == "List"
    assert {(i["metadata"]["namespace"], i["metadata"]["name"]) for i in document["items"]} >= {
        ("plugin-a", "web"), ("plugin-a", "db"), ("plugin-b", "cache")
    }
    shown = kubectl_colo(cluster_with_vms, "-n", "plugin-a", "status", "web", "-o", "yaml")
    assert shown.returncode == 0, shown.stderr
    obj = yaml.safe_load(shown.stdout)
    assert obj["kind"] == "ColoVM" and obj["status"]["lastCheckpoint"]["ackAgeMs"] == 93.0
    # The defaults the API server filled in come back too.
    assert obj["spec"]["failover"]["leaseDurationMs"] == 1000
    line = kubectl_colo(cluster_with_vms, "-n", "plugin-a", "checkpoints", "web", "-o", "json")
    assert {"term": 2, "epoch": 41}.items() <= json.loads(line.stdout).items()


def test_context_picks_the_contexts_namespace_and_a_missing_one_is_a_usage_error(
    cluster_with_vms: Path,
) -> None:
    listed = kubectl_colo(cluster_with_vms, "--context", "team-b", "list")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split()[:2] for line in listed.stdout.splitlines()[1:] if line.strip()]
    assert rows == [["plugin-b", "cache"]]
    missing = kubectl_colo(cluster_with_vms, "--context", "nope", "list")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr
    assert "--context" in missing.stderr
