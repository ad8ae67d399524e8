"""The operator's client of the agents' control API (`colo_agent.api.models`, version v1).

Polls are cheap and frequent, so a failed poll is not an exception but an
`AgentReport` saying why (the decision functions weigh an unreachable agent
against the other signals). Commands (promote, checkpoint, demote) raise
`AgentError` with the agent's own message. Transport errors are retried a
few times with tenacity (short, jittered backoff); refusals (4xx) are not.
Every response's API version is checked before anything else is read.

Over TLS every call names the agent it means (`peer`: the SPIFFE URI of
the VM, `colo_agent.api.identity`). The CA proves a certificate was issued
by this cluster; the name proves it was issued to *that* VM. A pod address
proves nothing: a stale status or a reused IP can point the operator at
another VM's agent, and that agent must receive neither the request nor
the bearer token. So the name is checked right after the TLS handshake,
before a byte of the request is written, and connections are pooled per
peer name, so a connection checked for one VM never carries a request
meant for another. The client context is asked for at every call, so a
renewed operator certificate or a new CA bundle is used from the next
connection on.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import httpx
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from colo_agent.api.identity import uri_names
from colo_agent.api.models import (
    API_VERSION_HEADER,
    STATUS_HEARTBEAT_WITHIN_MS,
    STATUS_WAIT_MS,
    SUPPORTED_API_VERSIONS,
    AgentStatus,
    CheckpointResult,
    DemoteResult,
    ErrorResponse,
    ModelError,
    PromoteRequest,
    PromoteResult,
)

from .snapshot import AgentReport

_T = TypeVar("_T", AgentStatus, PromoteResult, CheckpointResult, DemoteResult)

log = logging.getLogger(__name__)

# The operator's client context, asked for at every call (renewal replaces it).
TlsSource = Callable[[], ssl.SSLContext]


# Timeout of a poll of an agent whose node is not Ready.
SUSPECT_TIMEOUT_S = 0.3


class AgentError(RuntimeError):
    """A control request failed; `status` is the HTTP status (0: no answer), `reason` the agent's reason."""

    def __init__(self, message: str, status: int = 0, reason: str = "") -> None:
        self.status = status
        self.reason = reason
        super().__init__(message)


# `AgentError.reason` when the agent's certificate names another VM (or none).
WRONG_PEER = "WrongPeer"


class WrongPeer(Exception):
    """The agent's certificate verified but does not name the VM the operator meant."""

    def __init__(self, expected: str, names: Iterable[str]) -> None:
        who = ", ".join(names) or "a certificate without a URI name"
        super().__init__(f"the agent presented {who}, not {expected}; nothing was sent to it")


def _require(peer: str, ssl_object: object) -> None:
    names = uri_names(ssl_object) if isinstance(ssl_object, (ssl.SSLObject, ssl.SSLSocket)) else ()
    if peer not in names:
        raise WrongPeer(peer, names)


def _name_check(peer: str) -> Callable[[str, dict[str, Any]], Any]:
    """An httpx `trace` hook that refuses a new connection whose certificate does not name `peer`.

    httpcore reports `connection.start_tls.complete` after the handshake and
    before the request is written; raising there aborts the request, so the
    wrong agent receives nothing.
    """

    async def trace(event: str, info: dict[str, Any]) -> None:
        if event != "connection.start_tls.complete":
            return
        stream = info.get("return_value")
        if stream is None:
            return
        try:
            _require(peer, stream.get_extra_info("ssl_object"))
        except WrongPeer:
            await stream.aclose()
            raise

    return trace


def base_url(ip: str, port: int, secure: bool = False) -> str:
    scheme = "https" if secure else "http"
    return f"{scheme}://[{ip}]:{port}" if ":" in ip else f"{scheme}://{ip}:{port}"


class AgentClient:
    def __init__(
        self,
        *,
        timeout_s: float = 1.0,
        attempts: int = 2,
        transport: httpx.AsyncBaseTransport | None = None,
        tls: ssl.SSLContext | TlsSource | None = None,
    ) -> None:
        self._attempts = attempts
        self._timeout_s = timeout_s
        self._transport = transport
        # No proxies from the environment: agents are pod addresses, never behind a proxy.
        self._http = httpx.AsyncClient(timeout=timeout_s, trust_env=False, transport=transport)
        # Over TLS the operator presents its client certificate and trusts only the cluster CA.
        self._tls: TlsSource | None = (lambda: tls) if isinstance(tls, ssl.SSLContext) else tls
        self._context: ssl.SSLContext | None = None
        self._pools: dict[str, httpx.AsyncClient] = {}  # by peer name
        self._retired: list[httpx.AsyncClient] = []  # replaced, closed after a grace period
        self._closing: set[asyncio.Task[None]] = set()

    def _base(self, ip: str, port: int, secure: bool) -> str:
        return base_url(ip, port, secure)

    def _pool(self, peer: str) -> httpx.AsyncClient:
        if self._tls is None:
            raise AgentError(f"cannot reach {peer}: the operator has no TLS client certificate")
        context = self._tls()
        if context is not self._context:
            # A renewed certificate or CA bundle: new connections only; the old pools
            # finish what they carry and are closed once no request can still use them.
            self._retire(list(self._pools.values()))
            self._pools.clear()
            self._context = context
        pool = self._pools.get(peer)
        if pool is None:
            pool = httpx.AsyncClient(
                timeout=self._timeout_s, trust_env=False, transport=self._transport, verify=context
            )
            self._pools[peer] = pool
        return pool

    def _retire(self, pools: list[httpx.AsyncClient]) -> None:
        if not pools:
            return
        self._retired.extend(pools)
        grace = self._timeout_s * (self._attempts + 1) + 1.0

        async def close_later() -> None:
            await asyncio.sleep(grace)
            for pool in pools:
                self._retired.remove(pool)
                await pool.aclose()

        task = asyncio.get_running_loop().create_task(close_later())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def forget(self, peer: str) -> None:
        """Close the connections kept for `peer` (its ColoVM is gone)."""
        pool = self._pools.pop(peer, None)
        if pool is not None:
            await pool.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
        for task in list(self._closing):
            task.cancel()
        for pool in [*self._pools.values(), *self._retired]:
            await pool.aclose()
        self._pools.clear()
        self._retired.clear()

    async def _send(
        self, method: str, url: str, *, peer: str | None, attempts: int | None = None, **kwargs: Any
    ) -> httpx.Response:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(attempts or self._attempts),
            wait=wait_random_exponential(multiplier=0.05, max=0.5),
            retry=retry_if_exception_type(httpx.TransportError),
            reraise=True,
        ):
            with attempt:
                if peer is None:
                    return await self._http.request(method, url, **kwargs)
                extensions = {"trace": _name_check(peer)}
                response = await self._pool(peer).request(method, url, extensions=extensions, **kwargs)
                # Every connection was checked when it was opened; checked again here so
                # that an answer from anyone else is never believed.
                stream = response.extensions.get("network_stream")
                _require(peer, None if stream is None else stream.get_extra_info("ssl_object"))
                return response
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def _call(self, kind: type[_T], method: str, url: str, *, peer: str | None, **kwargs: Any) -> _T:
        try:
            response = await self._send(method, url, peer=peer, **kwargs)
        except httpx.TransportError as exc:
            raise AgentError(f"{method} {url}: {type(exc).__name__}: {exc}".rstrip(": ")) from None
        except WrongPeer as exc:
            log.warning("refused the agent at %s: %s", url, exc)
            raise AgentError(f"{method} {url}: {exc}", 0, WRONG_PEER) from None
        version = response.headers.get(API_VERSION_HEADER)
        if version is not None and version not in SUPPORTED_API_VERSIONS:
            raise AgentError(
                f"{method} {url}: the agent speaks control API {version!r}, the operator "
                f"{', '.join(sorted(SUPPORTED_API_VERSIONS))}; run matching versions",
                response.status_code,
                "VersionMismatch",
            )
        if response.status_code >= 400:
            try:
                error = ErrorResponse.from_json(response.content)
                message, reason = error.error, error.reason
            except ModelError:
                message, reason = response.text[:200] or response.reason_phrase, ""
            raise AgentError(
                f"{method} {url}: {response.status_code} {message}", response.status_code, reason
            )
        try:
            return kind.from_json(response.content)
        except ModelError as exc:
            raise AgentError(
                f"{method} {url}: malformed {kind.__name__}: {exc}", response.status_code
            ) from None

    async def status(
        self,
        ip: str,
        port: int,
        *,
        peer: str | None = None,
        suspect: bool = False,
        wait_s: float = 0.0,
        heartbeat_within_ms: int = 0,
    ) -> AgentReport:
        """Poll one agent: over TLS when `peer` names the VM its certificate must carry,
        in clear without. `suspect`: its node is not Ready, so one short try is
        enough; a dead agent must not hold up the decision for several timeouts.
        `wait_s`: a long poll, answered once the agent's peer is not connected or its
        heartbeat is older than `heartbeat_within_ms`, or after `wait_s`."""
        extra: dict[str, Any] = {"attempts": 1, "timeout": SUSPECT_TIMEOUT_S} if suspect else {}
        if wait_s > 0:
            params = {STATUS_WAIT_MS: round(wait_s * 1000), STATUS_HEARTBEAT_WITHIN_MS: heartbeat_within_ms}
            extra = {"attempts": 1, "timeout": wait_s + self._timeout_s, "params": params}
        try:
            return AgentReport(
                status=await self._call(
                    AgentStatus,
                    "GET",
                    f"{self._base(ip, port, peer is not None)}/v1/status",
                    peer=peer,
                    **extra,
                )
            )
        except AgentError as exc:
            return AgentReport(status=None, error=str(exc))

    async def promote(
        self, ip: str, port: int, token: str, term: int, *, peer: str | None = None
    ) -> PromoteResult:
        return await self._call(
            PromoteResult,
            "POST",
            f"{self._base(ip, port, peer is not None)}/v1/promote",
            peer=peer,
            content=PromoteRequest(term=term).to_json(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )

    async def checkpoint(
        self, ip: str, port: int, token: str, *, peer: str | None = None
    ) -> CheckpointResult:
        return await self._call(
            CheckpointResult,
            "POST",
            f"{self._base(ip, port, peer is not None)}/v1/checkpoint",
            peer=peer,
            headers={"Authorization": f"Bearer {token}"},
        )

    async def demote(self, ip: str, port: int, token: str, *, peer: str | None = None) -> DemoteResult:
        return await self._call(
            DemoteResult,
            "POST",
            f"{self._base(ip, port, peer is not None)}/v1/demote",
            peer=peer,
            headers={"Authorization": f"Bearer {token}"},
        )
