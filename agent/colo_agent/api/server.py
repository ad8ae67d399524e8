"""The agent's control API over HTTP (aiohttp): what the operator and the kubelet talk to.

Routes (contract in `colo_agent.api.models`):

- `GET /v1/status` -> `AgentStatus`; with `?waitMs=N&heartbeatWithinMs=M` a long
  poll that answers as soon as the peer's heartbeat is gone (`STATUS_WAIT_MS`), so
  the operator hears of a lost primary when the secondary does, not at its next poll
- `POST /v1/promote` (bearer) body `{"term": N}` -> `PromoteResult`
- `POST /v1/checkpoint` (bearer) -> `CheckpointResult`
- `POST /v1/demote` (bearer) -> `DemoteResult`
- `GET /healthz` (the process serves), `GET /readyz` (`AgentController.ready()`)
- `GET /metrics` (Prometheus exposition of the agent's registry)

Every response carries the `X-Colo-Api-Version` header and JSON bodies carry
`apiVersion`; every error is an `ErrorResponse` with a message saying what was
wrong. Reading routes need no token: the kubelet probes them and Prometheus
scrapes them, and they reveal nothing a pod's neighbours could not see.
Routes that change the agent need the per-VM secret as a bearer token.

Over TLS (`serve(..., ssl_context=...)`, on by default in a cluster) the
`/v1/` routes also need the caller's client certificate to name the operator
(`colo_agent.api.identity.OPERATOR_IDENTITY`); probes and scrapes offer no
certificate and reach only the reading routes outside `/v1/`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from colo_agent.api.models import (
    API_VERSION,
    API_VERSION_HEADER,
    MAX_STATUS_WAIT_MS,
    STATUS_HEARTBEAT_WITHIN_MS,
    STATUS_WAIT_MS,
    AgentStatus,
    CheckpointResult,
    ControlError,
    DemoteResult,
    ErrorReason,
    ErrorResponse,
    ModelError,
    PeerState,
    PromoteRequest,
    PromoteResult,
)
from colo_agent.tls import PeerNotAllowed, check_peer

log = logging.getLogger(__name__)

# Control requests are a few bytes; refuse anything large before reading it.
MAX_BODY_BYTES = 16 * 1024
JSON = "application/json"
# How often a long poll of /v1/status looks at the peer again.
STATUS_WATCH_STEP_S = 0.05


class AgentController(Protocol):
    """What the agent engine provides to the control API.

    The engine raises the `ControlError` subclasses of `colo_agent.api.models`
    (`StaleTerm`, `WrongRole`, `ArbiterConflict`, `NotReady`, `Unavailable`)
    to refuse a request; the server turns them into 409/503 responses. Any
    other exception is a bug and becomes a 500.
    """

    def status(self) -> AgentStatus: ...

    def ready(self) -> bool:
        """Primary: serving clients. Secondary: holds a complete committed image."""

    async def promote(self, term: int) -> PromoteResult:
        """Take the arbiter with `term` (strictly above the current one), then become primary;
        the rules (retries, stale terms, the arbiter's refusals) are the engine's
        (`colo_agent.engine.promotion`)."""

    async def checkpoint(self) -> CheckpointResult:
        """Take a checkpoint now and return once the secondary acknowledged it."""

    async def demote(self) -> DemoteResult:
        """Stop releasing output and step down (planned switchover)."""


def _json_response(status: int, body: str) -> web.Response:
    return web.Response(status=status, text=body, content_type=JSON)


def error_response(
    status: int, reason: ErrorReason, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    response = _json_response(status, ErrorResponse(error=message, reason=reason.value).to_json())
    if headers:
        response.headers.update(headers)
    return response


_REASON_BY_STATUS = {
    400: ErrorReason.BAD_REQUEST,
    401: ErrorReason.UNAUTHORIZED,
    403: ErrorReason.FORBIDDEN,
    404: ErrorReason.NOT_FOUND,
    405: ErrorReason.METHOD_NOT_ALLOWED,
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _RequestRefused(Exception):
    """A 4xx decided by the API layer itself (authentication, body size)."""

    def __init__(
        self, status: int, reason: ErrorReason, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.response = error_response(status, reason, message, headers)


@web.middleware
async def _errors_and_version(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every response, errors included, carries the API version and a JSON error body."""
    try:
        response = await handler(request)
    except ControlError as exc:
        response = _json_response(exc.status, exc.to_response().to_json())
    except _RequestRefused as exc:
        response = exc.response
    except web.HTTPException as exc:
        # aiohttp's own refusals: unknown path, wrong method, body over client_max_size.
        if exc.status < 400:
            raise
        reason = _REASON_BY_STATUS.get(exc.status, ErrorReason.BAD_REQUEST)
        if exc.status == 404:
            message = f"no such resource: {request.path}"
        elif exc.status == 405:
            allowed = exc.headers.get("Allow", "")
            message = f"{request.method} is not allowed on {request.path} (allowed: {allowed})"
        elif exc.status == 413:
            message = f"request body larger than {MAX_BODY_BYTES} bytes"
        else:
            message = exc.reason
        if exc.status >= 500:
            reason = ErrorReason.INTERNAL
        response = error_response(exc.status, reason, message)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("control API %s %s failed", request.method, request.path)
        response = error_response(500, ErrorReason.INTERNAL, "internal error; see the agent's log")
    response.headers[API_VERSION_HEADER] = API_VERSION
    return response


def _ms_param(request: web.Request, name: str, cap: int | None) -> int:
    raw = request.query.get(name)
    if raw is None:
        return 0
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0 or (cap is not None and value > cap):
        limit = f"0 to {cap}" if cap is not None else "0 or more"
        raise _RequestRefused(400, ErrorReason.BAD_REQUEST, f"{name} must be {limit} ms, got {raw!r}")
    return value


def _hears_peer(status: AgentStatus, within_ms: int) -> bool:
    """Connected, with a heartbeat no older than `within_ms` (0: any age)."""
    age = status.peer.last_heartbeat_age_ms
    stale = bool(within_ms) and age is not None and age > within_ms
    return status.peer.state is PeerState.CONNECTED and not stale


class _ControlApi:
    def __init__(
        self, controller: AgentController, token: bytes, peers: frozenset[str] = frozenset()
    ) -> None:
        self._controller = controller
        self._token = token
        self._peers = peers

    def _check_peer(self, request: web.Request) -> None:
        """Over TLS, only a caller whose certificate names an admitted peer (the operator)."""
        if not self._peers:
            return
        transport = request.transport
        tls = transport.get_extra_info("ssl_object") if transport is not None else None
        if not isinstance(tls, ssl.SSLObject):
            raise _RequestRefused(
                403, ErrorReason.FORBIDDEN, "this route needs TLS with a client certificate"
            )
        if tls.getpeercert() is None:
            raise _RequestRefused(
                403, ErrorReason.FORBIDDEN, "this route needs the operator's client certificate"
            )
        try:
            check_peer(tls, self._peers)
        except PeerNotAllowed as exc:
            raise _RequestRefused(403, ErrorReason.FORBIDDEN, str(exc)) from exc

    def _authorize(self, request: web.Request) -> None:
        self._check_peer(request)
        header = request.headers.get("Authorization")
        challenge = {"WWW-Authenticate": 'Bearer realm="colo-agent"'}
        if header is None:
            raise _RequestRefused(
                401, ErrorReason.UNAUTHORIZED, "missing Authorization: Bearer <secret>", challenge
            )
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise _RequestRefused(
                401, ErrorReason.UNAUTHORIZED, "Authorization must be 'Bearer <secret>'", challenge
            )
        # aiohttp decodes header bytes as UTF-8 with surrogateescape; this gives the bytes back.
        candidate = presented.strip().encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(candidate, self._token):
            raise _RequestRefused(403, ErrorReason.FORBIDDEN, "bearer token does not match this VM's secret")

    async def _body(self, request: web.Request) -> bytes:
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise _RequestRefused(
                413, ErrorReason.BAD_REQUEST, f"request body larger than {MAX_BODY_BYTES} bytes"
            )
        return await request.read()

    async def status(self, request: web.Request) -> web.Response:
        self._check_peer(request)
        wait_ms = _ms_param(request, STATUS_WAIT_MS, MAX_STATUS_WAIT_MS)
        within_ms = _ms_param(request, STATUS_HEARTBEAT_WITHIN_MS, None)
        status = self._controller.status()
        if wait_ms:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait_ms / 1000
            while _hears_peer(status, within_ms) and (left := deadline - loop.time()) > 0:
                await asyncio.sleep(min(STATUS_WATCH_STEP_S, left))
                status = self._controller.status()
        return _json_response(200, status.to_json())

    async def promote(self, request: web.Request) -> web.Response:
        self._authorize(request)
        try:
            wanted = PromoteRequest.from_json(await self._body(request))
        except ModelError as exc:
            return error_response(400, ErrorReason.BAD_REQUEST, f"promote body: {exc}")
        # Shielded: a client that gives up must not leave a promotion half done.
        result = await asyncio.shield(self._controller.promote(wanted.term))
        return _json_response(200, result.to_json())

    async def checkpoint(self, request: web.Request) -> web.Response:
        self._authorize(request)
        await self._body(request)  # no parameters; read so the connection can be reused
        result = await asyncio.shield(self._controller.checkpoint())
        return _json_response(200, result.to_json())

    async def demote(self, request: web.Request) -> web.Response:
        self._authorize(request)
        await self._body(request)
        result = await asyncio.shield(self._controller.demote())
        return _json_response(200, result.to_json())

    async def healthz(self, request: web.Request) -> web.Response:
        return _json_response(200, f'{{"apiVersion":"{API_VERSION}","status":"ok"}}')

    async def readyz(self, request: web.Request) -> web.Response:
        if self._controller.ready():
            return _json_response(200, f'{{"apiVersion":"{API_VERSION}","status":"ready"}}')
        return error_response(503, ErrorReason.NOT_READY, "not ready: not serving (primary) or not synced")


def create_app(
    controller: AgentController,
    token: str | bytes,
    registry: CollectorRegistry,
    *,
    peers: frozenset[str] = frozenset(),
) -> web.Application:
    """The control API application. `token` is the per-VM secret the mutating routes require;
    `peers`, when served over TLS, the certificate names admitted to the `/v1/` routes."""
    secret = token.encode() if isinstance(token, str) else bytes(token)
    if not secret.strip():
        raise ValueError("the control API needs a non-empty bearer token (the per-VM secret)")
    api = _ControlApi(controller, secret, peers)

    async def metrics(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        # Exposition walks every collector; off the event loop it cannot delay heartbeats.
        payload = await asyncio.to_thread(encoder, registry)
        response = web.Response(body=payload)
        response.headers["Content-Type"] = content_type
        return response

    app = web.Application(middlewares=[_errors_and_version], client_max_size=MAX_BODY_BYTES)
    app.router.add_get("/v1/status", api.status)
    app.router.add_post("/v1/promote", api.promote)
    app.router.add_post("/v1/checkpoint", api.checkpoint)
    app.router.add_post("/v1/demote", api.demote)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def serve(
    app: web.Application, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None
) -> web.AppRunner:
    """Listen on `host:port` (port 0: any free port; see `bound_port`). Stop with `runner.cleanup()`.

    No access log: the kubelet probes and Prometheus scrapes would drown the agent's own log.
    """
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=ssl_context)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port a runner from `serve` listens on."""
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    raise RuntimeError("the control API is not listening on a TCP port")
