"""The Kubernetes arbiter: a `coordination.k8s.io/v1` Lease per VM, through pykube-ng.

How the arbiter's record maps onto the Lease:

- `spec.holderIdentity`: the holder (the agent's pod name); absent or empty
  once released, which lets a taker take it at once (as client-go's leader
  election also reads it).
- `spec.leaseTransitions`: the **term**. It goes up by one at every promotion
  and only then. Not `metadata.generation`: the API server bumps generation at
  every spec change, and each renewal changes `spec.renewTime`, so generation
  counts renewals, not reigns.
- `metadata.resourceVersion`: the record's version. Every write is a PUT
  carrying the resourceVersion it read, so the API server refuses it with 409
  Conflict if anything wrote in between: that is the compare-and-swap.
- `spec.renewTime` / `spec.acquireTime` are written for people and tools
  (`kubectl get lease`) only. Fencing never compares wall clocks across nodes:
  a taker times the lease from when it saw `resourceVersion` change, by its
  own monotonic clock.
- `spec.leaseDurationSeconds` holds the lease rounded up to whole seconds (the
  field is an integer); the exact value in milliseconds is the annotation
  `colo.dev/lease-duration-ms`. A taker waits the longer of its own lease and
  the holder's.

The operator creates the Lease (no holder, `leaseTransitions` 0 or absent) and
reads the term from it; agents create it themselves only if it is missing.

pykube is synchronous: every call runs in a worker thread, one at a time,
bounded by a request timeout. Reads are retried on transport errors (tenacity);
writes are not: a write whose reply was lost may have landed, and the next
compare-and-swap finds out which way it went (`ArbiterUnavailable`: the
outcome is unknown; the base class reads it back and adopts or retries).

The request timeout follows the API server: it starts at what a renewal is
worth (the lease's validity window), doubles after every request that timed
out, up to `MAX_REQUEST_TIMEOUT`, and after an answer is twice the time that
answer took (never below the start). A loaded API server that answers in two
seconds is then waited for, instead of being asked again and again with a
timeout it can never meet.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pykube
import requests
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from colo_agent.arbiter.base import Arbiter, ArbiterError, ArbiterUnavailable, Clock, LeaseRecord
from colo_agent.timeouts import RequestTimeout

DURATION_ANNOTATION = "colo.dev/lease-duration-ms"
# The epoch floor (see `LeaseRecord.floor`): not a Lease field, so an annotation.
FLOOR_ANNOTATION = "colo.dev/epoch-floor"
API_VERSION = "coordination.k8s.io/v1"
# The longest a request is waited for once the API server turned slow (see the module doc).
MAX_REQUEST_TIMEOUT = 10.0


class Lease(pykube.objects.NamespacedAPIObject):
    version = API_VERSION
    endpoint = "leases"
    kind = "Lease"


class _Transient(Exception):
    """A read failed in a way worth retrying (connection refused, timeout, 5xx, 429)."""


def micro_time(epoch_seconds: float) -> str:
    """A Kubernetes MicroTime (RFC 3339, microseconds, UTC)."""
    return datetime.fromtimestamp(epoch_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record_from_lease(obj: Mapping[str, Any]) -> LeaseRecord:
    """Read the arbiter's record out of a Lease object; a malformed Lease is an ArbiterError,
    never "free": reading garbage as free would let a taker skip the wait."""
    metadata = obj.get("metadata")
    spec = obj.get("spec") or {}
    if not isinstance(metadata, Mapping) or not isinstance(spec, Mapping):
        raise ArbiterError("the Lease has no metadata or a spec that is not an object")
    version = metadata.get("resourceVersion")
    if not isinstance(version, str) or not version:
        raise ArbiterError("the Lease has no metadata.resourceVersion")
    term = spec.get("leaseTransitions") or 0
    if not isinstance(term, int) or isinstance(term, bool) or term < 0:
        raise ArbiterError(f"the Lease's spec.leaseTransitions is not a term: {term!r}")
    holder = spec.get("holderIdentity") or None
    if holder is not None and not isinstance(holder, str):
        raise ArbiterError(f"the Lease's spec.holderIdentity is not a string: {holder!r}")
    floor_text = (metadata.get("annotations") or {}).get(FLOOR_ANNOTATION, "0")
    if not isinstance(floor_text, str) or not floor_text.isdigit():
        raise ArbiterError(f"the Lease's {FLOOR_ANNOTATION} annotation is not an epoch: {floor_text!r}")
    return LeaseRecord(term=term, holder=holder, version=version, duration=_advertised_duration(obj),
                       floor=int(floor_text))


def _advertised_duration(obj: Mapping[str, Any]) -> float | None:
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    exact = annotations.get(DURATION_ANNOTATION) if isinstance(annotations, Mapping) else None
    if isinstance(exact, str):
        try:
            ms = float(exact)
        except ValueError:
            ms = math.nan
        if 0 < ms < math.inf:
            return ms / 1000
    seconds = (obj.get("spec") or {}).get("leaseDurationSeconds")
    if isinstance(seconds, int) and not isinstance(seconds, bool) and seconds > 0:
        return float(seconds)
    # Neither says anything usable: the taker's own lease duration applies.
    return None


def lease_body(
    *,
    namespace: str,
    name: str,
    current: Mapping[str, Any] | None,
    term: int,
    holder: str | None,
    duration: float,
    now_wall: float,
    floor: int = 0,
) -> dict[str, Any]:
    """The Lease to PUT (or POST when `current` is None): `current` with the record changed,
    everything else (labels, owner references, other annotations) kept."""
    body: dict[str, Any] = json.loads(json.dumps(current)) if current is not None else {}
    body["apiVersion"] = API_VERSION
    body["kind"] = "Lease"
    metadata = body.setdefault("metadata", {})
    metadata["name"] = name
    metadata["namespace"] = namespace
    annotations = metadata.get("annotations") or {}
    annotations[DURATION_ANNOTATION] = f"{duration * 1000:g}"
    annotations[FLOOR_ANNOTATION] = str(floor)
    metadata["annotations"] = annotations
    spec = body.get("spec") or {}
    previous_term = spec.get("leaseTransitions") or 0
    spec["leaseTransitions"] = term
    spec["leaseDurationSeconds"] = max(1, math.ceil(duration))
    if holder is None:
        spec.pop("holderIdentity", None)
    else:
        spec["holderIdentity"] = holder
        spec["renewTime"] = micro_time(now_wall)
        if term != previous_term or "acquireTime" not in spec:
            spec["acquireTime"] = micro_time(now_wall)
    body["spec"] = spec
    return body


class KubeLeaseArbiter(Arbiter):
    def __init__(
        self,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: float,
        *,
        api: pykube.HTTPClient | None = None,
        request_timeout: float | None = None,
        safety_margin: float | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(identity, lease_duration, safety_margin=safety_margin, clock=clock)
        if not namespace or not name:
            raise ValueError(f"a Lease needs a namespace and a name, got {namespace!r}/{name!r}")
        self.namespace = namespace
        self.name = name
        # A renewal answered after the validity window extends nothing, so the first
        # timeout is that window; it grows while the API server does not meet it.
        base = max(0.2, self.lease_duration - self.safety_margin)
        self.request_timeout = base if request_timeout is None else request_timeout
        self.timeout = RequestTimeout(self.request_timeout, max(MAX_REQUEST_TIMEOUT, self.request_timeout))
        self._api = api
        self._objects: dict[str, Mapping[str, Any]] = {}  # last Lease seen, by resourceVersion
        self._io = asyncio.Lock()

    def __repr__(self) -> str:
        return f"KubeLeaseArbiter({self.namespace}/{self.name}, identity={self.identity!r})"

    async def close(self) -> None:
        if self._api is not None:
            self._api.session.close()

    # ------------------------------------------------------------------ storage primitives

    async def _read(self) -> LeaseRecord | None:
        async with self._io:
            obj = await asyncio.to_thread(self._get_with_retries)
        if obj is None:
            return None
        record = record_from_lease(obj)
        self._objects = {record.version: obj}
        return record

    async def _swap(
        self, expected: LeaseRecord | None, term: int, holder: str | None, floor: int = 0
    ) -> LeaseRecord | None:
        current = None
        if expected is not None:
            current = self._objects.get(expected.version)
            if current is None:
                # We never saw that version's body (e.g. our own write's reply was lost):
                # it cannot be the current one as far as we know.
                return None
        body = lease_body(
            namespace=self.namespace,
            name=self.name,
            current=current,
            term=term,
            holder=holder,
            duration=self.lease_duration,
            now_wall=time.time(),
            floor=floor,
        )
        async with self._io:
            obj = await asyncio.to_thread(self._write, body, create=expected is None)
        if obj is None:
            return None
        record = record_from_lease(obj)
        self._objects = {record.version: obj}
        return record

    # ------------------------------------------------------------------ blocking parts

    def _client(self) -> pykube.HTTPClient:
        if self._api is None:
            try:
                config = pykube.KubeConfig.from_env()
            except Exception as exc:  # pykube raises several kinds for missing/invalid config
                raise ArbiterError(f"no Kubernetes configuration (in-cluster or kubeconfig): {exc}") from exc
            self._api = pykube.HTTPClient(config, timeout=self.request_timeout)
        return self._api

    def _kwargs(self, **extra: Any) -> dict[str, Any]:
        return {
            "version": API_VERSION,
            "namespace": self.namespace,
            "timeout": self.timeout.current,
            **extra,
        }

    @retry(
        retry=retry_if_exception_type(_Transient),
        stop=stop_after_attempt(3),
        wait=wait_exponential(multiplier=0.02, max=0.2),
        reraise=True,
    )
    def _get_once(self) -> dict[str, Any] | None:
        asked = time.monotonic()
        try:
            r = self._client().get(**self._kwargs(url=f"leases/{self.name}"))
        except requests.RequestException as exc:
            _count_failure(self.timeout, exc)
            raise _Transient(f"cannot reach the API server: {exc}") from exc
        self.timeout.answered(time.monotonic() - asked)
        if r.status_code == 404:
            return None
        if r.status_code == 429 or r.status_code >= 500:
            raise _Transient(_describe(r))
        if r.status_code != 200:
            raise ArbiterError(f"reading Lease {self.namespace}/{self.name}: {_describe(r)}")
        return _json_object(r)

    def _get_with_retries(self) -> dict[str, Any] | None:
        try:
            return self._get_once()
        except _Transient as exc:
            raise ArbiterUnavailable(f"reading Lease {self.namespace}/{self.name}: {exc}") from exc

    def _write(self, body: dict[str, Any], *, create: bool) -> dict[str, Any] | None:
        what = "creating" if create else "updating"
        data = json.dumps(body)
        headers = {"Content-Type": "application/json"}
        asked = time.monotonic()
        try:
            if create:
                r = self._client().post(**self._kwargs(url="leases", data=data, headers=headers))
            else:
                r = self._client().put(**self._kwargs(url=f"leases/{self.name}", data=data, headers=headers))
        except requests.RequestException as exc:
            _count_failure(self.timeout, exc)
            raise ArbiterUnavailable(
                f"{what} Lease {self.namespace}/{self.name}: outcome unknown: {exc}"
            ) from exc
        self.timeout.answered(time.monotonic() - asked)
        # 409: resourceVersion moved on, or (create) someone created it first. 404: deleted.
        if r.status_code in (409, 404):
            return None
        if r.status_code == 429 or r.status_code >= 500:
            # Refused or failed on the way (throttled, etcd timeout): also not known to have landed.
            raise ArbiterUnavailable(f"{what} Lease {self.namespace}/{self.name}: {_describe(r)}")
        if r.status_code not in (200, 201):
            raise ArbiterError(f"{what} Lease {self.namespace}/{self.name}: {_describe(r)}")
        return _json_object(r)


def _count_failure(timeout: RequestTimeout, exc: requests.RequestException) -> None:
    """A request that timed out waits longer next time; one refused at once does not."""
    if isinstance(exc, requests.Timeout):
        timeout.timed_out()


def _json_object(r: requests.Response) -> dict[str, Any]:
    try:
        obj = r.json()
    except ValueError as exc:
        raise ArbiterError(f"the API server answered with something that is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ArbiterError("the API server answered with JSON that is not an object")
    return obj


def _describe(r: requests.Response) -> str:
    """The API server's own message (a Status object) when there is one."""
    try:
        payload = r.json()
        message = payload.get("message") if isinstance(payload, dict) else None
    except ValueError:
        message = None
    return f"HTTP {r.status_code}: {message or r.reason}"
