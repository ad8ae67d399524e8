"""Every part that states a shared fact states the one in `colo_agent.constants`."""

from __future__ import annotations

import contextlib
import inspect
import io

import pytest
import yaml

from colo_agent import constants as k
from colo_agent.cli import build_parser
from colo_agent.microvm import abi
from colo_agent.replication import protocol as p
from colo_agent.replication.session import PrimarySession, SecondarySession
from colo_agent.replication.transport import CheckpointReceiver, CheckpointSender
from colo_operator import constants as c
from colo_operator.crd import render
from colo_operator.spec import ColoVMSpec, SpecError

RUN = ["run", "--role", "primary", "--arbiter", "file:/tmp/x"]


def _parse(argv: list[str]) -> object:
    with contextlib.redirect_stderr(io.StringIO()):
        return build_parser().parse_args(argv)


def _hello(channels: int) -> p.Hello:
    return p.Hello(
        version=p.PROTOCOL_VERSION, vm="ns/vm", role=p.Role.PRIMARY, kind=p.ChannelKind.CONTROL,
        index=0, channels=channels, session=1, term=1, page_count=1024, cache_pages=0,
        nonce=bytes(p.NONCE_SIZE),
    )  # fmt: skip


def test_the_channel_limit_is_the_same_everywhere() -> None:
    crd = yaml.safe_load(render())
    replication = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "replication"
    ]["properties"]
    assert replication["channels"]["maximum"] == k.MAX_CHANNELS
    assert ColoVMSpec.from_dict({"replication": {"channels": k.MAX_CHANNELS}}).replication.channels == 16
    with pytest.raises(SpecError, match=r"replication\.channels"):
        ColoVMSpec.from_dict({"replication": {"channels": k.MAX_CHANNELS + 1}})
    assert _parse([*RUN, "--channels", str(k.MAX_CHANNELS)]).channels == k.MAX_CHANNELS  # type: ignore[attr-defined]
    with pytest.raises(SystemExit):
        _parse([*RUN, "--channels", str(k.MAX_CHANNELS + 1)])
    p.FrameEncoder().encode(_hello(k.MAX_CHANNELS))
    with pytest.raises(p.LocalProtocolError, match="channels"):
        p.FrameEncoder().encode(_hello(k.MAX_CHANNELS + 1))


def test_heartbeat_defaults_are_the_same_everywhere() -> None:
    spec = ColoVMSpec.from_dict({}).failover
    assert (spec.heartbeat_interval_ms, spec.heartbeat_timeout_ms) == (
        k.HEARTBEAT_INTERVAL_MS,
        k.HEARTBEAT_TIMEOUT_MS,
    )
    args = _parse(RUN)
    assert args.heartbeat_interval_ms * 1000 == k.HEARTBEAT_INTERVAL_MS  # type: ignore[attr-defined]
    assert args.heartbeat_timeout_ms * 1000 == k.HEARTBEAT_TIMEOUT_MS  # type: ignore[attr-defined]
    for where in (PrimarySession, SecondarySession, CheckpointSender._pair, CheckpointReceiver):
        params = inspect.signature(where).parameters
        assert params["heartbeat_interval"].default * 1000 == k.HEARTBEAT_INTERVAL_MS, where
        assert params["heartbeat_timeout"].default * 1000 == k.HEARTBEAT_TIMEOUT_MS, where


def test_page_size_and_ram_bounds_are_the_guest_abi() -> None:
    assert p.PAGE_SIZE == abi.PAGE_SIZE == k.PAGE_SIZE
    assert (abi.MIN_RAM, abi.MAX_RAM) == (k.MIN_GUEST_RAM, k.MAX_GUEST_RAM)
    with pytest.raises(SpecError, match="between 4Mi and 1Gi"):
        ColoVMSpec.from_dict({"guest": {"memory": str(k.MAX_GUEST_RAM + k.PAGE_SIZE)}})
    with pytest.raises(SpecError, match=f"{k.PAGE_SIZE}-byte pages"):
        ColoVMSpec.from_dict({"guest": {"memory": str(k.MIN_GUEST_RAM + 1)}})


def test_replication_defaults_and_ports_are_the_same_everywhere() -> None:
    spec = ColoVMSpec.from_dict({}).replication
    assert (spec.checkpoint_interval_ms, spec.channels) == (k.CHECKPOINT_INTERVAL_MS, k.CHANNELS)
    crd = yaml.safe_load(render())
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    replication = props["replication"]["properties"]
    assert replication["checkpointIntervalMs"]["default"] == k.CHECKPOINT_INTERVAL_MS
    assert replication["channels"]["default"] == k.CHANNELS
    args = _parse(RUN)
    assert args.channels == k.CHANNELS  # type: ignore[attr-defined]
    ports = (k.CLIENT_PORT, k.CONTROL_PORT, k.REPLICATION_PORT)
    assert (args.port, args.control_port, args.replication_port) == ports  # type: ignore[attr-defined]
    assert ports == (c.CLIENT_PORT, c.CONTROL_PORT, c.REPLICATION_PORT)
