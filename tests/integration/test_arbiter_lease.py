"""KubeLeaseArbiter against a real kube-apiserver (etcd + kube-apiserver on loopback).

The API server is the `kube_apiserver` fixture of `tests/conftest.py` (the e2e
harness's `ControlPlane` without controllers); it skips with the reason when the
binaries are not built (`bash .ci/e2e-tools`). Assertions are about order and outcome,
never speed: the compare-and-swap is the API server's, timings are ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pykube
import pytest
import yaml
from cluster import ControlPlane
from support.proxy import CuttableProxy

from colo_agent.arbiter.base import ArbiterError, LeaseRecord, TermTooLow
from colo_agent.arbiter.lease import DURATION_ANNOTATION, KubeLeaseArbiter, Lease

NAMESPACE = "default"
# Long enough that a loaded machine's scheduling hiccups do not look like a lost holder.
LEASE = 2.0


@pytest.fixture
def api(kube_apiserver: ControlPlane) -> Iterator[pykube.HTTPClient]:
    client = pykube.HTTPClient(pykube.KubeConfig.from_file(str(kube_apiserver.kubeconfig)))
    yield client
    client.session.close()


@pytest.fixture
def lease_name() -> str:
    return f"vm-{uuid.uuid4().hex[:8]}"


class Traced(KubeLeaseArbiter):
    """Records the start of every successful write, to check fencing order afterwards."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writes: list[tuple[float, LeaseRecord]] = []

    async def _swap(
        self, expected: LeaseRecord | None, term: int, holder: str | None, floor: int = 0
    ) -> LeaseRecord | None:
        start = time.monotonic()
        written = await super()._swap(expected, term, holder, floor)
        if written is not None:
            self.writes.append((start, written))
        return written


@pytest.fixture
async def arbiters(api: pykube.HTTPClient, lease_name: str) -> AsyncIterator[list[Traced]]:
    made: list[Traced] = []
    yield made
    for arbiter in made:
        await arbiter.close()


def make(
    made: list[Traced], kube_apiserver: ControlPlane, name: str, identity: str, duration: float = LEASE
) -> Traced:
    client = pykube.HTTPClient(pykube.KubeConfig.from_file(str(kube_apiserver.kubeconfig)))
    # A generous request timeout: on a busy machine a slow answer is not a lost API server.
    arbiter = Traced(NAMESPACE, name, identity, duration, api=client, request_timeout=5.0)
    made.append(arbiter)
    return arbiter


def create_lease(api: pykube.HTTPClient, name: str) -> Lease:
    """What the operator does: a Lease with no holder and no term yet."""
    obj = Lease(api, {"metadata": {"name": name, "namespace": NAMESPACE, "labels": {"colo.dev/vm": name}}})
    obj.create()
    return obj


def server_lease(api: pykube.HTTPClient, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = Lease.objects(api, namespace=NAMESPACE).get_by_name(name).obj
    return obj


async def test_take_renew_and_hand_over_on_a_real_lease(
    api: pykube.HTTPClient, kube_apiserver: ControlPlane, arbiters: list[Traced], lease_name: str
) -> None:
    create_lease(api, lease_name)
    a = make(arbiters, kube_apiserver, lease_name, "db-a")
    b = make(arbiters, kube_apiserver, lease_name, "db-b")
    assert await a.acquire(1)
    spec = server_lease(api, lease_name)["spec"]
    assert (spec["holderIdentity"], spec["leaseTransitions"], spec["leaseDurationSeconds"]) == ("db-a", 1, 2)
    assert "renewTime" in spec and "acquireTime" in spec

    await b.observe()
    async def keep_renewed() -> None:
        # The agent's renewal loop, without the rest of the agent.
        while True:
            await a.renew()
            await asyncio.sleep(a.renew_interval)

    renewing = asyncio.create_task(keep_renewed())
    try:
        # While a renews, b cannot take over, however long it waits.
        assert not await b.wait_acquire(2, timeout=2 * LEASE, poll=0.05)
        assert a.is_valid()
    finally:
        renewing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewing
    # a is cut off from the API server (it stops renewing); b takes over after the lease.
    assert await b.wait_acquire(2, timeout=10 * LEASE, poll=0.05)
    taken_at, taken = b.writes[-1]
    assert taken.term == 2
    for write_start, _ in a.writes:
        assert taken_at >= write_start + LEASE
    assert taken_at > a.valid_until  # a had stopped before b started
    spec = server_lease(api, lease_name)["spec"]
    assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("db-b", 2)

    # a comes back: its renewal is refused by the API server (409), for good.
    assert not await a.renew()
    assert not a.holding and a.term == 2 and a.holder == "db-b"
    with pytest.raises(TermTooLow):
        await a.acquire(2)


async def test_release_hands_over_without_waiting(
    api: pykube.HTTPClient, kube_apiserver: ControlPlane, arbiters: list[Traced], lease_name: str
) -> None:
    create_lease(api, lease_name)
    a = make(arbiters, kube_apiserver, lease_name, "db-a", duration=30.0)
    b = make(arbiters, kube_apiserver, lease_name, "db-b", duration=30.0)
    assert await a.acquire(1)
    await a.release()
    assert not a.is_valid()
    spec = server_lease(api, lease_name)["spec"]
    assert "holderIdentity" not in spec and spec["leaseTransitions"] == 1
    assert await b.acquire(2)  # a 30 s lease, taken at once


async def test_of_racing_takers_one_wins(
    api: pykube.HTTPClient, kube_apiserver: ControlPlane, arbiters: list[Traced], lease_name: str
) -> None:
    create_lease(api, lease_name)
    racers = [make(arbiters, kube_apiserver, lease_name, f"db-{n}", duration=30.0) for n in range(3)]
    for term in range(1, 6):
        for r in racers:
            await r.observe()
        outcomes = await asyncio.gather(*(r.acquire(term) for r in racers), return_exceptions=True)
        winners = [r for r, won in zip(racers, outcomes, strict=True) if won is True]
        assert len(winners) == 1, outcomes
        assert all(won is True or won is False or isinstance(won, TermTooLow) for won in outcomes)
        assert server_lease(api, lease_name)["spec"]["holderIdentity"] == winners[0].identity
        await winners[0].release()


async def test_a_missing_lease_is_created_by_the_first_taker(
    api: pykube.HTTPClient, kube_apiserver: ControlPlane, arbiters: list[Traced], lease_name: str
) -> None:
    a = make(arbiters, kube_apiserver, lease_name, "db-a", duration=1.5)
    assert await a.observe() is None
    assert await a.acquire(1)
    obj = server_lease(api, lease_name)
    assert obj["spec"]["holderIdentity"] == "db-a"
    assert obj["metadata"]["annotations"][DURATION_ANNOTATION] == "1500"
    assert obj["spec"]["leaseDurationSeconds"] == 2


async def test_renewal_survives_an_edit_of_other_fields(
    api: pykube.HTTPClient, kube_apiserver: ControlPlane, arbiters: list[Traced], lease_name: str
) -> None:
    create_lease(api, lease_name)
    a = make(arbiters, kube_apiserver, lease_name, "db-a")
    assert await a.acquire(1)
    obj = Lease.objects(api, namespace=NAMESPACE).get_by_name(lease_name)
    obj.patch({"metadata": {"labels": {"colo.dev/edited": "yes"}}})
    assert await a.renew()
    assert a.holding
    assert server_lease(api, lease_name)["metadata"]["labels"]["colo.dev/edited"] == "yes"


async def test_a_taker_honours_a_longer_lease_advertised_by_the_holder(
    api: pykube.HTTPClient, kube_apiserver: ControlPlane, arbiters: list[Traced], lease_name: str
) -> None:
    create_lease(api, lease_name)
    a = make(arbiters, kube_apiserver, lease_name, "db-a", duration=3.0)
    b = make(arbiters, kube_apiserver, lease_name, "db-b", duration=0.5)
    assert await a.acquire(1)
    record = await b.observe()
    assert record is not None and record.duration == 3.0
    assert b.acquirable_at() >= a.writes[-1][0] + 3.0


async def test_without_rbac_the_error_names_the_refusal(
    api: pykube.HTTPClient, kube_apiserver: ControlPlane, lease_name: str
) -> None:
    pair = kube_apiserver.ca.issue("nobody", "nobody")
    kubeconfig = kube_apiserver.client_kubeconfig("nobody", pair, "nobody")
    client = pykube.HTTPClient(pykube.KubeConfig.from_file(str(kubeconfig)))
    arbiter = KubeLeaseArbiter(NAMESPACE, lease_name, "db-a", LEASE, api=client)
    try:
        with pytest.raises(ArbiterError, match="HTTP 403"):
            await arbiter.acquire(1)
    finally:
        await arbiter.close()


async def test_an_unreachable_api_server_fails_renewals_without_losing_the_term(
    api: pykube.HTTPClient, kube_apiserver: ControlPlane, arbiters: list[Traced], lease_name: str
) -> None:
    create_lease(api, lease_name)
    a = make(arbiters, kube_apiserver, lease_name, "db-a")
    assert await a.acquire(1)
    deadline = a.valid_until
    # Point a at a port where nothing listens, as if the API server vanished.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"https://127.0.0.1:{s.getsockname()[1]}"
    real_url = a._client().url
    a._client().url = dead
    assert not await a.renew()
    assert a.holding and a.valid_until == deadline
    a._client().url = real_url
    assert await a.renew()


@pytest.fixture
def slow_api(kube_apiserver: ControlPlane, tmp_path: Path) -> Iterator[tuple[CuttableProxy, Path]]:
    """A kubeconfig that reaches the API server through a proxy that can slow its answers."""
    port = int(kube_apiserver.server.rsplit(":", 1)[1])
    proxy = CuttableProxy("127.0.0.1", port)
    config = yaml.safe_load(kube_apiserver.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
    path = tmp_path / "slow.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    try:
        yield proxy, path
    finally:
        proxy.close()


async def test_a_fresh_primary_takes_its_term_through_a_slow_api_server(
    api: pykube.HTTPClient, slow_api: tuple[CuttableProxy, Path], arbiters: list[Traced], lease_name: str
) -> None:
    # Every answer comes after the first request timeout (the validity window, 0.8 s at a
    # 1 s lease): writes land and their replies are lost. An agent starting so used to exit
    # ("outcome unknown"). Order and outcome only: the machine may be far slower still.
    proxy, kubeconfig = slow_api
    create_lease(api, lease_name)
    proxy.reply_delay = 1.2
    client = pykube.HTTPClient(pykube.KubeConfig.from_file(str(kubeconfig)))
    a = Traced(NAMESPACE, lease_name, "db-a", 1.0, api=client)
    arbiters.append(a)
    assert await a.take_next_term(patience=3.0, retry=0.1) == 1
    spec = server_lease(api, lease_name)["spec"]
    assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("db-a", 1)
    assert a.timeout.current > 1.2  # it follows the server: twice an answer's time, or doubled
    # Renewals through the slow server keep the record ours (whether or not each reply
    # arrives in time), and once it is quick again they succeed.
    for _ in range(3):
        await a.renew()
    proxy.reply_delay = 0.0
    deadline = time.monotonic() + 60
    while not await a.renew():
        assert a.holding, "a renewal through a slow API server lost the term"
        assert time.monotonic() < deadline, "no renewal succeeded within 60 s of the API server recovering"
        await asyncio.sleep(0.1)
    spec = server_lease(api, lease_name)["spec"]
    assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("db-a", 1)
