"""The chart's monitoring: ServiceMonitor, PodMonitor, PrometheusRule and Grafana dashboard.

The alert rules are checked and unit-tested with Prometheus's own promtool
(`bash .ci/promtool` builds it; `.ci/run` does so before the tests): each alert
fires on the series that should fire it and stays quiet otherwise. The
dashboard is validated against a JSON Schema of Grafana's dashboard model, its
queries are parsed by promtool, and every metric a rule or a panel names must
exist in the agent's or the operator's registry.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client import CollectorRegistry

from colo_agent.api.metrics import AgentMetrics
from colo_operator.metrics import OperatorMetrics

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "colo-operator"
DASHBOARD = json.loads((CHART / "dashboards" / "colo-overview.json").read_text())
DASHBOARD_SCHEMA = json.loads((ROOT / "tests" / "support" / "grafana_dashboard.schema.json").read_text())
MONITORING = [
    "--set", "monitoring.serviceMonitor.enabled=true", "--set", "monitoring.podMonitor.enabled=true",
    "--set", "monitoring.prometheusRule.enabled=true", "--set", "monitoring.dashboard.enabled=true",
]  # fmt: skip


def _tool(name: str, cache: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / cache
    candidates = sorted(glob.glob(str(base / "*" / "bin" / name)))
    return candidates[-1] if candidates else None


HELM = _tool("helm", "colo-e2e")
PROMTOOL = os.environ.get("PROMTOOL") or _tool("promtool", "colo-promtool")
needs_helm = pytest.mark.skipif(HELM is None, reason="no helm binary (bash .ci/e2e-tools builds one)")
# Under CI (.ci/run builds promtool first) a missing promtool fails instead of skipping.
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None and not os.environ.get("CI"), reason="no promtool (bash .ci/promtool builds one)"
)


def render(*args: str) -> list[dict[str, Any]]:
    assert HELM is not None
    out = subprocess.run(
        [HELM, "template", "colo", str(CHART), "--namespace", "colo-system", *args],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None, "no promtool: bash .ci/promtool"
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------- metric names


def known_metrics() -> set[str]:
    """Every series name the agent and the operator expose."""
    names: set[str] = set()
    for registry in (
        AgentMetrics(CollectorRegistry()).registry,
        OperatorMetrics(CollectorRegistry()).registry,
    ):
        for family in registry.collect():
            names.add(family.name)
            names.update(sample.name for sample in family.samples)
            if family.type == "histogram":
                names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
            if family.type == "counter":
                names.add(f"{family.name}_total")
    return names


# A name followed by a matcher operator is a label (e.g. colo_dev_vm, from the PodMonitor).
METRIC = re.compile(r"\b((?:colo|process|python)_[a-zA-Z0-9_]+)\b(?!\s*(?:=|!=|=~|!~))")


def metrics_in(expr: str) -> set[str]:
    return set(METRIC.findall(expr))


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in DASHBOARD["panels"] for t in p.get("targets", ())]


def test_every_metric_the_dashboard_names_exists() -> None:
    known = known_metrics()
    used = set().union(*(metrics_in(e) for e in dashboard_exprs()))
    assert used, "the dashboard queries no metric"
    assert used - known == set()
    # Every figure the issue asks a platform team to watch is on it.
    for name in ("colo_ack_age_seconds", "colo_checkpoint_pause_seconds_bucket", "colo_operator_vms",
                 "colo_operator_failover_duration_seconds_bucket", "colo_operator_transitions_total",
                 "colo_operator_reconcile_duration_seconds_bucket"):  # fmt: skip
        assert name in used, name


def test_dashboard_matches_grafanas_dashboard_schema() -> None:
    jsonschema.validate(DASHBOARD, DASHBOARD_SCHEMA)
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    # Panels must not overlap on Grafana's 24-column grid.
    cells: set[tuple[int, int]] = set()
    for p in DASHBOARD["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine


def test_the_schema_rejects_what_grafana_would() -> None:
    broken = json.loads(json.dumps(DASHBOARD))
    broken["panels"][1]["gridPos"]["w"] = 30
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, DASHBOARD_SCHEMA)
    del broken["panels"][1]["gridPos"]["w"]
    broken["panels"][2]["targets"][0].pop("refId")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, DASHBOARD_SCHEMA)


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # Grafana's variables, as Grafana substitutes them.
    rules = [
        {
            "record": f"dashboard:query{i}",
            "expr": e.replace("$__rate_interval", "1m").replace("$namespace", ".*"),
        }
        for i, e in enumerate(dashboard_exprs())
    ]
    (tmp_path / "dashboard.rules.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "d", "rules": rules}]})
    )
    result = promtool("check", "rules", "dashboard.rules.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- the chart


@needs_helm
def test_monitoring_is_off_unless_asked_for() -> None:
    kinds = {d["kind"] for d in render()}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert not any(
        d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard") for d in render()
    )
    # The operator's metrics endpoint and its Service are there either way.
    service = next(
        d for d in render() if d["kind"] == "Service" and d["metadata"]["name"].endswith("-metrics")
    )
    assert service["spec"]["ports"][0]["port"] == 9090


@needs_helm
def test_monitors_scrape_the_operator_and_every_agent_pod() -> None:
    docs = render(*MONITORING)
    by_kind = {d["kind"]: d for d in docs}
    deployment = by_kind["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--metrics-port=9090" in container["args"]
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in container["ports"]
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-metrics"))
    monitor = by_kind["ServiceMonitor"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    pods = by_kind["PodMonitor"]["spec"]
    # The labels and port name the operator gives agent pods (manifests.py).
    assert pods["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "colo-agent",
        "app.kubernetes.io/managed-by": "colo-operator",
    }
    assert pods["namespaceSelector"] == {"any": True}
    assert pods["podMetricsEndpoints"][0]["port"] == "control"
    scoped = render(*MONITORING, "--set", "watchNamespaces={vms-a,vms-b}")
    assert next(d for d in scoped if d["kind"] == "PodMonitor")["spec"]["namespaceSelector"] == {
        "matchNames": ["vms-a", "vms-b"]
    }
    dashboard = next(
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")
    )
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["colo-overview.json"]) == DASHBOARD


def test_agent_pods_carry_what_the_pod_monitor_selects() -> None:
    from support.operator_world import vm

    from colo_operator.config import OperatorConfig
    from colo_operator.decide import CreatePod
    from colo_operator.manifests import agent_pod
    from colo_operator.placement import Place

    place = Place(candidates=("n1",), excluded_domains=(), excluded_nodes=())
    pod = agent_pod(
        vm(), OperatorConfig(), CreatePod(name="vm-0", serial=0, role="primary", peer=None, place=place)
    )
    assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == "colo-agent"
    assert pod["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "colo-operator"
    assert "control" in {p["name"] for p in pod["spec"]["containers"][0]["ports"]}


def rules_file(tmp_path: Path, *args: str) -> dict[str, Any]:
    rule = next(d for d in render(*MONITORING, *args) if d["kind"] == "PrometheusRule")
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
    return dict(rule["spec"])


@needs_helm
def test_alert_rules_name_only_real_metrics_and_take_thresholds_from_the_values(tmp_path: Path) -> None:
    spec = rules_file(tmp_path)
    alerts = {r["alert"]: r for g in spec["groups"] for r in g["rules"]}
    assert set(alerts) >= {
        "ColoVMNotProtected",
        "ColoVMFailedOver",
        "ColoCheckpointPauseHigh",
        "ColoLeaseNotRenewable",
    }
    assert set().union(*(metrics_in(r["expr"]) for r in alerts.values())) <= known_metrics()
    # Thresholds come from the values.
    custom = rules_file(tmp_path, "--set", "monitoring.prometheusRule.notProtectedFor=2m",
                        "--set-json", "monitoring.prometheusRule.checkpointPauseP99Seconds=0.2")  # fmt: skip
    rules = {r["alert"]: r for g in custom["groups"] for r in g["rules"]}
    assert rules["ColoVMNotProtected"]["for"] == "2m"
    assert rules["ColoCheckpointPauseHigh"]["expr"].endswith("> 0.2")


@needs_helm
@needs_promtool
def test_alert_rules_pass_promtool_check(tmp_path: Path) -> None:
    rules_file(tmp_path)
    result = promtool("check", "rules", "alerts.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# Each alert against series that must fire it and series that must not.
ALERT_TESTS = """
rule_files: [alerts.yaml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'colo_operator_vm_phase{namespace="a", name="syncing", phase="Syncing"}'
        values: '1x10'
      - series: 'colo_operator_vm_phase{namespace="a", name="syncing", phase="Protected"}'
        values: '0x10'
      - series: 'colo_operator_vm_phase{namespace="a", name="ok", phase="Protected"}'
        values: '1x10'
      - series: 'colo_operator_vm_phase{namespace="a", name="halted", phase="Stopped"}'
        values: '1x10'
      - series: 'colo_operator_vm_phase{namespace="a", name="brief", phase="Degraded"}'
        values: '1 1 0 0 0 0 0 0 0 0 0'
    alert_rule_test:
      - eval_time: 4m
        alertname: ColoVMNotProtected
        exp_alerts: []
      - eval_time: 6m
        alertname: ColoVMNotProtected
        exp_alerts:
          - exp_labels: {severity: warning, namespace: a, name: syncing}
            exp_annotations:
              summary: ColoVM a/syncing has no synced secondary
              description: >-
                ColoVM a/syncing has not been Protected for 5m: losing its primary's node now would
                lose the VM. kubectl colo status -n a syncing shows why.
  - interval: 1m
    input_series:
      - series: 'colo_operator_transitions_total{kind="Failover", cause="NodeNotReady"}'
        values: '0 0 0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1'
      - series: 'colo_operator_transitions_total{kind="Switchover", cause="Switchover"}'
        values: '0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25'
    alert_rule_test:
      - eval_time: 2m
        alertname: ColoVMFailedOver
        exp_alerts: []
      - eval_time: 5m
        alertname: ColoVMFailedOver
        exp_alerts:
          - exp_labels: {severity: warning, cause: NodeNotReady}
            exp_annotations:
              summary: A ColoVM failed over (NodeNotReady)
              description: >-
                1 failover(s) caused by NodeNotReady in the last 15m; the promoted secondary serves and
                a new one is being synced. kubectl get cvm -A and kubectl get events --field-selector
                reason=Promoted -A say which.
      - eval_time: 25m
        alertname: ColoVMFailedOver
        exp_alerts: []
  - interval: 1m
    input_series:
      # 60 pauses a minute, all in the 0.1 s bucket: p99 about 0.1 s.
      - series: 'colo_checkpoint_pause_seconds_bucket{namespace="a", pod="slow-0", le="0.05"}'
        values: '0x30'
      - series: 'colo_checkpoint_pause_seconds_bucket{namespace="a", pod="slow-0", le="0.1"}'
        values: '0+60x30'
      - series: 'colo_checkpoint_pause_seconds_bucket{namespace="a", pod="slow-0", le="+Inf"}'
        values: '0+60x30'
      # All under 1 ms.
      - series: 'colo_checkpoint_pause_seconds_bucket{namespace="a", pod="fast-0", le="0.001"}'
        values: '0+60x30'
      - series: 'colo_checkpoint_pause_seconds_bucket{namespace="a", pod="fast-0", le="0.05"}'
        values: '0+60x30'
      - series: 'colo_checkpoint_pause_seconds_bucket{namespace="a", pod="fast-0", le="0.1"}'
        values: '0+60x30'
      - series: 'colo_checkpoint_pause_seconds_bucket{namespace="a", pod="fast-0", le="+Inf"}'
        values: '0+60x30'
    alert_rule_test:
      - eval_time: 25m
        alertname: ColoCheckpointPauseHigh
        exp_alerts:
          - exp_labels: {severity: warning, namespace: a, pod: slow-0}
            exp_annotations:
              summary: Checkpoint pauses of a/slow-0 are long
              description: >-
                The p99 guest pause for a checkpoint is 99.5ms (threshold 0.05s): the guest dirties
                much memory per epoch, or the node is overloaded.
  - interval: 1m
    input_series:
      - series: 'colo_lease_valid{namespace="a", pod="cut-0"}'
        values: '1 1 0 0 0 0 0'
      - series: 'colo_role{namespace="a", pod="cut-0", colo_role="primary"}'
        values: '1x6'
      - series: 'colo_lease_valid{namespace="a", pod="standby-1"}'
        values: '0x6'
      - series: 'colo_role{namespace="a", pod="standby-1", colo_role="primary"}'
        values: '0x6'
      - series: 'colo_role{namespace="a", pod="standby-1", colo_role="secondary"}'
        values: '1x6'
    alert_rule_test:
      - eval_time: 2m
        alertname: ColoLeaseNotRenewable
        exp_alerts: []
      - eval_time: 4m
        alertname: ColoLeaseNotRenewable
        exp_alerts:
          - exp_labels: {severity: critical, namespace: a, pod: cut-0}
            exp_annotations:
              summary: Primary a/cut-0 cannot renew its Lease
              description: >-
                The primary agent has held no valid Lease for 1m (API server unreachable or
                overloaded). It serves only output its secondary acknowledged; a failover is
                impossible meanwhile.
"""


@needs_helm
@needs_promtool
def test_alerts_fire_on_what_they_describe_and_only_then(tmp_path: Path) -> None:
    rules_file(tmp_path)
    (tmp_path / "alerts.test.yaml").write_text(ALERT_TESTS)
    result = promtool("test", "rules", "alerts.test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
