"""The ColoVM CRD: structural, defaulted, validated, and in step with the operator's own parser."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from support.operator_world import UNREACHABLE, agent, lost_primary_world, world

from colo_agent.api.models import Role
from colo_operator import constants as c
from colo_operator import crd as crd_source
from colo_operator.decide import decide
from colo_operator.snapshot import LeaseView
from colo_operator.spec import ColoVMSpec

ROOT = Path(__file__).resolve().parents[2]
CRD = yaml.safe_load((ROOT / "crds" / "colovm.yaml").read_text())
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
SPEC = SCHEMA["properties"]["spec"]


def defaults(schema: dict[str, Any], present: bool = True) -> Any:
    """What the API server's defaulting makes of `{}` for this schema: an absent object
    appears only through its own default (guest.qemu, which has none, stays absent)."""
    if schema.get("type") == "object" and "properties" in schema:
        if not present and "default" not in schema:
            return None
        out = {}
        for name, sub in schema["properties"].items():
            value = defaults(sub, present=False)
            if value is not None:
                out[name] = value
        return out
    return schema.get("default")


def walk(schema: dict[str, Any], path: str = ""):
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from walk(sub, f"{path}.{name}")
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def test_identity() -> None:
    assert CRD["metadata"]["name"] == f"{c.PLURAL}.{c.GROUP}"
    assert CRD["spec"]["group"] == c.GROUP and VERSION["name"] == c.VERSION
    assert CRD["spec"]["names"]["kind"] == c.KIND and CRD["spec"]["names"]["shortNames"] == ["cvm"]
    assert VERSION["subresources"] == {"status": {}}
    assert VERSION["served"] and VERSION["storage"]


def test_structural_every_node_has_a_type() -> None:
    for path, node in walk(SCHEMA):
        if path in (".metadata",):
            continue
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"


def test_defaults_match_the_operator_parser() -> None:
    defaulted = defaults(SPEC)
    assert defaulted["guest"] == {"backend": "microvm", "accel": "auto", "memory": "64Mi"}
    assert ColoVMSpec.from_dict(defaulted) == ColoVMSpec.from_dict({})


def test_the_checked_in_crd_files_are_generated_from_the_one_source(tmp_path: Path) -> None:
    assert crd_source.stale() == [], "regenerate them: python -m colo_operator.crd"
    # The check notices a hand edit.
    for target in crd_source.TARGETS:
        (tmp_path / target).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / target).write_text(crd_source.render())
    assert crd_source.main(["--check", "--root", str(tmp_path)]) == 0
    edited = tmp_path / crd_source.TARGETS[1]
    edited.write_text(edited.read_text().replace("default: 100", "default: 200", 1))
    assert crd_source.main(["--check", "--root", str(tmp_path)]) == 1


def test_every_property_is_described() -> None:
    """`kubectl explain` shows each description; none may say <no description>."""
    # metadata is the standard ObjectMeta; the API server allows nothing but its type there.
    missing = [
        path
        for path, node in walk(SCHEMA)
        if path != ".metadata" and not str(node.get("description", "")).strip()
    ]
    assert SCHEMA["properties"]["metadata"] == {"type": "object"}
    assert missing == []
    assert all(col.get("description") for col in VERSION["additionalPrinterColumns"])


def test_durations_are_milliseconds_everywhere() -> None:
    for path, node in walk(SCHEMA):
        name = path.rsplit(".", 1)[-1]
        assert not name.endswith(("Seconds", "Secs", "S")) or name == "tolerationSeconds", path
        if name.endswith("Ms"):
            assert node["type"] in ("integer", "number"), path


def test_categories_put_colovms_in_kubectl_get_all() -> None:
    assert CRD["spec"]["names"]["categories"] == ["all", "colo"]


def test_cel_rules_present() -> None:
    failover = SPEC["properties"]["failover"]
    heartbeat, lease = failover["x-kubernetes-validations"]
    assert heartbeat["rule"].endswith("self.heartbeatTimeoutMs > self.heartbeatIntervalMs")
    assert heartbeat["fieldPath"] == ".heartbeatTimeoutMs"
    assert lease["rule"].endswith("self.leaseDurationMs > self.heartbeatIntervalMs")
    assert lease["fieldPath"] == ".leaseDurationMs"
    memory_rules = " ".join(
        r["rule"] for r in SPEC["properties"]["guest"]["properties"]["memory"]["x-kubernetes-validations"]
    )
    assert "quantity('4Mi')" in memory_rules and "quantity('1Gi')" in memory_rules
    # Guest immutability lives on spec: it may change while runStrategy stays Halted.
    guest, memory_limit, qemu_mode = SPEC["x-kubernetes-validations"]
    assert qemu_mode["fieldPath"] == ".replication.mode" and "'lockstep'" in qemu_mode["rule"]
    assert memory_limit["fieldPath"] == ".resources.limits"
    assert "quantity(self.guest.memory)" in memory_limit["rule"]
    assert guest["fieldPath"] == ".guest" and "self.guest == oldSelf.guest" in guest["rule"]
    assert (
        "oldSelf.runStrategy == 'Halted'" in guest["rule"] and "self.runStrategy == 'Halted'" in guest["rule"]
    )


def test_bounds_and_enums() -> None:
    rep = SPEC["properties"]["replication"]["properties"]
    assert (rep["channels"]["minimum"], rep["channels"]["maximum"]) == (1, 16)
    assert rep["mode"]["enum"] == ["checkpoint", "lockstep"]
    assert SPEC["properties"]["guest"]["properties"]["accel"]["enum"] == ["auto", "kvm", "tcg"]
    assert SCHEMA["properties"]["status"]["properties"]["phase"]["enum"] == [
        "Pending",
        "Syncing",
        "Protected",
        "Degraded",
        "FailingOver",
        "Failed",
        "Stopped",
    ]
    assert SPEC["properties"]["runStrategy"]["enum"] == ["Always", "Halted"]


def test_printer_columns() -> None:
    columns = {col["name"]: col["jsonPath"] for col in VERSION["additionalPrinterColumns"]}
    assert columns == {
        "Phase": ".status.phase",
        "Primary": ".status.primary.node",
        "Secondary": ".status.secondary.node",
        "Term": ".status.term",
        "Pause-ms": ".status.lastCheckpoint.pauseMs",
        "Mismatches": ".status.stream.mismatches",
        "Up-To-Date": ".status.upToDate",
        "Age": ".metadata.creationTimestamp",
    }
    # QEMU's figure is for `kubectl get -o wide` only: a micro-VM has none.
    wide = [col["name"] for col in VERSION["additionalPrinterColumns"] if col.get("priority", 0) > 0]
    assert wide == ["Mismatches"]


def test_the_status_keeps_a_qemu_primarys_stream_figures() -> None:
    stream = SCHEMA["properties"]["status"]["properties"]["stream"]
    assert set(stream["properties"]) == {"state", "channels", "mismatches"}
    assert "single-stream" in stream["properties"]["channels"]["description"]


def test_every_status_field_the_operator_writes_is_in_the_schema() -> None:
    """A field missing from the schema would be pruned silently by the API server."""
    statuses = [decide(world()).status]
    plan = decide(lost_primary_world())
    statuses.append(plan.status)
    s = lost_primary_world(status=plan.status, lease=LeaseView("vm-1", 2))
    s = replace(s, agents={"vm-0": UNREACHABLE, "vm-1": agent(Role.PRIMARY, term=2)})
    statuses.append(decide(s).status)
    statuses.append(decide(world(spec={"runStrategy": "Halted"})).status)
    manual = world(spec={"updateStrategy": "Manual"}, annotations={c.ANNOTATION_UPGRADE: "now"})
    statuses.append(decide(replace(manual, template="new")).status)
    status_schema = SCHEMA["properties"]["status"]

    def check(value: Any, schema: dict[str, Any], path: str) -> None:
        if isinstance(value, dict):
            props = schema.get("properties")
            assert props is not None, f"{path} is not an object with properties in the schema"
            for key, sub in value.items():
                assert key in props, f"status{path}.{key} would be pruned"
                check(sub, props[key], f"{path}.{key}")
        elif isinstance(value, list):
            for item in value:
                check(item, schema["items"], f"{path}[]")

    for st in statuses:
        check(st, status_schema, "")


def test_examples_are_valid_and_use_only_schema_fields() -> None:
    examples = sorted((ROOT / "examples").glob("*.yaml"))
    assert len(examples) >= 3

    def fields(value: Any, schema: dict[str, Any], path: str) -> None:
        if isinstance(value, dict) and "properties" in schema:
            for key, sub in value.items():
                assert key in schema["properties"], f"{path}.{key} is not in the CRD (it would be pruned)"
                fields(sub, schema["properties"][key], f"{path}.{key}")
        if "enum" in schema:
            assert value in schema["enum"], f"{path}: {value!r}"

    for path in examples:
        doc = yaml.safe_load(path.read_text())
        assert doc["apiVersion"] == f"{c.GROUP}/{c.VERSION}" and doc["kind"] == c.KIND
        ColoVMSpec.from_dict(doc["spec"])
        fields(doc["spec"], SPEC, f"{path.name}:spec")
