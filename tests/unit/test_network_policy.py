"""The agents' NetworkPolicy, evaluated the way an enforcing CNI reads it, against the pods
that really carry labels: the operator's pod as the chart renders it, agent pods as the
operator builds them, and pods that must be refused.

The evaluator follows the NetworkPolicy API (networking.k8s.io/v1, ingress): a policy
isolates the pods its podSelector matches in its own namespace; a connection is admitted
when one rule's `from` (absent: anyone) and `ports` (absent: every port) both match. A
peer with only a podSelector means pods of the policy's namespace; with a
namespaceSelector, pods of the namespaces it matches.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.operator_world import vm

from colo_operator import constants as c
from colo_operator.config import OperatorConfig
from colo_operator.decide import CreatePod
from colo_operator.manifests import agent_pod, network_policy
from colo_operator.placement import Place

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "colo-operator"
RELEASE_NAMESPACE = "colo-system"


@dataclass(frozen=True)
class Pod:
    namespace: str
    labels: dict[str, str]
    namespace_labels: dict[str, str] = field(default_factory=dict)

    @property
    def ns_labels(self) -> dict[str, str]:
        # Every namespace carries its name as a label (Kubernetes 1.21 and later).
        return {"kubernetes.io/metadata.name": self.namespace, **self.namespace_labels}


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    unknown = set(selector) - {"matchLabels"}
    assert not unknown, f"the evaluator does not know {unknown}: extend it before relying on it"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _peer_matches(peer: dict[str, Any], policy_ns: str, src: Pod) -> bool:
    assert "ipBlock" not in peer, "the evaluator does not know ipBlock"
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], src.ns_labels):
            return False
    elif src.namespace != policy_ns:
        return False
    return "podSelector" not in peer or _selects(peer["podSelector"], src.labels)


def admits(policy: dict[str, Any], src: Pod, dst: Pod, port: int) -> bool:
    ns = policy["metadata"]["namespace"]
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    if dst.namespace != ns or not _selects(spec["podSelector"], dst.labels):
        return True  # not isolated by this policy
    for rule in spec.get("ingress", []):
        peers = rule.get("from")
        ports = rule.get("ports")
        if peers is not None and not any(_peer_matches(p, ns, src) for p in peers):
            continue
        if ports is not None and not any(p.get("protocol", "TCP") == "TCP" and p["port"] == port
                                         for p in ports):
            continue
        return True
    return False


def _helm() -> str | None:
    found = shutil.which("helm")
    if found:
        return found
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "colo-e2e"
    candidates = sorted(glob.glob(str(cache / "*" / "bin*" / "helm")))
    return candidates[-1] if candidates else None


HELM = _helm()


def _operator_pod(*values: str) -> tuple[Pod, OperatorConfig]:
    """The operator's pod and the configuration its environment gives it, as the chart renders them."""
    assert HELM is not None
    out = subprocess.run(
        [HELM, "template", "colo", str(CHART), "--namespace", RELEASE_NAMESPACE, *values],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    deployment = next(d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Deployment")
    template = deployment["spec"]["template"]
    env = {e["name"]: e["value"] for e in template["spec"]["containers"][0]["env"] if "value" in e}
    return Pod(RELEASE_NAMESPACE, template["metadata"]["labels"]), OperatorConfig.from_env(env)


def _agent(name: str, vm_name: str = "vm", namespace: str = "ns", spec: dict[str, Any] | None = None) -> Pod:
    view = dataclasses.replace(vm(spec=spec), name=vm_name, namespace=namespace)
    action = CreatePod(name=name, serial=1, role="primary", peer=None, place=Place(("n1",), (), ()))
    return Pod(namespace, agent_pod(view, OperatorConfig(), action)["metadata"]["labels"])


@pytest.mark.skipif(HELM is None, reason="no helm binary (bash .ci/e2e-tools builds one)")
@pytest.mark.parametrize("values", [(), ("--set", "podLabels.team=storage")])
def test_only_the_operator_reaches_control_and_only_the_vms_agents_reach_replication(
    values: tuple[str, ...],
) -> None:
    operator, config = _operator_pod(*values)
    policy = network_policy(vm(), config.namespace, config.operator_labels)
    ours, peer = _agent("vm-0"), _agent("vm-1")
    other_vm = _agent("other-0", vm_name="other")  # same namespace, another ColoVM
    same_name_elsewhere = _agent("vm-0", namespace="tenant-b")  # another namespace's ColoVM "vm"
    client = Pod("ns", {"app": "web"})
    # The operator's labels, but in another namespace: not the operator.
    impostor = Pod("ns", operator.labels)

    assert admits(policy, operator, ours, c.CONTROL_PORT)
    assert admits(policy, peer, ours, c.REPLICATION_PORT)
    for src in (operator, peer, other_vm, same_name_elsewhere, client, impostor):
        assert admits(policy, src, ours, c.CLIENT_PORT)  # the Service's clients, from anywhere

    for src in (peer, other_vm, same_name_elsewhere, client, impostor):
        assert not admits(policy, src, ours, c.CONTROL_PORT), src
    for src in (operator, other_vm, same_name_elsewhere, client, impostor):
        assert not admits(policy, src, ours, c.REPLICATION_PORT), src
    for port in (22, 9090, c.CONTROL_PORT + 1):  # nothing else is open
        assert not admits(policy, peer, ours, port)

    # The policy isolates this VM's agents only: another VM's pods are its own policy's business.
    assert admits(policy, client, other_vm, c.REPLICATION_PORT)
    assert admits(policy, client, Pod("ns", operator.labels), c.CONTROL_PORT)


QEMU_VM = {"guest": {"backend": "qemu", "memory": "256Mi", "qemu": {"disk": {"size": "1Gi"}}}}


def test_qemus_colo_ports_open_between_the_vms_own_agents_only() -> None:
    """QEMU's COLO connections are in clear: the policy is what keeps other pods off them."""
    policy = network_policy(vm(spec=QEMU_VM), "colo-system", {"app.kubernetes.io/name": "colo-operator"})
    ours, peer = _agent("vm-0", spec=QEMU_VM), _agent("vm-1", spec=QEMU_VM)
    other_vm = _agent("other-0", vm_name="other", spec=QEMU_VM)
    operator = Pod("colo-system", {"app.kubernetes.io/name": "colo-operator"})
    for port in (*c.QEMU_COLO_PORTS, c.REPLICATION_PORT):
        assert admits(policy, peer, ours, port)
        for src in (other_vm, operator, Pod("ns", {"app": "web"})):
            assert not admits(policy, src, ours, port), (src, port)
    # A micro-VM's agents listen on no QEMU port, and the policy opens none.
    plain = network_policy(vm(), "colo-system", {"app.kubernetes.io/name": "colo-operator"})
    assert not any(admits(plain, _agent("vm-1"), _agent("vm-0"), port) for port in c.QEMU_COLO_PORTS)


def test_the_evaluator_refuses_what_it_does_not_understand() -> None:
    policy = network_policy(vm(), "colo-system", {"app.kubernetes.io/name": "colo-operator"})
    policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchExpressions"] = []
    with pytest.raises(AssertionError, match="does not know"):
        admits(policy, Pod("colo-system", {}), _agent("vm-0"), c.CONTROL_PORT)
