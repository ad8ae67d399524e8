"""The flags the operator writes into agent pods parse with the agent's real command line.

`manifests.agent_pod` renders the pod for a ColoVM spec; the container's args
then go through `colo_agent.cli.build_parser()` with the pod's environment, and
through the checks `colo-agent run` makes before it starts. A flag the operator
writes that the agent does not accept, or a value the agent reads differently,
fails here rather than as a crash-looping pod.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.operator_world import vm

from colo_agent.cli import build_parser
from colo_agent.config import FailoverTimings
from colo_operator.config import OperatorConfig
from colo_operator.decide import CreatePod
from colo_operator.manifests import agent_pod
from colo_operator.placement import Place
from colo_operator.spec import ColoVMSpec, SpecError

PLACE = Place(candidates=("n2",), excluded_domains=("n1",), excluded_nodes=("n1",))
PEER = "10.0.0.10:7700"
ROLES = [
    pytest.param(CreatePod(name="vm-0", serial=0, role="primary", peer=None, place=PLACE), id="primary"),
    pytest.param(CreatePod(name="vm-1", serial=1, role="secondary", peer=PEER, place=PLACE), id="secondary"),
]
# What the kubelet puts in the environment from the pod's valueFrom references.
POD_ENV = {"COLO_IDENTITY": "vm-0", "COLO_SECRET": "s" * 32}


def parse_pod(pod: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["colo-agent"]
    for entry in container["env"]:
        monkeypatch.setenv(entry["name"], entry.get("value", POD_ENV.get(entry["name"], "x")))
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            args = build_parser().parse_args(container["args"])
        except SystemExit:
            pytest.fail(f"colo-agent refuses the pod's args {container['args']}: {stderr.getvalue()}")
    # What `colo-agent run` checks before it starts.
    FailoverTimings(args.heartbeat_interval_ms, args.heartbeat_timeout_ms, args.lease_duration_ms)
    return args


def check_agrees(spec: ColoVMSpec, action: CreatePod, args: argparse.Namespace) -> None:
    assert args.command == "run" and args.role == action.role
    assert args.vm == "ns/vm"
    assert args.memory == spec.guest.memory_bytes
    assert args.accel == spec.guest.accel
    assert args.mode == spec.replication.mode
    assert args.interval_ms == spec.replication.checkpoint_interval_ms / 1000
    assert args.channels == spec.replication.channels
    assert args.heartbeat_interval_ms == spec.failover.heartbeat_interval_ms / 1000
    assert args.heartbeat_timeout_ms == spec.failover.heartbeat_timeout_ms / 1000
    assert args.lease_duration_ms == spec.failover.lease_duration_ms / 1000
    assert args.arbiter == "lease:ns/vm-primary"
    if action.peer is None:
        assert args.peer is None
    else:
        assert args.peer == ("10.0.0.10", 7700)


SPECS = [
    {},
    {"replication": {"mode": "lockstep"}},
    {"guest": {"accel": "kvm", "memory": "4Mi"}, "replication": {"channels": 1, "checkpointIntervalMs": 1}},
    {"guest": {"accel": "tcg", "memory": "1Gi"}, "replication": {"mode": "lockstep", "channels": 16}},
    {"guest": {"memory": "0.5Gi"}, "replication": {"checkpointIntervalMs": 60000}},
    {"failover": {"heartbeatIntervalMs": 10, "heartbeatTimeoutMs": 20, "leaseDurationMs": 100}},
    {"failover": {"heartbeatIntervalMs": 60000, "heartbeatTimeoutMs": 600000, "leaseDurationMs": 300000}},
]


@pytest.mark.parametrize("action", ROLES)
@pytest.mark.parametrize("spec", SPECS)
def test_rendered_args_parse_and_mean_the_spec(
    spec: dict[str, Any], action: CreatePod, monkeypatch: pytest.MonkeyPatch
) -> None:
    view = vm(spec=spec)
    args = parse_pod(agent_pod(view, OperatorConfig(), action), monkeypatch)
    check_agrees(view.spec, action, args)


@st.composite
def colovm_specs(draw: st.DrawFn) -> dict[str, Any]:
    interval = draw(st.integers(10, 60000))
    return {
        "guest": {
            "accel": draw(st.sampled_from(["auto", "kvm", "tcg"])),
            "memory": f"{draw(st.integers(1024, 256 * 1024)) * 4}Ki",
        },
        "replication": {
            "mode": draw(st.sampled_from(["checkpoint", "lockstep"])),
            "checkpointIntervalMs": draw(st.integers(1, 60000)),
            "channels": draw(st.integers(1, 16)),
        },
        "failover": {
            "heartbeatIntervalMs": interval,
            "heartbeatTimeoutMs": draw(st.integers(max(20, interval + 1), 600000)),
            "leaseDurationMs": draw(st.integers(max(100, interval + 1), 300000)),
        },
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=colovm_specs(), secondary=st.booleans())
def test_every_valid_spec_renders_args_the_agent_accepts(
    spec: dict[str, Any], secondary: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    try:
        view = vm(spec=spec)
    except SpecError as exc:  # the strategy stays inside the bounds; say which one it crossed
        pytest.fail(f"the strategy made an invalid spec: {exc}")
    action = ROLES[1 if secondary else 0].values[0]
    check_agrees(view.spec, action, parse_pod(agent_pod(view, OperatorConfig(), action), monkeypatch))


def test_an_unknown_flag_fails_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    # The check itself can fail: a flag the agent does not know is caught.
    action = ROLES[0].values[0]
    pod = agent_pod(vm(), OperatorConfig(), action)
    pod["spec"]["containers"][0]["args"].append("--checkpoint-budget-ms=5")
    with pytest.raises(pytest.fail.Exception, match="refuses the pod's args"):
        parse_pod(pod, monkeypatch)


QEMU_SPECS = [
    {"guest": {"backend": "qemu", "memory": "256Mi", "accel": "tcg", "qemu": {"disk": {"size": "1Gi"}}}},
    {"guest": {"backend": "qemu", "memory": "512Mi", "qemu": {
        "disk": {"size": "10Gi", "claimName": "vm-disk", "path": "images/vm.qcow2"}, "vcpus": 4,
        "nic": "virtio-net-pci"}}},
]


@pytest.mark.parametrize("action", ROLES)
@pytest.mark.parametrize("spec", QEMU_SPECS)
def test_a_qemu_pod_configures_the_backend_as_the_spec_says(
    spec: dict[str, Any], action: CreatePod, monkeypatch: pytest.MonkeyPatch
) -> None:
    from colo_agent.guest import GuestOptions
    from colo_agent.qemu.backend import QemuSettings

    view = vm(spec=spec)
    pod = agent_pod(view, OperatorConfig(), action)
    args = parse_pod(pod, monkeypatch)
    check_agrees(view.spec, action, args)
    assert args.backend == "qemu"
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value", "10.1.2.3") for e in container["env"]}  # podIP from the downward API
    peer = args.peer[0] if args.peer is not None else None
    settings = QemuSettings.from_env(GuestOptions(args.memory, args.accel, 0, peer), env)
    q = view.spec.guest.qemu
    assert q is not None
    assert settings.spec.memory_mib * (1 << 20) == view.spec.guest.memory_bytes
    assert (settings.spec.vcpus, settings.spec.nic.value) == (q.vcpus, q.nic)
    assert settings.disk_size == q.disk.size_bytes and settings.advertise == "10.1.2.3"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert settings.disk is not None and any(str(settings.disk).startswith(p) for p in mounts)
    claims = [v for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
    # Only a pod created as primary boots from the claim; a secondary copies its primary's disk.
    assert bool(claims) == (q.disk.claim_name is not None and action.role == "primary")
    if action.role == "secondary":
        assert settings.peer_host == "10.0.0.10"


def test_the_first_disk_does_not_make_the_primary_look_outdated() -> None:
    from colo_operator.manifests import template_hash

    view = vm(spec=QEMU_SPECS[1])
    primary = agent_pod(view, OperatorConfig(), ROLES[0].values[0])
    hashed = primary["metadata"]["annotations"]["colo.dev/template-hash"]
    assert hashed == template_hash(view, OperatorConfig())
