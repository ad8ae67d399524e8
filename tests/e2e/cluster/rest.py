"""A minimal JSON client of the Kubernetes API for the node runner and the harness.

The runner needs a dozen calls and full control over content types (merge
patches of pod status), timeouts and errors; plain urllib with a client
certificate does that without depending on a generated client's surface.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

JSON = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"
_PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}


def direct_opener(context: ssl.SSLContext | None = None) -> urllib.request.OpenerDirector:
    """An opener that ignores *_proxy variables: cluster traffic must never leave the machine."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    return urllib.request.build_opener(*handlers)


def without_proxies(env: dict[str, str]) -> dict[str, str]:
    """``env`` minus proxy settings, for processes the harness starts."""
    return {k: v for k, v in env.items() if k.lower() not in _PROXY_VARIABLES}


class ApiError(RuntimeError):
    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        self.status = status
        self.body = body
        try:
            detail = json.loads(body).get("message", body)
        except (ValueError, AttributeError):
            detail = body
        super().__init__(f"{method} {path}: HTTP {status}: {str(detail)[:300]}")


class Kube:
    def __init__(self, server: str, ca: Path, cert: Path, key: Path) -> None:
        self.server = server.rstrip("/")
        context = ssl.create_default_context(cafile=str(ca))
        context.load_cert_chain(str(cert), str(key))
        self._opener = direct_opener(context)

    @classmethod
    def from_kubeconfig(cls, path: Path) -> Kube:
        """Only what :func:`controlplane.write_kubeconfig` writes: file references, one context."""
        config = yaml.safe_load(path.read_text())
        cluster = config["clusters"][0]["cluster"]
        user = config["users"][0]["user"]
        return cls(
            cluster["server"],
            Path(cluster["certificate-authority"]),
            Path(user["client-certificate"]),
            Path(user["client-key"]),
        )

    def request(
        self,
        method: str,
        path: str,
        body: JSON | None = None,
        *,
        content_type: str = "application/json",
        timeout: float = 5.0,
    ) -> JSON:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.server + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", content_type)
        try:
            with self._opener.open(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise ApiError(method, path, exc.code, exc.read().decode(errors="replace")) from None
        if not raw:
            return {}
        decoded = json.loads(raw)
        return decoded if isinstance(decoded, dict) else {"items": decoded}

    def get(self, path: str, **kw: Any) -> JSON:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: JSON, **kw: Any) -> JSON:
        return self.request("POST", path, body, **kw)

    def put(self, path: str, body: JSON, **kw: Any) -> JSON:
        return self.request("PUT", path, body, **kw)

    def patch(self, path: str, body: JSON, **kw: Any) -> JSON:
        return self.request("PATCH", path, body, content_type=MERGE_PATCH, **kw)

    def delete(self, path: str, body: JSON | None = None, **kw: Any) -> JSON:
        return self.request("DELETE", path, body, **kw)
