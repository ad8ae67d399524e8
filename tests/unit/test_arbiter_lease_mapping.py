"""The Lease mapping of the Kubernetes arbiter, without a cluster: reading and writing the record."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from colo_agent.arbiter import from_spec
from colo_agent.arbiter.base import ArbiterError, LeaseRecord
from colo_agent.arbiter.lease import (
    DURATION_ANNOTATION,
    FLOOR_ANNOTATION,
    KubeLeaseArbiter,
    lease_body,
    micro_time,
    record_from_lease,
)
from colo_agent.arbiter.local import FileArbiter


def lease(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": "db",
            "namespace": "prod",
            "resourceVersion": "812",
            "labels": {"app.kubernetes.io/name": "db"},
            "ownerReferences": [{"kind": "ColoVM", "name": "db", "uid": "u-1"}],
        },
        "spec": spec,
    }


def test_a_fresh_lease_from_the_operator_is_free_at_term_0() -> None:
    assert record_from_lease(lease()) == LeaseRecord(0, None, "812", None)
    assert record_from_lease(lease(holderIdentity="", leaseTransitions=0)) == LeaseRecord(
        0, None, "812", None
    )


def test_term_is_lease_transitions_and_version_is_resource_version() -> None:
    obj = lease(holderIdentity="db-a", leaseTransitions=7, leaseDurationSeconds=2)
    assert record_from_lease(obj) == LeaseRecord(7, "db-a", "812", 2.0)


def test_the_exact_duration_annotation_wins_over_whole_seconds() -> None:
    obj = lease(holderIdentity="db-a", leaseTransitions=1, leaseDurationSeconds=2)
    obj["metadata"]["annotations"] = {DURATION_ANNOTATION: "1500"}
    assert record_from_lease(obj).duration == 1.5
    for junk in ("", "fast", "-5", "inf", "nan", "0"):
        obj["metadata"]["annotations"] = {DURATION_ANNOTATION: junk}
        assert record_from_lease(obj).duration == 2.0


@pytest.mark.parametrize(
    "obj",
    [
        {},
        {"metadata": {"name": "db"}, "spec": {}},
        {"metadata": "x", "spec": {}},
        lease(leaseTransitions=-1),
        lease(leaseTransitions="3"),
        lease(leaseTransitions=True),
        lease(holderIdentity=5),
    ],
)
def test_a_malformed_lease_is_an_error_never_free(obj: dict[str, Any]) -> None:
    with pytest.raises(ArbiterError):
        record_from_lease(obj)


def test_taking_keeps_everything_else_and_bumps_the_term() -> None:
    current = lease(holderIdentity="db-a", leaseTransitions=3, renewTime="2026-01-01T00:00:00.000000Z")
    current["spec"]["acquireTime"] = "2026-01-01T00:00:00.000000Z"
    body = lease_body(
        namespace="prod", name="db", current=current, term=4, holder="db-b", duration=1.5, now_wall=1.7e9
    )
    assert body["metadata"]["resourceVersion"] == "812"  # the compare-and-swap precondition
    assert body["metadata"]["labels"] == current["metadata"]["labels"]
    assert body["metadata"]["ownerReferences"] == current["metadata"]["ownerReferences"]
    assert body["metadata"]["annotations"] == {DURATION_ANNOTATION: "1500", FLOOR_ANNOTATION: "0"}
    assert body["spec"] == {
        "holderIdentity": "db-b",
        "leaseTransitions": 4,
        "leaseDurationSeconds": 2,
        "renewTime": micro_time(1.7e9),
        "acquireTime": micro_time(1.7e9),
    }
    assert current["spec"]["holderIdentity"] == "db-a"  # the input is not modified


def test_renewing_moves_renew_time_only() -> None:
    current = lease(holderIdentity="db-a", leaseTransitions=3, acquireTime="2026-01-01T00:00:00.000000Z")
    body = lease_body(
        namespace="prod", name="db", current=current, term=3, holder="db-a", duration=0.4, now_wall=1.7e9
    )
    assert body["spec"]["acquireTime"] == "2026-01-01T00:00:00.000000Z"
    assert body["spec"]["renewTime"] == micro_time(1.7e9)
    assert body["spec"]["leaseDurationSeconds"] == 1  # at least one whole second
    assert (
        record_from_lease({**body, "metadata": {**body["metadata"], "resourceVersion": "9"}}).duration == 0.4
    )


def test_releasing_drops_the_holder_and_keeps_the_term() -> None:
    current = lease(holderIdentity="db-a", leaseTransitions=3)
    body = lease_body(
        namespace="prod", name="db", current=current, term=3, holder=None, duration=1, now_wall=0
    )
    assert "holderIdentity" not in body["spec"]
    assert body["spec"]["leaseTransitions"] == 3


def test_creating_when_there_is_no_lease() -> None:
    body = lease_body(
        namespace="prod", name="db", current=None, term=1, holder="db-a", duration=1, now_wall=0
    )
    assert body["metadata"] == {
        "name": "db",
        "namespace": "prod",
        "annotations": {DURATION_ANNOTATION: "1000", FLOOR_ANNOTATION: "0"},
    }
    assert body["spec"]["leaseTransitions"] == 1 and body["spec"]["holderIdentity"] == "db-a"


def test_micro_time_is_rfc3339_utc_with_microseconds() -> None:
    assert micro_time(0) == "1970-01-01T00:00:00.000000Z"
    assert micro_time(1.5) == "1970-01-01T00:00:01.500000Z"


async def test_without_any_kubernetes_configuration_the_error_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path))
    arbiter = KubeLeaseArbiter("prod", "db", "db-a", 1.0)
    with pytest.raises(ArbiterError, match="no Kubernetes configuration"):
        await arbiter.acquire(1)


def test_from_spec(tmp_path: Path) -> None:
    file_arbiter = from_spec(f"file:{tmp_path}/a", "db-a", 1.0)
    assert isinstance(file_arbiter, FileArbiter) and file_arbiter.path == tmp_path / "a"
    lease_arbiter = from_spec("lease:prod/db", "db-a", 2.0)
    assert isinstance(lease_arbiter, KubeLeaseArbiter)
    assert (lease_arbiter.namespace, lease_arbiter.name, lease_arbiter.lease_duration) == ("prod", "db", 2.0)
    assert not math.isclose(lease_arbiter.request_timeout, 0)
    for bad in ("", "file:", "lease:db", "lease:/db", "lease:prod/", "lease:a/b/c", "etcd:x", "db"):
        with pytest.raises(ValueError, match="--arbiter"):
            from_spec(bad, "db-a", 1.0)
