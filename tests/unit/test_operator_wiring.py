"""Handler wiring: one reconcile pass against a Kubernetes API (kmock's emulator) and real agent
control API servers (`colo_agent.api.server` over a scripted engine), end to end over HTTP."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import socket
from collections.abc import AsyncIterator
from typing import Any

import kmock
import kubernetes
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry
from support.operator_world import vm as vm_view

from colo_agent.api.models import (
    AgentStatus,
    CheckpointResult,
    DemoteResult,
    GuestStatus,
    PeerState,
    PeerStatus,
    PromoteResult,
    ReplicationMode,
    Role,
)
from colo_agent.api.server import create_app, serve
from colo_operator import certs, pki
from colo_operator import constants as c
from colo_operator.agent_client import AgentClient
from colo_operator.config import OperatorConfig
from colo_operator.handlers import Runtime, ensure_objects, reconcile
from colo_operator.kube import Kube
from colo_operator.manifests import secret
from colo_operator.status import EventNote

RESOURCES = [
    "v1/pods",
    "v1/nodes",
    "v1/secrets",
    "v1/services",
    "v1/serviceaccounts",
    "coordination.k8s.io/v1/leases",
    "rbac.authorization.k8s.io/v1/roles",
    "rbac.authorization.k8s.io/v1/rolebindings",
    "policy/v1/poddisruptionbudgets",
    "colo.dev/v1alpha1/colovms",
]
TOKEN = "s3cret-token"


class ScriptedAgent:
    """An agent engine reduced to its control surface: reports what the test sets, records commands."""

    def __init__(self, role: Role, *, peer: PeerState = PeerState.CONNECTED, synced: bool = True) -> None:
        self.role, self.peer, self.synced, self.term = role, peer, synced, 1
        self.calls: list[str] = []

    def status(self) -> AgentStatus:
        return AgentStatus(
            role=self.role,
            term=self.term,
            last_acked_epoch=7,
            mode=ReplicationMode.CHECKPOINT,
            peer=PeerStatus(state=self.peer, last_heartbeat_age_ms=10.0),
            guest=GuestStatus(state="running", accel="tcg", memory_bytes=64 << 20),
            synced=self.synced,
        )

    def ready(self) -> bool:
        return True

    async def promote(self, term: int) -> PromoteResult:
        self.calls.append(f"promote {term}")
        self.role, self.term = Role.PRIMARY, term
        return PromoteResult(role=Role.PRIMARY, term=term, resumed_from_epoch=7)

    async def checkpoint(self) -> CheckpointResult:
        self.calls.append("checkpoint")
        return CheckpointResult(term=self.term, epoch=8)

    async def demote(self) -> DemoteResult:
        self.calls.append("demote")
        return DemoteResult(role=self.role, term=self.term)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def agents(*pairs: tuple[str, ScriptedAgent]) -> AsyncIterator[int]:
    """Serve each scripted agent's control API on its own loopback address, all on one port."""
    port = _free_port()
    runners = [await serve(create_app(agent, TOKEN, CollectorRegistry()), ip, port) for ip, agent in pairs]
    try:
        yield port
    finally:
        for runner in runners:
            await runner.cleanup()


@pytest.fixture
async def world(kmock: kmock.KubernetesEmulator) -> AsyncIterator[tuple[Kube, list[EventNote]]]:
    for resource in RESOURCES:
        kmock.resources[resource] = {}
    configuration = kubernetes.client.Configuration()
    configuration.host = str(kmock.url).rstrip("/")
    kube = Kube(kubernetes.client.ApiClient(configuration))
    for name in ("n1", "n2", "n3"):
        await kube.request("node", "POST", "/api/v1/nodes", body=node(name, ready=True))
    await kube.create(pki.ca_secret(OperatorConfig().namespace, CA))
    events: list[EventNote] = []
    yield kube, events
    kube.close()


def node(name: str, *, ready: bool) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "Unknown"}]},
    }


def colovm(status: dict[str, Any] | None = None, *, tls: bool = False) -> dict[str, Any]:
    # The scripted agents serve plain HTTP: these VMs opt out of TLS unless asked.
    body: dict[str, Any] = {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "metadata": {"name": "vm", "namespace": "ns", "uid": "uid-1", "generation": 1},
        "spec": {"guest": {"memory": "32Mi"}, "replication": {"insecureClear": not tls}},
    }
    if status:
        body["status"] = status
    return body


def agent_pod(name: str, role: str) -> dict[str, Any]:
    labels = {c.LABEL_VM: "vm", c.LABEL_MANAGED_BY: c.MANAGED_BY, c.LABEL_ROLE: role}
    meta = {"name": name, "namespace": "ns", "labels": labels, "annotations": {c.ANNOTATION_SERIAL: name[-1]}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta}


def lease(holder: str, term: int) -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "vm-primary", "namespace": "ns"},
        "spec": {"holderIdentity": holder, "leaseTransitions": term},
    }


def runtime(kube: Kube, events: list[EventNote], port: int = 1) -> Runtime:
    return Runtime(
        config=OperatorConfig(agent_image="colo:test"),
        kube=kube,
        agents=AgentClient(timeout_s=2.0),
        post_event=lambda body, note: events.append(note),
        control_port=port,
        ca=pki.ClusterCa.of(CA),
    )


CA = certs.new_ca(dt.datetime.now(dt.UTC))


async def test_a_vm_gets_its_certificate_and_network_policy_and_an_opt_out_a_warning(
    world: tuple[Kube, list[EventNote]],
) -> None:
    kube, events = world
    await kube.create(colovm(tls=True))
    rt = runtime(kube, events)
    await reconcile(rt, "ns", "vm")
    secret = await kube.get("Secret", "ns", "vm-agent-tls")
    assert secret is not None and secret["type"] == "kubernetes.io/tls"
    cert = base64.b64decode(secret["data"]["tls.crt"])
    assert certs.uri_of(cert) == "spiffe://colo.dev/ns/ns/colovm/vm"
    assert not certs.needs_renewal(cert, dt.datetime.now(dt.UTC), CA)
    assert await kube.get("NetworkPolicy", "ns", "vm-agents") is not None
    pod = await kube.get("Pod", "ns", "vm-0")
    assert pod is not None and "--tls-dir" in pod["spec"]["containers"][0]["args"]
    assert not any(e.reason == "InsecureClear" for e in events)

    await kube.patch(c.KIND, "ns", "vm", {"spec": {"replication": {"insecureClear": True}}})
    await reconcile(rt, "ns", "vm")
    assert [e.type for e in events if e.reason == "InsecureClear"] == ["Warning"]


async def test_a_ca_rotation_reaches_every_certificate_in_three_steps(
    world: tuple[Kube, list[EventNote]],
) -> None:
    """Stage the new CA in the bundle, make it the signer, retire the old one: each edit
    of the CA Secret reaches the VM's Secret (and the operator's own certificate) at the
    next pass, and at every step both ends trust whatever certificate the other holds."""
    kube, events = world
    op_ns = OperatorConfig().namespace
    await kube.create(colovm(tls=True))
    rt = runtime(kube, events)
    assert rt.ca is not None
    rt.credentials = pki.OperatorCredentials(rt.config, rt.ca)
    new = certs.new_ca(dt.datetime.now(dt.UTC))

    async def step(data: dict[str, str | None]) -> tuple[bytes, list[bytes]]:
        await kube.patch("Secret", op_ns, pki.CA_SECRET, {"data": data})
        rt.ca_checked = 0.0  # the CA Secret is read again at once, not after CA_CHECK_S
        await reconcile(rt, "ns", "vm")
        got = await kube.get("Secret", "ns", "vm-agent-tls")
        assert got is not None
        bundle = base64.b64decode(got["data"]["ca.crt"])
        return base64.b64decode(got["data"]["tls.crt"]), [c.public_bytes(serialization.Encoding.PEM)
                                                           for c in x509.load_pem_x509_certificates(bundle)]

    first, trust = await step({})
    assert trust == [CA.cert_pem] and issued_by(first, CA)
    op_first = rt.credentials.leaf_pem

    # 1. Stage: the new CA is trusted everywhere, nothing is re-issued yet.
    leaf, trust = await step({"ca.crt": b64(new.cert_pem)})
    assert leaf == first and trust == [CA.cert_pem, new.cert_pem]
    assert len(rt.credentials.context().get_ca_certs()) == 2 and rt.credentials.leaf_pem == op_first

    # 2. Switch: the new CA signs; every certificate is issued again; both still trusted.
    leaf, trust = await step({"tls.crt": b64(new.cert_pem), "tls.key": b64(new.key_pem),
                              "ca.crt": b64(CA.cert_pem)})
    assert leaf != first and issued_by(leaf, new) and trust == [new.cert_pem, CA.cert_pem]
    assert issued_by(rt.credentials.leaf_pem, new)

    # 3. Retire: the old CA is no longer trusted; the certificates stay.
    renewed = leaf
    leaf, trust = await step({"ca.crt": None})
    assert leaf == renewed and trust == [new.cert_pem]
    assert len(rt.credentials.context().get_ca_certs()) == 1


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def issued_by(cert_pem: bytes, ca: certs.KeyPair) -> bool:
    return not certs.needs_renewal(cert_pem, dt.datetime.now(dt.UTC), ca)


async def run_plan(rt: Runtime, times: int = 10) -> None:
    for _ in range(times):
        if not await reconcile(rt, "ns", "vm"):
            return


async def running(kube: Kube, pod: str, node_name: str, ip: str) -> None:
    await kube.patch("Pod", "ns", pod, {"spec": {"nodeName": node_name}})
    await kube.patch("Pod", "ns", pod, {"status": {"phase": "Running", "podIP": ip}}, subresource="status")


async def test_creation_wires_objects_pods_and_status(world: tuple[Kube, list[EventNote]]) -> None:
    kube, events = world
    await kube.create(colovm())
    primary = ScriptedAgent(Role.PRIMARY, peer=PeerState.NONE, synced=False)
    async with agents(("127.0.0.1", primary)) as port:
        rt = runtime(kube, events, port)
        await reconcile(rt, "ns", "vm")
        for kind, name in [("Secret", "vm-agent-key"), ("Lease", "vm-primary"), ("Service", "vm"),
                           ("ServiceAccount", "vm-agent"), ("Role", "vm-agent"), ("RoleBinding", "vm-agent"),
                           ("PodDisruptionBudget", "vm")]:  # fmt: skip
            assert await kube.get(kind, "ns", name) is not None, f"{kind} {name} missing"
        secret = await kube.get("Secret", "ns", "vm-agent-key")
        assert secret is not None and len(base64.b64decode(secret["data"]["secret"])) >= 32
        pod = await kube.get("Pod", "ns", "vm-0")
        assert pod is not None
        assert pod["spec"]["containers"][0]["command"] == ["colo-agent"]
        assert pod["metadata"]["labels"][c.LABEL_ROLE] == "primary"
        vm = await kube.get_vm("ns", "vm")
        assert vm is not None
        assert vm["status"]["phase"] == "Pending" and vm["status"]["currentPrimary"] == "vm-0"
        assert any(e.reason == "CreatingPrimary" for e in events)

        await running(kube, "vm-0", "n1", "127.0.0.1")
        await reconcile(rt, "ns", "vm")
        secondary = await kube.get("Pod", "ns", "vm-1")
        assert secondary is not None
        args = secondary["spec"]["containers"][0]["args"]
        assert args[args.index("--peer") + 1] == "127.0.0.1:7700"
        assert args[args.index("--role") + 1] == "secondary"
        vm = await kube.get_vm("ns", "vm")
        assert vm is not None
        assert vm["status"]["phase"] == "Syncing"
        assert vm["status"]["primary"]["node"] == "n1"


async def test_a_spec_change_updates_the_service_annotations_type_and_port(
    world: tuple[Kube, list[EventNote]],
) -> None:
    kube, events = world
    body = colovm()
    body["spec"]["service"] = {"annotations": {"a/x": "1", "a/y": "2"}}
    await kube.create(body)
    rt = runtime(kube, events, 1)
    await ensure_objects(rt, vm_view(spec=body["spec"]))
    await kube.patch("Service", "ns", "vm", {"metadata": {"annotations": {"other/z": "kept"}}})
    body["spec"]["service"] = {"type": "NodePort", "port": 16379, "annotations": {"a/x": "3"}}
    await ensure_objects(rt, vm_view(spec=body["spec"]))
    svc = await kube.get("Service", "ns", "vm")
    assert svc is not None
    annotations = svc["metadata"]["annotations"]
    assert annotations.get("a/x") == "3" and "a/y" not in annotations
    assert annotations.get("other/z") == "kept"
    assert svc["spec"]["type"] == "NodePort" and svc["spec"]["ports"][0]["port"] == 16379


async def test_failover_promotes_over_http_and_moves_the_labels(world: tuple[Kube, list[EventNote]]) -> None:
    kube, events = world
    protected = {
        "observedGeneration": 1,
        "phase": "Protected",
        "currentPrimary": "vm-0",
        "targetPrimary": "vm-0",
        "podSerial": 2,
        "term": 1,
        "secondary": {"pod": "vm-1", "synced": True},
    }
    await kube.create(colovm(protected))
    await kube.create(secret(vm_view(), TOKEN))
    await kube.create(lease("vm-0", 1))
    for name, role, node_name, ip in (
        ("vm-0", "primary", "n1", "127.0.0.1"),
        ("vm-1", "secondary", "n2", "127.0.0.2"),
    ):
        await kube.create(agent_pod(name, role))
        await running(kube, name, node_name, ip)
    # The primary's node stops reporting and its agent is gone; the secondary lost the heartbeat.
    await kube.request(
        "node",
        "PATCH",
        "/api/v1/nodes/n1",
        body=node("n1", ready=False),
        content_type="application/merge-patch+json",
    )
    secondary = ScriptedAgent(Role.SECONDARY, peer=PeerState.LOST)
    async with agents(("127.0.0.2", secondary)) as port:
        rt = runtime(kube, events, port)
        await run_plan(rt)
    assert secondary.calls == ["promote 2"]
    # The operator's metrics saw the completed failover once, with its duration.
    transitions = {"kind": "Failover", "cause": "NodeUnknown"}
    assert rt.metrics.registry.get_sample_value("colo_operator_transitions_total", transitions) == 1.0
    durations = rt.metrics.registry.get_sample_value(
        "colo_operator_failover_duration_seconds_count", {"kind": "Failover"}
    )
    assert durations == 1.0
    assert await kube.get("Pod", "ns", "vm-0") is None
    promoted = await kube.get("Pod", "ns", "vm-1")
    assert promoted is not None and promoted["metadata"]["labels"][c.LABEL_ROLE] == "primary"
    vm = await kube.get_vm("ns", "vm")
    assert vm is not None
    st = vm["status"]
    assert (st["currentPrimary"], st["targetPrimary"], st["term"], st["failovers"]) == ("vm-1", "vm-1", 2, 1)
    assert "transition" not in st
    assert st["lastFailover"]["cause"] == "NodeUnknown"
    # Re-protection: a new secondary, kept off both n1 (lost) and n2 (the new primary).
    fresh = await kube.get("Pod", "ns", "vm-2")
    assert fresh is not None
    affinity = fresh["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    (term,) = affinity["nodeSelectorTerms"]
    assert {v for field in term["matchFields"] for v in field["values"]} == {"n1", "n2"}
    reasons = [e.reason for e in events]
    assert reasons.index("FailoverStarted") < reasons.index("Promoted") < reasons.index("CreatingSecondary")


async def test_a_refused_promotion_is_reported_and_retried(world: tuple[Kube, list[EventNote]]) -> None:
    kube, events = world
    transition = {
        "kind": "Failover",
        "cause": "NodeUnknown",
        "from": "vm-0",
        "to": "vm-1",
        "step": "Promote",
        "term": 2,
        "startedAt": "2026-11-25T20:00:00Z",
    }
    status = {
        "observedGeneration": 1,
        "phase": "FailingOver",
        "currentPrimary": "vm-0",
        "targetPrimary": "vm-1",
        "podSerial": 2,
        "term": 1,
        "transition": transition,
    }
    await kube.create(colovm(status))
    await kube.create(secret(vm_view(), "a-different-key"))
    await kube.create(lease("vm-0", 1))
    await kube.create(agent_pod("vm-1", "secondary"))
    await running(kube, "vm-1", "n2", "127.0.0.2")
    secondary = ScriptedAgent(Role.SECONDARY, peer=PeerState.LOST)
    async with agents(("127.0.0.2", secondary)) as port:
        rt = runtime(kube, events, port)
        assert await reconcile(rt, "ns", "vm") is False
        # Retried on the next poll, but reported once.
        assert await reconcile(rt, "ns", "vm") is False
    # The agent refused the wrong bearer token: nothing promoted, the step is still pending.
    assert secondary.calls == []
    sample = rt.metrics.registry.get_sample_value
    assert sample("colo_operator_reconcile_errors_total", {"reason": "action"}) == 2.0
    (failed,) = [e for e in events if e.reason == "ActionFailed"]
    assert "PromoteAgent" in failed.message and ("401" in failed.message or "403" in failed.message)
    vm = await kube.get_vm("ns", "vm")
    assert vm is not None and vm["status"]["transition"]["step"] == "Promote"


async def test_the_secondary_losing_the_primary_wakes_the_vm_at_once(
    world: tuple[Kube, list[EventNote]],
) -> None:
    """The operator keeps a long poll on the secondary while it hears the primary; the moment it
    stops hearing it, the VM's reconcile is kicked instead of waiting for the next poll."""
    kube, events = world
    protected = {
        "observedGeneration": 1, "phase": "Protected", "currentPrimary": "vm-0", "targetPrimary": "vm-0",
        "podSerial": 2, "term": 1, "secondary": {"pod": "vm-1", "synced": True},
    }  # fmt: skip
    await kube.create(colovm(protected))
    await kube.create(secret(vm_view(), TOKEN))
    await kube.create(lease("vm-0", 1))
    for name, role, node_name, ip in (
        ("vm-0", "primary", "n1", "127.0.0.1"),
        ("vm-1", "secondary", "n2", "127.0.0.2"),
    ):
        await kube.create(agent_pod(name, role))
        await running(kube, name, node_name, ip)
    primary, secondary = ScriptedAgent(Role.PRIMARY), ScriptedAgent(Role.SECONDARY)
    async with agents(("127.0.0.1", primary), ("127.0.0.2", secondary)) as port:
        rt = runtime(kube, events, port)
        kick = rt.kick_event(("ns", "vm"))
        try:
            await reconcile(rt, "ns", "vm")
            assert rt.watches[("ns", "vm")][0] == "127.0.0.2"
            await asyncio.sleep(0.3)
            assert not kick.is_set()  # a long poll of a secondary that hears its primary waits
            secondary.peer = PeerState.LOST
            # Generous for a loaded machine; the long poll itself lasts 10 s.
            await asyncio.wait_for(kick.wait(), 8)
        finally:
            rt.unwatch(("ns", "vm"))


async def test_a_new_vm_s_objects_are_written_at_once_not_one_after_another(
    world: tuple[Kube, list[EventNote]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Twenty ColoVMs applied together spent seconds each in a dozen API calls in a row
    # before their first pod was even asked for (a loaded API server answers slowly).
    kube, events = world
    body = colovm()
    await kube.create(body)
    in_flight, most = 0, 0
    real = kube.request

    async def slow(*args: Any, **kwargs: Any) -> Any:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0.05)
            return await real(*args, **kwargs)
        finally:
            in_flight -= 1

    monkeypatch.setattr(kube, "request", slow)
    await ensure_objects(runtime(kube, events), vm_view(spec=body["spec"]))
    assert most >= 5
    for kind, name in (("Secret", "vm-agent-key"), ("Service", "vm"), ("Lease", "vm-primary"),
                       ("Role", "vm-agent"), ("NetworkPolicy", "vm-agents")):  # fmt: skip
        assert await kube.get(kind, "ns", name) is not None, (kind, name)
