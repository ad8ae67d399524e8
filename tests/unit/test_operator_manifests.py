"""Manifest builders: command, args and env per the agent contract, placement, ownership, RBAC."""

from __future__ import annotations

import base64
import json

from support.operator_world import vm

from colo_operator import constants as c
from colo_operator.config import KvmMode, OperatorConfig
from colo_operator.decide import CreatePod
from colo_operator.manifests import (
    agent_pod,
    base_objects,
    client_service,
    pod_disruption_budget,
    role,
    role_binding,
    secret,
    service_update,
    template_hash,
)
from colo_operator.placement import Place

PLACE = Place(candidates=("n3",), excluded_domains=("n1", "n2"), excluded_nodes=("n1", "n2"))
SECONDARY = CreatePod(name="vm-2", serial=2, role="secondary", peer="10.0.0.10:7700", place=PLACE)


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_pod_runs_colo_agent_with_the_contract_flags() -> None:
    view = vm(spec={"guest": {"memory": "0.5Gi"}, "replication": {"mode": "lockstep", "channels": 4}})
    p = agent_pod(view, OperatorConfig(agent_image="img:1"), SECONDARY)
    container = p["spec"]["containers"][0]
    assert container["command"] == ["colo-agent"]
    args = container["args"]
    assert args[0] == "run"
    assert flag(args, "--role") == "secondary"
    assert flag(args, "--vm") == "ns/vm"
    assert flag(args, "--backend") == "microvm"
    assert flag(args, "--memory") == str(512 << 20)
    assert flag(args, "--mode") == "lockstep" and flag(args, "--channels") == "4"
    assert flag(args, "--peer") == "10.0.0.10:7700"
    assert flag(args, "--arbiter") == "lease:ns/vm-primary"
    assert flag(args, "--lease-duration-ms") == "1000"
    assert flag(args, "--heartbeat-timeout-ms") == "500"
    env = {e["name"]: e for e in container["env"]}
    assert env["COLO_IDENTITY"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # The key is a file from the Secret, never an environment variable.
    assert "COLO_SECRET" not in env
    assert env["COLO_SECRET_FILE"]["value"] == "/var/run/secrets/colo/secret"
    volumes = {v["name"]: v for v in p["spec"]["volumes"]}
    assert volumes["agent-key"]["secret"]["secretName"] == "vm-agent-key"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["agent-key"] == {
        "name": "agent-key",
        "mountPath": "/var/run/secrets/colo",
        "readOnly": True,
    }
    assert container["image"] == "img:1"
    assert p["spec"]["restartPolicy"] == "Never"
    assert p["spec"]["serviceAccountName"] == "vm-agent"
    assert {port["containerPort"] for port in container["ports"]} == {6379, 7700, 8080}


def test_primary_has_no_peer() -> None:
    action = CreatePod(name="vm-0", serial=0, role="primary", peer=None, place=Place(("n1",), (), ()))
    p = agent_pod(vm(), OperatorConfig(), action)
    assert "--peer" not in p["spec"]["containers"][0]["args"]
    assert "nodeAffinity" not in p["spec"]["affinity"]


def test_anti_affinity_on_the_topology_key_and_excluded_domains() -> None:
    view = vm(
        spec={
            "placement": {
                "topologyKey": "topology.kubernetes.io/zone",
                "nodeSelector": {"colo": "yes"},
                "tolerations": [{"key": "vm", "operator": "Exists", "effect": "NoSchedule"}],
            }
        }
    )
    spec = agent_pod(view, OperatorConfig(), SECONDARY)["spec"]
    (anti,) = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti == {
        "labelSelector": {"matchLabels": {"colo.dev/vm": "vm"}},
        "topologyKey": "topology.kubernetes.io/zone",
    }
    (term,) = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert term["matchExpressions"] == [
        {"key": "topology.kubernetes.io/zone", "operator": "NotIn", "values": ["n1", "n2"]}
    ]
    assert term["matchFields"] == [
        {"key": "metadata.name", "operator": "NotIn", "values": ["n1"]},
        {"key": "metadata.name", "operator": "NotIn", "values": ["n2"]},
    ]
    assert spec["nodeSelector"] == {"colo": "yes"}
    assert spec["tolerations"] == [{"key": "vm", "operator": "Exists", "effect": "NoSchedule"}]


def test_labels_and_owner_reference_on_everything() -> None:
    view = vm()
    objects = [agent_pod(view, OperatorConfig(), SECONDARY), secret(view, "k"), *base_objects(view)]
    assert len({o["kind"] for o in objects}) == 8
    for obj in objects:
        meta = obj["metadata"]
        assert meta["namespace"] == "ns"
        assert meta["labels"][c.LABEL_VM] == "vm"
        assert meta["labels"][c.LABEL_MANAGED_BY] == "colo-operator"
        assert meta["labels"][c.LABEL_INSTANCE] == "vm"
        (owner,) = meta["ownerReferences"]
        assert owner == {
            "apiVersion": "colo.dev/v1alpha1",
            "kind": "ColoVM",
            "name": "vm",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    assert objects[0]["metadata"]["labels"][c.LABEL_ROLE] == "secondary"
    assert objects[0]["metadata"]["annotations"][c.ANNOTATION_SERIAL] == "2"


def test_kvm_only_when_asked_for() -> None:
    tcg = agent_pod(vm(spec={"guest": {"accel": "auto"}}), OperatorConfig(), SECONDARY)
    limits = tcg["spec"]["containers"][0]["resources"]["limits"]
    assert set(limits) == {"cpu", "memory"}
    assert all("hostPath" not in v for v in tcg["spec"]["volumes"])
    kvm = vm(spec={"guest": {"accel": "kvm"}, "resources": {"limits": {"cpu": "1"}}})
    by_resource = agent_pod(kvm, OperatorConfig(kvm_resource_name="example.com/kvm", kvm_group=36), SECONDARY)
    resources = by_resource["spec"]["containers"][0]["resources"]
    assert resources["limits"]["example.com/kvm"] == resources["requests"]["example.com/kvm"] == "1"
    # Through a device plugin, kvm stays unprivileged; the node's kvm group opens /dev/kvm.
    assert by_resource["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False
    assert by_resource["spec"]["securityContext"]["supplementalGroups"] == [36]
    by_path = agent_pod(kvm, OperatorConfig(kvm_mode=KvmMode.HOST_PATH), SECONDARY)
    kvm_volume = next(v for v in by_path["spec"]["volumes"] if v["name"] == "kvm")
    assert kvm_volume["hostPath"] == {"path": "/dev/kvm", "type": "CharDevice"}
    assert by_path["spec"]["containers"][0]["securityContext"]["privileged"] is True


def test_guest_ram_lives_in_a_memory_emptydir_sized_from_guest_memory() -> None:
    p = agent_pod(vm(spec={"guest": {"memory": "128Mi"}}), OperatorConfig(), SECONDARY)
    container = p["spec"]["containers"][0]
    ram = next(v for v in p["spec"]["volumes"] if v["name"] == "guest-ram")
    assert ram["emptyDir"] == {"medium": "Memory", "sizeLimit": "129Mi"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert env["COLO_RAM_DIR"] == mounts["guest-ram"]


def test_resources_are_guaranteed_from_guest_memory_and_overridable() -> None:
    small = agent_pod(vm(spec={"guest": {"memory": "64Mi"}}), OperatorConfig(), SECONDARY)
    large = agent_pod(vm(spec={"guest": {"memory": "512Mi"}}), OperatorConfig(), SECONDARY)
    for p in (small, large):
        resources = p["spec"]["containers"][0]["resources"]
        assert resources["requests"] == resources["limits"], "Guaranteed QoS by default"
    mem = [int(p["spec"]["containers"][0]["resources"]["limits"]["memory"][:-2]) for p in (small, large)]
    # RAM file plus cache: two MiB of limit per MiB of guest, on top of a fixed overhead.
    assert mem[1] - mem[0] == 2 * (512 - 64)
    assert mem[0] > 2 * 64
    burst = vm(spec={"resources": {"requests": {"cpu": "250m"}, "limits": {"cpu": "2"}}})
    resources = agent_pod(burst, OperatorConfig(), SECONDARY)["spec"]["containers"][0]["resources"]
    assert resources["requests"]["cpu"] == "250m" and resources["limits"]["cpu"] == "2"
    assert resources["requests"]["memory"] == resources["limits"]["memory"]
    # A request alone raises its limit with it: never a request above its limit.
    raised = vm(spec={"resources": {"requests": {"memory": "2Gi"}}})
    resources = agent_pod(raised, OperatorConfig(), SECONDARY)["spec"]["containers"][0]["resources"]
    assert resources["limits"]["memory"] == resources["requests"]["memory"] == "2Gi"


def test_security_context_is_restricted_with_a_startup_probe() -> None:
    p = agent_pod(vm(spec={"guest": {"accel": "tcg"}}), OperatorConfig(), SECONDARY)
    pod_sc = p["spec"]["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] == 65532
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    container = p["spec"]["containers"][0]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "control", "scheme": "HTTPS"}
    assert "initialDelaySeconds" not in container["livenessProbe"]


def test_pod_settings_from_the_operator_and_the_spec() -> None:
    from colo_operator.spec import PodSettings

    defaults = PodSettings(
        labels={"team": "a", "tier": "db"},
        annotations={"a": "1"},
        priority_class_name="colo-high",
        image_pull_secrets=("regcred",),
        affinity={"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
    )
    user_node_term = {"matchExpressions": [{"key": "disk", "operator": "In", "values": ["ssd"]}]}
    view = vm(
        spec={
            "pod": {
                "labels": {"tier": "cache", c.LABEL_VM: "spoof"},
                "annotations": {"b": "2"},
                "imagePullSecrets": [{"name": "mine"}],
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [user_node_term]
                        }
                    }
                },
            }
        }
    )
    p = agent_pod(view, OperatorConfig(agent_pod=defaults), SECONDARY)
    labels = p["metadata"]["labels"]
    assert labels["team"] == "a" and labels["tier"] == "cache"
    assert labels[c.LABEL_VM] == "vm", "the operator's own labels cannot be overridden"
    assert p["metadata"]["annotations"]["a"] == "1" and p["metadata"]["annotations"]["b"] == "2"
    assert p["spec"]["priorityClassName"] == "colo-high"
    assert p["spec"]["imagePullSecrets"] == [{"name": "mine"}]
    affinity = p["spec"]["affinity"]
    # The user's node term must also keep out the excluded nodes (terms are ORed).
    (term,) = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term["matchExpressions"][0] == user_node_term["matchExpressions"][0]
    assert {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["n1", "n2"]} in term[
        "matchExpressions"
    ]
    assert len(term["matchFields"]) == 2
    assert affinity["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0][
        "topologyKey"
    ] == ("kubernetes.io/hostname")


def test_operator_pod_defaults_come_from_the_environment() -> None:
    import pytest

    from colo_operator.config import ConfigError

    config = OperatorConfig.from_env(
        {
            "COLO_AGENT_POD": json.dumps(
                {"priorityClassName": "p", "imagePullSecrets": [{"name": "r"}], "labels": {"x": "y"}}
            )
        }
    )
    assert config.agent_pod.priority_class_name == "p"
    assert config.agent_pod.image_pull_secrets == ("r",)
    assert config.agent_pod.labels == {"x": "y"}
    with pytest.raises(ConfigError, match="COLO_AGENT_POD"):
        OperatorConfig.from_env({"COLO_AGENT_POD": '{"labels": {"x": 1}}'})


def test_service_selects_the_primary_only() -> None:
    svc = client_service(
        vm(spec={"service": {"type": "NodePort", "port": 16379, "annotations": {"lb.example.com/x": "1"}}})
    )
    assert svc["metadata"]["annotations"] == {
        "lb.example.com/x": "1",
        c.ANNOTATION_SERVICE_KEYS: "lb.example.com/x",
    }
    assert svc["spec"]["selector"] == {"colo.dev/vm": "vm", "colo.dev/role": "primary"}
    assert svc["spec"]["ports"] == [
        {"name": "resp", "port": 16379, "targetPort": "client", "protocol": "TCP"}
    ]
    assert svc["spec"]["type"] == "NodePort"


def test_service_update_follows_the_spec_annotations_and_leaves_others_alone() -> None:
    before = client_service(vm(spec={"service": {"annotations": {"a/x": "1", "a/y": "2"}}}))
    before["metadata"]["annotations"]["other/z"] = "kept"  # written by someone else
    after = vm(spec={"service": {"type": "NodePort", "annotations": {"a/x": "3"}}})
    patch = service_update(after, before)
    assert patch["metadata"]["annotations"] == {
        "a/x": "3",
        "a/y": None,  # dropped from the spec: removed from the Service
        c.ANNOTATION_SERVICE_KEYS: "a/x",
    }
    assert patch["spec"]["type"] == "NodePort"
    assert "selector" not in patch["spec"]
    # A Service from before the key list existed: only the spec's annotations are set.
    legacy = {"metadata": {"annotations": {"a/y": "2"}}}
    annotations = service_update(after, legacy)["metadata"]["annotations"]
    assert annotations == {"a/x": "3", c.ANNOTATION_SERVICE_KEYS: "a/x"}


def test_agents_may_touch_only_their_own_lease() -> None:
    (rule,) = role(vm())["rules"]
    assert rule["resources"] == ["leases"] and rule["resourceNames"] == ["vm-primary"]
    assert rule["verbs"] == ["get", "update"]
    assert role_binding(vm())["subjects"] == [
        {"kind": "ServiceAccount", "name": "vm-agent", "namespace": "ns"}
    ]


def test_secret_and_pdb() -> None:
    s = secret(vm(), "key-123")
    assert base64.b64decode(s["data"]["secret"]) == b"key-123" and s["immutable"] is True
    pdb = pod_disruption_budget(vm())
    assert pdb["spec"]["minAvailable"] == 2
    assert pdb["spec"]["selector"]["matchLabels"] == {
        "colo.dev/vm": "vm",
        "app.kubernetes.io/component": "agent",
    }


def test_lease_object_rounds_the_spec_milliseconds_up_to_whole_seconds() -> None:
    from colo_operator.manifests import lease

    assert lease(vm(spec={"failover": {"leaseDurationMs": 1500}}))["spec"]["leaseDurationSeconds"] == 2
    assert lease(vm(spec={"failover": {"leaseDurationMs": 300}}))["spec"]["leaseDurationSeconds"] == 1
    args = agent_pod(vm(spec={"failover": {"leaseDurationMs": 1500}}), OperatorConfig(), SECONDARY)
    assert flag(args["spec"]["containers"][0]["args"], "--lease-duration-ms") == "1500"


def test_template_hash_is_one_per_vm_and_moves_with_what_a_pod_cannot_change() -> None:
    config = OperatorConfig(agent_image="img:1")
    view = vm()
    primary = CreatePod(name="vm-1", serial=1, role="primary", peer=None, place=Place(("n1",), (), ()))
    hashes = {
        agent_pod(view, config, action)["metadata"]["annotations"][c.ANNOTATION_TEMPLATE]
        for action in (primary, SECONDARY)
    }
    # Role, peer, name and placement differ between the two pods; the template does not.
    assert hashes == {template_hash(view, config)}
    changed = [
        template_hash(view, OperatorConfig(agent_image="img:2")),
        template_hash(vm(spec={"image": "mine:1"}), config),
        template_hash(vm(spec={"replication": {"checkpointIntervalMs": 50}}), config),
        template_hash(vm(spec={"resources": {"limits": {"cpu": "2"}}}), config),
        template_hash(vm(annotations={c.ANNOTATION_RESTARTED_AT: "2026-12-03T17:00:00Z"}), config),
    ]
    assert len({*changed, template_hash(view, config)}) == len(changed) + 1
    # Placement and the Service may change without replacing pods.
    same = vm(spec={"placement": {"nodeSelector": {"a": "b"}}, "service": {"port": 7000}})
    assert template_hash(same, config) == template_hash(view, config)
