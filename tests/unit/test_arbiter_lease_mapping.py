"""The Lease mapping of the Kubernetes arbiter, without a cluster: reading and writing the record."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import requests

from colo_agent.arbiter import from_spec
from colo_agent.arbiter.base import ArbiterError, ArbiterUnavailable, LeaseRecord
from colo_agent.arbiter.lease import (
    DURATION_ANNOTATION,
    FLOOR_ANNOTATION,
    KubeLeaseArbiter,
    _count_failure,
    lease_body,
    micro_time,
    record_from_lease,
)
from colo_agent.arbiter.local import FileArbiter
from colo_agent.timeouts import RequestTimeout


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


class FakeResponse:
    def __init__(self, status: int, body: dict[str, Any] | None = None) -> None:
        self.status_code = status
        self.reason = "reason"
        self._body = body or {}

    def json(self) -> dict[str, Any]:
        return self._body


class FakeApi:
    """pykube's HTTPClient as the arbiter uses it; `answers` are popped per request
    (an exception is raised), and the timeout each request was given is kept."""

    def __init__(self, *answers: FakeResponse | Exception) -> None:
        self.answers = list(answers)
        self.timeouts: list[float] = []

    def _next(self, **kwargs: Any) -> FakeResponse:
        self.timeouts.append(kwargs["timeout"])
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    get = put = post = _next


def test_request_timeouts_follow_a_slow_api_server_and_come_back_after() -> None:
    timeout = RequestTimeout(0.8, 10.0)
    for expected in (1.6, 3.2, 6.4, 10.0, 10.0):
        _count_failure(timeout, requests.ReadTimeout("read timed out"))
        assert timeout.current == pytest.approx(expected)
    _count_failure(timeout, requests.ConnectionError("refused"))  # refused at once: no reason to wait longer
    assert timeout.current == pytest.approx(10.0)
    # An answer sets it to twice what that answer took, within the bounds.
    for elapsed, expected in ((3.0, 6.0), (0.1, 0.8), (1.5, 3.0), (0.0, 0.8), (7.0, 10.0)):
        timeout.answered(elapsed)
        assert timeout.current == pytest.approx(expected)
    with pytest.raises(ValueError):
        RequestTimeout(0, 1)


def test_the_first_request_timeout_is_the_validity_window_not_a_renewal_interval() -> None:
    # 0.27 s with the default 1 s lease timed out every request of a loaded API server.
    arbiter = KubeLeaseArbiter("prod", "db", "db-a", 1.0)
    assert arbiter.timeout.current == pytest.approx(0.8)
    assert arbiter.timeout.ceiling >= 10.0


async def test_a_write_without_an_answer_is_unavailable_and_the_next_waits_longer() -> None:
    api = FakeApi(
        requests.ReadTimeout("read timed out"), FakeResponse(503), FakeResponse(429),
        FakeResponse(403, {"message": "forbidden"}),
    )
    arbiter = KubeLeaseArbiter("prod", "db", "db-a", 1.0, api=api)  # type: ignore[arg-type]
    with pytest.raises(ArbiterUnavailable, match="outcome unknown"):
        await arbiter._swap(None, 1, "db-a")  # the create's reply was lost: it may have landed
    with pytest.raises(ArbiterUnavailable, match="HTTP 503"):
        await arbiter._swap(None, 1, "db-a")
    with pytest.raises(ArbiterUnavailable, match="HTTP 429"):
        await arbiter._swap(None, 1, "db-a")
    with pytest.raises(ArbiterError, match="HTTP 403") as refused:
        await arbiter._swap(None, 1, "db-a")
    assert not isinstance(refused.value, ArbiterUnavailable)  # asking again cannot help
    assert api.timeouts[1] == pytest.approx(2 * api.timeouts[0])
