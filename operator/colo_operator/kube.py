"""The one module that talks to the Kubernetes API.

Requests go through the `kubernetes` client's configuration, authentication
and connection pool (`ApiClient.param_serialize`/`call_api`), in worker
threads (`asyncio.to_thread`), and come back as the plain JSON the API server
sent, which the snapshot views parse: the operator never depends on the
client's generated models. Nothing connects at import time: `Kube.connect`
loads in-cluster configuration or a kubeconfig when the operator starts.

The request timeout follows the API server (`RequestTimeout`): 10 s at first,
doubled after a request that timed out (up to the API server's own 60 s),
twice the last answer's time after an answer. A fixed 10 s livelocked a
loaded API server: a Service create that needed 12 s was abandoned, its
handler cancelled with it, and asked again, forever.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import kubernetes
import urllib3

from colo_agent.timeouts import RequestTimeout

from . import constants as c
from .manifests import Names

JSON = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"


class KubeError(RuntimeError):
    """An API request failed; `status` is the HTTP status (0 when no response came)."""

    def __init__(self, what: str, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(f"{what}: {status or 'no response'} {reason}".strip())


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> JSON:
    """RFC 7386 merge patch turning `old` into `new`: removed keys become null, nested objects recurse."""
    patch: JSON = {}
    for key in old:
        if key not in new:
            patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            inner = merge_patch(before, value)
            if inner:
                patch[key] = inner
        elif key not in old or value != before:
            patch[key] = value
    return patch


# Collection paths of the kinds the operator creates, by kind.
_PATHS = {
    "Pod": "/api/v1/namespaces/{ns}/pods",
    "Service": "/api/v1/namespaces/{ns}/services",
    "Secret": "/api/v1/namespaces/{ns}/secrets",
    "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
    "Lease": "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases",
    "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
    "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
    "PodDisruptionBudget": "/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets",
    "NetworkPolicy": "/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies",
    "Certificate": "/apis/cert-manager.io/v1/namespaces/{ns}/certificates",
    c.KIND: f"/apis/{c.GROUP}/{c.VERSION}/namespaces/{{ns}}/{c.PLURAL}",
}


def _path(kind: str, namespace: str, name: str | None = None) -> str:
    base = _PATHS[kind].format(ns=quote(namespace, safe=""))
    return base if name is None else f"{base}/{quote(name, safe='')}"


# The API server's own default --request-timeout: waiting longer is pointless.
MAX_REQUEST_TIMEOUT_S = 60.0


class Kube:
    def __init__(self, api: kubernetes.client.ApiClient, timeout_s: float = 10.0) -> None:
        self.api = api
        self.timeout = RequestTimeout(timeout_s, max(timeout_s, MAX_REQUEST_TIMEOUT_S))

    @classmethod
    def connect(cls, kubeconfig: str | None = None, pool_size: int = 32, context: str | None = None) -> Kube:
        """In-cluster configuration inside a pod (unless a kubeconfig or context is given), else the
        kubeconfig, at `context` or its current one."""
        configuration = kubernetes.client.Configuration()
        if kubeconfig is None and context is None:
            try:
                kubernetes.config.load_incluster_config(client_configuration=configuration)
            except kubernetes.config.ConfigException:
                kubernetes.config.load_kube_config(client_configuration=configuration)
        else:
            kubernetes.config.load_kube_config(
                config_file=kubeconfig, context=context, client_configuration=configuration
            )
        # Many ColoVMs are reconciled concurrently from worker threads; a small pool would serialise them.
        configuration.connection_pool_maxsize = pool_size
        return cls(kubernetes.client.ApiClient(configuration))

    def close(self) -> None:
        self.api.close()

    def _request_sync(
        self, method: str, path: str, query: list[tuple[str, str]] | None, body: Any, content_type: str | None
    ) -> tuple[int, bytes]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        method, url, headers, body, _ = self.api.param_serialize(
            method, path, query_params=query, header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        asked = time.monotonic()
        try:
            response = self.api.call_api(
                method, url, header_params=headers, body=body, _request_timeout=self.timeout.current
            )
        except (urllib3.exceptions.TimeoutError, urllib3.exceptions.MaxRetryError) as exc:
            # urllib3 retries a read that timed out, then raises MaxRetryError with the timeout as reason.
            if isinstance(getattr(exc, "reason", exc), urllib3.exceptions.TimeoutError):
                self.timeout.timed_out()
            raise
        self.timeout.answered(time.monotonic() - asked)
        return int(response.status), bytes(response.read() or b"")

    async def request(
        self,
        what: str,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str | None = None,
        missing_ok: bool = False,
    ) -> JSON | None:
        try:
            status, data = await asyncio.to_thread(
                self._request_sync, method, path, query, body, content_type
            )
        except kubernetes.client.ApiException as exc:
            raise KubeError(what, exc.status or 0, str(exc.reason)) from None
        except Exception as exc:  # urllib3 and socket errors: no response at all
            raise KubeError(what, 0, f"{type(exc).__name__}: {exc}") from None
        if status == 404 and missing_ok:
            return None
        try:
            document = json.loads(data) if data else {}
        except ValueError:
            document = {"message": data[:200].decode(errors="replace")}
        if status >= 400:
            message = document.get("message") if isinstance(document, dict) else None
            raise KubeError(what, status, str(message or "error"))
        return document if isinstance(document, dict) else {}

    # ----------------------------------------------------------------- reads

    async def get(self, kind: str, namespace: str, name: str) -> JSON | None:
        return await self.request(
            f"get {kind} {namespace}/{name}", "GET", _path(kind, namespace, name), missing_ok=True
        )

    async def get_vm(self, namespace: str, name: str) -> JSON | None:
        return await self.get(c.KIND, namespace, name)

    async def list_vms(self, namespace: str | None = None) -> list[JSON]:
        """ColoVMs of `namespace`, or of every namespace."""
        path = _path(c.KIND, namespace) if namespace else f"/apis/{c.GROUP}/{c.VERSION}/{c.PLURAL}"
        document = await self.request(f"list {c.PLURAL} in {namespace or 'all namespaces'}", "GET", path)
        return list((document or {}).get("items") or [])

    async def list_pods(self, namespace: str, vm: str) -> list[JSON]:
        selector = f"{c.LABEL_VM}={vm},{c.LABEL_MANAGED_BY}={c.MANAGED_BY}"
        document = await self.request(
            f"list pods of {namespace}/{vm}",
            "GET",
            _path("Pod", namespace),
            query=[("labelSelector", selector)],
        )
        return list((document or {}).get("items") or [])

    async def list_nodes(self) -> list[JSON]:
        document = await self.request("list nodes", "GET", "/api/v1/nodes")
        return list((document or {}).get("items") or [])

    async def get_lease(self, namespace: str, name: str) -> JSON | None:
        return await self.get("Lease", namespace, name)

    async def get_secret_value(self, namespace: str, name: str, key: str) -> bytes | None:
        document = await self.get("Secret", namespace, name)
        encoded = ((document or {}).get("data") or {}).get(key)
        return base64.b64decode(encoded) if isinstance(encoded, str) else None

    # ----------------------------------------------------------------- writes

    async def create(self, obj: Mapping[str, Any]) -> bool:
        """Create `obj`; False if it exists already (creating is how the operator ensures)."""
        meta = obj["metadata"]
        try:
            await self.request(
                f"create {obj['kind']} {meta['namespace']}/{meta['name']}",
                "POST",
                _path(obj["kind"], meta["namespace"]),
                body=dict(obj),
            )
        except KubeError as exc:
            if exc.status == 409:
                return False
            raise
        return True

    async def patch(
        self,
        kind: str,
        namespace: str,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str = "",
        missing_ok: bool = False,
    ) -> JSON | None:
        path = _path(kind, namespace, name) + (f"/{subresource}" if subresource else "")
        return await self.request(
            f"patch {kind} {namespace}/{name}{'/' + subresource if subresource else ''}",
            "PATCH",
            path,
            body=dict(patch),
            content_type=MERGE_PATCH,
            missing_ok=missing_ok,
        )

    async def delete(self, kind: str, namespace: str, name: str, *, grace_seconds: int | None = None) -> None:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds  # type: ignore[assignment]
        await self.request(
            f"delete {kind} {namespace}/{name}",
            "DELETE",
            _path(kind, namespace, name),
            body=body,
            missing_ok=True,
        )

    async def delete_pod(self, namespace: str, name: str, *, force: bool) -> None:
        await self.delete("Pod", namespace, name, grace_seconds=0 if force else None)

    async def label_pod(self, namespace: str, name: str, role: str) -> None:
        await self.patch("Pod", namespace, name, {"metadata": {"labels": {c.LABEL_ROLE: role}}})

    async def patch_vm_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        await self.patch(
            c.KIND, namespace, name, {"status": dict(patch)}, subresource="status", missing_ok=True
        )

    async def annotate_vm(self, namespace: str, name: str, key: str, value: str) -> JSON | None:
        return await self.patch(c.KIND, namespace, name, {"metadata": {"annotations": {key: value}}})

    async def delete_vm_objects(self, namespace: str, vm: str) -> int:
        """Delete everything the operator made for `vm`; returns how many agent pods still exist.

        The pods go first and the rest only once they are gone: an agent that is
        still shutting down must keep its Lease access and key until it exits.
        """
        names = Names(vm)
        pods = await self.list_pods(namespace, vm)
        for pod in pods:
            if pod.get("metadata", {}).get("deletionTimestamp") is None:
                await self.delete_pod(namespace, pod["metadata"]["name"], force=False)
        if pods:
            return len(await self.list_pods(namespace, vm))
        for kind, name in (
            ("Service", names.service),
            ("PodDisruptionBudget", names.pdb),
            ("Lease", names.lease),
            ("RoleBinding", names.role),
            ("Role", names.role),
            ("ServiceAccount", names.service_account),
            ("Secret", names.secret),
            ("NetworkPolicy", names.network_policy),
            ("Secret", names.tls_secret),
        ):
            await self.delete(kind, namespace, name)
        return 0
