"""The operator's agent client: version handshake, error documents, retries on transport errors only."""

from __future__ import annotations

import json
import ssl

import httpx
import pytest
from support.operator_world import agent

from colo_agent.api.models import API_VERSION_HEADER, Role
from colo_operator.agent_client import WRONG_PEER, AgentClient, AgentError

STATUS = agent(Role.SECONDARY).status
assert STATUS is not None


def client(handler, calls: list[httpx.Request] | None = None) -> AgentClient:
    def record(request: httpx.Request) -> httpx.Response:
        if calls is not None:
            calls.append(request)
        return handler(request)

    return AgentClient(transport=httpx.MockTransport(record), attempts=2)


async def test_status_parsed() -> None:
    c = client(lambda r: httpx.Response(200, text=STATUS.to_json(), headers={API_VERSION_HEADER: "v1"}))
    report = await c.status("10.0.0.1", 8080)
    assert report.status == STATUS and report.error is None


async def test_other_api_version_is_refused_before_reading_the_body() -> None:
    c = client(lambda r: httpx.Response(200, text="{}", headers={API_VERSION_HEADER: "v2"}))
    report = await c.status("10.0.0.1", 8080)
    assert report.status is None and "speaks control API 'v2'" in (report.error or "")
    body = json.dumps({**STATUS.to_dict(), "apiVersion": "v9"})
    c = client(lambda r: httpx.Response(200, text=body))
    assert "v9" in ((await c.status("10.0.0.1", 8080)).error or "")


async def test_malformed_status_is_an_error_not_a_crash() -> None:
    c = client(lambda r: httpx.Response(200, text='{"apiVersion": "v1", "role": 7}'))
    report = await c.status("10.0.0.1", 8080)
    assert report.status is None and "malformed AgentStatus" in (report.error or "")


async def test_refusal_carries_the_agents_message_and_is_not_retried() -> None:
    calls: list[httpx.Request] = []
    error = {"apiVersion": "v1", "error": "term 2 is not above the current term 3", "reason": "StaleTerm"}
    c = client(lambda r: httpx.Response(409, json=error), calls)
    with pytest.raises(AgentError) as raised:
        await c.promote("10.0.0.1", 8080, "token", 2)
    assert raised.value.status == 409 and raised.value.reason == "StaleTerm"
    assert "not above the current term" in str(raised.value)
    assert len(calls) == 1
    assert calls[0].headers["Authorization"] == "Bearer token"
    assert json.loads(calls[0].content) == {"term": 2}


async def test_transport_errors_are_retried_except_for_suspect_agents() -> None:
    calls: list[httpx.Request] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    c = client(refuse, calls)
    report = await c.status("10.0.0.1", 8080)
    assert report.status is None and "ConnectError" in (report.error or "")
    assert len(calls) == 2
    calls.clear()
    await c.status("10.0.0.1", 8080, suspect=True)
    assert len(calls) == 1


async def test_a_long_poll_asks_the_agent_to_wait_and_gives_it_time_to() -> None:
    calls: list[httpx.Request] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    c = client(refuse, calls)
    await c.status("10.0.0.1", 8080, wait_s=10.0, heartbeat_within_ms=500)
    assert len(calls) == 1  # a failed long poll is not retried: the caller decides
    assert dict(calls[0].url.params) == {"waitMs": "10000", "heartbeatWithinMs": "500"}
    # The read timeout covers the wait plus the ordinary timeout.
    assert calls[0].extensions["timeout"]["read"] == 11.0


async def test_ipv6_addresses_are_bracketed() -> None:
    calls: list[httpx.Request] = []
    c = client(lambda r: httpx.Response(200, text=STATUS.to_json()), calls)
    await c.status("fd00::5", 8080)
    assert str(calls[0].url) == "http://[fd00::5]:8080/v1/status"


async def test_a_named_peer_needs_tls_and_an_answer_without_a_checked_name_is_not_believed() -> None:
    """A call that names the VM goes over TLS only; an answer on a connection whose
    certificate was not checked (here: no TLS at all) is refused, not parsed."""
    calls: list[httpx.Request] = []
    ok = lambda r: httpx.Response(200, text=STATUS.to_json())  # noqa: E731
    report = await client(ok, calls).status("10.0.0.1", 8080, peer="spiffe://colo.dev/ns/a/colovm/b")
    assert report.status is None and "no TLS client certificate" in (report.error or "")
    assert calls == []

    ctx = ssl.create_default_context()
    c = AgentClient(transport=httpx.MockTransport(ok), tls=ctx)
    with pytest.raises(AgentError) as refused:
        await c.demote("10.0.0.1", 8080, "token", peer="spiffe://colo.dev/ns/a/colovm/b")
    assert refused.value.reason == WRONG_PEER
    await c.aclose()


async def test_a_renewed_client_context_opens_new_connections_and_closes_the_old_ones() -> None:
    contexts = [ssl.create_default_context()]
    c = AgentClient(tls=lambda: contexts[0], timeout_s=0.01, attempts=1)
    first = c._pool("spiffe://colo.dev/ns/a/colovm/b")
    assert c._pool("spiffe://colo.dev/ns/a/colovm/b") is first
    assert c._pool("spiffe://colo.dev/ns/a/colovm/c") is not first  # one pool per VM name
    contexts[0] = ssl.create_default_context()  # renewed
    second = c._pool("spiffe://colo.dev/ns/a/colovm/b")
    assert second is not first and not first.is_closed  # requests in flight finish
    await c.aclose()
    assert first.is_closed and second.is_closed
