"""The control API over real HTTP (aiohttp test server on loopback) against a small controller."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from colo_agent.api.metrics import AgentMetrics
from colo_agent.api.models import (
    API_VERSION_HEADER,
    AgentStatus,
    ArbiterConflict,
    CheckpointFigures,
    CheckpointResult,
    DemoteResult,
    ErrorResponse,
    GuestStatus,
    NotReady,
    PeerState,
    PeerStatus,
    PromoteResult,
    ReplicationMode,
    Role,
    WrongRole,
)
from colo_agent.api.server import MAX_BODY_BYTES, bound_port, create_app, serve
from colo_agent.arbiter.local import FileArbiter
from colo_agent.engine.promotion import RoleChanges, arbiter_refusals

SECRET = "s3cret-per-vm-key-0123456789"
AUTH = {"Authorization": f"Bearer {SECRET}"}


class SmallAgent:
    """Just enough of an agent engine: a role, a term, epochs, and a metrics object."""

    def __init__(self, metrics: AgentMetrics, role: Role = Role.SECONDARY, term: int = 1) -> None:
        self.metrics = metrics
        self.role = role
        self.term = term
        self.epoch = 0
        self.releasing = role is Role.PRIMARY
        self.changes = RoleChanges()
        self.synced = True
        self.promotions: list[int] = []
        self.promote_delay = 0.0
        self.peer = PeerStatus(PeerState.CONNECTED, "127.0.0.1:7700", 5.0)

    def status(self) -> AgentStatus:
        return AgentStatus(
            role=self.role,
            term=self.term,
            last_acked_epoch=self.epoch,
            mode=ReplicationMode.CHECKPOINT,
            peer=self.peer,
            guest=GuestStatus("running" if self.role is Role.PRIMARY else "paused", "tcg", 64 << 20),
            totals=self.metrics.totals(),
            synced=self.synced,
        )

    def ready(self) -> bool:
        return self.releasing if self.role is Role.PRIMARY else self.synced

    async def promote(self, term: int) -> PromoteResult:
        # The engine's promote rules (retries, stale terms), as the real agent applies them.
        return await self.changes.promote(lambda: (self.role, self.term), term, lambda: self._promote(term))

    async def _promote(self, term: int) -> PromoteResult:
        if not self.synced:
            raise NotReady("no complete committed image to resume from")
        await asyncio.sleep(self.promote_delay)
        self.promotions.append(term)
        self.role, self.term, self.releasing = Role.PRIMARY, term, True
        resumed, self.epoch = self.epoch, 0
        self.metrics.failed_over()
        self.metrics.set_role(self.role, term)
        return PromoteResult(role=Role.PRIMARY, term=term, resumed_from_epoch=resumed)

    async def checkpoint(self) -> CheckpointResult:
        if self.role is not Role.PRIMARY:
            raise WrongRole("only a primary takes checkpoints")
        self.epoch += 1
        self.metrics.checkpoint_acknowledged(CheckpointFigures(self.epoch, 0.4, 10, 40960, 2.0, "requested"))
        return CheckpointResult(term=self.term, epoch=self.epoch)

    async def demote(self) -> DemoteResult:
        if self.role is not Role.PRIMARY:
            raise WrongRole("only a primary can step down")
        self.releasing = False
        return DemoteResult(role=self.role, term=self.term, releasing=False)


class Bug(SmallAgent):
    async def checkpoint(self) -> CheckpointResult:
        raise RuntimeError("engine bug with a secret detail")


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def agent(registry: CollectorRegistry) -> SmallAgent:
    return SmallAgent(AgentMetrics(registry))


@pytest.fixture
async def client(agent: SmallAgent, registry: CollectorRegistry) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(create_app(agent, SECRET, registry), host="127.0.0.1")) as c:
        yield c


async def error_of(response: ClientResponse, status: int) -> ErrorResponse:
    assert response.status == status, await response.text()
    assert response.headers[API_VERSION_HEADER] == "v1"
    assert response.content_type == "application/json"
    return ErrorResponse.from_json(await response.read())


async def test_status_is_open_and_versioned(client: TestClient, agent: SmallAgent) -> None:
    response = await client.get("/v1/status")
    assert response.status == 200
    assert response.headers[API_VERSION_HEADER] == "v1"
    status = AgentStatus.from_json(await response.read())
    assert status == agent.status()


async def test_a_long_poll_of_status_answers_when_the_peer_is_lost(
    client: TestClient, agent: SmallAgent
) -> None:
    async def lose_peer() -> None:
        await asyncio.sleep(0.2)
        agent.peer = PeerStatus(PeerState.LOST, "127.0.0.1:7700", 600.0)

    losing = asyncio.ensure_future(lose_peer())
    # Far below the 30 s asked for, however loaded the machine.
    response = await asyncio.wait_for(client.get("/v1/status?waitMs=30000&heartbeatWithinMs=500"), 20)
    await losing
    assert response.status == 200
    assert AgentStatus.from_json(await response.read()).peer.state is PeerState.LOST


async def test_a_long_poll_answers_at_once_when_the_heartbeat_is_already_too_old(
    client: TestClient, agent: SmallAgent
) -> None:
    agent.peer = PeerStatus(PeerState.CONNECTED, "127.0.0.1:7700", 900.0)
    response = await asyncio.wait_for(client.get("/v1/status?waitMs=30000&heartbeatWithinMs=500"), 20)
    assert AgentStatus.from_json(await response.read()).peer.last_heartbeat_age_ms == 900.0


async def test_a_long_poll_without_news_answers_after_the_wait(client: TestClient, agent: SmallAgent) -> None:
    response = await client.get("/v1/status?waitMs=100&heartbeatWithinMs=500")
    assert AgentStatus.from_json(await response.read()) == agent.status()


@pytest.mark.parametrize("query", ["waitMs=-1", "waitMs=30001", "waitMs=soon", "heartbeatWithinMs=-5"])
async def test_a_long_poll_with_a_bad_parameter_is_refused(client: TestClient, query: str) -> None:
    error = await error_of(await client.get(f"/v1/status?{query}"), 400)
    assert query.split("=")[0] in error.error


async def test_promote_needs_the_secret(client: TestClient, agent: SmallAgent) -> None:
    response = await client.post("/v1/promote", json={"term": 2})
    error = await error_of(response, 401)
    assert error.reason == "Unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")

    error = await error_of(
        await client.post("/v1/promote", json={"term": 2}, headers={"Authorization": "Basic x"}), 401
    )
    assert "Bearer" in error.error

    wrong = {"Authorization": f"Bearer {SECRET}x"}
    error = await error_of(await client.post("/v1/promote", json={"term": 2}, headers=wrong), 403)
    assert error.reason == "Forbidden"
    # A non-ASCII token is just a wrong token, not a crash.
    wrong = {"Authorization": "Bearer sécret"}
    await error_of(await client.post("/v1/promote", json={"term": 2}, headers=wrong), 403)
    assert agent.role is Role.SECONDARY and agent.promotions == []


async def test_promote_takes_a_higher_term(client: TestClient, agent: SmallAgent) -> None:
    agent.epoch = 17
    response = await client.post("/v1/promote", json={"term": 2}, headers=AUTH)
    assert response.status == 200
    assert PromoteResult.from_json(await response.read()) == PromoteResult(Role.PRIMARY, 2, 17)
    status = AgentStatus.from_json(await (await client.get("/v1/status")).read())
    assert (status.role, status.term, status.totals.failovers) == (Role.PRIMARY, 2, 1)


async def test_promote_retry_of_the_same_term_is_idempotent(client: TestClient, agent: SmallAgent) -> None:
    agent.promote_delay = 0.05
    agent.epoch = 17
    first, second = await asyncio.gather(
        client.post("/v1/promote", json={"term": 5}, headers=AUTH),
        client.post("/v1/promote", json={"term": 5}, headers=AUTH),
    )
    assert (first.status, second.status) == (200, 200)
    assert agent.promotions == [5]  # promoted once
    for response in (first, second):
        # The retry gets the first answer, epoch included.
        assert PromoteResult.from_json(await response.read()) == PromoteResult(Role.PRIMARY, 5, 17)


@pytest.mark.parametrize("term", [0, 1])
async def test_promote_with_a_term_not_above_the_current_one_conflicts(
    client: TestClient, agent: SmallAgent, term: int
) -> None:
    response = await client.post("/v1/promote", json={"term": term}, headers=AUTH)
    if term == 0:
        error = await error_of(response, 400)
        assert "term" in error.error
    else:
        error = await error_of(response, 409)
        assert error.reason == "StaleTerm"
        assert "term 1 is not above the current term 1" in error.error
    assert agent.promotions == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "not valid JSON"),
        (b"{term: 2}", "not valid JSON"),
        (b'{"term": "2"}', "term: expected an integer"),
        (b'{"trem": 2}', "term: is required"),
        (b"[2]", "expected an object"),
        (b"\xff\xff", "not"),
    ],
)
async def test_malformed_promote_bodies_are_400(client: TestClient, body: bytes, message: str) -> None:
    response = await client.post(
        "/v1/promote", data=body, headers={**AUTH, "Content-Type": "application/json"}
    )
    error = await error_of(response, 400)
    assert error.reason == "BadRequest"
    assert message in error.error


async def test_oversized_body_is_refused(client: TestClient) -> None:
    body = b'{"term": 2, "pad": "' + b"x" * (MAX_BODY_BYTES + 10) + b'"}'
    await error_of(await client.post("/v1/promote", data=body, headers=AUTH), 413)


async def test_controller_refusals_map_to_409_and_503(client: TestClient, agent: SmallAgent) -> None:
    error = await error_of(await client.post("/v1/checkpoint", headers=AUTH), 409)
    assert error.reason == "WrongRole"
    await error_of(await client.post("/v1/demote", headers=AUTH), 409)
    agent.synced = False
    error = await error_of(await client.post("/v1/promote", json={"term": 9}, headers=AUTH), 503)
    assert error.reason == "NotReady"


async def test_planned_switchover_sequence(
    client: TestClient, agent: SmallAgent, registry: CollectorRegistry
) -> None:
    agent.role, agent.releasing = Role.PRIMARY, True
    response = await client.post("/v1/checkpoint", headers=AUTH)
    assert CheckpointResult.from_json(await response.read()) == CheckpointResult(term=1, epoch=1)
    assert (await client.get("/readyz")).status == 200
    response = await client.post("/v1/demote", headers=AUTH)
    assert DemoteResult.from_json(await response.read()) == DemoteResult(Role.PRIMARY, 1, releasing=False)
    # Stepped down: no longer serving, so no longer ready.
    await error_of(await client.get("/readyz"), 503)
    assert registry.get_sample_value("colo_checkpoints_total", {"cause": "requested"}) == 1.0


async def test_unknown_path_and_wrong_method(client: TestClient) -> None:
    error = await error_of(await client.get("/v1/nope"), 404)
    assert "/v1/nope" in error.error
    response = await client.get("/v1/promote")
    error = await error_of(response, 405)
    assert "POST" in response.headers["Allow"] and "POST" in error.error
    await error_of(await client.delete("/v1/status"), 405)


async def test_an_engine_bug_is_a_500_without_details(registry: CollectorRegistry) -> None:
    app = create_app(Bug(AgentMetrics(registry), role=Role.PRIMARY), SECRET, registry)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        error = await error_of(await c.post("/v1/checkpoint", headers=AUTH), 500)
        assert "secret detail" not in error.error
        assert (await c.get("/healthz")).status == 200


async def test_health_and_readiness(client: TestClient, agent: SmallAgent) -> None:
    response = await client.get("/healthz")
    assert response.status == 200
    assert json.loads(await response.read())["apiVersion"] == "v1"
    assert (await client.get("/readyz")).status == 200
    agent.synced = False
    error = await error_of(await client.get("/readyz"), 503)
    assert error.reason == "NotReady"


async def test_metrics_exposition(client: TestClient, agent: SmallAgent) -> None:
    agent.metrics.describe(vm="default/db", identity="db-a", mode="checkpoint", accel="tcg")
    agent.metrics.set_peer(up=True, synced=True)
    await client.post("/v1/promote", json={"term": 3}, headers=AUTH)
    for _ in range(2):
        await client.post("/v1/checkpoint", headers=AUTH)
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(await response.text())
        for s in family.samples
    }
    assert samples[("colo_checkpoints_total", (("cause", "requested"),))] == 2
    assert samples[("colo_checkpoint_pages_total", ())] == 20
    assert samples[("colo_checkpoint_bytes_total", ())] == 81920
    assert samples[("colo_checkpoint_pause_seconds_count", ())] == 2
    assert samples[("colo_last_acked_epoch", ())] == 2
    assert samples[("colo_term", ())] == 3
    assert samples[("colo_role", (("colo_role", "primary"),))] == 1
    assert samples[("colo_role", (("colo_role", "secondary"),))] == 0
    assert samples[("colo_failovers_total", ())] == 1
    assert samples[("colo_peer_up", ())] == 1
    info = [k for k in samples if k[0] == "colo_agent_info"]
    assert dict(info[0][1])["vm"] == "default/db"
    # The status document reports the same counts.
    status = AgentStatus.from_json(await (await client.get("/v1/status")).read())
    assert status.totals.checkpoints == 2 and status.totals.checkpoints_by_cause == {"requested": 2}
    assert status.totals.pages == 20 and status.totals.failovers == 1


async def test_openmetrics_is_negotiated(client: TestClient) -> None:
    response = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert (await response.text()).rstrip().endswith("# EOF")


def test_an_empty_token_is_refused(agent: SmallAgent, registry: CollectorRegistry) -> None:
    with pytest.raises(ValueError, match="bearer token"):
        create_app(agent, "", registry)
    with pytest.raises(ValueError, match="bearer token"):
        create_app(agent, b"  ", registry)


class FencedAgent(SmallAgent):
    """Promotes only after taking a real FileArbiter, as the engine does."""

    def __init__(self, metrics: AgentMetrics, arbiter: FileArbiter) -> None:
        super().__init__(metrics)
        self.arbiter = arbiter

    async def promote(self, term: int) -> PromoteResult:
        with arbiter_refusals():
            if not await self.arbiter.wait_acquire(term, timeout=0.05, poll=0.01):
                raise ArbiterConflict(f"the arbiter is still held by {self.arbiter.holder}")
        return await super().promote(term)


@pytest.fixture
async def fenced(tmp_path: Path, registry: CollectorRegistry) -> AsyncIterator[tuple[TestClient, Path]]:
    record = tmp_path / "vm.arbiter"
    agent = FencedAgent(AgentMetrics(registry), FileArbiter(record, "db-b", 30.0))
    async with TestClient(TestServer(create_app(agent, SECRET, registry), host="127.0.0.1")) as c:
        yield c, record


async def test_promotion_refused_by_the_arbiter(fenced: tuple[TestClient, Path]) -> None:
    client, record = fenced
    other = FileArbiter(record, "db-a", 30.0)
    assert await other.acquire(5)
    # The agent only knew term 1; the arbiter knows better.
    error = await error_of(await client.post("/v1/promote", json={"term": 3}, headers=AUTH), 409)
    assert error.reason == "StaleTerm" and "term 3 is not above the arbiter's term 5" in error.error
    # A higher term, but the holder's 30 s lease has not run out.
    error = await error_of(await client.post("/v1/promote", json={"term": 6}, headers=AUTH), 409)
    assert error.reason == "Conflict" and "db-a" in error.error
    # Released: taken at once.
    await other.release()
    response = await client.post("/v1/promote", json={"term": 6}, headers=AUTH)
    assert response.status == 200
    assert json.loads(record.read_text())["holder"] == "db-b"


async def test_an_unusable_arbiter_is_503(fenced: tuple[TestClient, Path]) -> None:
    client, record = fenced
    record.write_text("not a record")
    error = await error_of(await client.post("/v1/promote", json={"term": 2}, headers=AUTH), 503)
    assert error.reason == "Unavailable" and "not a valid arbiter record" in error.error


async def test_serve_on_a_real_port(agent: SmallAgent, registry: CollectorRegistry) -> None:
    runner = await serve(create_app(agent, SECRET, registry), "127.0.0.1", 0)
    try:
        port = bound_port(runner)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = await reader.read()
        writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"X-Colo-Api-Version: v1" in head
        assert AgentStatus.from_json(body).term == agent.term
    finally:
        await runner.cleanup()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
