"""The chart's monitoring: ServiceMonitor, PodMonitor, PrometheusRule and Grafana dashboard.

The dashboard is validated against a JSON Schema of Grafana's dashboard model,
and every metric a rule or a panel names must exist in the agent's or the
operator's registry.
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
needs_helm = pytest.mark.skipif(HELM is None, reason="no helm binary (bash .ci/e2e-tools builds one)")


def render(*args: str) -> list[dict[str, Any]]:
    assert HELM is not None
    out = subprocess.run(
        [HELM, "template", "colo", str(CHART), "--namespace", "colo-system", *args],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


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
