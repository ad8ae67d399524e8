"""Pure pieces of the local cluster harness (tests/e2e/cluster)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from unittest import mock

import pytest
from cluster import build
from cluster.noderunner import NodeRunner, Probe, _expand, _field, _port


def test_expand_replaces_known_variables_keeps_unknown_and_unescapes_dollars() -> None:
    env = {"NODE": "node-1", "POD": "web"}
    assert _expand("$(NODE)/$(POD)", env) == "node-1/web"
    assert _expand("$(MISSING) stays", env) == "$(MISSING) stays"
    assert _expand("$$(NODE) is literal", env) == "$(NODE) is literal"
    assert _expand("no refs", env) == "no refs"


def test_field_refs_cover_labels_annotations_and_refuse_the_rest() -> None:
    meta = {"labels": {"app": "web"}, "annotations": {"colo.dev/term": "3"}}
    assert _field("metadata.labels['app']", {}, meta) == "web"
    assert _field("metadata.annotations['colo.dev/term']", {}, meta) == "3"
    assert _field("metadata.labels['absent']", {}, meta) == ""
    assert _field("spec.nodeName", {"spec.nodeName": "node-2"}, meta) == "node-2"
    with pytest.raises(ValueError, match="not supported"):
        _field("status.phase", {}, meta)


def test_probe_ports_by_number_or_name() -> None:
    container = {"ports": [{"name": "http", "containerPort": 8080}]}
    assert _port(9000, container) == 9000
    assert _port("9000", container) == 9000
    assert _port("http", container) == 8080
    with pytest.raises(ValueError, match="named port"):
        _port("grpc", container)


def test_probe_thresholds_latch_like_the_kubelet() -> None:
    probe = Probe({"successThreshold": 2, "failureThreshold": 3, "initialDelaySeconds": 5}, started=100.0)
    assert probe.next_due == 105.0
    probe.record(True)
    assert not probe.ok  # one success is not enough
    probe.record(True)
    assert probe.ok
    probe.record(False)
    probe.record(False)
    assert probe.ok and not probe.failed  # still below the failure threshold
    probe.record(False)
    assert not probe.ok and probe.failed
    probe.record(True)
    assert not probe.failed and not probe.ok


def test_replace_parser_reads_blocks_single_lines_and_ignores_comments() -> None:
    go_mod = """
module example
// replace commented => out v1
replace single.example/a => single.example/a v0.1.0
replace (
    k8s.io/api => ./staging/src/k8s.io/api // trailing comment
    k8s.io/client-go => ./staging/src/k8s.io/client-go
)
require k8s.io/kubernetes v1.34.4
"""
    assert build._replaced_paths(go_mod) == {"single.example/a", "k8s.io/api", "k8s.io/client-go"}


def test_wrapper_module_replaces_all_staging_modules_with_the_release() -> None:
    go_mod = (build.GO_DIR / "kubernetes" / "go.mod").read_text()
    replaced = build._replaced_paths(go_mod)
    assert len(replaced) == 31
    assert {"k8s.io/api", "k8s.io/apimachinery", "k8s.io/client-go", "k8s.io/kubectl"} <= replaced
    for line in go_mod.splitlines():
        if "=>" in line and not line.lstrip().startswith("//"):
            source, target = (side.split() for side in line.split("=>"))
            assert target == [source[-1], "v0.34.4"], line


def test_cache_stamp_changes_with_the_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLO_E2E_CACHE", str(tmp_path))
    group = build.GROUPS[0]
    assert not build.is_current(group)
    assert group.name in {g.name for g in build.GROUPS if not build.is_current(g)}
    other = build.BuildGroup(group.name, group.module_dir, group.packages, ("-X a.b=c",), group.binaries)
    assert other.fingerprint() != group.fingerprint()
    assert build.bin_dir() == tmp_path / build.KUBERNETES_VERSION / "bin"


def test_a_group_is_current_only_with_its_stamp_and_every_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLO_E2E_CACHE", str(tmp_path))
    group = next(g for g in build.GROUPS if g.name == "kubernetes")
    build.bin_dir().mkdir(parents=True)
    for name in group.outputs():
        (build.bin_dir() / name).write_text("#!/bin/sh\n")
        (build.bin_dir() / name).chmod(0o755)
    stamp = tmp_path / build.KUBERNETES_VERSION / "stamps" / "kubernetes.json"
    stamp.parent.mkdir()
    stamp.write_text(json.dumps({"fingerprint": group.fingerprint()}))
    assert build.is_current(group)
    (build.bin_dir() / "kubectl").unlink()
    assert not build.is_current(group)
    assert "kubectl" in build.missing()
    stamp.write_text("{not json")
    assert not build.is_current(group)


def test_a_node_keeps_its_heartbeat_while_pod_work_takes_seconds() -> None:
    # With forty agent pods to probe and report, one tick of pod work took longer than the
    # node monitor's grace period, and healthy nodes went Unknown in the middle of the
    # operator benchmark (secondaries replaced as lost, over and over).
    runner = NodeRunner.__new__(NodeRunner)  # no cluster: only the loops are exercised
    runner.stopping = False
    runner.pods = {}
    beats: list[float] = []

    def heartbeat() -> None:
        beats.append(time.monotonic())

    def sync_pods() -> None:
        time.sleep(1.0)  # one slow tick of pod work
        runner.stopping = True

    runner.heartbeat = heartbeat  # type: ignore[method-assign]
    runner.sync_pods = sync_pods  # type: ignore[method-assign]
    runner.shutdown = lambda: None  # type: ignore[method-assign]
    with mock.patch.object(signal, "signal"):
        runner.run()
    assert len(beats) >= 3  # a beat every tick (0.25 s) all through the slow second
