"""The operator's client of the agents' control API (`colo_agent.api.models`, version v1).

Polls are cheap and frequent, so a failed poll is not an exception but an
`AgentReport` saying why (the decision functions weigh an unreachable agent
against the other signals). Commands (promote, checkpoint, demote) raise
`AgentError` with the agent's own message. Transport errors are retried a
few times with tenacity (short, jittered backoff); refusals (4xx) are not.
Every response's API version is checked before anything else is read.
"""

from __future__ import annotations

import ssl
from typing import Any, TypeVar

import httpx
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from colo_agent.api.models import (
    API_VERSION_HEADER,
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


# Timeout of a poll of an agent whose node is not Ready.
SUSPECT_TIMEOUT_S = 0.3


class AgentError(RuntimeError):
    """A control request failed; `status` is the HTTP status (0: no answer), `reason` the agent's reason."""

    def __init__(self, message: str, status: int = 0, reason: str = "") -> None:
        self.status = status
        self.reason = reason
        super().__init__(message)


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
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._attempts = attempts
        # No proxies from the environment: agents are pod addresses, never behind a proxy.
        self._http = httpx.AsyncClient(timeout=timeout_s, trust_env=False, transport=transport)
        # Over TLS the operator presents its client certificate and trusts only the cluster CA.
        self._https = (
            None if tls is None
            else httpx.AsyncClient(timeout=timeout_s, trust_env=False, transport=transport, verify=tls)
        )  # fmt: skip

    def _base(self, ip: str, port: int, secure: bool | None) -> str:
        return base_url(ip, port, self._https is not None if secure is None else secure)

    async def aclose(self) -> None:
        await self._http.aclose()
        if self._https is not None:
            await self._https.aclose()

    async def _send(
        self, method: str, url: str, *, attempts: int | None = None, **kwargs: Any
    ) -> httpx.Response:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(attempts or self._attempts),
            wait=wait_random_exponential(multiplier=0.05, max=0.5),
            retry=retry_if_exception_type(httpx.TransportError),
            reraise=True,
        ):
            with attempt:
                if url.startswith("https:"):
                    if self._https is None:
                        raise AgentError(f"{method} {url}: the operator has no TLS client certificate")
                    return await self._https.request(method, url, **kwargs)
                return await self._http.request(method, url, **kwargs)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def _call(self, kind: type[_T], method: str, url: str, **kwargs: Any) -> _T:
        try:
            response = await self._send(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise AgentError(f"{method} {url}: {type(exc).__name__}: {exc}".rstrip(": ")) from None
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
        self, ip: str, port: int, *, suspect: bool = False, secure: bool | None = None
    ) -> AgentReport:
        """Poll one agent. `suspect`: its node is not Ready, so one short try is
        enough; a dead agent must not hold up the decision for several timeouts."""
        extra: dict[str, Any] = {"attempts": 1, "timeout": SUSPECT_TIMEOUT_S} if suspect else {}
        try:
            return AgentReport(
                status=await self._call(
                    AgentStatus, "GET", f"{self._base(ip, port, secure)}/v1/status", **extra
                )
            )
        except AgentError as exc:
            return AgentReport(status=None, error=str(exc))

    async def promote(
        self, ip: str, port: int, token: str, term: int, *, secure: bool | None = None
    ) -> PromoteResult:
        return await self._call(
            PromoteResult,
            "POST",
            f"{self._base(ip, port, secure)}/v1/promote",
            content=PromoteRequest(term=term).to_json(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )

    async def checkpoint(
        self, ip: str, port: int, token: str, *, secure: bool | None = None
    ) -> CheckpointResult:
        return await self._call(
            CheckpointResult,
            "POST",
            f"{self._base(ip, port, secure)}/v1/checkpoint",
            headers={"Authorization": f"Bearer {token}"},
        )

    async def demote(self, ip: str, port: int, token: str, *, secure: bool | None = None) -> DemoteResult:
        return await self._call(
            DemoteResult,
            "POST",
            f"{self._base(ip, port, secure)}/v1/demote",
            headers={"Authorization": f"Bearer {token}"},
        )
