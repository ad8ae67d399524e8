"""The Helm chart: the CRD copy, values and their schema, RBAC and the Deployment.

Rendering and `helm lint` run when a helm binary is found (the e2e harness
builds one into ~/.cache/colo-e2e/<version>/bin); the file checks run always.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "colo-operator"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())


def test_chart_carries_the_crd_byte_for_byte() -> None:
    assert (CHART / "files" / "colovm.yaml").read_bytes() == (ROOT / "crds" / "colovm.yaml").read_bytes(), (
        "charts/colo-operator/files/colovm.yaml differs from crds/colovm.yaml: python -m colo_operator.crd"
    )


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "colo-operator"
    assert chart["appVersion"] == "0.1.0"
    # The CRD must not also sit in crds/, where Helm would install it without upgrades.
    assert not (CHART / "crds").exists()


def check(value: Any, schema: dict[str, Any], path: str = "values") -> list[str]:
    """The subset of JSON Schema that values.schema.json uses."""
    errors: list[str] = []
    kind = schema.get("type")
    types = {
        "object": dict,
        "array": list,
        "string": str,
        "boolean": bool,
        "integer": int,
        "number": (int, float),
    }
    if (
        (kind
        and not isinstance(value, types[kind]))
        or (kind in ("integer", "number") and isinstance(value, bool))
    ):
        return [f"{path}: expected {kind}, got {value!r}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{path}: {value} < {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        errors.append(f"{path}: {value} > {schema['maximum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path}.{key}: required")
        for key, sub in value.items():
            if key in props:
                errors += check(sub, props[key], f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}.{key}: not allowed")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += check(sub, schema["additionalProperties"], f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += check(item, schema["items"], f"{path}[{i}]")
    return errors


def test_values_match_their_schema() -> None:
    assert check(VALUES, SCHEMA) == []
    every_key = set(SCHEMA["properties"]) - {"global"}
    assert every_key == set(VALUES), "values.yaml and values.schema.json list different keys"


def test_schema_rejects_nonsense() -> None:
    assert check({**VALUES, "replicaCount": 0}, SCHEMA)
    assert check({**VALUES, "agent": {"kvm": {"mode": "magic"}}}, SCHEMA)
    assert check({**VALUES, "tpyo": 1}, SCHEMA)


def test_values_are_documented() -> None:
    text = (CHART / "values.yaml").read_text().splitlines()
    for i, line in enumerate(text):
        if line and not line.startswith((" ", "#")) and line.rstrip().endswith(":"):
            assert text[i - 1].startswith("#"), f"top-level section {line!r} has no comment"


def test_templates_gate_the_crd_and_keep_it() -> None:
    crd = (CHART / "templates" / "crd.yaml").read_text()
    assert "if .Values.crds.enabled" in crd
    assert "helm.sh/resource-policy" in crd and "keep" in crd
    assert '.Files.Get "files/colovm.yaml"' in crd


def test_deployment_runs_colo_operator_under_its_service_account() -> None:
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    assert "command: [colo-operator]" in deployment
    assert "serviceAccountName:" in deployment
    assert "livenessProbe" in deployment and "/healthz" in deployment
    assert VALUES["replicaCount"] == 2 and VALUES["peering"]["enabled"] is True


def test_rbac_grants_what_the_agents_role_hands_out() -> None:
    rbac = (CHART / "templates" / "rbac.yaml").read_text()
    leases = next(line for line in rbac.splitlines() if "[leases]" in line)
    verbs_line = rbac.splitlines()[rbac.splitlines().index(leases) + 1]
    for verb in ("get", "update", "create"):
        assert verb in verbs_line
    verbs = {v.strip() for line in rbac.splitlines() if "verbs:" in line
             for v in line.split("[", 1)[1].rstrip("]").split(",")}  # fmt: skip
    assert verbs <= {"get", "list", "watch", "create", "update", "patch", "delete"}, verbs
    assert "'*'" not in rbac and '"*"' not in rbac


# --------------------------------------------------------------------------- with helm


def _helm() -> str | None:
    found = shutil.which("helm")
    if found:
        return found
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "colo-e2e"
    candidates = sorted(glob.glob(str(cache / "*" / "bin*" / "helm")))
    return candidates[-1] if candidates else None


HELM = _helm()
needs_helm = pytest.mark.skipif(HELM is None, reason="no helm binary (bash .ci/e2e-tools builds one)")


def _render(*args: str) -> list[dict[str, Any]]:
    assert HELM is not None
    out = subprocess.run(
        [HELM, "template", "colo", str(CHART), "--namespace", "colo-system", *args],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@needs_helm
def test_helm_lint_is_clean() -> None:
    assert HELM is not None
    result = subprocess.run(
        [HELM, "lint", "--strict", str(CHART)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_helm
def test_rendered_chart() -> None:
    docs = _render()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("CustomResourceDefinition", "colovms.colo.dev") in kinds
    assert ("CustomResourceDefinition", "clusterkopfpeerings.kopf.dev") in kinds
    crd = next(d for d in docs if d["metadata"]["name"] == "colovms.colo.dev")
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert crd["spec"] == yaml.safe_load((ROOT / "crds" / "colovm.yaml").read_text())["spec"]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["command"] == ["colo-operator"]
    assert pod["serviceAccountName"] == "colo-colo-operator"
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert env["COLO_AGENT_IMAGE"] == "ghcr.io/colo-dev/colo-operator:0.1.0"
    assert deployment["spec"]["replicas"] == 2
    without = _render(
        "--set", "crds.enabled=false", "--set", "peering.enabled=false", "--set", "replicaCount=1"
    )
    assert not any(d["kind"] == "CustomResourceDefinition" for d in without)
    args = next(d for d in without if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0][
        "args"
    ]
    assert "--standalone" in args


def _readme_cluster_commands() -> list[list[str]]:
    """The commands of the README's "Run on a cluster" block, continuation lines joined."""
    import re
    import shlex

    text = (ROOT / "README.md").read_text()
    section = text.split("## Run on a cluster", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert block is not None
    joined = block.group(1).replace("\\\n", " ")
    lines = (line.split("#", 1)[0] for line in joined.splitlines())
    return [shlex.split(line) for line in lines if line.strip()]


@needs_helm
def test_the_readme_install_points_the_operator_and_its_agents_at_the_image_it_built() -> None:
    commands = _readme_cluster_commands()
    build = next(c for c in commands if c[:2] == ["docker", "build"])
    image = build[build.index("-t") + 1]
    load = next(c for c in commands if c[:2] == ["kind", "load"])
    assert load[-1] == image
    install = next(c for c in commands if c[:2] == ["helm", "install"])
    assert install[3] == "charts/colo-operator"
    namespace = install[install.index("--namespace") + 1]
    sets = [install[i + 1] for i, arg in enumerate(install) if arg == "--set"]
    docs = _render(*(a for s in sets for a in ("--set", s)))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == image
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["COLO_AGENT_IMAGE"] == image
    assert json.loads(env["COLO_AGENT_POD"]) == VALUES["agent"]["pod"]
    assert namespace == "colo-system"
    assert any(c[:2] == ["kubectl", "apply"] and (ROOT / c[-1]).is_file() for c in commands)
