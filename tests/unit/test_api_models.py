"""The control API contract: round trips, validation messages, the version handshake."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from colo_agent.api import models, reader
from colo_agent.api.models import (
    API_VERSION,
    AgentStatus,
    CheckpointFigures,
    CheckpointResult,
    DemoteResult,
    ErrorResponse,
    GuestStatus,
    ModelError,
    PeerState,
    PeerStatus,
    PromoteRequest,
    PromoteResult,
    ReplicationMode,
    Role,
    Totals,
    VersionMismatch,
    check_api_version,
)


def sample_status() -> AgentStatus:
    return AgentStatus(
        role=Role.PRIMARY,
        term=3,
        last_acked_epoch=41,
        mode=ReplicationMode.CHECKPOINT,
        peer=PeerStatus(PeerState.CONNECTED, "10.0.0.7:7700", 12.5),
        last_checkpoint=CheckpointFigures(
            epoch=41, pause_ms=0.8, pages=120, bytes=491520, duration_ms=3.2, cause="interval"
        ),
        totals=Totals(
            checkpoints=41, pages=5000, bytes=20480000, failovers=1, checkpoints_by_cause={"interval": 41}
        ),
        guest=GuestStatus(state="running", accel="kvm", memory_bytes=64 << 20),
        synced=True,
    )


def test_status_json_keys_are_the_contract() -> None:
    doc = json.loads(sample_status().to_json())
    assert doc == {
        "apiVersion": "v1",
        "role": "primary",
        "term": 3,
        "lastAckedEpoch": 41,
        "mode": "checkpoint",
        "peer": {"state": "connected", "address": "10.0.0.7:7700", "lastHeartbeatAgeMs": 12.5},
        "lastCheckpoint": {
            "epoch": 41,
            "pauseMs": 0.8,
            "pages": 120,
            "bytes": 491520,
            "durationMs": 3.2,
            "cause": "interval",
        },
        "totals": {
            "checkpoints": 41,
            "pages": 5000,
            "bytes": 20480000,
            "failovers": 1,
            "checkpointsByCause": {"interval": 41},
        },
        "guest": {"state": "running", "accel": "kvm", "memoryBytes": 67108864},
        "synced": True,
    }


def test_status_round_trip_with_optional_parts_absent() -> None:
    status = AgentStatus(
        role=Role.SECONDARY,
        term=0,
        last_acked_epoch=0,
        mode=ReplicationMode.LOCKSTEP,
        peer=PeerStatus(PeerState.NONE),
        guest=GuestStatus(state="paused", accel="tcg", memory_bytes=4 << 20),
    )
    again = AgentStatus.from_json(status.to_json())
    assert again == status
    assert again.last_checkpoint is None
    assert again.peer.address is None


def test_failover_possible_is_optional_and_round_trips() -> None:
    assert "failoverPossible" not in sample_status().to_dict()
    assert AgentStatus.from_json(sample_status().to_json()).failover_possible is None
    for possible in (True, False):
        status = dataclasses.replace(sample_status(), failover_possible=possible)
        assert status.to_dict()["failoverPossible"] is possible
        assert AgentStatus.from_json(status.to_json()) == status
    doc = sample_status().to_dict() | {"failoverPossible": "yes"}
    with pytest.raises(ModelError, match="failoverPossible"):
        AgentStatus.from_dict(doc)


def test_stream_figures_are_optional_and_round_trip() -> None:
    assert "stream" not in sample_status().to_dict()
    status = dataclasses.replace(sample_status(), stream=models.StreamFiguresStatus("colo", 1, 4))
    assert status.to_dict()["stream"] == {"state": "colo", "channels": 1, "mismatches": 4}
    assert AgentStatus.from_json(status.to_json()) == status
    doc = status.to_dict()
    doc["stream"] = {"state": "colo", "channels": "one", "mismatches": 0}
    with pytest.raises(ModelError, match="channels"):
        AgentStatus.from_dict(doc)


def test_every_response_round_trips() -> None:
    for doc in (
        sample_status(),
        PromoteResult(role=Role.PRIMARY, term=4, resumed_from_epoch=41),
        CheckpointResult(term=4, epoch=7),
        DemoteResult(role=Role.PRIMARY, term=4),
        ErrorResponse(error="term 2 is not above 3", reason="StaleTerm"),
    ):
        assert type(doc).from_json(doc.to_json()) == doc
        assert type(doc).from_json(doc.to_json().encode()) == doc
        assert type(doc).from_dict(doc.to_dict()) == doc


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    doc = sample_status().to_dict()
    doc["somethingNew"] = {"x": 1}
    doc["peer"]["rttMs"] = 0.3
    assert AgentStatus.from_dict(doc) == sample_status()


def test_unknown_cause_and_guest_state_are_accepted() -> None:
    doc = sample_status().to_dict()
    doc["lastCheckpoint"]["cause"] = "disk-flush"
    doc["guest"]["state"] = "migrating"
    status = AgentStatus.from_dict(doc)
    assert status.last_checkpoint is not None
    assert status.last_checkpoint.cause == "disk-flush"
    assert status.guest.state == "migrating"


@pytest.mark.parametrize(
    ("mutate", "field", "reason"),
    [
        (lambda d: d.pop("term"), "term", "is required"),
        (lambda d: d.update(term="3"), "term", "expected an integer, got a string"),
        (lambda d: d.update(term=True), "term", "expected an integer, got a boolean"),
        (lambda d: d.update(term=-1), "term", "must be >= 0"),
        (lambda d: d.update(role="leader"), "role", "'leader' is not one of primary, secondary"),
        (lambda d: d.update(mode=""), "mode", "must not be empty"),
        (lambda d: d.update(synced="yes"), "synced", "expected true or false"),
        (lambda d: d.update(peer=[]), "peer", "expected an object, got an array"),
        (lambda d: d["peer"].update(state="gone"), "peer.state", "'gone' is not one of"),
        (lambda d: d["peer"].update(lastHeartbeatAgeMs=-2), "peer.lastHeartbeatAgeMs", "must be a finite"),
        (lambda d: d["lastCheckpoint"].update(epoch=0), "lastCheckpoint.epoch", "must be >= 1"),
        (lambda d: d["lastCheckpoint"].update(pauseMs="1"), "lastCheckpoint.pauseMs", "expected a number"),
        (lambda d: d["totals"]["checkpointsByCause"].update(x=-1), "totals.checkpointsByCause.x", ">= 0"),
        (lambda d: d["guest"].pop("memoryBytes"), "guest.memoryBytes", "is required"),
    ],
)
def test_validation_names_the_field_and_the_reason(mutate: Any, field: str, reason: str) -> None:
    doc = sample_status().to_dict()
    mutate(doc)
    with pytest.raises(ModelError) as info:
        AgentStatus.from_dict(doc)
    assert info.value.field == field
    assert reason in info.value.reason
    assert str(info.value).startswith(f"{field}: ")


def test_version_is_checked_before_anything_else() -> None:
    doc = sample_status().to_dict()
    doc["apiVersion"] = "v2"
    doc["role"] = "something a v2 agent says"
    with pytest.raises(VersionMismatch) as info:
        AgentStatus.from_dict(doc)
    assert info.value.got == "v2"
    assert "v1" in str(info.value)
    del doc["apiVersion"]
    with pytest.raises(ModelError, match="apiVersion: is required"):
        AgentStatus.from_dict(doc)
    with pytest.raises(VersionMismatch):
        check_api_version({"apiVersion": 1})
    check_api_version({"apiVersion": API_VERSION})


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe\x00", "not"),
        (b"[" * 100_000, "not valid JSON"),
        (b"[]", "expected an object, got an array"),
        (b"null", "expected an object, got null"),
    ],
)
def test_malformed_bodies_are_model_errors(body: bytes, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        AgentStatus.from_json(body)


def test_promote_request() -> None:
    assert PromoteRequest.from_json(b'{"term": 5}') == PromoteRequest(5)
    # A request body is not a response: no apiVersion needed.
    assert PromoteRequest(5).to_dict() == {"term": 5}
    for bad in (b'{"term": 0}', b'{"term": 1.5}', b'{"term": "5"}', b"{}", b'{"term": null}'):
        with pytest.raises(ModelError) as info:
            PromoteRequest.from_json(bad)
        assert info.value.field == "term"
    with pytest.raises(ModelError):
        PromoteRequest(0)


def test_nan_is_never_written() -> None:
    figures = CheckpointFigures(1, float("nan"), 0, 0, 0.0, "interval")
    status = AgentStatus(
        role=Role.PRIMARY,
        term=1,
        last_acked_epoch=1,
        mode=ReplicationMode.CHECKPOINT,
        peer=PeerStatus(PeerState.NONE),
        guest=GuestStatus("running", "tcg", 1),
        last_checkpoint=figures,
    )
    with pytest.raises(ValueError):
        status.to_json()


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
_noisy_machine = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _paths(doc: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for key, value in doc.items():
        out.append((*prefix, key))
        if isinstance(value, dict):
            out.extend(_paths(value, (*prefix, key)))
    return out


@_noisy_machine
@given(st.sampled_from(_paths(sample_status().to_dict())), _json, st.booleans())
def test_any_corruption_of_a_valid_status_parses_or_raises_model_error(
    path: tuple[str, ...], value: Any, delete: bool
) -> None:
    doc = sample_status().to_dict()
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    try:
        status = AgentStatus.from_dict(doc)
    except ModelError:
        return
    # What parses must survive its own round trip.
    assert AgentStatus.from_json(status.to_json()) == status


@_noisy_machine
@given(
    st.dictionaries(st.sampled_from(["apiVersion", "term", "epoch", "role", "error", "reason", "x"]), _json)
)
def test_arbitrary_documents_parse_or_raise_model_error(doc: dict[str, Any]) -> None:
    for kind in (PromoteResult, CheckpointResult, DemoteResult, ErrorResponse, PromoteRequest):
        with contextlib.suppress(ModelError):
            kind.from_dict(doc)


@_noisy_machine
@given(st.binary(max_size=64))
def test_arbitrary_bytes_parse_or_raise_model_error(body: bytes) -> None:
    with contextlib.suppress(ModelError):
        AgentStatus.from_json(body)


def test_models_import_only_the_standard_library() -> None:
    # models and the reader it parses with; the reader imports no project module at all.
    for module, ours in ((models, {"colo_agent.api.reader"}), (reader, set())):
        tree = ast.parse(Path(module.__file__).read_text())
        imported: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module if node.module in ours else node.module.split(".")[0])
        assert imported <= set(sys.stdlib_module_names) | {"__future__"} | ours, module.__name__
